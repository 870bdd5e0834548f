"""Class-conditional sampling entry point with classifier-free guidance (docs/design.md, "Diffusion")."""

from __future__ import annotations

import torch

from .respace import create_diffusion

SAMPLERS = ("ddpm", "ddim")


@torch.no_grad()
def sample_images(model, labels, shape_chw, *, cfg_scale: float, num_steps: int = 250, sampler: str = "ddpm",
                  generator: torch.Generator | None = None, device=None, progress: bool = False) -> torch.Tensor:
    """Sample one image per label; returns (B, C, H, W) in the model's normalised (latent or pixel) space.

    `model` offers forward(x, t, y), forward_with_cfg(x, t, y, cfg_scale) and num_classes (the null label).
    With cfg_scale == 1 the model is run conditionally; otherwise the batch is doubled (conditional half,
    null-label half), run through forward_with_cfg, and the first half is returned. The diffusion is
    respaced to `num_steps` evenly strided steps; `sampler` is "ddpm" (ancestral, learned variance) or
    "ddim" (η = 0). All randomness comes from `generator`, which must live on `device`. An nn.Module is
    put in eval mode while sampling (class dropout off) and restored afterwards.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= 1000:
        raise ValueError(f"num_steps must be an integer in 1..1000, got {num_steps!r}")
    if labels is None:
        raise ValueError("labels are required (one class index per image)")

    if device is None:
        parameter = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        device = parameter.device if parameter is not None else torch.device("cpu")
    labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
    shape = (labels.shape[0], *shape_chw)

    diffusion = create_diffusion(str(num_steps))
    loop = diffusion.p_sample_loop if sampler == "ddpm" else diffusion.ddim_sample_loop
    z = torch.randn(shape, generator=generator, device=device)
    guided = cfg_scale != 1
    if guided:
        # Both halves start from the same noise; forward_with_cfg guides the ε-channels across them.
        z = torch.cat([z, z])
        y = torch.cat([labels, torch.full_like(labels, model.num_classes)])
        model_fn, model_kwargs = model.forward_with_cfg, {"y": y, "cfg_scale": cfg_scale}
    else:
        model_fn, model_kwargs = model.forward, {"y": labels}

    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()
    try:
        samples = loop(model_fn, z.shape, noise=z, model_kwargs=model_kwargs, device=device,
                       progress=progress, generator=generator)
    finally:
        if was_training:
            model.train()
    return samples[: labels.shape[0]] if guided else samples
