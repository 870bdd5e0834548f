"""ImageFolders (``ROOT/<class>/<images>``): the image source, and the pixel dataset that reads any source."""
from __future__ import annotations

import os
from typing import Any

import torch

from data.base import BaseDataset, DatasetError, check_labels, flip_coin
from data.images import load_image, open_image, scan_image_folder
from data.stats import PIXEL_STATS_MAX_IMAGES, spaced_subset


class FolderSource:
    """The images of an ImageFolder (``ROOT/<class>/<images>``, classes sorted), read one at a time.

    An image source is what the pixel and the on-the-fly VAE datasets and prepare_latents.py read: its
    ``labels`` (int64), ``class_names``, ``name``/``data_path``/``where`` (for records and messages), and
    ``pixels(idx, image_size)``, the ADM centre crop of image ``idx`` in [-1, 1] (data.hf.HFSource is the
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


class ImageFolderDataset(BaseDataset):
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
        self.num_classes = check_labels(self.labels, num_classes, self.source.where)
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

