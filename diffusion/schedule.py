"""Noise schedule of the DiT/ADM Gaussian diffusion (docs/design.md, "Diffusion").

All quantities are derived once in float64 numpy from the betas. For the step loops and the loss they
are also kept as torch tensors per device (created on first use), so a step only gathers values with
an index tensor instead of converting numpy arrays every time.
"""

from __future__ import annotations

import numpy as np
import torch

# Every per-step table that the diffusion reads; see NoiseSchedule.__init__ for the formulas.
TABLE_NAMES = (
    "betas",
    "log_betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def linear_betas(num_timesteps: int = 1000) -> np.ndarray:
    """ADM's linear schedule: β from 1e-4 to 0.02 over 1000 steps (both ends scaled by 1000/T otherwise)."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be at least 1, got {num_timesteps}")
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


class NoiseSchedule:
    """Per-step tables of a discrete Gaussian diffusion with the given betas (ᾱ_t = Π_{s≤t} (1 − β_s))."""

    def __init__(self, betas) -> None:
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not np.all((betas > 0) & (betas <= 1)):
            raise ValueError("betas must lie in (0, 1]")
        self.num_timesteps = int(betas.size)

        alphas_cumprod = np.cumprod(1.0 - betas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])

        # Forward process q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 − ᾱ_t) I) and its inversion for x_0 from ε.
        tables = {
            "betas": betas,
            "log_betas": np.log(betas),
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1.0),
        }

        # Posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, β̃_t I),
        # β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t); β̃_0 = 0, so its log is clipped to the t = 1 value.
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        if self.num_timesteps > 1:
            clipped = np.append(posterior_variance[1], posterior_variance[1:])
        else:  # a single step (t = 0) never adds noise; any finite value will do
            clipped = betas.copy()
        tables["posterior_variance"] = posterior_variance
        tables["posterior_log_variance_clipped"] = np.log(clipped)
        tables["posterior_mean_coef1"] = betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        tables["posterior_mean_coef2"] = (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod)

        assert set(tables) == set(TABLE_NAMES)
        self.numpy: dict[str, np.ndarray] = tables
        self._on_device: dict[torch.device, dict[str, torch.Tensor]] = {}

    def tables(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """All tables as 1-D tensors on `device` (float64; float32 where the device lacks float64)."""
        device = torch.device(device)
        cached = self._on_device.get(device)
        if cached is None:
            dtype = torch.float32 if device.type == "mps" else torch.float64
            cached = {name: torch.as_tensor(arr, dtype=dtype, device=device) for name, arr in self.numpy.items()}
            self._on_device[device] = cached
        return cached

    def gather(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Table `name` at steps `t` (shape (B,)), shaped (B, 1, ..., 1) to broadcast against `like`.

        The result has `like`'s floating dtype, but never less than float32 (ADM gathers in float64
        and casts to float32).
        """
        dtype = like.dtype if like.is_floating_point() else torch.float32
        dtype = torch.promote_types(dtype, torch.float32)
        values = self.tables(t.device)[name][t].to(dtype)
        return values.view(-1, *([1] * (like.ndim - 1)))
