"""Encode an ImageFolder into a latent folder in the reference (map-dit) format.

    python prepare_latents.py --data-path IMAGEFOLDER --out LATENT_DIR [--image-size 128]
        [--vae stabilityai/sd-vae-ft-mse] [--batch-size 64] [--device auto]

ImageFolder (ROOT/<class>/<images>, classes sorted) -> RGB -> ADM centre crop to --image-size -> [-1, 1]
-> ``AutoencoderKL.encode(x).latent_dist`` -> writes, each atomically (temp file then ``os.replace``):

* ``posterior_means.pt``, ``posterior_stds.pt``: float32 N x C x H x W, the raw posterior mean / std
  (no 0.18215 factor, exactly as the reference's ``download_data.py``);
* ``labels.pt``: int64 N;
* ``stats.pt``: ``{"mean": tensor[C], "std": tensor[C]}``, the mixture statistics
  ``mean_c = E[mu]``, ``var_c = E[sigma^2] + E[(mu - mean_c)^2]``;
* ``meta.json``: VAE name (or absolute path), image size, class names, counts.

``--random-flip`` mirrors each image with probability 1/2 before encoding, as the reference did (off by
default). Errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch
from torch.utils.data import DataLoader, Dataset

from atomic import atomic_path, torch_save_file
from data import (DEFAULT_VAE, LATENT_FILES, DatasetError, load_image, load_vae, mixture_stats,
                      scan_image_folder)


class _Pixels(Dataset):
    def __init__(self, samples, image_size: int, random_flip: bool, seed: int):
        self.samples, self.image_size, self.random_flip, self.seed = samples, image_size, random_flip, seed

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, idx):
        path, label = self.samples[idx]
        try:
            x = load_image(path, self.image_size)
        except (OSError, ValueError) as e:
            raise DatasetError(f"cannot read image {path}: {e}; remove or replace the file") from e
        if self.random_flip:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + idx)
            if torch.rand((), generator=g) < 0.5:
                x = x.flip(-1)
        return x, label


def _device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise DatasetError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DatasetError(f"device {name} requested but CUDA is not available; use --device cpu or auto")
    return dev


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Encode an ImageFolder into MaP-DiT / map-dit latent files.")
    p.add_argument("--data-path", required=True, help="ImageFolder root: ROOT/<class>/<images>")
    p.add_argument("--out", required=True, help="output folder for posterior_means.pt, posterior_stds.pt, "
                                                "labels.pt, stats.pt, meta.json")
    p.add_argument("--image-size", type=int, default=128, help="centre-crop size in pixels (default 128)")
    p.add_argument("--vae", default=DEFAULT_VAE, help=f"AutoencoderKL hub name or local folder (default {DEFAULT_VAE})")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for image decoding")
    p.add_argument("--random-flip", action="store_true", help="mirror each image with p=0.5 (the reference did)")
    p.add_argument("--seed", type=int, default=0, help="seed for --random-flip")
    p.add_argument("--overwrite", action="store_true", help="replace latent files already in --out")
    return p.parse_args(argv)


def run(args) -> dict:
    if args.image_size <= 0:
        raise DatasetError(f"--image-size must be positive, got {args.image_size}")
    if args.batch_size <= 0:
        raise DatasetError(f"--batch-size must be positive, got {args.batch_size}")
    if os.path.isdir(args.data_path) and not os.listdir(args.data_path):
        raise DatasetError(f"image folder {args.data_path} is empty; put images in ROOT/<class>/ sub-folders")
    samples, class_names = scan_image_folder(args.data_path)
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise DatasetError(f"--out {out} is a file; pass a folder")
    existing = [fn for fn in LATENT_FILES if os.path.exists(os.path.join(out, fn))]
    if existing and not args.overwrite:
        raise DatasetError(f"{out} already holds {', '.join(existing)}; pass --overwrite to replace them")
    device = _device(args.device)
    vae_name = args.vae
    local = os.path.expanduser(vae_name)
    if os.path.isdir(local):
        vae_name = os.path.abspath(local)
    vae = load_vae(vae_name, device)
    dtype = next(vae.parameters()).dtype

    from tqdm import tqdm

    loader = DataLoader(_Pixels(samples, args.image_size, args.random_flip, args.seed), batch_size=args.batch_size,
                        shuffle=False, num_workers=args.num_workers, pin_memory=device.type == "cuda")
    n = len(samples)
    means = stds = None
    labels = torch.empty(n, dtype=torch.int64)
    i = 0
    with torch.no_grad():
        for x, y in tqdm(loader, desc="encoding images", unit="batch", dynamic_ncols=True):
            dist = vae.encode(x.to(device, dtype)).latent_dist
            mu, sd = dist.mean.float().cpu(), dist.std.float().cpu()
            if means is None:
                means = torch.empty((n,) + tuple(mu.shape[1:]), dtype=torch.float32)
                stds = torch.empty_like(means)
            b = mu.shape[0]
            means[i:i + b], stds[i:i + b], labels[i:i + b] = mu, sd, y
            i += b
    stats = mixture_stats(means, stds)
    meta = {
        "format": "map-dit-latents",
        "version": 1,
        "vae": vae_name,
        "image_size": int(args.image_size),
        "random_flip": bool(args.random_flip),
        "num_images": n,
        "latent_shape": list(means.shape[1:]),
        "scaling": "raw posterior mean/std (no 0.18215 factor); decode vae.decode(z * std + mean)",
        "source": os.path.abspath(args.data_path),
        "class_names": class_names,
    }
    os.makedirs(out, exist_ok=True)
    items = [
        ("posterior_means.pt", means, False),
        ("posterior_stds.pt", stds, False),
        ("labels.pt", labels, False),
        ("stats.pt", {"mean": stats["mean"], "std": stats["std"]}, False),
        ("meta.json", meta, True),
    ]
    # All five files or none: each is written to a temporary file, and all are renamed at the end, in list
    # order (the stack renames the last entered first), meta.json last.
    with contextlib.ExitStack() as stack:
        for fn, obj, is_json in reversed(items):
            tmp = stack.enter_context(atomic_path(os.path.join(out, fn)))
            if is_json:
                with open(tmp, "w") as f:
                    f.write(json.dumps(obj, indent=2) + "\n")
            else:
                torch_save_file(obj, tmp)
    return {"out": out, "num_images": n, "latent_shape": list(means.shape[1:]),
            "stats": {k: [float(v) for v in t] for k, t in stats.items()}}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        info = run(args)
    except (DatasetError, OSError) as e:  # OSError: unreadable images, a full disk
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {info['num_images']} latents of shape {'x'.join(map(str, info['latent_shape']))} to {info['out']} "
          f"(mean {[round(v, 4) for v in info['stats']['mean']]}, std {[round(v, 4) for v in info['stats']['std']]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
