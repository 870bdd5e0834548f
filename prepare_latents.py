"""Encode images (an ImageFolder or a Hugging Face dataset) into a latent folder in the reference (map-dit) format.

    python prepare_latents.py --data-path IMAGES --out LATENT_DIR [--image-size 128]
        [--vae stabilityai/sd-vae-ft-mse] [--random-flip] [--batch-size 64] [--device auto]
        [--split train] [--image-column image] [--label-column label]

IMAGES is an ImageFolder (ROOT/<class>/<images>, classes sorted) or a Hugging Face dataset: a hub name (the
paper's ``benjamin-paine/imagenet-1k-128x128``), ``hf:NAME``, or a folder written by ``save_to_disk``; its split
and image and label columns are chosen by ``--split``, ``--image-column``, ``--label-column``.

Each image -> RGB -> ADM centre crop to --image-size -> [-1, 1] -> ``AutoencoderKL.encode(x).latent_dist``
-> writes, each atomically (temp file then ``os.replace``), all or none:

* ``posterior_means.pt``, ``posterior_stds.pt``: float32 N x C x H x W, the raw posterior mean / std
  (no 0.18215 factor, exactly as the reference's ``download_data.py``);
* with ``--random-flip``, also ``posterior_means_flip.pt``, ``posterior_stds_flip.pt``: the posteriors of the
  mirrored images (as LightningDiT stores ``latents_flip``), from which ``train.py --random-flip`` picks per item
  with the step's seed (the reference instead mirrored each image with p=1/2 here, once for all epochs);
* ``labels.pt``: int64 N;
* ``stats.pt``: ``{"mean": tensor[C], "std": tensor[C]}``, the mixture statistics
  ``mean_c = E[mu]``, ``var_c = E[sigma^2] + E[(mu - mean_c)^2]`` of the unmirrored posteriors (so a folder
  trains the same with or without the mirrored files; on-the-fly encoding estimates the same numbers);
* ``meta.json``: VAE name (or absolute path), image size, class names, counts, whether mirrored files exist.

Errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import limits
from atomic import (LinkError, atomic_path, atomic_write_text, check_output_dir, interruptible, refuse_links,
                    remove_stale_temporaries_of, torch_save_file)
from cli import Parser
import data.hf
from data import (DEFAULT_VAE, LATENT_FILES, LATENT_FLIP_FILES, LATENT_INCOMPLETE, DatasetError, FolderSource,
                  encode_posterior, load_vae, mixture_stats, open_image_source, resolve_vae_name,
                  set_max_image_pixels)


class _Pixels(Dataset):
    """Image ``idx`` of the source, centre-cropped, and (with ``flips``) its mirror too."""

    def __init__(self, source, image_size: int, flips: bool):
        self.source, self.image_size, self.flips = source, image_size, flips

    def __len__(self):
        return len(self.source)

    def __getitem__(self, idx):
        x = self.source.pixels(idx, self.image_size)
        return (torch.stack([x, x.flip(-1)]) if self.flips else x[None]), self.source.labels[idx]


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
    p = Parser(description="Encode images into MaP-DiT / map-dit latent files.")
    p.add_argument("--data-path", required=True,
                   help="ImageFolder root (ROOT/<class>/<images>) or Hugging Face dataset (save_to_disk folder, hub "
                        "name such as benjamin-paine/imagenet-1k-128x128, or hf:NAME)")
    p.add_argument("--out", required=True, help="output folder for posterior_means.pt, posterior_stds.pt, "
                                                "labels.pt, stats.pt, meta.json")
    p.add_argument("--image-size", type=int, default=128, help="centre-crop size in pixels (default 128)")
    p.add_argument("--vae", default=DEFAULT_VAE, help=f"AutoencoderKL hub name or local folder (default {DEFAULT_VAE})")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for image decoding")
    p.add_argument("--random-flip", action="store_true",
                   help="also store the posteriors of the mirrored images (posterior_*_flip.pt) for train.py "
                        "--random-flip; twice the encoding time and the disk")
    data.hf.add_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="replace latent files already in --out")
    p.add_argument("--max-image-pixels", type=int, default=None, metavar="N",
                   help="refuse images whose header claims more pixels (default: PIL's 89,478,485)")
    return p.parse_args(argv)


def open_source(args):
    """The images to encode (data.FolderSource or data.HFSource), checked before the VAE loads."""
    source = open_image_source(args.data_path, split=args.split, image_column=args.image_column,
                               label_column=args.label_column)
    if source is None:
        raise DatasetError(f"{args.data_path} is a latent folder already; pass the images to encode")
    return source


def run(args) -> dict:
    set_max_image_pixels(args.max_image_pixels)
    if args.image_size <= 0:
        raise DatasetError(f"--image-size must be positive, got {args.image_size}")
    if args.batch_size <= 0:
        raise DatasetError(f"--batch-size must be positive, got {args.batch_size}")
    views = 2 if args.random_flip else 1  # the image, and its mirror
    limits.check_fits(4 * 3 * args.image_size ** 2 * args.batch_size * views,
                      f"a batch of {args.batch_size} images of {args.image_size}x{args.image_size}",
                      "pass a smaller --batch-size or --image-size", DatasetError)
    source = open_source(args)
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise DatasetError(f"--out {out} is a file; pass a folder")
    names = LATENT_FILES + (LATENT_FLIP_FILES if args.random_flip else ())
    existing = [fn for fn in names + (LATENT_INCOMPLETE,) if os.path.lexists(os.path.join(out, fn))]
    if existing and not args.overwrite:
        raise DatasetError(f"{out} already holds {', '.join(existing)}; pass --overwrite to replace them")
    if os.path.isdir(out):
        try:  # written by replacing (never through a link), but a linked file would mislead whoever reads it
            refuse_links(out, [*names, "meta.json", LATENT_INCOMPLETE])
        except LinkError as e:
            raise DatasetError(str(e)) from None
    check_output_dir(out, "--out")
    if isinstance(source, FolderSource):
        source.check_headers()  # a file that is no image is found now, not at 75 % of the encoding
    device = _device(args.device)
    vae_name = resolve_vae_name(args.vae)
    vae = load_vae(vae_name, device)

    loader = DataLoader(_Pixels(source, args.image_size, args.random_flip), batch_size=args.batch_size,
                        shuffle=False, num_workers=args.num_workers, pin_memory=device.type == "cuda")
    n = len(source)
    means = stds = None
    labels = torch.empty(n, dtype=torch.int64)
    i = 0
    for x, y in tqdm(loader, desc="encoding images", unit="batch", dynamic_ncols=True):
        b = x.shape[0]
        mu, sd = (t.cpu().unflatten(0, (b, views)) for t in encode_posterior(vae, x.flatten(0, 1)))
        if means is None:
            means = torch.empty((views, n) + tuple(mu.shape[2:]), dtype=torch.float32)
            stds = torch.empty_like(means)
        means[:, i:i + b], stds[:, i:i + b], labels[i:i + b] = mu.transpose(0, 1), sd.transpose(0, 1), y
        i += b
    stats = mixture_stats(means[0], stds[0])
    meta = {
        "format": "map-dit-latents",
        "version": 1,
        "vae": vae_name,
        "image_size": int(args.image_size),
        "flipped_posteriors": bool(args.random_flip),
        "num_images": n,
        "latent_shape": list(means.shape[2:]),
        "scaling": "raw posterior mean/std (no 0.18215 factor); decode vae.decode(z * std + mean)",
        "source": source.data_path,
        "class_names": source.class_names,
    }
    os.makedirs(out, exist_ok=True)
    files = [fn for fn in (*names, "meta.json")]
    remove_stale_temporaries_of([os.path.join(out, fn) for fn in (*files, LATENT_INCOMPLETE)])  # of a killed run
    items = [
        ("posterior_means.pt", means[0], False),
        ("posterior_stds.pt", stds[0], False),
        *([(LATENT_FLIP_FILES[0], means[1], False), (LATENT_FLIP_FILES[1], stds[1], False)] if views == 2 else []),
        ("labels.pt", labels, False),
        ("stats.pt", {"mean": stats["mean"], "std": stats["std"]}, False),
        ("meta.json", meta, True),
    ]
    # All files or none: each is written to a temporary file, and all are renamed at the end, in list
    # order (the stack renames the last entered first), meta.json last. The INCOMPLETE marker lands before
    # the first rename and goes after the last, so a folder killed between them is refused by every reader
    # (data.LatentDataset) instead of training on files of two different encodings, or without meta.json.
    marker = os.path.join(out, LATENT_INCOMPLETE)
    with contextlib.ExitStack() as stack:
        for fn, obj, is_json in reversed(items):
            tmp = stack.enter_context(atomic_path(os.path.join(out, fn)))
            if is_json:
                with open(tmp, "w") as f:
                    f.write(json.dumps(obj, indent=2) + "\n")
            else:
                torch_save_file(obj.contiguous() if isinstance(obj, torch.Tensor) else obj, tmp)
        atomic_write_text(marker, "prepare_latents.py is writing this folder; if it is still here, it was "
                                  "interrupted: re-run it with --overwrite\n")
    os.remove(marker)
    with contextlib.suppress(OSError):  # the removal on disk too
        fd = os.open(out, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    return {"out": out, "num_images": n, "latent_shape": list(means.shape[2:]),
            "stats": {k: [float(v) for v in t] for k, t in stats.items()}}


@interruptible("no latent folder was completed: --out is as it was, or marked INCOMPLETE (refused by readers)")
def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        info = run(args)
    except (ValueError, OSError) as e:  # DatasetError, a bad output path; OSError: unreadable images, a full disk
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {info['num_images']} latents of shape {'x'.join(map(str, info['latent_shape']))} to {info['out']} "
          f"(mean {[round(v, 4) for v in info['stats']['mean']]}, std {[round(v, 4) for v in info['stats']['std']]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
