"""The VAE: loading it (``load_vae``), decoding samples to pixels, and images encoded by it as training reads
them (DiT's route, ``train.py --data-path IMAGES --vae NAME``).

A loader worker reads an item as (the ADM centre crop of the image in [-1, 1], mirrored when its flip
coin says so; the posterior noise ``eps``; the label); the training process encodes the batch on its
device, ``z = mu + eps * sigma`` with the encoder's posterior mean and std, and normalises ``z`` per
channel. That is exactly what prepare_latents.py stores and data.LatentDataset draws, in the same order
from the same per-item seed (``eps`` first, then the coin; the mirrored image's posterior when it
falls), so a step sees the same latents from either route, and sampling and FID decode a run of either
kind with ``vae.decode(z * std_c + mean_c)``.

The per-channel statistics ``mean_c``, ``std_c`` are those of prepare_latents.py's ``stats.pt`` (the
mixture statistics of the posteriors, data.mixture_stats), estimated once when the run starts from the
unmirrored posteriors of a fixed subset: all images, or ``VAE_STATS_MAX_IMAGES`` (1,000) evenly spaced
ones of a larger set, whose per-channel estimates are within about a percent of the whole set's (1,000
images x H x W positions each). The run records them (config.json, ``data.stats``) and a resumed run reuses
them instead of estimating again, so its latents are the ones the interrupted run trained on.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from tqdm import tqdm

from data.base import BaseDataset, DatasetError, check_labels, flip_coin
from data.latents import DEFAULT_VAE, LATENT_SCALE
from data.stats import denormalize, mixture_stats, normalize, spaced_subset

# diffusers' default (a low-memory load) needs `accelerate`, not a dependency here; without it diffusers loads
# the ordinary way after a five-line notice at every load. Asking for the ordinary way is the same, silently.
QUIET_LOAD = {"low_cpu_mem_usage": False}


def load_vae(vae_name_or_path: str, device: str | torch.device = "cpu"):
    """``diffusers.AutoencoderKL`` from a local folder (``save_pretrained``) or a hub name, in eval mode.

    Hub names are looked up in the local cache first (no network); only then online. Any failure becomes a
    one-line :class:`DatasetError`.
    """
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise DatasetError("decoding latents needs diffusers; install it with `pip install diffusers`") from e
    name = str(vae_name_or_path)
    local = os.path.expanduser(name)
    looks_local = os.path.isabs(local) or name.startswith((".", "~")) or os.path.exists(local)
    try:
        if looks_local:
            if not os.path.isdir(local):
                raise DatasetError(f"VAE folder not found: {name}; pass (--vae) a folder written by "
                                   f"AutoencoderKL.save_pretrained or a hub name such as {DEFAULT_VAE}")
            vae = AutoencoderKL.from_pretrained(local, **QUIET_LOAD)
        else:
            try:
                vae = AutoencoderKL.from_pretrained(name, local_files_only=True, **QUIET_LOAD)
            except Exception:  # noqa: BLE001 - not cached: try the hub (fails fast offline)
                vae = AutoencoderKL.from_pretrained(name, **QUIET_LOAD)
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DatasetError(f"cannot load VAE {name!r} ({type(e).__name__}: {msg}); its weights are not in the "
                           f"local Hugging Face cache and this machine may be offline: pass a local folder saved "
                           f"with AutoencoderKL.save_pretrained, or fill the cache (HF_HUB_OFFLINE=1 fails fast)") from e
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def decode_latents(vae, z_normalised: torch.Tensor, stats: dict) -> torch.Tensor:
    """Denormalise with the dataset stats, then ``vae.decode(z).sample`` -> pixels (about [-1, 1], unclamped).

    Latents are stored raw (reference format, no 0.18215 factor), so there is no ``/ 0.18215`` here.
    """
    p = next(vae.parameters())
    z = denormalize(z_normalised.to(p.device, torch.float32), stats)
    return vae.decode(z.to(p.dtype)).sample.float()


def decode_samples(x: torch.Tensor, info: dict, vae=None) -> torch.Tensor:
    """Model-space samples -> pixels in about [-1, 1], given a ``describe()`` dict.

    Pixel sets are denormalised; latent sets are decoded with ``vae`` (loaded from ``info["vae"]`` if None).
    """
    if info.get("kind") == "latent":
        if vae is None:
            vae = load_vae(info.get("vae") or DEFAULT_VAE, x.device)
        return decode_latents(vae, x, info["stats"])
    return denormalize(x.float(), info["stats"])


VAE_STATS_MAX_IMAGES = 1_000
ENCODE_BATCH = 32  # images per encoder call when estimating the statistics


def resolve_vae_name(name: str) -> str:
    """A local VAE folder as its absolute path (what runs and latent folders record); a hub name as given."""
    local = os.path.expanduser(str(name))
    return os.path.abspath(local) if os.path.isdir(local) else str(name)


@torch.no_grad()
def encode_posterior(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's posterior ``(mean, std)`` (float32, on the VAE's device) of images in [-1, 1]; raw, with
    no 0.18215 factor (the reference format)."""
    p = next(vae.parameters())
    dist = vae.encode(pixels.to(p.device, p.dtype)).latent_dist
    return dist.mean.float(), dist.std.float()


