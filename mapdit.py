"""The Python API, for notebooks: a trained run and its samples in three lines.

    from mapdit import load_run
    run = load_run("results/000-DiT-XS-2")        # the post-hoc EMA of σ_rel 0.05, on a GPU if there is one
    images = run.sample(class_labels=[3, 7], n=4)  # uint8 array 8×H×W×3: four of class 3, four of class 7

`run.model` is the DiT (eval mode), `run.config` the run's config.json; `run.grid(images)` makes one PIL
image of them. The images are those `sample.py` draws with the same options and seed.
"""
from __future__ import annotations

import numpy as np
import torch

import runs
from fast_paths import apply_fast_paths
from sample import MAX_SEED, generate, image_grid
from training import parse_device

__all__ = ["load_run", "Run"]


class Run:
    """A trained run folder with chosen weights, ready to sample (see `load_run`)."""

    def __init__(self, path: str, *, ema_std: float | None = 0.05, step: int | None = None,
                 ckpt: int | str | None = None, device=None, vae: str | None = None):
        self.path, self.device = path, parse_device(device, runs.RunError)
        self.ckpt, self.step, self.vae = ckpt, step, vae
        self._load(ema_std)

    def _load(self, ema_std: float | None) -> None:
        model, config, self.weights = runs.load_run_model(self.path, ema_std=ema_std, ckpt_step=self.ckpt,
                                                          step=self.step, device=self.device)
        apply_fast_paths(model)
        self.model, self.config, self.ema_std = model, runs.with_vae(config, self.path, self.vae), ema_std
        self._vae = None

    @property
    def num_classes(self) -> int:
        return self.config["num_classes"]

    def sample(self, class_labels=None, n: int = 1, *, sampler: str = "dpm-solver++", steps: int = 25,
               cfg_scale: float = 4.0, ema_std: float | None = None, seed: int = 0, batch_size: int = 256,
               progress: bool = False) -> np.ndarray:
        """`n` images of each class in `class_labels` (an int or a list; default every class), as uint8
        N×H×W×3, class by class. `ema_std` rebuilds the post-hoc EMA of that σ_rel first (default: the
        weights loaded). Samplers: ddpm, ddim, dpm-solver++, heun, unipc; `cfg_scale` 1 = no guidance."""
        if ema_std is not None and ema_std != self.ema_std:
            if self.ckpt is not None:
                raise runs.RunError("ema_std applies to the post-hoc EMA; this run was loaded with ckpt=")
            self._load(ema_std)
        classes = list(range(self.num_classes)) if class_labels is None else (
            [int(class_labels)] if np.ndim(class_labels) == 0 else [int(c) for c in class_labels])
        bad = [c for c in classes if not 0 <= c < self.num_classes]
        if bad:
            raise ValueError(f"class label {bad[0]} is out of range: this run has {self.num_classes} classes "
                             f"(0..{self.num_classes - 1})")
        if n < 1 or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"n must be >= 1 (got {n}) and seed in 0..{MAX_SEED} (got {seed})")
        labels = torch.tensor(classes, device=self.device).repeat_interleave(n)
        return generate(self.model, self.config, labels, cfg_scale=cfg_scale, num_steps=steps, sampler=sampler,
                        seed=seed, batch_size=batch_size, device=self.device, progress=progress)

    def grid(self, images: np.ndarray, rows: int | None = None):
        """One PIL image of uint8 N×H×W×3 `images`, `rows` rows (default: as many as fit a square)."""
        rows = rows or max(1, int(round(len(images) ** 0.5)))
        return image_grid(images, rows=rows)

    def __repr__(self) -> str:
        return f"Run({self.path!r}: {self.config['model']}, {self.weights}, on {self.device})"


def load_run(path: str, *, ema_std: float = 0.05, step: int | None = None, ckpt: int | str | None = None,
             device=None, vae: str | None = None) -> Run:
    """A run folder of train.py, with the post-hoc EMA of `ema_std` (at snapshot `step`, default the last),
    or with `ckpt` (a step or a checkpoint file) that checkpoint's raw weights; `device` default: CUDA when
    there is one; `vae`: where a latent run's VAE is now (default: the recorded one)."""
    return Run(path, ema_std=None if ckpt is not None else ema_std, step=step, ckpt=ckpt, device=device, vae=vae)
