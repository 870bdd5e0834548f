"""FID during training (`train.py --eval-every N`): the FID of a tracked EMA at every N steps.

Convergence speed is where magnitude preservation claims to help, and one FID at the end hides it. Every
`--eval-every` steps (and at the last) the tracked EMA of `--eval-ema-std` is sampled with a fast sampler
and scored against the run's reference statistics. The draw is eval/sample_fid.py's: the same labels,
noise and batching for the same seed, so the number equals what

    python -m eval.sample_fid --run-dir RUN --ckpt STEP --ckpt-ema --ema-std S --num-samples N \
        --sampler X --num-sampling-steps K --cfg-scale C --seed SEED --precision P --ref REF

computes afterwards from the checkpoint of that step (a test holds them equal; P is --eval-precision, fp32 by
default, bf16 autocast for a GPU sitting). Under DDP every rank
samples its share and rank 0 gathers the images and scores them. Records go to
RUN/fid_during_training.jsonl (truncated on resume like metrics.jsonl, so the curve continues), the curve
to RUN/fid_during_training.png; each record says what the evaluations have cost so far as a fraction of
the training time, and a warning says when that exceeds `--eval-max-fraction`.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import torch.distributed as dist

from diffusion.sampling import SAMPLERS
from eval.fid import FIDError, compute_statistics, fid_from_images
from eval.inception import load_inception, resolve_device
from eval.ref_stats import ref_images_argument
from eval.sample_fid import fid_labels
from eval.sample_fid import resolve_reference as sample_fid_reference
from fast_paths import apply_fast_paths
from runs import load_weights, model_from_config
from sample import generate

LOG_NAME = "fid_during_training.jsonl"


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("FID during training (off unless --eval-every is given)")
    g.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="FID of the tracked EMA every N steps and at the last (default 0: off)")
    g.add_argument("--eval-samples", type=int, default=1000, help="images per evaluation")
    g.add_argument("--eval-sampler", choices=SAMPLERS, default="dpm-solver++")
    g.add_argument("--eval-sampling-steps", type=int, default=20)
    g.add_argument("--eval-cfg-scale", type=float, default=1.5)
    g.add_argument("--eval-ema-std", type=float, default=None,
                   help="which tracked EMA (one of --ema-stds; default the first)")
    g.add_argument("--eval-seed", type=int, default=42, help="sampling seed (the same at every evaluation)")
    g.add_argument("--eval-batch-size", type=int, default=250, help="images per sampling forward and process")
    g.add_argument("--eval-precision", choices=["fp32", "tf32", "bf16"], default="fp32",
                   help="the sampling forwards' precision (as sample.py --precision; bf16 autocast: a few times "
                        "faster on a GPU, other samples than fp32's)")
    g.add_argument("--eval-ref", default="auto",
                   help='reference statistics or images (as eval/sample_fid.py --ref); "auto": the built-in '
                        "dataset's, computed once into RESULTS/refs/")
    g.add_argument("--eval-ref-images", type=ref_images_argument, default=None, metavar="N|all",
                   help="with --eval-ref auto: the reference over N evenly spaced images of the dataset (default: "
                        "all on a GPU, 300 on a CPU, a few minutes; the log announces the count and the time)")
    g.add_argument("--eval-max-fraction", type=float, default=0.25,
                   help="warn when the evaluations have taken more than this fraction of the training time")
    g.add_argument("--inception-weights", default=None, help="TorchScript FID Inception (default: the bundled one)")


# Options of this module that may change on --resume (they do not change the weights).
RESUMABLE = ["eval_every", "eval_samples", "eval_sampler", "eval_sampling_steps", "eval_cfg_scale", "eval_ema_std",
             "eval_seed", "eval_batch_size", "eval_precision", "eval_ref", "eval_ref_images", "eval_max_fraction",
             "inception_weights"]


def check_arguments(args) -> None:
    """Raises FIDError naming the option, before anything expensive; fills --eval-ema-std's default."""
    if args.eval_every < 0:
        raise FIDError(f"--eval-every must be >= 0 (0 = off), got {args.eval_every}")
    if not args.eval_every:
        return
    if args.eval_ema_std is None:
        args.eval_ema_std = args.ema_stds[0]
    if not any(abs(args.eval_ema_std - s) < 1e-9 for s in args.ema_stds):
        raise FIDError(f"--eval-ema-std {args.eval_ema_std:g} is not a tracked EMA (--ema-stds "
                       f"{' '.join(f'{s:g}' for s in args.ema_stds)}); pick one of them")
    if args.eval_samples < 2:
        raise FIDError(f"--eval-samples must be at least 2, got {args.eval_samples}")
    if not 1 <= args.eval_sampling_steps <= 1000:
        raise FIDError(f"--eval-sampling-steps must be in 1..1000, got {args.eval_sampling_steps}")
    if args.eval_batch_size < 1:
        raise FIDError(f"--eval-batch-size must be >= 1, got {args.eval_batch_size}")
    if args.eval_ref == "none":
        raise FIDError("--eval-ref none: FID during training needs a reference; pass one or use auto")


