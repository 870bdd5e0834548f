"""Gaussian diffusion of DiT/ADM: schedule, loss, respacing; DDPM, DDIM and ODE samplers, guidance."""

from .gaussian_diffusion import GaussianDiffusion
from .respace import SpacedDiffusion, create_diffusion, space_timesteps
from .sampling import sample_images
from .schedule import NoiseSchedule, linear_betas

__all__ = [
    "GaussianDiffusion",
    "NoiseSchedule",
    "SpacedDiffusion",
    "create_diffusion",
    "linear_betas",
    "sample_images",
    "space_timesteps",
]
