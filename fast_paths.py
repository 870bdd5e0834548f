"""The speed layer: the math of mp_layers.py and models.py with fewer, fused kernels.

    model = apply_fast_paths(build_model(...))            # train.py, sample.py, eval/, bench.py
    model = apply_fast_paths(build_model(...), ddp=True)  # before wrapping it in DistributedDataParallel

`apply_fast_paths` changes the classes of the model's layers to the subclasses below; parameters and buffers
stay as they are, so state dicts move freely between plain and fast models. What it changes:

- weight normalisation of all linear layers in one batched pass per forward: the weights are grouped by
  fan-in and normalised, and multiplied by their gains, in one autograd node per group, forward and
  backward (per layer, several small kernels each). Not under DDP: a batched weight gets its gradient only
  at the very end of the backward, so DDP could not all-reduce while the backward still runs; there each
  layer normalises its own weight. On a CPU each group's weights share one storage, so that neither the
  pass nor the forced-WN projection copies them together;
- the modulation parts of a block (scale, shift, rotation, gate) as one matrix product;
- `normalize` with a hand-written backward (one autograd node instead of autograd's ~8 kernels), whose
  row dot is a batched matrix product for contiguous rows (no product written and read back);
- cosine attention normalises q and k in one call;
- MP-SiLU's 1/0.596 folded into the next layer's weight (which is scaled anyway) instead of dividing the
  (tokens × hidden) activations;
- the residual x + gate·update as one multiply-add, its MP sum as one node with a hand-written backward;
- the rotation modulation as one node with a hand-written backward;
- the forced-WN projection after each optimiser step batched the same way;
- `frozen_weights(model)`: within it (sampling), every effective weight is computed once.

tests/test_fast_paths.py holds the fast model equal to the plain one (float64, every switch, outputs and
gradients). A layer class without a fast twin below runs its plain forward unchanged.
"""
from __future__ import annotations

import contextlib
import math
from collections import defaultdict

import torch
import torch.nn.functional as F

