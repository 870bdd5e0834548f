"""Statistics and normalisation: the per-channel mixture statistics of a latent set, the per-channel
statistics of a pixel set, (de)normalisation, uint8 images, and the fixed subset statistics are estimated from."""
from __future__ import annotations

import numpy as np
import torch

from data.base import DatasetError

PIXEL_STATS_MAX_IMAGES = 10_000  # ImageFolder stats use at most this many images (evenly spaced)


def mixture_stats(means: torch.Tensor, stds: torch.Tensor, chunk: int = 4096) -> dict[str, torch.Tensor]:
    """Per-channel mean/std of the Gaussian mixture sum_i N(mu_i, sigma_i^2) over all items and positions.

    ``mean_c = E[mu]``, ``var_c = E[sigma^2] + E[(mu - mean_c)^2]`` (expectations over items and H x W).
    Accumulates in float64 over chunks of items, so it neither copies nor loses precision on ImageNet-sized
    arrays. Returns float32 tensors ``{"mean": [C], "std": [C]}`` (the ``stats.pt`` layout).
    """
    if means.shape != stds.shape or means.dim() < 2:
        raise DatasetError(f"mixture_stats needs equal-shape N x C x ... tensors, got {tuple(means.shape)} "
                           f"and {tuple(stds.shape)}")
    n, c = means.shape[0], means.shape[1]
    if n == 0:
        raise DatasetError("mixture_stats needs at least one item")
    per_item = int(np.prod(means.shape[2:], dtype=np.int64)) if means.dim() > 2 else 1
    count = n * per_item
    s_mu = torch.zeros(c, dtype=torch.float64)
    for i in range(0, n, chunk):
        s_mu += means[i:i + chunk].double().transpose(0, 1).reshape(c, -1).sum(1)
    mean = s_mu / count
    s_var = torch.zeros(c, dtype=torch.float64)
    shape = (1, c) + (1,) * (means.dim() - 2)
    for i in range(0, n, chunk):
        mu = means[i:i + chunk].double()
        sd = stds[i:i + chunk].double()
        s_var += (sd.square() + (mu - mean.view(shape)).square()).transpose(0, 1).reshape(c, -1).sum(1)
    std = (s_var / count).sqrt()
    return {"mean": mean.float(), "std": std.float()}


def channel_stats(x: torch.Tensor) -> dict[str, list[float]]:
    """Population mean/std per channel of an N x C x H x W tensor (float64 accumulation)."""
    xd = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    mean = xd.mean(1)
    std = xd.std(1, unbiased=False).clamp_min(1e-8)
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def _stats_tensors(stats: dict, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.as_tensor(stats["mean"], dtype=torch.float32)
    std = torch.as_tensor(stats["std"], dtype=torch.float32)
    shape = (-1, 1, 1) if like.dim() == 3 else (1, -1) + (1,) * (like.dim() - 2)
    dtype = like.dtype if like.is_floating_point() else torch.float32
    return mean.to(like.device, dtype).reshape(shape), std.to(like.device, dtype).reshape(shape)


def normalize(x: torch.Tensor, stats: dict) -> torch.Tensor:
    """``(x - mean_c) / std_c`` for ``C x H x W`` or ``B x C x H x W``; stats = {"mean": [C], "std": [C]}."""
    mean, std = _stats_tensors(stats, x)
    return (x - mean) / std


def denormalize(x: torch.Tensor, stats: dict) -> torch.Tensor:
    """Inverse of :func:`normalize`: ``x * std_c + mean_c`` (``C x H x W`` or ``B x C x H x W``)."""
    mean, std = _stats_tensors(stats, x)
    return x * std + mean


def to_uint8_images(x_pixels: torch.Tensor) -> np.ndarray:
    """Map pixel tensors in [-1, 1] (``B x C x H x W`` or ``C x H x W``) to uint8 ``B x H x W x 3`` numpy.

    Clamped, ``127.5 * x + 128`` truncated (= rounding, as in DiT's ``sample_ddp.py``); one channel is
    repeated to three (the ADM evaluator's format).
    """
    x = torch.as_tensor(x_pixels).detach()
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"to_uint8_images expects B x C x H x W with C in (1, 3), got {tuple(x.shape)}")
    x = (x.float() * 127.5 + 128.0).clamp(0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()



def spaced_subset(n: int, at_most: int) -> np.ndarray:
    """Indices of at most ``at_most`` items spread evenly over ``0 .. n-1`` (all of them when n is smaller):
    the fixed subset the statistics of an image set are estimated from."""
    return np.unique(np.linspace(0, n - 1, min(n, at_most)).round().astype(np.int64))

