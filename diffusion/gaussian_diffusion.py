"""Gaussian diffusion with ε-prediction and learned-range variance (DiT/ADM; docs/design.md, "Diffusion").

A model function is called as `model_fn(x_t, t, **model_kwargs)` and returns (B, 2C, ...): the predicted
noise ε̂ in the first C channels and the variance interpolation v (meant to lie in [−1, 1]) in the last C.
Nothing is clipped: x̂_0 is used as reconstructed from ε̂ (latents are not bounded).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from .losses import LN2, discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .schedule import NoiseSchedule

ModelFn = Callable[..., torch.Tensor]


class GaussianDiffusion:
    """Forward process, model posterior, training loss and the DDPM / DDIM samplers for given betas."""

    def __init__(self, betas) -> None:
        self.schedule = NoiseSchedule(betas)
        self.num_timesteps = self.schedule.num_timesteps

    # numpy views of the schedule, for inspection and tests
    @property
    def betas(self) -> np.ndarray:
        return self.schedule.numpy["betas"]

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return self.schedule.numpy["alphas_cumprod"]

    def _wrap_model(self, model_fn: ModelFn) -> ModelFn:
        """Hook for subclasses that must change what the model sees (respacing); identity here."""
        return model_fn

    def _coef(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.schedule.gather(name, t, x)

    # ------------------------------------------------------------------ forward process

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 − ᾱ_t) I), using `noise` as the standard normal draw."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        return (self._coef("sqrt_alphas_cumprod", t, x_start) * x_start
                + self._coef("sqrt_one_minus_alphas_cumprod", t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t−1} | x_t, x_0), each broadcast to x_t's shape."""
        mean = (self._coef("posterior_mean_coef1", t, x_t) * x_start
                + self._coef("posterior_mean_coef2", t, x_t) * x_t)
        variance = self._coef("posterior_variance", t, x_t).expand_as(x_t)
        log_variance = self._coef("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    # ------------------------------------------------------------------ reverse process

    @staticmethod
    def _split_output(model_output: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε̂, v) from a (B, 2C, ...) model output; upcast to at least float32 (e.g. under bf16 autocast)."""
        channels = x.shape[1]
        expected = (x.shape[0], 2 * channels, *x.shape[2:])
        if tuple(model_output.shape) != expected:
            raise ValueError(f"model output has shape {tuple(model_output.shape)}, expected {expected} "
                             f"(ε and variance channels for a learned-sigma model)")
        dtype = torch.promote_types(model_output.dtype, torch.float32)
        eps, v = model_output.to(dtype).split(channels, dim=1)
        return eps, v

    def _p_mean_variance_from_output(self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> dict:
        eps, v = self._split_output(model_output, x)
        # Learned range: interpolate the log-variance between β̃_t (v = −1) and β_t (v = +1).
        min_log = self._coef("posterior_log_variance_clipped", t, x)
        max_log = self._coef("log_betas", t, x)
        frac = (v + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        # x̂_0 = (x_t − sqrt(1 − ᾱ_t) ε̂) / sqrt(ᾱ_t), written with the precomputed reciprocals.
        pred_xstart = (self._coef("sqrt_recip_alphas_cumprod", t, x) * x
                       - self._coef("sqrt_recipm1_alphas_cumprod", t, x) * eps)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": torch.exp(log_variance), "log_variance": log_variance,
                "pred_xstart": pred_xstart, "eps": eps}

    def p_mean_variance(self, model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor,
                        model_kwargs: dict | None = None) -> dict:
        """Run the model and return p(x_{t−1} | x_t) as a dict with keys
        mean, variance, log_variance, pred_xstart (x̂_0) and eps (ε̂)."""
        model_fn = self._wrap_model(model_fn)
        model_output = model_fn(x, t, **(model_kwargs or {}))
        return self._p_mean_variance_from_output(model_output, x, t)

    # ------------------------------------------------------------------ training loss

    def _vb_terms_bpd(self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor,
                      t: torch.Tensor) -> torch.Tensor:
        """Per-sample VB term in bits/dim: KL(q(x_{t−1}|x_t,x_0) || p(x_{t−1}|x_t)) for t > 0, and the
        discretised-Gaussian decoder NLL −log p(x_0|x_1) for t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        p = self._p_mean_variance_from_output(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, p["mean"], p["log_variance"])) / LN2
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
            x_start, means=p["mean"], log_scales=0.5 * p["log_variance"])) / LN2
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(self, model_fn: ModelFn, x_start: torch.Tensor, t: torch.Tensor,
                        model_kwargs: dict | None = None, noise: torch.Tensor | None = None) -> dict:
        """Per-sample losses at steps `t` (shape (B,)): a dict of (B,) tensors
        loss = mse + vb, mse = mean((ε − ε̂)²), vb = VB term in bits/dim (not rescaled).

        The VB term sees ε̂ detached, so it trains only the variance channels (ADM's hybrid loss)."""
        model_fn = self._wrap_model(model_fn)
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        model_output = model_fn(x_t, t, **(model_kwargs or {}))
        eps, v = self._split_output(model_output, x_t)

        mse = mean_flat((noise - eps) ** 2)
        frozen_mean_output = torch.cat([eps.detach(), v], dim=1)
        vb = self._vb_terms_bpd(frozen_mean_output, x_start, x_t, t)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    # ------------------------------------------------------------------ samplers

    @staticmethod
    def _initial_noise(shape, noise, device, generator) -> torch.Tensor:
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise shape {tuple(noise.shape)} != requested shape {tuple(shape)}")
            return noise if device is None else noise.to(device)
        if device is None:
            device = generator.device if generator is not None else torch.device("cpu")
        return torch.randn(tuple(shape), generator=generator, device=device)

    def _reverse_steps(self, progress: bool, desc: str):
        steps = range(self.num_timesteps - 1, -1, -1)
        return tqdm(steps, desc=desc, leave=False) if progress else steps

    @staticmethod
    def _not_last_step(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """1 where t > 0 and 0 at t = 0 (no noise is added on the final step), shaped to broadcast."""
        return (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))

    @torch.no_grad()
    def p_sample(self, model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None = None,
                 generator: torch.Generator | None = None) -> dict:
        """One ancestral step x_t -> x_{t−1} ~ N(μ_θ, σ²_θ) with the learned variance."""
        out = self.p_mean_variance(model_fn, x, t, model_kwargs)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=out["mean"].dtype)
        sample = out["mean"] + self._not_last_step(t, x) * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    @torch.no_grad()
    def p_sample_loop(self, model_fn: ModelFn, shape, noise: torch.Tensor | None = None,
                      model_kwargs: dict | None = None, device=None, progress: bool = False,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Ancestral (DDPM) sampling over every step of this diffusion, starting from `noise` or a draw
        from `generator`; all randomness comes from `generator` (on `device`)."""
        model_fn = self._wrap_model(model_fn)
        x = self._initial_noise(shape, noise, device, generator)
        for i in self._reverse_steps(progress, "DDPM"):
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            x = self.p_sample(model_fn, x, t, model_kwargs, generator)["sample"]
        return x

    @torch.no_grad()
    def ddim_sample(self, model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None = None,
                    eta: float = 0.0, generator: torch.Generator | None = None) -> dict:
        """One DDIM step: x_{t−1} = sqrt(ᾱ_{t−1}) x̂_0 + sqrt(1 − ᾱ_{t−1} − σ²) ε̂ + σ z,
        σ = η sqrt((1 − ᾱ_{t−1}) / (1 − ᾱ_t)) sqrt(1 − ᾱ_t / ᾱ_{t−1}); η = 0 is deterministic."""
        out = self.p_mean_variance(model_fn, x, t, model_kwargs)
        alpha_bar = self._coef("alphas_cumprod", t, x)
        alpha_bar_prev = self._coef("alphas_cumprod_prev", t, x)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        sample = (out["pred_xstart"] * torch.sqrt(alpha_bar_prev)
                  + torch.sqrt((1 - alpha_bar_prev - sigma ** 2).clamp(min=0)) * out["eps"])
        if eta > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=sample.dtype)
            sample = sample + self._not_last_step(t, x) * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    @torch.no_grad()
    def ddim_sample_loop(self, model_fn: ModelFn, shape, noise: torch.Tensor | None = None,
                         model_kwargs: dict | None = None, device=None, progress: bool = False,
                         generator: torch.Generator | None = None, eta: float = 0.0) -> torch.Tensor:
        """DDIM sampling (η = 0 by default: the only randomness is the starting noise)."""
        model_fn = self._wrap_model(model_fn)
        x = self._initial_noise(shape, noise, device, generator)
        for i in self._reverse_steps(progress, "DDIM"):
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            x = self.ddim_sample(model_fn, x, t, model_kwargs, eta, generator)["sample"]
        return x