class VAELatentDataset(BaseDataset):
    """An image source (data.folders.FolderSource, data.hf.HFSource) in a VAE's latent space, encoded on the fly.

    ``loader_item`` is what a loader worker reads (pixels, eps, label); ``model_batch`` encodes a batch of
    them on the VAE's device; ``dataset[idx]`` is one item encoded alone (the magnitude probe, tests).
    The VAE stays in the training process: workers get the dataset without it. ``recorded`` is the data
    record (``describe()``) of the run being resumed: its statistics are used instead of new estimates.
    """

    kind = "latent"

    def __init__(self, source, image_size: int | None, vae: str, device: str | torch.device = "cpu", *,
                 num_classes: int | None = None, random_flip: bool = False, recorded: dict | None = None,
                 max_stats_images: int = VAE_STATS_MAX_IMAGES):
        if image_size is None:
            raise DatasetError(f"encoding {source.where} with a VAE needs an image size; pass --image-size "
                               f"(e.g. 128, the paper's, for 16 x 16 latents with the SD VAE)")
        self.source, self.image_size, self.random_flip = source, int(image_size), random_flip
        self.data_path, self.name = source.data_path, source.name
        self.labels, self.class_names = source.labels, source.class_names
        if num_classes is None and self.class_names:
            num_classes = len(self.class_names)
        self.num_classes = check_labels(self.labels, num_classes, source.where)  # before the VAE loads
        self.vae = resolve_vae_name(vae)
        self._vae = load_vae(self.vae, device)
        first_mean, _ = encode_posterior(self._vae, source.pixels(0, self.image_size)[None])
        self.latent_shape = tuple(first_mean.shape[1:])
        self.channels, self.resolution = self.latent_shape[0], self.latent_shape[-1]
        if recorded is None:
            stats = self._estimate_stats(max_stats_images)
            self.stats_num_images = int(len(spaced_subset(len(source), max_stats_images)))
        else:
            stats, self.stats_num_images = recorded["stats"], recorded.get("stats_num_images")
        if len(stats["mean"]) != self.channels or len(stats["std"]) != self.channels:
            raise DatasetError(f"the recorded latent statistics have {len(stats['mean'])} channels, the VAE "
                               f"{self.vae} {self.channels}; resume with the VAE the run was made with")
        self.stats = {"mean": [float(v) for v in stats["mean"]], "std": [float(v) for v in stats["std"]]}

    def _estimate_stats(self, max_images: int) -> dict[str, list[float]]:
        idx = spaced_subset(len(self.source), max_images)
        means, stds = [], []
        for start in tqdm(range(0, len(idx), ENCODE_BATCH), desc="latent statistics", unit="batch",
                          dynamic_ncols=True, disable=len(idx) <= ENCODE_BATCH):
            x = torch.stack([self.source.pixels(int(i), self.image_size) for i in idx[start:start + ENCODE_BATCH]])
            mu, sd = encode_posterior(self._vae, x)
            means.append(mu.cpu())
            stds.append(sd.cpu())
        st = mixture_stats(torch.cat(means), torch.cat(stds))
        return {"mean": st["mean"].tolist(), "std": st["std"].tolist()}

    def __getstate__(self):  # loader workers read images; the VAE stays with the training process
        return {k: v for k, v in self.__dict__.items() if k != "_vae"}

    def loader_item(self, idx: int):
        eps = torch.randn(self.latent_shape)  # first the posterior sample, then the flip coin (as LatentDataset)
        x = self.source.pixels(idx, self.image_size)
        if flip_coin(self.random_flip):
            x = x.flip(-1)
        return x, eps, self.labels[idx]

    @torch.no_grad()
    def model_batch(self, batch, device) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, eps, y = batch
        mu, sd = encode_posterior(self._vae, pixels)
        z = mu + eps.to(mu.device) * sd
        return normalize(z, self.stats).to(device, non_blocking=True), y.to(device, non_blocking=True)

    def __getitem__(self, idx: int):
        pixels, eps, y = self.loader_item(idx)
        x, _ = self.model_batch((pixels[None], eps[None], y[None]), "cpu")
        return x[0], y

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(image_size=self.image_size, encoding="on the fly", stats_num_images=self.stats_num_images,
                 latent_scale=LATENT_SCALE)
        return d
