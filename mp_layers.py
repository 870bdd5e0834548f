"""Magnitude-preserving (MP) primitives and the small modules built on them.

Every technique of "The Art of Balance" (Bill & Jensen, 2025), ported from EDM2 (Karras et al., 2024),
is a switch in `MPConfig`; the layers below read only the switches they need.

Norms are always computed in fp32 and the result is cast back to the input's dtype, which keeps the
layers exact under bf16 autocast.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
from collections import defaultdict
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

MP_SILU_RMS = 0.596  # RMS of silu(x) for x ~ N(0, 1)


# ----------------------------------------------------------------------------------------------------
# Configuration: the eight switches.


@dataclasses.dataclass(frozen=True)
class MPConfig:
    """The eight magnitude-preservation switches. Field names are the CLI flags with underscores."""

    use_cosine_attention: bool = False
    use_weight_normalization: bool = False
    use_forced_weight_normalization: bool = False
    use_mp_residual: bool = False
    use_mp_silu: bool = False
    use_no_layernorm: bool = False
    use_mp_pos_enc: bool = False
    use_mp_embedding: bool = False

    @classmethod
    def switch_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def all_on(cls) -> "MPConfig":
        return cls(**{name: True for name in cls.switch_names()})

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Adds `--use-...` for each switch and `--use-all-mp` that turns all eight on."""
        group = parser.add_argument_group("magnitude preservation (each switch is one technique)")
        for name in cls.switch_names():
            group.add_argument("--" + name.replace("_", "-"), action="store_true", dest=name)
        group.add_argument("--use-all-mp", action="store_true", help="turn on all eight MP switches")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "MPConfig":
        if getattr(args, "use_all_mp", False):
            return cls.all_on()
        return cls(**{name: bool(getattr(args, name, False)) for name in cls.switch_names()})

    def to_dict(self) -> dict[str, bool]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MPConfig":
        unknown = set(d) - set(cls.switch_names())
        if unknown:
            raise ValueError(f"unknown MP switches {sorted(unknown)}; valid: {cls.switch_names()}")
        return cls(**{k: bool(v) for k, v in d.items()})

    def enabled(self) -> list[str]:
        return [name for name in self.switch_names() if getattr(self, name)]

    def describe(self) -> str:
        on = self.enabled()
        if len(on) == len(self.switch_names()):
            return "all eight MP switches"
        return ", ".join(n.removeprefix("use_") for n in on) if on else "no MP switches"


# ----------------------------------------------------------------------------------------------------
# Primitives.


def norm_dtype(x: torch.Tensor) -> torch.dtype:
    """Norms are computed in fp32, or in the input's dtype where it is wider (float64)."""
    return torch.promote_types(x.dtype, torch.float32)


def normalize(x: torch.Tensor, dim: int = -1, eps: float = 1e-4) -> torch.Tensor:
    """Scale each slice along `dim` to RMS 1: x·sqrt(d) / (‖x‖₂ + eps) (EDM2 eq. 47), norm in fp32 or wider."""
    if dim in (-1, x.ndim - 1) and x.requires_grad and torch.is_grad_enabled():
        return scale_rows_by_inverse_norm(x, math.sqrt(x.shape[-1]), eps)
    dtype = norm_dtype(x)
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=dtype)
    scale = math.sqrt(x.shape[dim]) / (norm + eps)
    return (x.to(dtype) * scale).to(x.dtype)


