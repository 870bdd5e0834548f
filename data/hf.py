"""Hugging Face datasets as an image source: a hub name (the paper's data route,
``benjamin-paine/imagenet-1k-128x128``) or a local copy (a ``save_to_disk`` folder, or any folder that
``datasets.load_dataset`` reads).

``HFSource`` offers what data.folders.FolderSource offers (labels, class names, ``pixels(idx, image_size)``), so
the pixel and the on-the-fly VAE datasets and prepare_latents.py read either. The split and the image
and label columns are chosen by name (``--split``, ``--image-column``, ``--label-column``); all three
are checked when the source opens, before any image is decoded or any VAE loaded, and a wrong one is
one :class:`data.DatasetError` naming what exists. A folder saved from a single ``Dataset`` (not a
``DatasetDict``) has no splits: it is used whole.
"""
from __future__ import annotations

import os
import re

import numpy as np
import torch

from PIL import Image

from data.base import DatasetError
from data.images import image_tensor, too_large

HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name


# The options that pick the part of a Hugging Face dataset to read: name -> (default, help), the same in
# every command line (train.py's TrainConfig takes them from here too).
OPTIONS = {"split": ("train", "split of a Hugging Face dataset (default train)"),
           "image_column": ("image", "image column of a Hugging Face dataset (default image)"),
           "label_column": ("label", "label column of a Hugging Face dataset (default label)")}


def add_arguments(p) -> None:
    """The flags that pick the part of a Hugging Face dataset to read."""
    for name, (default, help) in OPTIONS.items():
        p.add_argument("--" + name.replace("_", "-"), default=default, help=help)


def is_hf_folder(path: str) -> bool:
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return os.path.isfile(os.path.join(path, "dataset_dict.json")) or (
        os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "dataset_info.json")))


def looks_like_hub_name(spec: str) -> bool:
    return bool(HUB_NAME.match(spec)) and not spec.startswith((".", "~"))


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def open_hf_dataset(spec: str, split: str):
    """The ``datasets.Dataset`` of split ``split`` of ``spec`` (a local path or a hub name)."""
    try:
        import datasets
    except ImportError as e:
        raise DatasetError("Hugging Face datasets need the datasets package; `pip install datasets`") from e
    path = os.path.abspath(os.path.expanduser(spec))
    if os.path.isdir(path) and is_hf_folder(path):
        try:
            loaded = datasets.load_from_disk(path)
        except Exception as e:  # noqa: BLE001 - a damaged folder becomes one line
            raise DatasetError(f"cannot read the Hugging Face dataset folder {path} ({_first_line(e)}); "
                               f"write it again with save_to_disk") from e
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DatasetError(f"Hugging Face dataset {path} has no split {split!r}; pass --split with one of: "
                                   f"{', '.join(loaded)}")
            loaded = loaded[split]
        return loaded
    where = path if os.path.exists(path) else spec
    try:
        return datasets.load_dataset(where, split=split)
    except ValueError as e:
        if "split" in str(e).lower():  # 'Unknown split "x". Should be one of [...]'
            raise DatasetError(f"Hugging Face dataset {where}: {_first_line(e)}; pass --split with one of them") from e
        raise DatasetError(f"cannot load the Hugging Face dataset {where} ({_first_line(e)})") from e
    except Exception as e:  # noqa: BLE001 - offline, unknown name, no access: one line
        raise DatasetError(f"cannot load the Hugging Face dataset {where!r} ({type(e).__name__}: {_first_line(e)}); "
                           f"it is no local path, and the hub (or its local cache) did not provide it: pass a "
                           f"folder written by save_to_disk, or a hub name this machine can reach") from e


class HFSource:
    """Image ``idx`` of a Hugging Face dataset: column ``image_column`` (an ``Image`` feature), its label
    from ``label_column`` (a ``ClassLabel``, whose names become the class names, or integers)."""

    def __init__(self, spec: str, split: str = "train", image_column: str = "image", label_column: str = "label"):
        import datasets
        ds = open_hf_dataset(spec, split)
        local = os.path.abspath(os.path.expanduser(spec))
        self.data_path = local if os.path.exists(local) else spec
        self.name = f"hf:{self.data_path}"
        self.where = f"Hugging Face dataset {self.data_path} (split {split})"
        features = ds.features
        images = [c for c, f in features.items() if isinstance(f, datasets.Image)]
        if image_column not in features:
            raise DatasetError(f"{self.where} has no column {image_column!r} (columns: {', '.join(features)}); pass "
                               f"--image-column NAME" + (f" (image columns: {', '.join(images)})" if images else ""))
        if not isinstance(features[image_column], datasets.Image):
            raise DatasetError(f"column {image_column!r} of {self.where} holds {features[image_column]}, not images; "
                               f"pass --image-column with an image column"
                               + (f" ({', '.join(images)})" if images else " (it has none)"))
        if label_column not in features:
            raise DatasetError(f"{self.where} has no column {label_column!r} (columns: {', '.join(features)}); pass "
                               f"--label-column NAME, the column of integer class labels")
        label = features[label_column]
        is_int = isinstance(label, datasets.ClassLabel) or (
            isinstance(label, datasets.Value) and re.fullmatch(r"u?int\d+", label.dtype or ""))
        if not is_int:
            raise DatasetError(f"column {label_column!r} of {self.where} holds {label}, not integer class labels; "
                               f"pass --label-column with a ClassLabel or integer column")
        if len(ds) == 0:
            raise DatasetError(f"{self.where} has no rows")
        self.class_names = list(label.names) if isinstance(label, datasets.ClassLabel) else None
        labels = ds.select_columns([label_column]).with_format("numpy")[:][label_column]
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.image_column = image_column
        self._images = ds.select_columns([image_column])  # reads (and decodes) only that column

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def pixels(self, idx: int, image_size: int) -> torch.Tensor:
        try:
            image = self._images[int(idx)][self.image_column]
            if image is None:
                raise ValueError("no image in this row")
            return image_tensor(image, image_size)
        except Image.DecompressionBombError:
            raise DatasetError(f"cannot read row {idx} of {self.where}: {too_large(None)}") from None
        except (OSError, ValueError) as e:
            raise DatasetError(f"cannot read row {idx} of {self.where}: {e}; fix or drop that row") from e
