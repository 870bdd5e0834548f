"""DiT (Peebles & Xie, 2023) built from the toggleable magnitude-preserving layers of `mp_layers`.

`build_model("DiT-XS/2", in_channels=4, input_size=16, mp=MPConfig.all_on())` gives the paper's model.
DESIGN.md §3 is the specification; the parameter counts of §3.3 are checked by the tests.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from mp_layers import MLP, Attention, MPConfig, MPEmbedding, MPLinear, activation, modulate, mp_sum, mp_sum_weights
from mp_layers import normalize
from mp_layers import project_forced_weights_, scaled_weights_for_step

# name: (depth, width, heads)
MODEL_SIZES = {
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
    """[cos(t·f_k), sin(t·f_k)] with f_k = exp(−ln(10⁴)·k/(dim/2)), k < dim/2 (DESIGN §3.2)."""
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
# Blocks.


class TimestepEmbedder(nn.Module):
    """Sinusoidal features (or, with use_mp_embedding, a learned 1000×D table), then an MLP D → D → D."""

    def __init__(self, dim: int, mp: MPConfig):
        super().__init__()
        self.dim = dim
        self.table = None
        if mp.use_mp_embedding:
            self.table = MPEmbedding(NUM_TIMESTEPS, dim, weight_norm=mp.use_weight_normalization,
                                     forced_weight_norm=mp.use_forced_weight_normalization)
        self.mlp = MLP(dim, dim, dim, mp)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = self.table(t.long()) if self.table is not None else sinusoidal_timestep_embedding(t, self.dim)
        return self.mlp(features)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block (DiT order) with optional MP residuals and no layer norm."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, mp: MPConfig):
        super().__init__()
        self.mp_residual = mp.use_mp_residual
        self.norm = nn.Identity() if mp.use_no_layernorm else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, mp)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dim, mp)
        self.modulation = MPLinear(dim, 6 * dim, weight_norm=mp.use_weight_normalization,
                                   forced_weight_norm=mp.use_forced_weight_normalization, zero_init=True)

    def residual(self, x: torch.Tensor, gate: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """x + gate·update, or mp_sum(x, gate·update, 0.3), as one fused multiply-add."""
        gate = gate.unsqueeze(1)
        if not self.mp_residual:
            return torch.addcmul(x, gate, update)
        wx, wu = mp_sum_weights(0.3)
        dtype = torch.promote_types(x.dtype, update.dtype)
        return torch.addcmul(x.to(dtype) * wx, gate, update, value=wu)

    def forward(self, x: torch.Tensor, c_act: torch.Tensor) -> torch.Tensor:
        """`c_act`: (MP-)SiLU of the conditioning, computed once by the model for all blocks."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c_act).chunk(6, dim=-1)
        x = self.residual(x, gate1, self.attn(modulate(self.norm(x), shift1, scale1)))
        x = self.residual(x, gate2, self.mlp(modulate(self.norm(x), shift2, scale2)))
        return x


class FinalLayer(nn.Module):
    """adaLN modulation, then a zero-initialised linear to p·p·(2C) values per token."""

    def __init__(self, dim: int, out_features: int, mp: MPConfig):
        super().__init__()
        wn = dict(weight_norm=mp.use_weight_normalization, forced_weight_norm=mp.use_forced_weight_normalization)
        self.norm = nn.Identity() if mp.use_no_layernorm else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = MPLinear(dim, 2 * dim, zero_init=True, **wn)
        self.linear = MPLinear(dim, out_features, zero_init=True, **wn)

    def forward(self, x: torch.Tensor, c_act: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(c_act).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


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
        wn = dict(weight_norm=mp.use_weight_normalization, forced_weight_norm=mp.use_forced_weight_normalization)

        self.x_embedder = MPLinear(patch_size * patch_size * in_channels + 1, width, input_bias=True, **wn)
        self.t_embedder = TimestepEmbedder(width, mp)
        self.y_embedder = MPEmbedding(num_classes + 1, width, weight_norm=mp.use_mp_embedding,
                                      forced_weight_norm=mp.use_mp_embedding)
        pos = sincos_pos_embed_2d(width, self.grid)
        self.register_buffer("pos_embed", normalize(pos) if mp.use_mp_pos_enc else pos, persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(width, num_heads, mlp_ratio, mp) for _ in range(depth))
        self.final_layer = FinalLayer(width, patch_size * patch_size * self.out_channels, mp)

        # The tables and weights that forced weight normalisation keeps at unit-RMS rows.
        self._forced_weights = [m.weight for m in self.modules()
                                if isinstance(m, (MPLinear, MPEmbedding)) and m.forced_weight_norm]
        # The linear layers whose effective weight is computed in one batched pass per training step.
        self._scaled_layers = [m for m in self.modules() if isinstance(m, MPLinear) and m.scales_weight]
        # Off: each layer normalises its own weight. train.py turns the batched pass off under DDP: it
        # hands every grouped weight its gradient only at the very end of the backward, so DDP could not
        # all-reduce those gradients while the backward is still running.
        self.batch_weight_normalization = True

    @torch.no_grad()
    def project_forced_weights_(self) -> None:
        """Forced weight normalisation: call after every optimiser step (train.py does)."""
        if self._forced_weights:
            project_forced_weights_(self._forced_weights)

    def check_labels(self, y: torch.Tensor) -> None:
        if y.numel() and (int(y.min()) < 0 or int(y.max()) > self.num_classes):
            raise ValueError(f"class label out of range: got {int(y.min())}..{int(y.max())}, the model has "
                             f"{self.num_classes} classes (0..{self.num_classes - 1}, {self.num_classes} = null label)")

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # Training, and anything compiled: all effective weights in one batched pass (a few kernels in
        # all, forward and backward, instead of several per layer, with or without torch.compile).
        # Eager evaluation reuses each layer's cached weight instead (sampling renormalises nothing).
        if self._scaled_layers and self.batch_weight_normalization and (
                torch.is_grad_enabled() or torch.compiler.is_compiling()):
            with scaled_weights_for_step(self._scaled_layers):
                return self._forward(x, t, y)
        return self._forward(x, t, y)

    def _forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != (self.in_channels, self.input_size, self.input_size):
            raise ValueError(f"input of shape {tuple(x.shape[1:])} does not match the model's "
                             f"{(self.in_channels, self.input_size, self.input_size)}")
        # Training: train.py checks the whole dataset once instead. On a GPU the check would stall the
        # device at every sampling step, so there sample.py and eval/ check the labels once up front.
        if not self.training and y.device.type == "cpu" and not torch.compiler.is_compiling():
            self.check_labels(y)
        if self.training and self.class_dropout > 0:
            drop = torch.rand(y.shape, device=y.device) < self.class_dropout
            y = torch.where(drop, self.num_classes, y)

        tokens = self.x_embedder(patchify(x, self.patch_size))
        pos = self.pos_embed.to(tokens.dtype)
        x = mp_sum(tokens, pos, 0.5) if self.mp.use_mp_residual else tokens + pos
        t_emb, y_emb = self.t_embedder(t), self.y_embedder(y)
        c = mp_sum(t_emb, y_emb, 0.5) if self.mp.use_mp_residual else t_emb + y_emb
        c_act = activation(self.mp)(c)  # every modulation layer's input, computed once
        for block in self.blocks:
            x = block(x, c_act)
        x = self.final_layer(x, c_act)
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
