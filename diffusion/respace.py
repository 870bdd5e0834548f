"""Timestep respacing (ADM semantics): sample with a subset of the 1000 training steps.

The respaced diffusion keeps the training ᾱ at the chosen steps and recomputes its betas from them,
β'_i = 1 − ᾱ_{k_i} / ᾱ_{k_{i−1}}, and wraps the model so it still sees the original step indices k_i.
"""

from __future__ import annotations

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion, ModelFn
from .schedule import linear_betas


def space_timesteps(num_timesteps: int, section_counts) -> list[int]:
    """Sorted original step indices to keep out of `num_timesteps`.

    `section_counts` is
      - "" or None: every step;
      - "N" or "N1,N2,...", or a list of ints: the steps are cut into equal sections and N_i steps are
        taken from section i at an even fractional stride, so each section's first and last step are kept
        ("250" of 1000 keeps 0, 4, 8, ..., 991, 995, 999, strides of 4 or 5);
      - "ddimN": range(0, num_timesteps, stride) for the integer stride that gives exactly N steps.
    """
    if section_counts is None or section_counts == "":
        return list(range(num_timesteps))
    if isinstance(section_counts, int):
        section_counts = str(section_counts)
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps + 1):
                steps = range(0, num_timesteps, stride)
                if len(steps) == desired:
                    return list(steps)
            raise ValueError(f"cannot take exactly {desired} steps out of {num_timesteps} with an integer stride")
        section_counts = [int(part) for part in section_counts.split(",")]

    num_sections = len(section_counts)
    base_size, extra = divmod(num_timesteps, num_sections)
    kept: list[int] = []
    start = 0
    for i, count in enumerate(section_counts):
        size = base_size + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"cannot take {count} steps out of a section of {size} steps")
        # Fractional stride that lands on the section's first and last step.
        # (Accumulated, not multiplied, so the rounding matches ADM's step for step.)
        stride = 1.0 if count == 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


class _OriginalStepModel:
    """Model wrapper that maps respaced step indices i to the original indices timestep_map[i]."""

    def __init__(self, model_fn: ModelFn, timestep_map: list[int]) -> None:
        self.model_fn = model_fn
        self.timestep_map = timestep_map
        self._map_tensors: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **model_kwargs) -> torch.Tensor:
        key = (t.device, t.dtype)
        mapping = self._map_tensors.get(key)
        if mapping is None:
            mapping = self._map_tensors[key] = torch.tensor(self.timestep_map, device=t.device, dtype=t.dtype)
        return self.model_fn(x, mapping[t], **model_kwargs)


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion over the kept steps `use_timesteps` of the process defined by `betas`.

    `timestep_map[i]` is the original step of respaced step i; every public method that takes a model
    function feeds the model those original steps.
    """

    def __init__(self, use_timesteps, betas) -> None:
        betas = np.asarray(betas, dtype=np.float64)
        kept = sorted(set(int(k) for k in use_timesteps))
        if not kept or kept[0] < 0 or kept[-1] >= len(betas):
            raise ValueError(f"kept steps must be a non-empty subset of 0..{len(betas) - 1}")
        alphas_cumprod = np.cumprod(1.0 - betas)[kept]
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        super().__init__(1.0 - alphas_cumprod / alphas_cumprod_prev)
        self.timestep_map: list[int] = kept
        self.original_num_steps = len(betas)

    def _wrap_model(self, model_fn: ModelFn) -> ModelFn:
        if isinstance(model_fn, _OriginalStepModel):  # already wrapped by an outer call
            return model_fn
        return _OriginalStepModel(model_fn, self.timestep_map)


def create_diffusion(timestep_respacing="", num_timesteps: int = 1000) -> SpacedDiffusion:
    """The DiT diffusion: linear betas over `num_timesteps` steps, respaced per `timestep_respacing`
    ("" = all steps, e.g. "250" = 250 evenly strided steps, "ddim50" = stride 20; see space_timesteps)."""
    betas = linear_betas(num_timesteps)
    return SpacedDiffusion(space_timesteps(num_timesteps, timestep_respacing), betas)