from models import DiT, DiTBlock, FinalLayer, ModulationParts
from mp_layers import MLP, MP_SILU_RMS, Attention, MPEmbedding, MPLinear, mp_silu


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ a·b along the last dim (keepdim). For contiguous rows as a batched (1×d)·(d×1) product, which reads
    a and b once (a multiply and a sum write their product and read it again: on a CPU, for the weights'
    rows, a visible part of the step); elementwise where the product would need a copy of a strided input,
    or could run in TF32 on a GPU."""
    if (a.is_contiguous() and b.is_contiguous() and a.dtype == b.dtype
            and not (a.is_cuda and a.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32)):
        d = a.shape[-1]
        return torch.bmm(a.view(-1, 1, d), b.view(-1, d, 1)).view(*a.shape[:-1], 1)
    return torch.linalg.vecdot(a, b, dim=-1).unsqueeze(-1)


class _ScaleRowsByInverseNorm(torch.autograd.Function):
    """y = x·c·γ / (‖x‖ + eps) along the last dim: mp_layers.normalize times c/sqrt(d), and times a learned
    gain γ per segment of rows (`segments`: (rows, has gain) in order; `tensors`: the 0-dim gains in order,
    then, with `stored`, the weights whose shared storage x is, one per segment: they receive the gradient,
    as views of one tensor, instead of x).

    The backward reads x and the incoming gradient twice instead of autograd's ~8 passes, and the gains cost
    no pass over the rows of their own: with n = ‖x‖, s = c/(n+eps), k = s·γ, r = Σ g·x per row,
        ∂L/∂x = k·g − k·r / ((n+eps)·n) · x,   ∂L/∂γ = Σ over the segment's rows of r·s.
    """

    @staticmethod
    def forward(ctx, x, c, eps, segments=None, stored=False, *tensors):
        gains = tensors[:sum(has_gain for _, has_gain in segments)] if segments else ()
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
        scale = c / (norm + eps)
        row_scale = scale
        if gains:  # one factor per row: its segment's gain, or 1
            one, gain = scale.new_ones(1, 1), iter(gains)
            row_scale = scale * torch.cat([(next(gain).to(scale.dtype).view(1, 1) if has_gain else one).expand(n, 1)
                                           for n, has_gain in segments])
        y = (x.to(scale.dtype) * row_scale).to(x.dtype)
        ctx.save_for_backward(x, norm, scale, row_scale)
        ctx.eps, ctx.segments, ctx.stored, ctx.gain_dtypes = eps, segments, stored, [g.dtype for g in gains]
        return y

    @staticmethod
    def backward(ctx, grad):
        x, norm, scale, row_scale = ctx.saved_tensors
        xf = x.to(scale.dtype)
        r = _row_dot(grad.to(scale.dtype), xf)
        coef = row_scale * r / ((norm + ctx.eps) * norm.clamp_min(1e-30))  # x = 0 ⇒ r = 0 ⇒ coef = 0
        grad_x = torch.addcmul(grad * row_scale, xf, coef, value=-1).to(x.dtype)
        sizes = [n for n, _ in ctx.segments] if ctx.segments else []
        grad_gains = []
        if ctx.gain_dtypes:
            with_gain = [rows for rows, (_, has_gain) in zip((r * scale).split(sizes), ctx.segments) if has_gain]
            grad_gains = [rows.sum().to(d) for rows, d in zip(with_gain, ctx.gain_dtypes)]
        if ctx.stored:
            return None, None, None, None, None, *grad_gains, *grad_x.split(sizes)
        return grad_x, None, None, None, None, *grad_gains


def scale_rows_by_inverse_norm(x: torch.Tensor, c: float, eps: float = 1e-4) -> torch.Tensor:
    """x·c / (‖x‖₂ + eps) per row (last dim), one autograd node."""
    return _ScaleRowsByInverseNorm.apply(x, c, eps)


def fused_normalize(x: torch.Tensor) -> torch.Tensor:
    """mp_layers.normalize along the last dim, with the one-node backward."""
    return scale_rows_by_inverse_norm(x, math.sqrt(x.shape[-1]))


# ----------------------------------------------------------------------------------------------------
# Weights.


class FastMPLinear(MPLinear):
    """Takes its effective weight from the model's batched pass or `frozen_weights` when they hand one over.

    `input_gain`: the layer computes linear(input_gain · x), folded into the weight (MP-SiLU's 1/0.596).
    """

    input_gain: float = 1.0
    given_weight: torch.Tensor | None = None

    def weight_scale(self) -> float:
        """The constant factor of the effective weight: input gain, and 1/sqrt(fan_in) under (forced) WN."""
        if self.weight_norm or self.forced_weight_norm:
            return self.input_gain / math.sqrt(self.in_features)
        return self.input_gain

    @property
    def scales_weight(self) -> bool:
        """Whether the effective weight differs from the raw one."""
        return self.weight_norm or self.gain is not None or self.weight_scale() != 1

    def effective_weight(self) -> torch.Tensor:
        if self.given_weight is not None:
            return self.given_weight
        return batched_effective_weights([self])[0] if self.scales_weight else self.weight


def _weight_layers(user) -> list[FastMPLinear]:
    """The layers whose weights a weight user multiplies by: a layer itself, or all of a FastModulationParts."""
    return list(user.values()) if isinstance(user, FastModulationParts) else [user]


def _group_key(layer: FastMPLinear) -> tuple:
    return layer.in_features, layer.weight_norm, layer.weight_scale(), layer.weight.device, layer.weight.dtype


def weight_groups(users: list) -> dict[tuple, list[int]]:
    """The users' indices grouped by their weights' fan-in, scale, device and dtype (the batched pass's groups)."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, user in enumerate(users):
        groups[_group_key(_weight_layers(user)[0])].append(i)
    return groups


def _group_layers(users: list, members: list[int]) -> list[FastMPLinear]:
    """The layers of a group's users, in order: the row blocks of the group's weight."""
    return [layer for i in members for layer in _weight_layers(users[i])]


def is_storage_of(rows: torch.Tensor, layers: list) -> bool:
    """Whether the layers' weights are, in order, the row blocks of the contiguous tensor `rows`."""
    storage, offset = rows.untyped_storage().data_ptr(), rows.storage_offset()
    for layer in layers:
        w = layer.weight
        if (w.untyped_storage().data_ptr() != storage or w.storage_offset() != offset or not w.is_contiguous()
                or w.dtype != rows.dtype or w.shape[1:] != rows.shape[1:]):
            return False
        offset += w.numel()
    return rows.is_contiguous() and offset == rows.storage_offset() + rows.numel()


def batched_effective_weights(users: list, stored: dict | None = None) -> list[torch.Tensor]:
    """The effective weights of many weight users (a layer, or a FastModulationParts: its layers' effective
    weights stacked by rows, one matrix), computed together.

    Users are grouped by fan-in and scale; each group's weights are concatenated, their rows normalised and
    multiplied by their gains in one autograd node, and split back per user, so the backward is batched
    the same way. (Gains exist only under weight normalisation.) `stored`: for a group whose weights are
    the row blocks of one tensor (FastDiT's shared storage), the layers' ids → that tensor, read in place
    of the concatenation.
    """
    out: list[torch.Tensor | None] = [None] * len(users)
    for (fan_in, weight_norm, scale, _, _), members in weight_groups(users).items():
        layers = _group_layers(users, members)
        shared = (stored or {}).get(tuple(id(layer) for layer in layers))  # only weight-normalised groups
        rows = shared if shared is not None else torch.cat([layer.weight for layer in layers]) if len(layers) > 1 \
            else layers[0].weight
        if weight_norm:  # normalize(W)·γ·scale = W · (scale·sqrt(fan_in))·γ / (‖W_row‖ + eps)
            gains = [layer.gain for layer in layers if layer.gain is not None]
            segments = tuple((layer.out_features, layer.gain is not None) for layer in layers)
            weights = [layer.weight for layer in layers] if shared is not None else []
            rows = _ScaleRowsByInverseNorm.apply(rows, scale * math.sqrt(fan_in), 1e-4,
                                                 segments if gains or weights else None, bool(weights), *gains, *weights)
        elif scale != 1:  # no gains here
            rows = rows * scale
        sizes = [sum(layer.out_features for layer in _weight_layers(users[i])) for i in members]
        for i, w in zip(members, rows.split(sizes)):
            out[i] = w
    return out


class FastModulationParts(ModulationParts):
    """All parts' linears of a = act(c) as one matrix product: the batched pass hands the module its
    layers' effective weights stacked (they share fan-in and scale), so one product and its backward
    replace one per part."""

    given_weight: torch.Tensor | None = None

    def linear_outputs(self, a: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.given_weight is None:
            return super().linear_outputs(a)
        outputs = F.linear(a, self.given_weight).split([layer.out_features for layer in self.values()], dim=-1)
        return dict(zip(self.keys(), outputs))

    @property
    def batchable(self) -> bool:
        """Whether the parts' weights can be handed over as one matrix: all computed, in one group."""
        layers = list(self.values())
        return all(layer.scales_weight for layer in layers) and len({_group_key(layer) for layer in layers}) == 1


@torch.no_grad()
def project_rows_(weights: list[torch.Tensor]) -> None:
    """W ← normalize(W) row-wise for many weights: one reduction and one multi-tensor multiply per row length."""
    groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for w in weights:
        groups[(w.shape[-1], w.device, w.dtype)].append(w)
    for (d, _, _), ws in groups.items():
        rows = torch.cat(ws) if len(ws) > 1 else ws[0]
        norm = torch.linalg.vector_norm(rows, dim=-1, keepdim=True, dtype=torch.promote_types(rows.dtype, torch.float32))
        scale = (math.sqrt(d) / (norm + 1e-4)).to(rows.dtype)
        torch._foreach_mul_(ws, list(scale.split([len(w) for w in ws])))


class FastMPEmbedding(MPEmbedding):
    def forward(self, index: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(index, self.weight)
        return fused_normalize(rows) if self.weight_norm else rows


# ----------------------------------------------------------------------------------------------------
# Attention, block, model.


class FastAttention(Attention):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cosine:
            return super().forward(x)
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        qk, v = qkv.split([2, 1])
        q, k = fused_normalize(qk).unbind(0)  # q and k of every head and token in one call
        out = F.scaled_dot_product_attention(q, k, v.squeeze(0))
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class _RotatePairs(torch.autograd.Function):
    """mp_layers.rotate_pairs as one autograd node: y = C⊙h + S⊙Ph, where P swaps the halves of the
    channels (i ↔ i + D/2), C = [cos θ, cos θ] and S = [−sin θ, sin θ] per sample.

    Three passes over the tokens forward instead of eight, six backward instead of about twenty. The
    rotation is orthogonal and P symmetric with PS = −S, so ∂L/∂h = C⊙g − S⊙Pg, and with u = Σ_tokens Pg⊙y,
    ∂L/∂θ_i = Σ_tokens (g_{i+D/2}·y_i − g_i·y_{i+D/2}) = u_i − u_{i+D/2}.
    """

    @staticmethod
    def forward(ctx, h, angles):
        half = h.shape[-1] // 2
        cos, sin = torch.cos(angles), torch.sin(angles)
        c, s = torch.cat([cos, cos], dim=-1).unsqueeze(1), torch.cat([-sin, sin], dim=-1).unsqueeze(1)
        y = torch.addcmul(h * c, h.roll(half, dims=-1), s)
        ctx.save_for_backward(c, s, y)
        ctx.dtypes = h.dtype, angles.dtype
        return y

    @staticmethod
    def backward(ctx, grad):
        c, s, y = ctx.saved_tensors
        half = grad.shape[-1] // 2
        swapped = grad.roll(half, dims=-1)
        grad_h = torch.addcmul(grad * c, swapped, s, value=-1)
        u = (swapped * y).sum(1)
        return grad_h.to(ctx.dtypes[0]), (u[:, :half] - u[:, half:]).to(ctx.dtypes[1])


def fast_rotate_pairs(h: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """mp_layers.rotate_pairs (h (B, T, D), angles (B, D/2)), one autograd node."""
    return _RotatePairs.apply(h, angles)


class _GatedMPSum(torch.autograd.Function):
    """y = a·x + g⊙u (g a gate per sample and channel, (B, 1, D)): the MP residual mp_sum(x, gate·u, 0.3)
    with a = 0.7/n and g = gate·0.3/n. Backward: ∂L/∂x = a·G, ∂L/∂u = g⊙G, ∂L/∂g = Σ_tokens G⊙u: four passes
    over the tokens instead of autograd's five (it also scales u by the multiply-add's factor)."""

    @staticmethod
    def forward(ctx, x, gate, update, a):
        ctx.save_for_backward(gate, update)
        ctx.a, ctx.x_dtype = a, x.dtype
        return torch.addcmul(x.to(torch.promote_types(x.dtype, update.dtype)) * a, gate, update)

    @staticmethod
    def backward(ctx, grad):
        gate, update = ctx.saved_tensors
        grad_gate = (grad * update).sum(1, keepdim=True)
        return (grad * ctx.a).to(ctx.x_dtype), grad_gate.to(gate.dtype), (grad * gate).to(update.dtype), None


class FastDiTBlock(DiTBlock):
    rotate = staticmethod(fast_rotate_pairs)

    def residual(self, x: torch.Tensor, update: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        if gate is None:
            return super().residual(x, update, gate)
        gate = gate.unsqueeze(1)
        if not self.mp_residual:
            return torch.addcmul(x, gate, update)
        norm = math.sqrt(0.7**2 + 0.3**2)  # mp_sum(x, gate·update, 0.3) as one multiply-add
        return _GatedMPSum.apply(x, gate * (0.3 / norm), update, 0.7 / norm)


class FastFinalLayer(FinalLayer):
    rotate = staticmethod(fast_rotate_pairs)


class FastDiT(DiT):
    """The model's forward, with all effective weights computed in one batched pass (unless `ddp`)."""

    batched: bool = True
    frozen: bool = False

    def setup_fast_paths(self, ddp: bool) -> None:
        self.batched = not ddp
        # What frozen_weights sets lives on the instances from the start. A compiled forward guards on the
        # instance dict: an attribute that first appeared there in the first frozen_weights block (sampling,
        # FID during training) failed the training graph's guards and recompiled it once per model.
        self.frozen = False
        for m in self.modules():
            if isinstance(m, (FastMPLinear, FastModulationParts)):
                m.given_weight = None
        # The weight users of the batched pass: every FastModulationParts whose parts batch, and the other
        # layers whose effective weight is computed.
        parts = [m for m in self.modules() if isinstance(m, FastModulationParts) and m.batchable]
        batched_parts = {id(layer) for m in parts for layer in m.values()}
        self._scaled_layers = parts + [m for m in self.modules() if isinstance(m, FastMPLinear) and m.scales_weight
                                       and id(m) not in batched_parts]
        self._forced_layers = [m for m in self.modules()
                               if isinstance(m, (MPLinear, MPEmbedding)) and m.forced_weight_norm]
        self.store_groups_together()

    @torch.no_grad()
    def store_groups_together(self) -> None:
        """On a CPU (batched, not DDP): the weights of each weight-normalised group of the batched pass become
        the row blocks of one tensor, so that the pass and the forced-WN projection read them in place
        instead of copying them together (two passes over all weights per step, a visible part of a CPU
        step). The parameters stay the same objects; only their storage is shared, so state dicts, the
        optimiser and `.data.copy_` swaps see no difference. Anything that gives a weight a storage of its
        own (load_state_dict(assign=True), a deepcopy) makes its group concatenate again; `.to()` regroups.
        On a GPU the copy is one cheap kernel and each weight keeps its own storage."""
        for rows, layers in getattr(self, "_stored", {}).values():  # apply_fast_paths again, or .to()
            if not self.batched and is_storage_of(rows, layers):
                for layer in layers:
                    layer.weight.data = layer.weight.data.clone()
        self._stored = {}
        if not self.batched:
            return
        for (_, weight_norm, _, device, _), members in weight_groups(self._scaled_layers).items():
            layers = _group_layers(self._scaled_layers, members)
            if weight_norm and device.type == "cpu" and len(layers) > 1:
                rows = torch.cat([layer.weight for layer in layers])
                for layer, block in zip(layers, rows.split([layer.out_features for layer in layers])):
                    layer.weight.data = block
                self._stored[tuple(id(layer) for layer in layers)] = rows, layers

    def _apply(self, fn, recurse=True):  # .to(), .double(), ...: each weight gets a new storage; regroup them
        super()._apply(fn, recurse)
        if hasattr(self, "_stored"):
            self.store_groups_together()
        return self

    def _intact_groups(self) -> dict:
        """The stored groups whose weights are still the row blocks of their tensor: layers' ids → (tensor, layers)."""
        return {ids: (rows, layers) for ids, (rows, layers) in self._stored.items() if is_storage_of(rows, layers)}

    def stored_rows(self) -> dict:
        """The groups whose weights are still the row blocks of their tensor: layers' ids → tensor."""
        if torch.compiler.is_compiling():  # the compiler fuses the concatenation; storage checks would break the graph
            return {}
        return {ids: rows for ids, (rows, _) in self._intact_groups().items()}

    def forced_weights(self) -> list[torch.Tensor]:
        return [m.weight for m in self._forced_layers]

    @torch.no_grad()
    def project_forced_weights_(self) -> None:
        """The batched projection; a group stored together is projected in place as one tensor."""
        if not self._forced_layers:
            return
        together = [(rows, layers) for rows, layers in self._intact_groups().values()
                    if all(layer.forced_weight_norm for layer in layers)]
        done = {id(layer) for _, layers in together for layer in layers}
        for rows, _ in together:
            project_rows_([rows])
        project_rows_([m.weight for m in self._forced_layers if id(m) not in done])

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        if self.frozen:
            if torch.is_grad_enabled():
                raise RuntimeError("frozen_weights(model) is for sampling: its weights carry no gradient; "
                                   "run the model under torch.no_grad() there")
            return super().forward(x, t, y, drop)
        if not (self.batched and self._scaled_layers):
            return super().forward(x, t, y, drop)
        for layer, w in zip(self._scaled_layers, batched_effective_weights(self._scaled_layers, self.stored_rows())):
            layer.given_weight = w
        try:
            return super().forward(x, t, y, drop)
        finally:
            for layer in self._scaled_layers:
                layer.given_weight = None


FAST_CLASSES = {MPLinear: FastMPLinear, MPEmbedding: FastMPEmbedding, Attention: FastAttention,
                ModulationParts: FastModulationParts, DiTBlock: FastDiTBlock, FinalLayer: FastFinalLayer, DiT: FastDiT}


def _fast_class(cls: type) -> type | None:
    """The fast twin of a layer class: FAST_CLASSES, or for a direct subclass of MPLinear (e.g. AdaLNZero)
    one made on the fly that takes FastMPLinear's weights and keeps the subclass's forward."""
    if cls in FAST_CLASSES:
        return FAST_CLASSES[cls]
    if cls.__bases__ == (MPLinear,):
        FAST_CLASSES[cls] = type(cls.__name__, (cls, FastMPLinear), {"__module__": cls.__module__})
        return FAST_CLASSES[cls]
    return None


def apply_fast_paths(model: DiT, *, ddp: bool = False) -> DiT:
    """Turns `model` (in place) into its fast twin and returns it. `ddp`: it will be wrapped in
    DistributedDataParallel, so each layer normalises its own weight (see the module's docstring)."""
    if not isinstance(model, DiT):
        raise TypeError(f"apply_fast_paths takes a models.DiT, not a {type(model).__name__}")
    if not isinstance(model, FastDiT):
        for module in model.modules():
            fast = _fast_class(type(module))
            if fast is not None:
                module.__class__ = fast
            if isinstance(module, MLP) and module.act is mp_silu:  # fc2(silu(h)/0.596) = (fc2 / 0.596)(silu(h))
                module.act = F.silu
                module.fc2.input_gain = 1 / MP_SILU_RMS
    model.setup_fast_paths(ddp)
    return model


@contextlib.contextmanager
def frozen_weights(model: torch.nn.Module):
    """Within the block the model's effective weights are computed once and reused by every forward
    (sampling: eval mode, no grad). They are dropped on exit, so nothing is cached outside the block:
    change the weights (an EMA swap, load_state_dict) outside it, or enter it again after changing them.
    A model without fast paths runs unchanged."""
    fast = [m for m in model.modules() if isinstance(m, FastDiT) and not m.frozen]
    layers = [layer for m in fast for layer in m._scaled_layers]
    stored = {ids: rows for m in fast for ids, rows in m.stored_rows().items()}
    with torch.no_grad():
        for layer, w in zip(layers, batched_effective_weights(layers, stored)):
            layer.given_weight = w
    for m in fast:
        m.frozen = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.given_weight = None
        for m in fast:
            m.frozen = False
