"""What every dataset of data/ shares: the error type, the dataset base class with its record
(``describe()``), the label check and the per-item flip coin."""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset


class DatasetError(ValueError):
    """A dataset/VAE problem with a one-line message that names the problem and the fix."""


class BaseDataset(Dataset):
    """A dataset of data/: ``(x, label)`` items, and ``describe()``, the record a run saves."""

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


def check_labels(labels: torch.Tensor, num_classes: int | None, where: str) -> int:
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