class _ScaleRowsByInverseNorm(torch.autograd.Function):
    """y = x·c / (‖x‖ + eps) along the last dim (c a number), with a hand-written backward.

    Same math as autograd through `normalize`; the backward reads x and the incoming gradient twice
    instead of ~8 passes (mul, sum, div, masked_fill, mul, add of autograd's own version).
    With n = ‖x‖, s = c/(n+eps), r = Σ g·x:  ∂L/∂x = s·g − s·r / ((n+eps)·n) · x.
    """

    @staticmethod
    def forward(ctx, x, c, eps):
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=norm_dtype(x))
        scale = c / (norm + eps)
        ctx.save_for_backward(x, norm, scale)
        ctx.eps = eps
        return (x.to(scale.dtype) * scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, norm, scale = ctx.saved_tensors
        xf = x.to(scale.dtype)
        r = torch.linalg.vecdot(grad.to(scale.dtype), xf, dim=-1).unsqueeze(-1)
        coef = scale * r / ((norm + ctx.eps) * norm.clamp_min(1e-30))  # x = 0 ⇒ r = 0 ⇒ coef = 0
        return torch.addcmul(grad * scale, xf, coef, value=-1).to(x.dtype), None, None


def scale_rows_by_inverse_norm(x: torch.Tensor, c: float, eps: float = 1e-4) -> torch.Tensor:
    """x·c / (‖x‖₂ + eps) per row (last dim): normalize(x)·c/sqrt(d), one fused autograd node."""
    return _ScaleRowsByInverseNorm.apply(x, c, eps)


def mp_sum_weights(t: float) -> tuple[float, float]:
    """The weights (wa, wb) of mp_sum: wa·a + wb·b = ((1−t)a + t·b)/sqrt((1−t)² + t²)."""
    norm = math.sqrt((1 - t) ** 2 + t**2)
    return (1 - t) / norm, t / norm


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving blend ((1−t)a + t·b)/sqrt((1−t)² + t²) (EDM2 eq. 88): unit in, unit out."""
    dtype = torch.promote_types(a.dtype, b.dtype)  # autocast may hand us a bf16 and an fp32 input
    wa, wb = mp_sum_weights(t)
    return torch.add(a.to(dtype) * wa, b.to(dtype), alpha=wb)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU divided by its RMS on a standard normal (EDM2 eq. 81), so unit-variance input keeps RMS 1."""
    return F.silu(x) / MP_SILU_RMS


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of tokens (B, T, D) by per-sample shift/scale (B, D)."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def activation(mp: MPConfig):
    return mp_silu if mp.use_mp_silu else F.silu


# ----------------------------------------------------------------------------------------------------
# Weight handling shared by the linear layer and the embedding table.


class _InferenceWeightCache:
    """Keeps the effective (normalised) weight between calls while nothing can change it.

    Used only in eval mode with autograd off (sampling): the weight is normalised once and reused for
    every sampling step. The key holds each source tensor's version counter and storage, so an
    in-place update (optimizer step, load_state_dict, EMA copy) or a device move invalidates it.
    """

    def __init__(self):
        self.key = None
        self.value = None

    def get(self, module: nn.Module, sources: Iterable[torch.Tensor], compute):
        if module.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            if self.key is not None:  # (no attribute writes on the hot path: none for torch.compile to replay)
                self.key = self.value = None
            return compute()
        key = tuple((s._version, s.data_ptr(), s.dtype) for s in sources)
        if key != self.key:
            self.value = compute()
            self.key = key
        return self.value


class MPLinear(nn.Module):
    """Bias-free linear layer, plain, weight-normalised, and/or force-normalised (DESIGN §3.2).

    - plain: kaiming-uniform init (or zeros with `zero_init`), used as is.
    - `weight_norm`: N(0,1) init; forward uses normalize(W)·g/sqrt(fan_in) with g = 1, or a learnable
      scalar gain starting at 0 when `zero_init` (the layer outputs 0 at init).
    - `forced_weight_norm`: the rows of W are kept at RMS 1 by `project_forced_weights_` (called at
      construction and after every optimiser step); the forward divides by sqrt(fan_in) even when
      weight_norm is off, so the layer preserves magnitude (the reference code forgets this).
    - `input_bias`: the last input feature is a constant one (the patch embedding's stand-in for a
      bias); the caller passes inputs without it and that weight column is applied as a bias, which
      is the same math without materialising the ones.
    """

    def __init__(self, in_features: int, out_features: int, *, weight_norm: bool, forced_weight_norm: bool,
                 zero_init: bool = False, input_bias: bool = False, input_gain: float = 1.0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_norm = weight_norm
        self.forced_weight_norm = forced_weight_norm
        self.input_bias = input_bias
        self.input_gain = input_gain  # the layer computes linear(input_gain · x), folded into the weight
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.gain = nn.Parameter(torch.zeros(())) if (weight_norm and zero_init) else None
        if weight_norm:
            nn.init.normal_(self.weight)
        elif zero_init:
            nn.init.zeros_(self.weight)
        else:
            nn.init.kaiming_uniform_(self.weight, a=0)  # U(±sqrt(6 / fan_in))
        if forced_weight_norm:
            project_forced_weights_([self.weight])
        self._cache = _InferenceWeightCache()
        self.step_weight: torch.Tensor | None = None  # set by `scaled_weights_for_step` for one forward

    @property
    def scales_weight(self) -> bool:
        """Whether the effective weight differs from the raw one (and is worth computing in a batch)."""
        return self.weight_norm or self.forced_weight_norm or self.input_gain != 1

    def weight_scale(self) -> float:
        """The constant factor of the effective weight: input gain, and 1/sqrt(fan_in) under (forced) WN."""
        if self.weight_norm or self.forced_weight_norm:
            return self.input_gain / math.sqrt(self.in_features)
        return self.input_gain

    def effective_weight(self) -> torch.Tensor:
        """The matrix the forward multiplies by (the batched computation, for this layer alone)."""
        return batched_effective_weights([self])[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.step_weight is not None:
            w = self.step_weight
        else:
            sources = [self.weight] if self.gain is None else [self.weight, self.gain]
            w = self._cache.get(self, sources, self.effective_weight)
        if self.input_bias:
            return F.linear(x, w[:, :-1], w[:, -1])
        return F.linear(x, w)

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, weight_norm={self.weight_norm}, "
                f"forced_weight_norm={self.forced_weight_norm}, gain={self.gain is not None}"
                + (f", input_gain={self.input_gain:.4g}" if self.input_gain != 1 else ""))


class MPEmbedding(nn.Module):
    """Lookup table whose rows are optionally weight- and force-normalised to RMS 1.

    With `normalized` the table is N(0,1)-initialised and each looked-up row is normalised; only the
    gathered rows are normalised (normalisation is per row, so this is the same as normalising the
    table first, at a fraction of the cost).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, weight_norm: bool, forced_weight_norm: bool):
        super().__init__()
        self.weight_norm = weight_norm
        self.forced_weight_norm = forced_weight_norm
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))
        if weight_norm:
            nn.init.normal_(self.weight)
        else:
            nn.init.kaiming_uniform_(self.weight, a=0)
        if forced_weight_norm:
            project_forced_weights_([self.weight])

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(index, self.weight)
        return normalize(rows) if self.weight_norm else rows


@torch.no_grad()
def project_forced_weights_(weights: list[torch.Tensor]) -> None:
    """W ← normalize(W) row-wise, for many weights at once.

    Weights are grouped by row length; each group is normalised with one concatenated reduction and
    one fused multi-tensor multiply, instead of a handful of kernels per layer.
    """
    groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for w in weights:
        groups[(w.shape[-1], w.device, w.dtype)].append(w)
    for (d, _, _), ws in groups.items():
        rows = torch.cat([w if w.ndim == 2 else w.reshape(-1, d) for w in ws])  # (no per-weight op for 2-D)
        norm = torch.linalg.vector_norm(rows, dim=-1, keepdim=True, dtype=norm_dtype(rows))
        scale = (math.sqrt(d) / (norm + 1e-4)).to(rows.dtype)
        scales = [s if w.ndim == 2 else s.view(*w.shape[:-1], 1)
                  for s, w in zip(scale.split([w.numel() // d for w in ws]), ws)]
        torch._foreach_mul_(ws, scales)


def batched_effective_weights(layers: list[MPLinear]) -> list[torch.Tensor]:
    """The effective weights of many layers (the matrices their forwards multiply by), computed together.

    Weight norm: normalize(W)·gain·input_gain/sqrt(fan_in); forced WN alone: W·input_gain/sqrt(fan_in)
    (W already has unit rows); plain: W·input_gain. Layers are grouped by fan-in and scale; each group's
    weights are concatenated, their rows normalised with one reduction and split back, so the backward
    pass is batched the same way. Per layer, weight normalisation costs several small kernels a step.
    """
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, layer in enumerate(layers):
        groups[(layer.in_features, layer.weight_norm, layer.weight_scale(), layer.weight.device,
                layer.weight.dtype)].append(i)
    out: list[torch.Tensor | None] = [None] * len(layers)
    for (fan_in, weight_norm, scale, _, _), members in groups.items():
        rows = torch.cat([layers[i].weight for i in members]) if len(members) > 1 else layers[members[0]].weight
        if weight_norm:  # normalize(W)·scale = W · (scale·sqrt(fan_in)) / (‖W_row‖ + eps)
            rows = scale_rows_by_inverse_norm(rows, scale * math.sqrt(fan_in))
        elif scale != 1:
            rows = rows * scale
        for i, w in zip(members, rows.split([layers[i].out_features for i in members])):
            out[i] = w * layers[i].gain if layers[i].gain is not None else w
    return out


@contextlib.contextmanager
def scaled_weights_for_step(layers: list[MPLinear]):
    """Within the block, each layer uses its effective weight computed by one batched pass."""
    for layer, w in zip(layers, batched_effective_weights(layers)):
        layer.step_weight = w
    try:
        yield
    finally:
        for layer in layers:
            layer.step_weight = None


# ----------------------------------------------------------------------------------------------------
# Attention and MLP.


class Attention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection and optional cosine attention.

    Fusing q, k, v into one (3D × D) weight is exactly three separate layers: weight normalisation
    and forced WN act per output row, so each chunk is normalised on its own.
    With `use_cosine_attention`, q and k are normalised per head to RMS 1, so the logits are
    sqrt(d_head)·cos(q, k) under the usual 1/sqrt(d_head) scale.
    """

    def __init__(self, dim: int, num_heads: int, mp: MPConfig):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.cosine = mp.use_cosine_attention
        wn = dict(weight_norm=mp.use_weight_normalization, forced_weight_norm=mp.use_forced_weight_normalization)
        self.qkv = MPLinear(dim, 3 * dim, **wn)
        self.proj = MPLinear(dim, dim, **wn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.cosine:  # q and k per head and token, in one call
            qk, v = qkv.split([2, 1])
            q, k = normalize(qk).unbind(0)
            v = v.squeeze(0)
        else:
            q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(d_head)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    """Linear → SiLU (or MP-SiLU) → linear, bias-free.

    MP-SiLU's 1/0.596 is applied by fc2 (folded into its weight, which it scales anyway), not to the
    (tokens × hidden) activations: fc2(silu(h)/0.596) is the same product.
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: int, mp: MPConfig):
        super().__init__()
        wn = dict(weight_norm=mp.use_weight_normalization, forced_weight_norm=mp.use_forced_weight_normalization)
        self.fc1 = MPLinear(in_features, hidden_features, **wn)
        self.fc2 = MPLinear(hidden_features, out_features, input_gain=1 / MP_SILU_RMS if mp.use_mp_silu else 1.0,
                            **wn)
        self.act = F.silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
