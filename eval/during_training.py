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
the training time, and a warning says when that exceeds `--eval-max-fraction`. The options are fields of
config.TrainConfig (group "FID during training"), which checks them.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch.distributed as dist

from config import TrainConfig
from eval.fid import compute_statistics, fid_from_images
from eval.inception import load_inception, resolve_device

from eval.sample_fid import fid_labels
from eval.sample_fid import resolve_reference as sample_fid_reference
from fast_paths import apply_fast_paths
from runs import load_weights, model_from_config
from sample import generate


LOG_NAME = "fid_during_training.jsonl"


def resolve_reference(cfg: TrainConfig, dataset, rank: int, world_size: int) -> tuple[str | None, float]:
    """The reference path (rank 0; None elsewhere), resolved as eval/sample_fid.py does: "auto" computes the
    built-in dataset's statistics once into RESULTS/refs/, which sample_fid then reuses; and the seconds it
    took (part of what the evaluations cost)."""
    path, began = None, time.perf_counter()
    if rank == 0 and cfg.eval_every:
        config = {"data": dataset.describe(), "input_size": dataset.resolution}
        path = sample_fid_reference(cfg.eval_ref, config, os.path.abspath(cfg.results_dir), cfg.inception_weights,
                                    ref_images=cfg.eval_ref_images, log=lambda line: print(line, flush=True),
                                    flag="--eval-ref")
    if world_size > 1:
        dist.barrier()  # the others wait while rank 0 computes a missing reference
    return path, time.perf_counter() - began


class TrainingFID:
    """Evaluates the FID of the state's tracked EMA when `due`; rank 0 writes the records."""

    def __init__(self, cfg: TrainConfig, reference: str | None, config: dict, rank: int, world_size: int, device,
                 reference_seconds: float = 0.0):
        self.cfg, self.reference, self.config = cfg, reference, config
        self.rank, self.world_size, self.device = rank, world_size, device
        # The reference computed for this run counts as evaluation time (it is not training time).
        self.started = time.perf_counter() - reference_seconds
        self.eval_seconds = reference_seconds
        self._extractor, self._ref_stats = None, None

    def due(self, step: int, last: bool) -> bool:
        return bool(self.cfg.eval_every) and (step % self.cfg.eval_every == 0 or last)

    def _sample_share(self, state) -> np.ndarray:
        a = self.cfg
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
            self._extractor = load_inception(self.cfg.inception_weights, device=resolve_device("auto"))
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
            a = self.cfg
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
