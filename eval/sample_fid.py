"""FID-10K of a trained run (and the rest of the ADM evaluator's metrics), with the paper's protocol as defaults.

python -m eval.sample_fid --run-dir results/000-DiT-XS-2                  (from the repository root)
python -m eval.sample_fid --run-dir RUN --sampler dpm-solver++ --num-sampling-steps 25
torchrun --nproc_per_node=8 -m eval.sample_fid --run-dir RUN --ref VIRTUAL_imagenet256_labeled.npz

Draws --num-samples labels uniformly over the classes (seeded), splits the images across the processes,
samples them with the post-hoc EMA (--ema-std, default 0.05), CFG 1.5 and 250 DDPM steps, writes
RUN/fid/samples-<tag>.npz (key arr_0, uint8 N×H×W×3, the ADM evaluator's format), then evaluates them against
--ref with eval/evaluate.py: FID, sFID, precision and recall (and the Inception Score with
--inception-classifier). --ref is an images .npz, an image folder or ImageFolder, an ADM reference batch, or a
statistics cache; "auto" = the run's built-in dataset, whose statistics and features are computed once and
cached in RESULTS/refs/. The reference, the Inception weights, the guide and every option are loaded and
checked before the first sample is drawn. Prints the metrics (ADM's lines, FID among them), records them in
RUN/fid/fid.jsonl.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

if __name__ == "__main__" and not __package__:  # `python eval/sample_fid.py`: the package `eval` is not importable
    print("error: run it from the repository root as a module: python -m eval.sample_fid --run-dir RUN ...",
          file=sys.stderr)
    sys.exit(2)

import numpy as np
import torch
import torch.distributed as dist

import data
from atomic import atomic_path, check_output_file, interruptible
from eval.evaluate import (METRICS, check_set, evaluate, feature_dims, featurize, format_table, images_set,
                           read_set, small_sample_warning)
from eval.fid import FIDError
from eval.inception import InceptionWeightsError, load_inception, sha1_of_file
from eval.ref_stats import (BUILTIN_REFERENCES, cache_tag, reference_images,
                            reference_statistics)
from fast_paths import apply_fast_paths
from logs import append_jsonl
from runs import RunError, find_checkpoint, load_run_model, with_vae
from cli import Parser, ref_images_argument
from sample import (add_sampling_arguments, check_output, check_sample_count, check_sampling_args, generate,
                    load_guide, precision_tag, resolve_run_dir, sampling_tag)
from training import setup_distributed


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m eval.sample_fid", description=__doc__)
    p.add_argument("--run-dir", metavar="RUN", default=None,
                   help="run folder written by train.py (may be left out when --ckpt is a file of its checkpoints/)")
    p.add_argument("--result-dir", dest="run_dir", help=argparse.SUPPRESS)  # (the earlier name, still taken)
    p.add_argument("--num-samples", type=int, default=10_000)
    add_sampling_arguments(p, cfg_scale=1.5, seed=42)
    p.add_argument("--batch-size", type=int, default=250, help="images per forward pass and process")
    p.add_argument("--ref", default="auto",
                   help='reference: images .npz, image folder or ImageFolder, ADM reference batch, statistics '
                        'cache, "auto" (the run\'s built-in dataset) or "none" (samples only)')
    p.add_argument("--ref-images", type=ref_images_argument, default=None, metavar="N|all",
                   help="with --ref auto: compute the reference over N evenly spaced images of the dataset "
                        "(default: all on a GPU, 300 on a CPU)")
    p.add_argument("--out", default=None, help="samples .npz (default RUN/fid/samples-<tag>.npz)")
    p.add_argument("--inception-weights", default=None, help="TorchScript FID Inception (default: the bundled one)")
    p.add_argument("--inception-classifier", default=None, metavar="PATH",
                   help="the Inception's classifier weights (fc.weight), to report the Inception Score")
    p.add_argument("--ckpt-ema", action="store_true",
                   help="with --ckpt: that checkpoint's tracked EMA of --ema-std (fp32, what train.py --eval-every "
                        "scores) instead of its raw weights")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def fid_labels(num_samples: int, num_classes: int, seed: int) -> torch.Tensor:
    """The labels of an FID draw: uniform over the classes, seeded (train.py --eval-every draws the same)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_classes, (num_samples,), generator=g)


def sample_tag(args) -> str:
    if args.ckpt is not None:
        weights = f"ckpt{find_checkpoint(args.run_dir, args.ckpt)[0]}" + (f"-ema{args.ema_std:g}" if args.ckpt_ema else "")
    else:
        weights = f"ema{args.ema_std:g}" + (f"-step{args.step}" if args.step is not None else "")
    return (f"{weights}-cfg{args.cfg_scale:g}{sampling_tag(args)}-n{args.num_samples}"
            f"-seed{args.seed}{precision_tag(args.precision)}")


def resolve_reference(ref: str, config: dict, results_dir: str, inception_weights=None,
                      ref_images: int | str | None = None, log=print, flag: str = "--ref") -> str | None:
    """The reference's path: `ref` as given, or for "auto" the built-in dataset's statistics over
    `ref_images` evenly spaced images (see ref_stats.reference_images: a count, "all", or None for the
    default), computed once into RESULTS/refs/ under a name that says the count and the Inception weights."""
    if ref == "none":
        return None
    if ref != "auto":
        if not os.path.exists(ref):
            raise FIDError(f"reference not found: {ref}")
        return ref
    name = config["data"]["name"]
    if name not in BUILTIN_REFERENCES:
        raise FIDError(f"no automatic reference for dataset {name!r}; compute one with python -m eval.ref_stats "
                       f"and pass it with {flag}")
    # Statistics from other Inception weights than the bundled ones are cached under another name.
    weights_tag = f"-w{sha1_of_file(inception_weights)[:10]}" if inception_weights and os.path.isfile(inception_weights) else ""
    num_images = reference_images(ref_images)
    cache = os.path.join(results_dir, "refs",
                         f"{BUILTIN_REFERENCES[name]}-{config['input_size']}{cache_tag(num_images)}{weights_tag}.npz")
    return reference_statistics(name, cache, image_size=config["input_size"], inception_weights=inception_weights,
                                num_images=num_images, log=log)


