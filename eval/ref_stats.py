"""Inception reference statistics and features of a dataset's real images, for eval/evaluate.py.

python eval/ref_stats.py --data-path digits --out refs/digits.npz
python eval/ref_stats.py --data-path mnist-test --out refs/mnist-test.npz
python eval/ref_stats.py --data-path LATENT_DIR --out refs/imagenet128.npz   # decoded with the set's VAE

Pixel sets (ImageFolder, digits, MNIST) are used as they are (the normalisation undone); latent sets are
decoded with their VAE, so the reference sees what the generator's samples will look like. The file holds
mu/sigma (FID), mu_s/sigma_s (sFID) and the pool3 features (precision/recall), all from one Inception pass.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numpy as np
import torch
from tqdm import tqdm

import data
import hf_data
from atomic import interruptible
from eval.evaluate import featurize, images_set, save_reference
from eval.fid import FIDError, _open_npz
from eval.inception import InceptionWeightsError, load_inception, resolve_device

# The real images each built-in training set is compared with (MNIST: its 10,000 test images).
BUILTIN_REFERENCES = {"digits": "digits", "mnist": "mnist-test", "mnist-test": "mnist-test"}


def dataset_images(dataset, batch_size: int = 256, device="cpu", max_images: int | None = None) -> np.ndarray:
    """The dataset's images as uint8 N×H×W×3 (latents decoded with the dataset's VAE)."""
    info = dataset.describe()
    vae = data.load_vae(info["vae"] or data.DEFAULT_VAE, device) if info["kind"] == "latent" else None
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    out = []
    torch.manual_seed(0)  # latent sets draw a posterior sample per item
    for start in tqdm(range(0, n, batch_size), desc="images", unit="batch"):
        x = torch.stack([dataset[i][0] for i in range(start, min(n, start + batch_size))]).to(device)
        out.append(data.to_uint8_images(data.decode_samples(x, info, vae=vae)))
    return np.concatenate(out)


def reference_statistics(data_path: str, out: str, *, image_size: int | None = None, max_images: int | None = None,
                         device="auto", inception_weights=None, batch_size: int = 100, **columns) -> str:
    """Computes and saves the reference statistics and features of `data_path` (a built-in name is mapped to its
    reference split); returns `out`. An existing complete file is reused (one without the features of
    precision/recall, as older versions wrote, is recomputed). `columns` (split, image_column, label_column)
    choose what a Hugging Face dataset provides."""
    if os.path.isfile(out) and _is_complete(out):
        return out
    ref_path = BUILTIN_REFERENCES.get(str(data_path), data_path)
    dataset = data.load_dataset(ref_path, image_size=image_size, **columns)
    dev = resolve_device(device)
    images = dataset_images(dataset, device=dev, max_images=max_images)
    extractor = load_inception(inception_weights, device=dev)
    save_reference(featurize(images_set(images, str(ref_path)), extractor, batch_size=batch_size, device=dev), out)
    return out


def _is_complete(path: str) -> bool:
    try:
        with _open_npz(path) as z:
            return {"mu", "sigma", "pool"} <= set(z.files)
    except FIDError:
        return False


@interruptible("no statistics were written")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", required=True,
                   help="digits, mnist, mnist-test, a latent folder, an ImageFolder or a Hugging Face dataset")
    p.add_argument("--image-size", type=int, default=None)
    hf_data.add_arguments(p)
    p.add_argument("--out", required=True, help="statistics .npz to write (keys mu, sigma)")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default="auto")
    p.add_argument("--inception-weights", default=None)
    args = p.parse_args(argv)
    try:
        if os.path.exists(args.out):
            raise FIDError(f"{args.out} exists; remove it or choose another --out")
        reference_statistics(args.data_path, args.out, image_size=args.image_size, max_images=args.max_images,
                             device=args.device, inception_weights=args.inception_weights, batch_size=args.batch_size,
                             split=args.split, image_column=args.image_column, label_column=args.label_column)
    except (FIDError, InceptionWeightsError, data.DatasetError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
