"""Latent folders in the reference (map-dit) format, written by prepare_latents.py (the format: data/__init__.py)."""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from data.base import BaseDataset, DatasetError, check_labels, flip_coin
from data.stats import mixture_stats

LATENT_FILES = ("posterior_means.pt", "posterior_stds.pt", "labels.pt", "stats.pt")
LATENT_SCALE = "raw posterior (decode: vae.decode(z * std + mean), no 0.18215)"  # recorded in describe()
LATENT_FLIP_FILES = ("posterior_means_flip.pt", "posterior_stds_flip.pt")  # the mirrored images' posteriors
DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"  # what the reference encodes ImageNet with
# Written by prepare_latents.py before its first file lands in a latent folder and removed after its last:
# a folder that still holds it was interrupted half-way and is refused by every reader.
LATENT_INCOMPLETE = "INCOMPLETE"


class LatentDataset(BaseDataset):
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
        _check_folder(path)
        self.means, self.stds, self.labels = _load_posteriors(path)
        self.means_flip = self.stds_flip = None
        if random_flip:
            self.means_flip, self.stds_flip = self._load_flipped(path)
        meta = _read_meta(path)
        names = meta.get("class_names")
        if num_classes is None and isinstance(names, list) and names:
            num_classes = len(names)
        self.num_classes = check_labels(self.labels, num_classes, f"latent folder {path} (labels.pt)")
        self.class_names = names if isinstance(names, list) and len(names) == self.num_classes else None
        self.channels, self.resolution = int(self.means.shape[1]), int(self.means.shape[-1])
        self.image_size = meta.get("image_size")
        self.vae = meta.get("vae") or DEFAULT_VAE
        self.stats = self._channel_stats(path)
        self._mean = torch.tensor(self.stats["mean"], dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(self.stats["std"], dtype=torch.float32).view(-1, 1, 1)

    def _channel_stats(self, path: str) -> dict[str, list[float]]:
        """The per-channel statistics of stats.pt, checked; the mixture statistics of the posteriors when the
        folder has no stats.pt."""
        if os.path.isfile(os.path.join(path, "stats.pt")):
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
        return {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}

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


def _check_folder(path: str) -> None:
    """A latent folder that exists, is complete (no INCOMPLETE marker) and holds the three posterior files."""
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


def _load_posteriors(path: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(means, stds, int64 labels) of a latent folder, checked: shapes (square N x C x H x W, equal), 1-D
    integer labels, equal lengths, finite values (found now, not as a "non-finite loss" blamed on the
    learning rate, nor by the first training step)."""
    means = _load_tensor(path, "posterior_means.pt")
    stds = _load_tensor(path, "posterior_stds.pt")
    labels = _load_tensor(path, "labels.pt")
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels)
    for fn, t in (("posterior_means.pt", means), ("posterior_stds.pt", stds)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise DatasetError(f"latent folder {path}: {fn} must hold an N x C x H x W tensor, "
                               f"got {_shape_str(t)}; re-run prepare_latents.py")
    if means.shape[-1] != means.shape[-2]:
        raise DatasetError(f"latent folder {path}: posterior_means.pt holds latents of {means.shape[-2]} x "
                           f"{means.shape[-1]}; the model takes square latents: re-run prepare_latents.py")
    if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
        raise DatasetError(f"latent folder {path}: labels.pt must hold a 1-D integer tensor, got "
                           f"{labels.dtype} {tuple(labels.shape)}")
    for fn, t in (("posterior_means.pt", means), ("posterior_stds.pt", stds)):
        bad = _first_non_finite(t)
        if bad is not None:
            raise DatasetError(f"latent folder {path}: {fn} holds non-finite values (NaN or inf, first in "
                               f"item {bad}); the data are damaged: re-run prepare_latents.py")
    n_mu, n_sd, n_y = means.shape[0], stds.shape[0], labels.shape[0]
    if not n_mu == n_sd == n_y:
        raise DatasetError(f"latent folder {path}: mismatched lengths, posterior_means.pt has {n_mu} items, "
                           f"posterior_stds.pt {n_sd}, labels.pt {n_y}; re-run prepare_latents.py")
    if means.shape != stds.shape:
        raise DatasetError(f"latent folder {path}: posterior_means.pt {tuple(means.shape)} and "
                           f"posterior_stds.pt {tuple(stds.shape)} differ in shape")
    return means, stds, labels.to(torch.int64)
