"""Reading images: the pixel cap, opening, RGB conversion, the ADM centre crop, and walking an ImageFolder."""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from data.base import DatasetError

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