def resolve_reference(args, dataset, rank: int, world_size: int) -> tuple[str | None, float]:
    """The reference path (rank 0; None elsewhere), resolved as eval/sample_fid.py does: "auto" computes the
    built-in dataset's statistics once into RESULTS/refs/, which sample_fid then reuses; and the seconds it
    took (part of what the evaluations cost)."""
    path, began = None, time.perf_counter()
    if rank == 0 and args.eval_every:
        config = {"data": dataset.describe(), "input_size": dataset.resolution}
        path = sample_fid_reference(args.eval_ref, config, os.path.abspath(args.results_dir),
                                    args.inception_weights, ref_images=getattr(args, "eval_ref_images", None),
                                    log=lambda line: print(line, flush=True), flag="--eval-ref")
    if world_size > 1:
        dist.barrier()  # the others wait while rank 0 computes a missing reference
    return path, time.perf_counter() - began


class TrainingFID:
    """Evaluates the FID of the state's tracked EMA when `due`; rank 0 writes the records."""

    def __init__(self, args, reference: str | None, config: dict, rank: int, world_size: int, device,
                 reference_seconds: float = 0.0):
        self.args, self.reference, self.config = args, reference, config
        self.rank, self.world_size, self.device = rank, world_size, device
        # The reference computed for this run counts as evaluation time (it is not training time).
        self.started = time.perf_counter() - reference_seconds
        self.eval_seconds = reference_seconds
        self._extractor, self._ref_stats = None, None

    def due(self, step: int, last: bool) -> bool:
        return bool(self.args.eval_every) and (step % self.args.eval_every == 0 or last)

    def _sample_share(self, state) -> np.ndarray:
        a = self.args
        model = model_from_config(self.config)
        load_weights(model, state.ema.ema_state(a.eval_ema_std), f"the tracked EMA σ_rel={a.eval_ema_std:g}")
        model.to(self.device).eval()
        apply_fast_paths(model)  # as eval/sample_fid.py does
        labels = fid_labels(a.eval_samples, self.config["num_classes"], a.eval_seed)
        share = -(-a.eval_samples // self.world_size)
        lo, hi = self.rank * share, min(a.eval_samples, (self.rank + 1) * share)
        return generate(model, self.config, labels[lo:hi].to(self.device), cfg_scale=a.eval_cfg_scale,
                        num_steps=a.eval_sampling_steps, sampler=a.eval_sampler, seed=a.eval_seed, first_index=lo,
                        batch_size=a.eval_batch_size, precision=a.eval_precision, device=self.device,
                        progress=False)

    def _fid(self, images) -> float:
        if self._extractor is None:  # loaded once per run, and the reference's statistics with it
            self._extractor = load_inception(self.args.inception_weights, device=resolve_device("auto"))
            self._ref_stats = compute_statistics(self.reference, self._extractor, progress=False)
        return fid_from_images(images, self._ref_stats, extractor=self._extractor, progress=False)

    def cost_fraction(self) -> float:
        """The evaluations' time so far (the run's reference included) over the training time."""
        return self.eval_seconds / max(time.perf_counter() - self.started - self.eval_seconds, 1e-9)

    def evaluate(self, state, step: int, run, meter=None) -> dict | None:
        """Samples (every rank its share), scores (rank 0), appends the record and redraws the curve.
        Returns the record on rank 0. The training RNG is left as it was, and the rate `meter` reports
        next leaves this time out."""
        start = time.perf_counter()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            images = self._sample_share(state)
        if self.world_size > 1:
            gathered = [None] * self.world_size if self.rank == 0 else None
            dist.gather_object(images, gathered, dst=0)
            images = np.concatenate(gathered) if self.rank == 0 else None
        record = None
        if self.rank == 0:
            fid = self._fid(images)
            seconds = time.perf_counter() - start
            self.eval_seconds += seconds
            a = self.args
            record = {"step": step, "fid": fid, "num_samples": a.eval_samples, "sampler": a.eval_sampler,
                      "num_sampling_steps": a.eval_sampling_steps, "cfg_scale": a.eval_cfg_scale,
                      "ema_std": a.eval_ema_std, "seed": a.eval_seed, "precision": a.eval_precision,
                      "reference": self.reference, "seconds": seconds, "cost_fraction": self.cost_fraction()}
            run.append(LOG_NAME, record)
            run.images("fid_during_training/samples", images, step)  # (for TensorBoard / W&B, when on)
            run.log(f"FID {fid:.2f} at step {step} ({a.eval_samples} samples, {a.eval_sampler} "
                    f"{a.eval_sampling_steps} steps, CFG {a.eval_cfg_scale:g}, tracked EMA σ_rel {a.eval_ema_std:g}) "
                    f"in {seconds:.1f} s; evaluations so far {100 * record['cost_fraction']:.1f} % of training time")
            if record["cost_fraction"] > a.eval_max_fraction:
                run.warn(f"warning: FID evaluations cost {100 * record['cost_fraction']:.0f} % of the training "
                         f"time (over --eval-max-fraction {a.eval_max_fraction:g}); raise --eval-every or lower "
                         f"--eval-samples / --eval-sampling-steps")
            run.plot("fid")
        if self.world_size > 1:
            dist.barrier()
        if meter is not None:
            meter.timer += time.perf_counter() - start
        return record
