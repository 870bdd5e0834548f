"""Class-conditional sampling with classifier-free guidance or autoguidance, on the DiT/ADM diffusion.

Samplers:
  ddpm          ancestral steps with the learned variance (the paper's protocol, 250 steps);
  ddim          DDIM, η = 0 (deterministic) unless `eta` is given;
  dpm-solver++  DPM-Solver++(2M) (Lu et al. 2022) on the probability-flow ODE;
  heun          Heun's 2nd-order method on the Karras σ grid (EDM; N steps cost 2N − 1 model calls);
  unipc         UniPC (bh2, order 2) on the same ODE.
The three ODE solvers are diffusers' schedulers set up for our process (the 1000 linear βs, ε-prediction);
they read the ε channels only: the learned variance matters only to ancestral sampling.

Guidance: with `cfg_scale` s ≠ 1, ε = ε_ref + s·(ε(c) − ε_ref), where ε_ref is the model's unconditional
prediction (classifier-free guidance; conditional and null-label halves in one doubled batch) or, with a
`guide` model, that model's conditional prediction (autoguidance, Karras et al. 2024). The variance channels
come from the main model's conditional prediction. `guidance_interval = (lo, hi)` applies the guidance only
at noise levels σ in (lo, hi] (Kynkäänniemi et al. 2024), σ = sqrt((1 − ᾱ_t)/ᾱ_t) being the EDM noise level
of step t (0.01 at t = 0, 157 at t = 999 for our schedule); elsewhere the conditional prediction alone is
used and neither the unconditional half nor the guide is run.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm import tqdm

from .respace import create_diffusion
from .schedule import linear_betas

SAMPLERS = ("ddpm", "ddim", "dpm-solver++", "heun", "unipc")
ODE_SAMPLERS = ("dpm-solver++", "heun", "unipc")
NUM_TRAIN_STEPS = 1000


def noise_levels(num_timesteps: int = NUM_TRAIN_STEPS) -> np.ndarray:
    """σ_t = sqrt((1 − ᾱ_t) / ᾱ_t) of every training step: the VP process x_t = sqrt(ᾱ_t)(x_0 + σ_t ε)."""
    alphas_cumprod = np.cumprod(1.0 - linear_betas(num_timesteps))
    return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


_LOG_SIGMAS = np.log(noise_levels())


def noise_level(t: float) -> float:
    """σ at a (possibly fractional, as on Heun's Karras grid) training step t: log σ interpolated linearly
    between the integer steps, the inverse of how diffusers maps σ back to t."""
    return float(np.exp(np.interp(t, np.arange(NUM_TRAIN_STEPS), _LOG_SIGMAS)))


def check_guidance_interval(interval) -> tuple[float, float] | None:
    if interval is None:
        return None
    lo, hi = (float(v) for v in interval)
    if not (math.isfinite(lo) and 0 <= lo < hi):  # hi may be inf: no upper limit
        raise ValueError(f"guidance interval must be 0 <= LO < HI (noise levels σ), got {lo:g} {hi:g}")
    return lo, hi


class GuidedDenoiser:
    """model_fn(x, t) -> (B, 2C): guided ε channels and the main model's conditional variance channels.

    Counts its network calls in `calls` (one entry per call: which network, batch size) so tests can check
    that no unconditional or guide pass is spent outside the guidance interval.
    """

    def __init__(self, model, labels: torch.Tensor, *, cfg_scale: float, guide=None, guidance_interval=None):
        self.model, self.guide, self.labels, self.cfg_scale = model, guide, labels, float(cfg_scale)
        self.interval = check_guidance_interval(guidance_interval)
        self.channels = model.in_channels
        self.calls: list[tuple[str, int]] = []
        self._cfg_labels: torch.Tensor | None = None  # labels then null labels, built once at the first guided step

    def _guided_at(self, t: torch.Tensor) -> bool:
        if self.cfg_scale == 1:
            return False
        if self.interval is None:
            return True
        lo, hi = self.interval
        return lo < noise_level(float(t.reshape(-1)[0])) <= hi  # one host sync per step

    def _run(self, net, name, x, t, y):
        self.calls.append((name, x.shape[0]))
        return net(x, t, y)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c, s = self.channels, self.cfg_scale
        if not self._guided_at(t):
            return self._run(self.model, "cond", x, t, self.labels)
        if self.guide is None:  # classifier-free: conditional and null-label halves in one batch
            if self._cfg_labels is None:
                self._cfg_labels = torch.cat([self.labels, torch.full_like(self.labels, self.model.num_classes)])
            out = self._run(self.model, "cond+uncond", torch.cat([x, x]), torch.cat([t, t]), self._cfg_labels)
            cond, ref_eps = out[: len(x)], out[len(x):, :c]
        else:  # autoguidance: the weaker model's conditional prediction is the reference
            cond = self._run(self.model, "cond", x, t, self.labels)
            ref_eps = self._run(self.guide, "guide", x, t, self.labels)[:, :c]
        eps = ref_eps + s * (cond[:, :c] - ref_eps)
        return torch.cat([eps, cond[:, c:]], dim=1)


def ode_scheduler(sampler: str, num_steps: int, device):
    """The diffusers scheduler of `sampler` for our process (1000 linear βs, ε-prediction), set to `num_steps`."""
    from diffusers import DPMSolverMultistepScheduler, HeunDiscreteScheduler, UniPCMultistepScheduler

    common = dict(num_train_timesteps=NUM_TRAIN_STEPS, trained_betas=linear_betas(NUM_TRAIN_STEPS),
                  prediction_type="epsilon")
    if sampler == "dpm-solver++":
        scheduler = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2)
    elif sampler == "heun":
        scheduler = HeunDiscreteScheduler(**common, use_karras_sigmas=True)
    elif sampler == "unipc":
        scheduler = UniPCMultistepScheduler(**common, solver_order=2, solver_type="bh2", predict_x0=True)
    else:
        raise ValueError(f"{sampler!r} is not an ODE sampler ({', '.join(ODE_SAMPLERS)})")
    scheduler.set_timesteps(num_steps, device=device)
    return scheduler


@torch.no_grad()
def ode_sample_loop(sampler: str, model_fn, noise: torch.Tensor, num_steps: int, progress: bool = False):
    """Solve the probability-flow ODE from `noise` (unit variance, at t = 999) with a diffusers scheduler;
    `model_fn(x, t)` returns (B, 2C) and only its first C (ε) channels are used."""
    scheduler = ode_scheduler(sampler, num_steps, noise.device)
    channels = noise.shape[1]
    x = noise * scheduler.init_noise_sigma  # Heun works in the variance-exploding x/sqrt(ᾱ) scale
    steps = scheduler.timesteps
    for t in tqdm(steps, desc=sampler, leave=False) if progress else steps:
        model_input = scheduler.scale_model_input(x, t)
        out = model_fn(model_input, t.expand(x.shape[0]))
        eps = out[:, :channels].float()
        x = scheduler.step(eps, t, x).prev_sample
    return x


def num_model_calls(sampler: str, num_steps: int) -> int:
    """Network evaluations per image and guidance branch: Heun evaluates twice on every step but the last."""
    return 2 * num_steps - 1 if sampler == "heun" else num_steps


@torch.no_grad()
def sample_images(model, labels, shape_chw, *, cfg_scale: float, num_steps: int = 250, sampler: str = "ddpm",
                  generator: torch.Generator | None = None, device=None, progress: bool = False, eta: float = 0.0,
                  guide=None, guidance_interval=None, denoiser: GuidedDenoiser | None = None) -> torch.Tensor:
    """Sample one image per label; returns (B, C, H, W) in the model's normalised (latent or pixel) space.

    `model` offers forward(x, t, y), in_channels and num_classes (the null label); `guide`, if given, is a
    model of the same kind (autoguidance). See the module docstring for the samplers and the guidance. DDPM
    and DDIM respace the diffusion to `num_steps` evenly strided steps; `eta` is DDIM's η. All randomness
    comes from `generator`, which must live on `device`. An nn.Module is put in eval mode while sampling
    (class dropout off) and restored afterwards. `denoiser` replaces the GuidedDenoiser built here (tests).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= NUM_TRAIN_STEPS:
        raise ValueError(f"num_steps must be an integer in 1..{NUM_TRAIN_STEPS}, got {num_steps!r}")
    if sampler == "heun" and num_steps < 2:
        raise ValueError("the heun sampler needs at least 2 steps")
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")
    if not math.isfinite(cfg_scale):
        raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale}")
    if labels is None:
        raise ValueError("labels are required (one class index per image)")

    if device is None:
        parameter = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        device = parameter.device if parameter is not None else torch.device("cpu")
    labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
    z = torch.randn((labels.shape[0], *shape_chw), generator=generator, device=device)
    model_fn = denoiser or GuidedDenoiser(model, labels, cfg_scale=cfg_scale, guide=guide,
                                          guidance_interval=guidance_interval)

    nets = [m for m in (model, guide) if isinstance(m, torch.nn.Module)]
    was_training = [m.training for m in nets]
    for m in nets:
        m.eval()
    try:
        if sampler in ODE_SAMPLERS:
            return ode_sample_loop(sampler, model_fn, z, num_steps, progress)
        diffusion = create_diffusion(str(num_steps))
        if sampler == "ddpm":
            return diffusion.p_sample_loop(model_fn, z.shape, noise=z, device=device, progress=progress,
                                           generator=generator)
        return diffusion.ddim_sample_loop(model_fn, z.shape, noise=z, device=device, progress=progress,
                                          generator=generator, eta=eta)
    finally:
        for m, mode in zip(nets, was_training):
            m.train(mode)
