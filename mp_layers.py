"""Magnitude-preserving (MP) layers, as plain math.

Every technique of "The Art of Balance" (Bill & Jensen, 2025), ported from EDM2 (Karras et al., 2024), is a
switch of `MPConfig`. The config is handed whole to every layer; each layer reads the switches it needs.
Norms are computed in fp32 (or float64 for float64 input) and cast back to the input's dtype, which keeps
the layers exact under bf16 autocast. The forwards below are the definitions; `fast_paths.py` computes the
same numbers with fewer kernels and is held equal to these by the tests.
"""
from __future__ import annotations

import argparse
import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

MP_SILU_RMS = 0.596  # RMS of silu(x) for x ~ N(0, 1)
MODULATION_PARTS = ("scale", "shift", "rotation", "gate")  # in the order they are applied
FOURIER_CHANNELS = 256


# ----------------------------------------------------------------------------------------------------
# Configuration.


def _switch(help: str, *, in_all_mp: bool = True):
    return dataclasses.field(default=False, metadata={"help": help, "in_all_mp": in_all_mp})


def parse_modulation(text: str) -> str:
    """"adaln", or parts from scale, shift, rotation, gate joined by "+" (each once, any order), written in
    the order they are applied (so "gate+scale" and "scale+gate" are one configuration)."""
    if text == "adaln":
        return text
    parts = text.split("+")
    if not all(p in MODULATION_PARTS for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(f"modulation {text!r} is not adaln or a set of parts from {', '.join(MODULATION_PARTS)} "
                         f"joined by + (each at most once), e.g. scale+rotation+gate")
    return "+".join(p for p in MODULATION_PARTS if p in parts)


def _modulation_argument(text: str) -> str:
    try:
        return parse_modulation(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class MPConfig:
    """The magnitude-preservation switches. Field names are the CLI flags with underscores.

    `--use-all-mp` turns on the paper's techniques (the switches marked `in_all_mp`).
    """

    use_cosine_attention: bool = _switch("normalise q and k per head to RMS 1 (cosine attention)")
    use_weight_normalization: bool = _switch("normalise every weight row in the forward (learned gain on "
                                             "zero-initialised layers)")
    use_forced_weight_normalization: bool = _switch("project every weight row back to RMS 1 after each "
                                                    "optimiser step")
    use_mp_residual: bool = _switch("magnitude-preserving sums for the residuals, position and conditioning")
    use_mp_silu: bool = _switch("SiLU divided by 0.596, its RMS on a standard normal")
    use_no_layernorm: bool = _switch("no layer norm before the modulation")
    use_mp_pos_enc: bool = _switch("positional embedding normalised to RMS 1 per token")
    use_mp_embedding: bool = _switch("normalised label table and a learned, normalised timestep table")
    use_mp_fourier: bool = _switch(f"MP Fourier timestep features ({FOURIER_CHANNELS} fixed random cosines of RMS 1, "
                                   f"as EDM2) instead of sinusoidal ones or the learned table", in_all_mp=False)
    modulation: str = dataclasses.field(default="adaln", metadata={"help": (
        "how the condition modulates each branch: adaln (default: DiT's fused adaLN-Zero) or parts from "
        "scale, shift, rotation, gate joined by +, e.g. scale+rotation+gate (each its own zero-init linear)")})

    def __post_init__(self):
        object.__setattr__(self, "modulation", parse_modulation(self.modulation))

    @property
    def modulation_parts(self) -> tuple[str, ...]:
        """The parts of a non-adaLN modulation, () for adaln."""
        return () if self.modulation == "adaln" else tuple(self.modulation.split("+"))

    @classmethod
    def switch_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.type in (bool, "bool")]

    @classmethod
    def all_mp_names(cls) -> list[str]:
        """The switches `--use-all-mp` turns on."""
        return [f.name for f in dataclasses.fields(cls) if f.metadata.get("in_all_mp")]

    @classmethod
    def all_on(cls) -> "MPConfig":
        return cls(**{name: True for name in cls.all_mp_names()})

    @classmethod
    def option_names(cls) -> list[str]:
        """Every field: the switches and the other options (modulation)."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Adds `--use-...` for each switch, `--use-all-mp` and `--modulation`."""
        group = parser.add_argument_group("magnitude preservation (each switch is one technique)")
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            if f.name in cls.switch_names():
                group.add_argument(flag, action="store_true", dest=f.name, help=f.metadata["help"])
            else:
                group.add_argument(flag, type=_modulation_argument, default=f.default, dest=f.name,
                                   metavar="PARTS", help=f.metadata["help"])
        group.add_argument("--use-all-mp", action="store_true",
                           help=f"turn on the paper's {len(cls.all_mp_names())} MP techniques (the switches above "
                                f"except {', '.join(sorted(set(cls.switch_names()) - set(cls.all_mp_names())))})")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "MPConfig":
        given = {name: bool(getattr(args, name, False)) for name in cls.switch_names()}
        if getattr(args, "use_all_mp", False):
            given.update({name: True for name in cls.all_mp_names()})
        return cls(**given, modulation=getattr(args, "modulation", "adaln"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MPConfig":
        """From `to_dict`'s output; keys a run folder written before an option existed take its default."""
        valid = cls.option_names()
        unknown = set(d) - set(valid)
        if unknown:
            raise ValueError(f"unknown MP switches {sorted(unknown)}; valid: {valid}")
        return cls(**{k: bool(v) if k in cls.switch_names() else v for k, v in d.items()})

    def enabled(self) -> list[str]:
        return [name for name in self.switch_names() if getattr(self, name)]

    def describe(self) -> str:
        on = self.enabled()
        if set(self.all_mp_names()) <= set(on):
            on = [f"all {len(self.all_mp_names())} MP switches"] + [n for n in on if n not in self.all_mp_names()]
        text = ", ".join(n.removeprefix("use_") for n in on) if on else "no MP switches"
        return text if self.modulation == "adaln" else f"{text}, modulation {self.modulation}"


# ----------------------------------------------------------------------------------------------------
# Primitives.


def normalize(x: torch.Tensor, dim: int = -1, eps: float = 1e-4) -> torch.Tensor:
    """Each slice along `dim` to RMS 1 (EDM2 eq. 47): x·sqrt(d) / (‖x‖₂ + eps), the norm in fp32."""
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
    return (x.to(norm.dtype) * (math.sqrt(x.shape[dim]) / (norm + eps))).to(x.dtype)


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """((1−t)·a + t·b) / sqrt((1−t)² + t²) (EDM2 eq. 88): two uncorrelated unit-RMS inputs give unit RMS."""
    norm = math.sqrt((1 - t) ** 2 + t**2)
    dtype = torch.promote_types(a.dtype, b.dtype)  # under autocast, one may be bf16 and the other fp32
    return torch.add(a.to(dtype) * ((1 - t) / norm), b.to(dtype), alpha=t / norm)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU divided by its RMS on a standard normal (EDM2 eq. 81): unit-variance input keeps RMS 1."""
    return F.silu(x) / MP_SILU_RMS


def activation(mp: MPConfig):
    return mp_silu if mp.use_mp_silu else F.silu


def rotate_pairs(h: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotates each channel pair (h_i, h_{i+D/2}) of tokens h (B, T, D) by a per-sample angle θ_i (B, D/2):
    (h_i cos θ_i − h_{i+D/2} sin θ_i, h_i sin θ_i + h_{i+D/2} cos θ_i). A rotation: every token keeps its norm."""
    a, b = h.chunk(2, dim=-1)
    cos, sin = torch.cos(angles).unsqueeze(1), torch.sin(angles).unsqueeze(1)
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


class MPFourier(nn.Module):
    """Fixed random Fourier features of the integer step t: √2·cos(2π(f_k·t + φ_k)), f_k ~ N(0, 1),
    φ_k ~ U(0, 1) (EDM2's MPFourier). A cosine of a uniform phase has RMS 1/√2; the √2 makes it 1."""

    def __init__(self, num_channels: int = FOURIER_CHANNELS):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels))
        self.register_buffer("phases", torch.rand(num_channels))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(self.freqs.dtype, torch.float32)
        y = torch.outer(t.to(dtype), self.freqs.to(dtype)) + self.phases.to(dtype)
        return (torch.cos(2 * math.pi * y) * math.sqrt(2)).to(self.freqs.dtype)


# ----------------------------------------------------------------------------------------------------
# Layers with weights.


class MPLinear(nn.Module):
    """Bias-free linear layer; the two WN switches of `mp` say what its weight W becomes.

    - plain: kaiming-uniform init (zeros with `zero_init`), W used as it is.
    - weight normalisation: N(0, 1) init; the forward uses normalize(W)·g/sqrt(fan_in) (EDM2 eq. 66), g = 1,
      or with `zero_init` a learned scalar gain that starts at 0 (the layer outputs 0 at init).
    - forced weight normalisation: W's rows are kept at RMS 1 (at construction and, through
      `DiT.project_forced_weights_`, after every optimiser step); the forward divides by sqrt(fan_in) even
      without weight normalisation, so the layer preserves magnitude (the paper's code forgets this).
    """

    def __init__(self, in_features: int, out_features: int, mp: MPConfig, *, zero_init: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_norm = mp.use_weight_normalization
        self.forced_weight_norm = mp.use_forced_weight_normalization
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.gain = nn.Parameter(torch.zeros(())) if self.weight_norm and zero_init else None
        with torch.no_grad():
            if self.weight_norm:
                nn.init.normal_(self.weight)
            elif zero_init:
                nn.init.zeros_(self.weight)
            else:
                nn.init.kaiming_uniform_(self.weight, a=0)  # U(±sqrt(6 / fan_in))
            if self.forced_weight_norm:
                self.weight.copy_(normalize(self.weight))

    def effective_weight(self) -> torch.Tensor:
        """The matrix the forward multiplies by."""
        w = normalize(self.weight) if self.weight_norm else self.weight
        if self.gain is not None:
            w = w * self.gain
        if self.weight_norm or self.forced_weight_norm:
            w = w / math.sqrt(self.in_features)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight())

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, weight_norm={self.weight_norm}, "
                f"forced_weight_norm={self.forced_weight_norm}, gain={self.gain is not None}")


