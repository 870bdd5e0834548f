"""Inception reference statistics and features of a dataset's real images, for eval/evaluate.py.

python -m eval.ref_stats --data-path digits --out refs/digits.npz          (from the repository root)
python -m eval.ref_stats --data-path mnist-test --out refs/mnist-test.npz
python -m eval.ref_stats --data-path LATENT_DIR --out refs/imagenet128.npz   # decoded with the set's VAE

Pixel sets (ImageFolder, digits, MNIST) are used as they are (the normalisation undone); latent sets are
decoded with their VAE, so the reference sees what the generator's samples will look like. The file holds
mu/sigma (FID), mu_s/sigma_s (sFID) and the pool3 features (precision/recall), all from one Inception pass.
"""
from __future__ import annotations

import os
import sys
import time

if __name__ == "__main__" and not __package__:  # `python eval/ref_stats.py`: the package `eval` is not importable
    print("error: run it from the repository root as a module: python -m eval.ref_stats --data-path DATA --out OUT.npz",
          file=sys.stderr)
    sys.exit(2)

import numpy as np
import torch
from tqdm import tqdm

import data
import data.hf
from atomic import interruptible
from cli import Parser, ref_images_argument
from eval.evaluate import featurize, images_set, save_reference
from eval.fid import FIDError, open_npz
from eval.inception import InceptionWeightsError, load_inception, resolve_device
from logs import format_duration

# The real images each built-in training set is compared with (MNIST: its 10,000 test images).
BUILTIN_REFERENCES = {"digits": "digits", "mnist": "mnist-test", "mnist-test": "mnist-test"}
# Reference images by default: all on a GPU; on a CPU, where the Inception takes ~0.5 s an image, this many
# (a few minutes; the FID against them is a noisier, biased estimate, fine for comparing runs and steps).
CPU_REFERENCE_IMAGES = 300
PROBE_IMAGES = 16  # images timed for the announced estimate


def reference_images(given: int | str | None, device="auto") -> int | None:
    """How many reference images --ref-images `given` asks for (None: all of them): a count, "all", or when
    not given all on a GPU and CPU_REFERENCE_IMAGES on a CPU (`device` computes the reference)."""
    if given is None:
        return None if resolve_device(device).type == "cuda" else CPU_REFERENCE_IMAGES
    return None if given == "all" else int(given)


def cache_tag(num_images: int | None) -> str:
    """The part of a cached reference's file name that says how many images it holds ("" for all of them)."""
    return "" if num_images is None else f"-n{num_images}"


def dataset_images(dataset, indices, batch_size: int = 256, device="cpu", progress: bool = True) -> np.ndarray:
    """The dataset's items `indices` as uint8 N×H×W×3 images (latents decoded with the dataset's VAE)."""
    info = dataset.describe()
    vae = data.load_vae(info["vae"] or data.DEFAULT_VAE, device) if info["kind"] == "latent" else None
    out = []
    torch.manual_seed(0)  # latent sets draw a posterior sample per item
    for start in tqdm(range(0, len(indices), batch_size), desc="images", unit="batch", disable=not progress):
        x = torch.stack([dataset[int(i)][0] for i in indices[start:start + batch_size]]).to(device)
        out.append(data.to_uint8_images(data.decode_samples(x, info, vae=vae)))
    return np.concatenate(out)


def time_per_image(dataset, indices, extractor, device) -> float:
    """Seconds to decode and featurise one of the images `indices`, timed on them after one untimed warm-up
    image (the first forward of a network sets up its kernels and would count several times over)."""
    def featurize_images(chosen):
        featurize(images_set(dataset_images(dataset, chosen, device=device, progress=False), "probe"), extractor,
                  batch_size=len(chosen), device=device, progress=False)
    featurize_images(indices[:1])
    began = time.perf_counter()
    featurize_images(indices)
    return (time.perf_counter() - began) / len(indices)


def reference_statistics(data_path: str, out: str, *, image_size: int | None = None, num_images: int | None = None,
                         device="auto", inception_weights=None, batch_size: int = 100, log=print,
                         progress: bool = True, **columns) -> str:
    """Computes and saves the reference statistics and features of `data_path` (a built-in name is mapped to its
    reference split) over `num_images` evenly spaced images (None: all); returns `out`. Before the work a line
    (`log`) says what is computed, over how many images, and about how long it takes (timed on a few images).
    An existing complete file is reused (one without the features of precision/recall, as older versions
    wrote, is recomputed). `columns` (split, image_column, label_column) choose what a Hugging Face dataset
    provides."""
    if os.path.isfile(out) and _is_complete(out):
        return out
    ref_path = BUILTIN_REFERENCES.get(str(data_path), data_path)
    dataset = data.load_dataset(ref_path, image_size=image_size, **columns)
    dev = resolve_device(device)
    indices = data.spaced_subset(len(dataset), len(dataset) if num_images is None else num_images)
    extractor = load_inception(inception_weights, device=dev)
    per_image = time_per_image(dataset, indices[:PROBE_IMAGES], extractor, dev)
    which = "all" if len(indices) == len(dataset) else f"{len(indices):,} evenly spaced of the"
    log(f"reference: Inception statistics of {which} {len(dataset):,} images of {ref_path} on {dev}, about "
        f"{format_duration(per_image * len(indices))} (cached in {out})")
    began = time.perf_counter()
    images = dataset_images(dataset, indices, device=dev, progress=progress)
    save_reference(featurize(images_set(images, str(ref_path)), extractor, batch_size=batch_size, device=dev,
                             progress=progress), out)
    log(f"reference: computed in {format_duration(time.perf_counter() - began)}")
    return out


def _is_complete(path: str) -> bool:
    try:
        with open_npz(path) as z:
            return {"mu", "sigma", "pool"} <= set(z.files)
    except FIDError:
        return False


@interruptible("no statistics were written")
def main(argv=None) -> int:
    p = Parser(prog="python -m eval.ref_stats", description=__doc__)
    p.add_argument("--data-path", required=True,
                   help="digits, mnist, mnist-test, a latent folder, an ImageFolder or a Hugging Face dataset")
    p.add_argument("--image-size", type=int, default=None)
    data.hf.add_arguments(p)
    p.add_argument("--out", required=True, help="statistics .npz to write (keys mu, sigma)")
    p.add_argument("--ref-images", "--max-images", type=ref_images_argument, default="all", metavar="N|all",
                   help="compute the statistics over N evenly spaced images")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default="auto")
    p.add_argument("--inception-weights", default=None)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        if os.path.exists(args.out):
            raise FIDError(f"{args.out} exists; remove it or choose another --out")
        reference_statistics(args.data_path, args.out, image_size=args.image_size, num_images=reference_images(args.ref_images), progress=not args.no_progress,
                             device=args.device, inception_weights=args.inception_weights, batch_size=args.batch_size,
                             split=args.split, image_column=args.image_column, label_column=args.label_column)
    except (FIDError, InceptionWeightsError, data.DatasetError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
