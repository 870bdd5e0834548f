"""DiT (Peebles & Xie, 2023) built from the magnitude-preserving layers of `mp_layers`.

`build_model("DiT-XS/2", in_channels=4, input_size=16, mp=MPConfig.all_on())` gives the paper's model.
The formulas are written out in docs/design.md; `fast_paths.apply_fast_paths(model)` makes it faster.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from mp_layers import (FOURIER_CHANNELS, MLP, Attention, MPConfig, MPEmbedding, MPFourier, MPLinear, activation,
                       mp_sum, normalize, rotate_pairs)

# name: (depth, width, heads). XXS and XS are not DiT's: XS is the paper's CPU-sized model, XXS half its
# width (a quarter of its compute per token), the size the CPU demo trains in a few minutes.
MODEL_SIZES = {
    "XXS": (6, 128, 2),
    "XS": (6, 256, 4),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCH_SIZES = (2, 4, 8)
MODEL_NAMES = [f"DiT-{size}/{p}" for size in MODEL_SIZES for p in PATCH_SIZES]
NUM_TIMESTEPS = 1000
CLASS_DROPOUT = 0.1


# ----------------------------------------------------------------------------------------------------
# Fixed embeddings.


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """The MAE / DiT 2-D sin-cos positional embedding, (grid², dim), float32.

    The first half of the channels encodes the column index and the second half the row index (MAE's
    meshgrid puts w first); each half is [sin | cos] with frequencies 10000^(−k/(dim/4)).
    """
    if dim % 4:
        raise ValueError(f"width {dim} must be divisible by 4 for the 2-D sin-cos embedding")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")

    def encode(pos):
        out = np.outer(pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return torch.from_numpy(np.concatenate([encode(cols), encode(rows)], axis=1)).float()


def sinusoidal_timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos(t·f_k), sin(t·f_k)] with f_k = exp(−ln(10⁴)·k/(dim/2)), k < dim/2, t the integer step."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) → (B, H/p·W/p, p·p·C), features ordered (row-in-patch, column-in-patch, channel)."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x: torch.Tensor, p: int, channels: int, grid: int) -> torch.Tensor:
    """The exact inverse of `patchify` for a square grid."""
    B = x.shape[0]
    x = x.reshape(B, grid, grid, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, channels, grid * p, grid * p)


# ----------------------------------------------------------------------------------------------------
# Conditioning: per-sample modulation of each branch from a = act(c).


class AdaLNZero(MPLinear):
    """DiT's adaLN-Zero: one zero-initialised linear from a = act(c) to (shift, scale[, gate]) per branch.

    `forward(a)` returns one dict per branch: {"shift", "scale", "gate"} (B, D) each; the branch's
    output is multiplied by its gate, which starts at 0, so every block is the identity at init.
    """

    def __init__(self, dim: int, mp: MPConfig, *, branches: int, gated: bool):
        parts = ("shift", "scale", "gate") if gated else ("shift", "scale")
        super().__init__(dim, len(parts) * branches * dim, mp, zero_init=True)
        self.parts, self.branches = parts, branches

    def forward(self, a: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        chunks = super().forward(a).chunk(len(self.parts) * self.branches, dim=-1)
        k = len(self.parts)
        return [dict(zip(self.parts, chunks[i * k: (i + 1) * k])) for i in range(self.branches)]


class ModulationParts(nn.ModuleDict):
    """The follow-up paper's modulation: one zero-initialised linear from a = act(c) per part and branch
    (scale, shift and gate: D values; rotation: D/2 angles), each with its own gain under WN.

    `forward(a)` returns one dict per branch, like AdaLNZero; the gate is returned as the factor 1 + g,
    so that every part, the gate too, is the identity at init.
    """

    def __init__(self, dim: int, mp: MPConfig, *, branches: tuple[str, ...], gated: bool):
        parts = [p for p in mp.modulation_parts if gated or p != "gate"]
        super().__init__({f"{b}_{p}" if b else p: MPLinear(dim, dim // 2 if p == "rotation" else dim, mp, zero_init=True)
                          for b in branches for p in parts})
        self.branches, self.parts = branches, parts

    def linear_outputs(self, a: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every part's linear of a, by layer name (fast_paths.py: one matrix product for all of them)."""
        return {name: layer(a) for name, layer in self.items()}

    def forward(self, a: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        linear = self.linear_outputs(a)
        out = []
        for b in self.branches:
            m = {p: linear[f"{b}_{p}" if b else p] for p in self.parts}
            if "gate" in m:
                m["gate"] = 1 + m["gate"]
            out.append(m)
        return out


def modulation(dim: int, mp: MPConfig, *, branches: tuple[str, ...], gated: bool) -> nn.Module:
    """The modulation layers of a block (branches attn, mlp) or of the final layer, as `mp.modulation` says."""
    if mp.modulation == "adaln":
        return AdaLNZero(dim, mp, branches=len(branches), gated=gated)
    return ModulationParts(dim, mp, branches=branches, gated=gated)


def modulate(h: torch.Tensor, parts: dict[str, torch.Tensor], rotate=rotate_pairs) -> torch.Tensor:
    """A branch's input modulation of tokens h (B, T, D) by per-sample parts: h·(1 + scale) + shift, then
    the rotation of channel pairs (`rotate`: rotate_pairs, or the speed layer's twin). Missing parts are
    left out."""
    scale, shift = parts.get("scale"), parts.get("shift")
    if scale is not None and shift is not None:
        h = torch.addcmul(shift.unsqueeze(1), h, 1 + scale.unsqueeze(1))
    elif scale is not None:
        h = h * (1 + scale.unsqueeze(1))
    elif shift is not None:
        h = h + shift.unsqueeze(1)
    if "rotation" in parts:
        h = rotate(h, parts["rotation"])
    return h


def layer_norm(dim: int, mp: MPConfig) -> nn.Module:
    """LayerNorm without affine parameters, or nothing with use_no_layernorm."""
    return nn.Identity() if mp.use_no_layernorm else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


# ----------------------------------------------------------------------------------------------------
# Blocks.


class TimestepEmbedder(nn.Module):
    """Features of the integer step t, then an MLP → D → D. The features: sinusoidal (D), or with
    use_mp_embedding a learned 1000×D table, or with use_mp_fourier MP Fourier features (256)."""

    def __init__(self, dim: int, mp: MPConfig):
        super().__init__()
        self.dim = dim
        self.fourier = MPFourier(FOURIER_CHANNELS) if mp.use_mp_fourier else None
        self.table = MPEmbedding(NUM_TIMESTEPS, dim, mp) if mp.use_mp_embedding and not mp.use_mp_fourier else None
        self.mlp = MLP(FOURIER_CHANNELS if mp.use_mp_fourier else dim, dim, dim, mp)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if self.fourier is not None:
            return self.mlp(self.fourier(t))
        if self.table is not None:
            return self.mlp(self.table(t.long()))
        return self.mlp(sinusoidal_timestep_embedding(t, self.dim).to(self.mlp.fc1.weight.dtype))  # fp32 (or f64)


class DiTBlock(nn.Module):
    """Transformer block (DiT order): attention, then MLP, each a modulated, gated residual branch."""

    rotate = staticmethod(rotate_pairs)  # the rotation modulation (fast_paths.py swaps in its twin)

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, mp: MPConfig):
        super().__init__()
        self.mp_residual = mp.use_mp_residual
        self.norm = layer_norm(dim, mp)
        self.attn = Attention(dim, num_heads, mp)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dim, mp)
        self.modulation = modulation(dim, mp, branches=("attn", "mlp"), gated=True)

    def residual(self, x: torch.Tensor, update: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """x + gate·update, or with use_mp_residual mp_sum(x, gate·update, 0.3)."""
        if gate is not None:
            update = gate.unsqueeze(1) * update
        return mp_sum(x, update, 0.3) if self.mp_residual else x + update

    def forward(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """`a`: act(c), the input of every modulation layer (computed once by the model)."""
        attn_mod, mlp_mod = self.modulation(a)
        x = self.residual(x, self.attn(modulate(self.norm(x), attn_mod, self.rotate)), attn_mod.get("gate"))
        x = self.residual(x, self.mlp(modulate(self.norm(x), mlp_mod, self.rotate)), mlp_mod.get("gate"))
        return x


class FinalLayer(nn.Module):
    """Modulation of the tokens (no gate), then a zero-initialised linear to p·p·(2C) values per token."""

    rotate = staticmethod(rotate_pairs)

    def __init__(self, dim: int, out_features: int, mp: MPConfig):
        super().__init__()
        self.norm = layer_norm(dim, mp)
        self.modulation = modulation(dim, mp, branches=("",), gated=False)  # input parts only
        self.linear = MPLinear(dim, out_features, mp, zero_init=True)

    def forward(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        (parts,) = self.modulation(a)
        return self.linear(modulate(self.norm(x), parts, self.rotate))


# ----------------------------------------------------------------------------------------------------
# The model.


class DiT(nn.Module):
    """Class-conditional DiT with learned variance (2·C output channels).

    `forward(x, t, y)`: x (B, C, H, W) noisy input, t (B,) integer DDPM steps in [0, 1000), y (B,)
    labels in [0, num_classes]; the extra label `num_classes` is the null label used for
    classifier-free guidance (labels are replaced by it with p = 0.1 in training mode).
    """

    def __init__(self, *, depth: int, width: int, num_heads: int, patch_size: int, in_channels: int,
                 input_size: int, num_classes: int, mp: MPConfig, mlp_ratio: float = 4.0,
                 class_dropout: float = CLASS_DROPOUT):
        super().__init__()
        self.mp = mp
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels
        self.input_size = input_size
        self.patch_size = patch_size
        self.grid = input_size // patch_size
        self.num_classes = num_classes
        self.class_dropout = class_dropout

        # Patch embedding: a linear of the patch's features and one constant 1 (which stands in for a bias).
        self.x_embedder = MPLinear(patch_size * patch_size * in_channels + 1, width, mp)
        self.t_embedder = TimestepEmbedder(width, mp)
        self.y_embedder = MPEmbedding(num_classes + 1, width, mp, labels=True)
        pos = sincos_pos_embed_2d(width, self.grid)
        self.register_buffer("pos_embed", normalize(pos) if mp.use_mp_pos_enc else pos, persistent=False)
        self.act = activation(mp)
        self.blocks = nn.ModuleList(DiTBlock(width, num_heads, mlp_ratio, mp) for _ in range(depth))
        self.final_layer = FinalLayer(width, patch_size * patch_size * self.out_channels, mp)

    def forced_weights(self) -> list[torch.Tensor]:
        """The weights and tables that forced weight normalisation keeps at unit-RMS rows."""
        return [m.weight for m in self.modules() if isinstance(m, (MPLinear, MPEmbedding)) and m.forced_weight_norm]

    @torch.no_grad()
    def project_forced_weights_(self) -> None:
        """Forced weight normalisation, W ← normalize(W): call after every optimiser step."""
        for w in self.forced_weights():
            w.copy_(normalize(w))

    def check_labels(self, y: torch.Tensor) -> None:
        if y.numel() and (int(y.min()) < 0 or int(y.max()) > self.num_classes):
            raise ValueError(f"class label out of range: got {int(y.min())}..{int(y.max())}, the model has "
                             f"{self.num_classes} classes (0..{self.num_classes - 1}, {self.num_classes} = null label)")

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → tokens (B, T, D): patchify, append the constant-1 feature, linear."""
        patches = patchify(x, self.patch_size)
        return self.x_embedder(torch.cat([patches, torch.ones_like(patches[..., :1])], dim=-1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """`drop` (bool, like y): the labels to replace by the null label; by default, in training, each with
        probability class_dropout (the trainer draws them itself when it splits a batch into micro-batches)."""
        if x.shape[1:] != (self.in_channels, self.input_size, self.input_size):
            raise ValueError(f"input of shape {tuple(x.shape[1:])} does not match the model's "
                             f"{(self.in_channels, self.input_size, self.input_size)}")
        # Training: train.py checks the whole dataset once instead. On a GPU the check would stall the
        # device at every sampling step, so there sample.py and eval/ check the labels once up front.
        if not self.training and y.device.type == "cpu" and not torch.compiler.is_compiling():
            self.check_labels(y)
        if drop is None and self.training and self.class_dropout > 0:
            drop = torch.rand(y.shape, device=y.device) < self.class_dropout
        if drop is not None:
            y = torch.where(drop, self.num_classes, y)

        tokens = self.embed_patches(x)
        pos = self.pos_embed.to(tokens.dtype)
        x = mp_sum(tokens, pos, 0.5) if self.mp.use_mp_residual else tokens + pos
        t_emb, y_emb = self.t_embedder(t), self.y_embedder(y)
        c = mp_sum(t_emb, y_emb, 0.5) if self.mp.use_mp_residual else t_emb + y_emb
        a = self.act(c)  # what every modulation layer reads
        for block in self.blocks:
            x = block(x, a)
        x = self.final_layer(x, a)
        return unpatchify(x, self.patch_size, self.out_channels, self.grid)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance on a doubled batch: first half conditional, second half null labels.

        Both halves of `x` must be equal. All C ε-channels are guided, ε = ε_u + s·(ε_c − ε_u); the
        variance channels of both halves are taken from the conditional half.
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        eps, var = out[:, : self.in_channels], out[:, self.in_channels:]
        cond_eps, uncond_eps = eps.chunk(2)
        guided = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        cond_var = var[: len(half)]
        return torch.cat([torch.cat([guided, guided]), torch.cat([cond_var, cond_var])], dim=1)


def build_model(name: str, *, in_channels: int, input_size: int, num_classes: int = 1000,
                mp: MPConfig = MPConfig()) -> DiT:
    """Builds one of `MODEL_NAMES`, e.g. "DiT-XS/2"."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODEL_NAMES)}")
    size, patch = name.removeprefix("DiT-").split("/")
    patch = int(patch)
    if input_size % patch:
        raise ValueError(f"input size {input_size} is not divisible by the patch size {patch} of {name}; "
                         f"use an input size that is a multiple of {patch}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    depth, width, heads = MODEL_SIZES[size]
    return DiT(depth=depth, width=width, num_heads=heads, patch_size=patch, in_channels=in_channels,
               input_size=input_size, num_classes=num_classes, mp=mp)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