def prepare_reference(args, config: dict, device):
    """(extractor, reference set) loaded and checked, or (None, None) for --ref none: everything that could
    fail after hours of sampling fails now instead."""
    if args.ref == "none":
        return None, None
    extractor = load_inception(args.inception_weights, device=device, classifier_path=args.inception_classifier)
    dims = feature_dims(extractor)
    path = resolve_reference(args.ref, config, os.path.dirname(os.path.abspath(args.run_dir)),
                             inception_weights=args.inception_weights,
                             ref_images=args.ref_images)
    reference = read_set(path)
    check_set(reference, dims)
    return extractor, reference


def run(args) -> dict | None:
    check_sampling_args(args)
    resolve_run_dir(args)
    if args.num_samples < 2:
        raise FIDError(f"--num-samples must be at least 2, got {args.num_samples}")
    rank, world_size, device = setup_distributed(None)
    if args.ckpt_ema and args.ckpt is None:
        raise FIDError("--ckpt-ema needs --ckpt STEP (the checkpoint whose tracked EMA to use)")
    check_output(args.out, args.run_dir, "fid", "--out")  # found now, not after the sampling
    model, config, what = load_run_model(args.run_dir, ema_std=args.ema_std, ckpt_step=args.ckpt,
                                         step=args.step, device=device, ckpt_ema=args.ckpt_ema)
    config = with_vae(config, args.run_dir, args.vae)
    apply_fast_paths(model)
    check_sample_count(args.num_samples, config)
    guide, guide_what = load_guide(args.guide, args, args.run_dir, config, device) if args.guide else (None, "")
    extractor = reference = None
    if rank == 0:  # the reference and the Inception before the long sampling (a cached reference computed once)
        extractor, reference = prepare_reference(args, config, device)
    fid_dir = os.path.join(args.run_dir, "fid")
    out = args.out or os.path.join(fid_dir, f"samples-{sample_tag(args)}.npz")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    labels = fid_labels(args.num_samples, config["num_classes"], args.seed)
    share = -(-args.num_samples // world_size)
    lo, hi = rank * share, min(args.num_samples, (rank + 1) * share)
    if rank == 0:
        print(f"sampling {args.num_samples} images on {world_size} process(es) with {what}, cfg {args.cfg_scale:g}"
              f"{', ' + guide_what if guide else ''}, {args.num_sampling_steps} {args.sampler} steps")
    start = time.perf_counter()
    # The seed of each batch depends on its global position, so the images do not depend on the process count
    # as long as each process's share is a multiple of --batch-size (e.g. 10,000 = 8 x 5 x 250).
    images = generate(model, config, labels[lo:hi].to(device), cfg_scale=args.cfg_scale,
                      num_steps=args.num_sampling_steps, sampler=args.sampler, seed=args.seed, first_index=lo,
                      batch_size=args.batch_size, device=device, progress=rank == 0 and not args.no_progress, precision=args.precision,
                      compile=args.compile, eta=args.ddim_eta, guide=guide, guidance_interval=args.guidance_interval)
    part = f"{out}.part{rank}.npy"
    try:
        with atomic_path(part) as tmp:
            np.save(tmp, images)
        if world_size > 1:
            dist.barrier()
        if rank == 0:
            parts = [f"{out}.part{r}.npy" for r in range(world_size)]
            all_images = np.concatenate([np.load(p) for p in parts])
            with atomic_path(out, suffix=".npz") as tmp:
                np.savez(tmp, arr_0=all_images)
    finally:  # the parts are whole, but only the .npz is an output: an interruption leaves none behind
        if rank == 0 or world_size == 1:
            for p in [f"{out}.part{r}.npy" for r in range(world_size)]:
                if os.path.exists(p):
                    os.remove(p)
    result = None
    if rank == 0:
        elapsed = time.perf_counter() - start
        print(f"wrote {out} ({len(all_images)} images, {len(all_images) / elapsed:.1f} img/s)")
        if reference is not None:
            samples = images_set(all_images, out)
            for s in (samples, reference):
                featurize(s, extractor, device=device)
            result = evaluate(samples, reference, device=device, classifier_hint="--inception-classifier")
            record = {**{m: result[m] for m in METRICS}, "samples": out, "reference": reference.name,
                      "num_samples": args.num_samples, "num_reference": reference.num_images, "weights": what,
                      "cfg_scale": args.cfg_scale, "sampler": args.sampler,
                      "num_sampling_steps": args.num_sampling_steps, "ddim_eta": args.ddim_eta,
                      "guidance_interval": args.guidance_interval, "guide": guide_what or None,
                      "seed": args.seed, "compute_precision": args.precision}
            os.makedirs(fid_dir, exist_ok=True)  # --out may have put the samples elsewhere
            append_jsonl(os.path.join(fid_dir, "fid.jsonl"), record)
            print(format_table(result, samples, reference))
            if small_sample_warning(args.num_samples):
                print(small_sample_warning(args.num_samples), file=sys.stderr)
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


@interruptible("no statistics or images were written")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (RunError, FIDError, InceptionWeightsError, data.DatasetError, ValueError, OSError) as e:  # one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