class MPEmbedding(nn.Module):
    """Lookup table whose rows are optionally weight- and force-normalised to RMS 1.

    The label table (`labels=True`) is magnitude-preserving with use_mp_embedding alone; the timestep
    table (which exists only with it) follows the two weight-normalisation switches, like a linear layer.
    Normalised: N(0, 1) init, each looked-up row normalised. Otherwise kaiming-uniform init, rows used raw.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, mp: MPConfig, *, labels: bool = False):
        super().__init__()
        self.weight_norm = mp.use_mp_embedding if labels else mp.use_weight_normalization
        self.forced_weight_norm = mp.use_mp_embedding if labels else mp.use_forced_weight_normalization
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))
        with torch.no_grad():
            if self.weight_norm:
                nn.init.normal_(self.weight)
            else:
                nn.init.kaiming_uniform_(self.weight, a=0)
            if self.forced_weight_norm:
                self.weight.copy_(normalize(self.weight))

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(index, self.weight)
        return normalize(rows) if self.weight_norm else rows


# ----------------------------------------------------------------------------------------------------
# Attention and MLP.


class Attention(nn.Module):
    """Multi-head self-attention; with use_cosine_attention, q and k are normalised per head to RMS 1,
    so the logits are sqrt(d_head)·cos(q, k) under the usual 1/sqrt(d_head) scale.

    q, k and v share one (3D × D) weight: (forced) weight normalisation acts per output row, so this is
    exactly three separate layers.
    """

    def __init__(self, dim: int, num_heads: int, mp: MPConfig):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.cosine = mp.use_cosine_attention
        self.qkv = MPLinear(dim, 3 * dim, mp)
        self.proj = MPLinear(dim, dim, mp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.cosine:
            q, k = normalize(q), normalize(k)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, d_head), scale 1/sqrt(d_head)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    """Linear → SiLU (MP-SiLU with use_mp_silu) → linear, bias-free."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int, mp: MPConfig):
        super().__init__()
        self.fc1 = MPLinear(in_features, hidden_features, mp)
        self.act = activation(mp)
        self.fc2 = MPLinear(hidden_features, out_features, mp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
