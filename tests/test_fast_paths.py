"""The fast paths of mp_layers / models compute exactly the math of DESIGN §2-3.

`naive_dit_forward` below is an independent, deliberately plain re-implementation of the DiT forward
from a state dict: every weight is normalised at every use with its own formula (q, k and v as separate
slices of the fused qkv weight), the patch embedding appends an explicit ones feature, patchify and the
positional embedding are built element by element, attention is an explicit softmax. It runs in float64,
so it is the reference the fp32 model is held to (relative error ≤ 1e-5) for every single switch, none and
all eight: outputs in train and eval mode, and gradients. It also covers the eval-mode weight cache, the
batched forced-WN projection, torch.compile of the model (MAPDIT_COMPILE_TESTS=0 skips those, =all
compiles every switch set) and a smoke run of bench.py.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_dit
from mp_layers import MPConfig, project_forced_weights_

SWITCHES = MPConfig.switch_names()
CONFIGS = ([("none", MPConfig()), ("all", MPConfig.all_on())]
           + [(name.removeprefix("use_"), MPConfig(**{name: True})) for name in SWITCHES])
CONFIG_IDS = [c[0] for c in CONFIGS]

# Tiny model: 16 tokens (8×8 input, patch 2), 2 blocks, width 32, 2 heads of 16.
DEPTH, WIDTH, HEADS, PATCH, CHANNELS, SIZE, CLASSES = 2, 32, 2, 2, 3, 8, 5
RTOL = 1e-5


# ----------------------------------------------------------------------------------------------------
# The reference: DESIGN §2-3 written out plainly, in float64.


def ref_normalize(w, eps=1e-4):
    """Each row to RMS 1: w·sqrt(d) / (‖w‖₂ + eps)."""
    return w * math.sqrt(w.shape[-1]) / (w.norm(dim=-1, keepdim=True) + eps)


def ref_mp_sum(a, b, t):
    return ((1 - t) * a + t * b) / math.sqrt((1 - t) ** 2 + t ** 2)


def ref_act(x, mp):
    return F.silu(x) / 0.596 if mp.use_mp_silu else F.silu(x)


def ref_linear_weight(sd, name, mp, rows=None):
    """The matrix a linear layer multiplies by (DESIGN §3.2), normalising W at this use."""
    w = sd[name + ".weight"]
    if rows is not None:
        w = w[rows]  # one of q / k / v: each slice is a linear layer of its own
    fan_in = w.shape[1]
    if mp.use_forced_weight_normalization and not sd.get("__projected__"):
        w = ref_normalize(w)  # forced WN: W ← normalize(W) before it is used
    if mp.use_weight_normalization:
        gain = sd.get(name + ".gain")
        w = ref_normalize(w) * (gain if gain is not None else 1.0)
    if mp.use_weight_normalization or mp.use_forced_weight_normalization:
        w = w / math.sqrt(fan_in)
    return w


def ref_linear(x, sd, name, mp, rows=None):
    return x @ ref_linear_weight(sd, name, mp, rows).T


def ref_layer_norm(x, mp):
    return x if mp.use_no_layernorm else F.layer_norm(x, x.shape[-1:], eps=1e-6)


def ref_modulate(x, shift, scale):
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def ref_patchify(x, p):
    """(B, C, H, W) → (B, T, p·p·C): token (gi, gj) row-major, feature (i, j, c) row-major."""
    B, C, H, W = x.shape
    g = H // p
    out = torch.empty(B, g * g, p * p * C, dtype=x.dtype)
    for gi in range(g):
        for gj in range(g):
            for i in range(p):
                for j in range(p):
                    for c in range(C):
                        out[:, gi * g + gj, (i * p + j) * C + c] = x[:, c, gi * p + i, gj * p + j]
    return out


def ref_unpatchify(tokens, p, C, g):
    B = tokens.shape[0]
    out = torch.empty(B, C, g * p, g * p, dtype=tokens.dtype)
    for gi in range(g):
        for gj in range(g):
            for i in range(p):
                for j in range(p):
                    for c in range(C):
                        out[:, c, gi * p + i, gj * p + j] = tokens[:, gi * g + gj, (i * p + j) * C + c]
    return out


def ref_pos_embed(D, g, mp):
    """MAE 2-D sin-cos: token (i, j) gets [sin(jω), cos(jω), sin(iω), cos(iω)], ω_k = 10000^(−k/(D/4))."""
    omega = torch.tensor([10000.0 ** (-k / (D / 4)) for k in range(D // 4)], dtype=torch.float64)
    rows = []
    for i in range(g):
        for j in range(g):
            rows.append(torch.cat([torch.sin(j * omega), torch.cos(j * omega),
                                   torch.sin(i * omega), torch.cos(i * omega)]))
    pos = torch.stack(rows)
    return ref_normalize(pos) if mp.use_mp_pos_enc else pos


def ref_timestep_features(t, D):
    half = D // 2
    freqs = torch.tensor([math.exp(-math.log(10000.0) * k / half) for k in range(half)], dtype=torch.float64)
    args = t.double()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def ref_table(sd, name, index, weight_norm, forced_weight_norm):
    table = sd[name + ".weight"]
    if forced_weight_norm and not sd.get("__projected__"):
        table = ref_normalize(table)  # the whole table, then look up
    if weight_norm:
        table = ref_normalize(table)
    return table[index]


def ref_attention(x, sd, prefix, mp, heads):
    B, T, D = x.shape
    dh = D // heads

    def split(h):  # (B, T, D) → (B, heads, T, dh)
        return h.reshape(B, T, heads, dh).transpose(1, 2)

    q = split(ref_linear(x, sd, prefix + ".qkv", mp, rows=slice(0, D)))
    k = split(ref_linear(x, sd, prefix + ".qkv", mp, rows=slice(D, 2 * D)))
    v = split(ref_linear(x, sd, prefix + ".qkv", mp, rows=slice(2 * D, 3 * D)))
    if mp.use_cosine_attention:
        q, k = ref_normalize(q), ref_normalize(k)
    logits = q @ k.transpose(-1, -2) / math.sqrt(dh)
    out = torch.softmax(logits, dim=-1) @ v
    return ref_linear(out.transpose(1, 2).reshape(B, T, D), sd, prefix + ".proj", mp)


def ref_mlp(x, sd, prefix, mp):
    return ref_linear(ref_act(ref_linear(x, sd, prefix + ".fc1", mp), mp), sd, prefix + ".fc2", mp)


def naive_dit_forward(sd, mp, x, t, y, *, depth, heads, patch, num_classes, drop=None, projected=False):
    """DiT forward of DESIGN §3.2 from a state dict, in float64. `drop`: labels replaced by the null label.

    Forced WN normalises each weight at use, unless `projected` says the weights already are (then the
    gradients are those of train.py's step, where the projection happens after the optimiser step)."""
    sd = {k: v if v.dtype == torch.float64 else v.double() for k, v in sd.items()}
    sd["__projected__"] = projected
    x, C = x.double(), x.shape[1]
    g = x.shape[-1] // patch
    if drop is not None:
        y = torch.where(drop, torch.full_like(y, num_classes), y)

    patches = ref_patchify(x, patch)
    ones = torch.ones(*patches.shape[:-1], 1, dtype=patches.dtype)
    tokens = ref_linear(torch.cat([patches, ones], dim=-1), sd, "x_embedder", mp)
    D = tokens.shape[-1]
    pos = ref_pos_embed(D, g, mp)[None]
    h = ref_mp_sum(tokens, pos, 0.5) if mp.use_mp_residual else tokens + pos

    if mp.use_mp_embedding:  # learned 1000×D table; its WN / forced WN follow the two WN switches
        t_feat = ref_table(sd, "t_embedder.table", t.long(), mp.use_weight_normalization,
                           mp.use_forced_weight_normalization)
    else:
        t_feat = ref_timestep_features(t, D)
    t_emb = ref_mlp(t_feat, sd, "t_embedder.mlp", mp)
    y_emb = ref_table(sd, "y_embedder", y, mp.use_mp_embedding, mp.use_mp_embedding)
    c = ref_mp_sum(t_emb, y_emb, 0.5) if mp.use_mp_residual else t_emb + y_emb

    def residual(a, b):
        return ref_mp_sum(a, b, 0.3) if mp.use_mp_residual else a + b

    for i in range(depth):
        pre = f"blocks.{i}"
        mod = ref_linear(ref_act(c, mp), sd, pre + ".modulation", mp)
        shift1, scale1, gate1, shift2, scale2, gate2 = (mod[:, k * D:(k + 1) * D] for k in range(6))
        a = ref_attention(ref_modulate(ref_layer_norm(h, mp), shift1, scale1), sd, pre + ".attn", mp, heads)
        h = residual(h, gate1[:, None, :] * a)
        m = ref_mlp(ref_modulate(ref_layer_norm(h, mp), shift2, scale2), sd, pre + ".mlp", mp)
        h = residual(h, gate2[:, None, :] * m)

    mod = ref_linear(ref_act(c, mp), sd, "final_layer.modulation", mp)
    shift, scale = mod[:, :D], mod[:, D:]
    out = ref_linear(ref_modulate(ref_layer_norm(h, mp), shift, scale), sd, "final_layer.linear", mp)
    return ref_unpatchify(out, patch, 2 * C, g)


# ----------------------------------------------------------------------------------------------------
# Helpers.


def make_model(mp, seed=0):
    """The tiny DiT with every parameter random and non-zero (zero-init layers and gains included).

    Returns the model, whose forced-WN weights have been projected (as after an optimiser step), and
    the raw state dict from before that projection: the reference applies forced WN itself."""
    torch.manual_seed(seed)
    model = tiny_dit(mp, depth=DEPTH, width=WIDTH, heads=HEADS, patch=PATCH, in_channels=CHANNELS,
                     input_size=SIZE, num_classes=CLASSES)
    return model, perturb_(model)


@torch.no_grad()
def perturb_(model, scale=1.0, add=False):
    """New random values for all parameters (plain layers scaled so activations stay O(1)), or
    random steps added to them; then the forced-WN projection. Returns the state before projecting."""
    for name, p in model.named_parameters():
        if name.endswith("gain"):
            new = torch.empty_like(p).uniform_(0.5, 1.5)
        elif p.ndim == 2 and "embedder.table" not in name and "y_embedder" not in name:
            new = scale * torch.randn_like(p) / math.sqrt(p.shape[1])
        else:
            new = scale * torch.randn_like(p)
        p.add_(new) if add else p.copy_(new)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    model.project_forced_weights_()
    return raw


def batch(seed=1, n=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, CHANNELS, SIZE, SIZE, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    t[0] = 0  # edge steps
    t[1] = 999
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return x, t, y


def reference(raw_state, mp, x, t, y, drop=None):
    return naive_dit_forward(raw_state, mp, x, t, y, depth=DEPTH, heads=HEADS, patch=PATCH,
                             num_classes=CLASSES, drop=drop)


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


# ----------------------------------------------------------------------------------------------------
# The reference itself is right where it can be checked against torch's own building blocks.


def test_reference_building_blocks_match_torch():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    p = ref_patchify(x, 2)
    expected = F.unfold(x, 2, stride=2)  # (B, C·p·p, T) with features (c, i, j)
    expected = expected.reshape(2, 3, 2, 2, 16).permute(0, 4, 2, 3, 1).reshape(2, 16, 12)
    assert torch.equal(p, expected)
    assert torch.equal(ref_unpatchify(p, 2, 3, 4), x)
    q, k, v = torch.randn(3, 2, 2, 5, 4, dtype=torch.float64)
    sdpa = F.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(torch.softmax(q @ k.transpose(-1, -2) / 2, -1) @ v, sdpa)


# ----------------------------------------------------------------------------------------------------
# The model against the reference, one switch at a time.


@pytest.mark.parametrize("name,mp", CONFIGS, ids=CONFIG_IDS)
def test_train_mode_forward_equals_naive_reference(name, mp):
    model, raw = make_model(mp)
    model.train()
    model.class_dropout = 0.5  # drop some labels (the same ones in both: same RNG draw)
    x, t, y = batch()
    torch.manual_seed(123)
    out = model(x, t, y)
    torch.manual_seed(123)
    drop = torch.rand(y.shape) < model.class_dropout
    assert 0 < drop.sum() < len(drop)
    ref = reference(raw, mp, x, t, y, drop)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert ref.norm() > 0 and torch.isfinite(ref).all()
    assert rel_err(out, ref) < RTOL, f"{name}: relative error {rel_err(out, ref):.2e}"
    # The output is not trivially independent of the input (zero-init layers were perturbed).
    assert (ref[0] - ref[1]).norm() > 1e-3 * ref.norm()


@pytest.mark.parametrize("name,mp", CONFIGS, ids=CONFIG_IDS)
def test_eval_mode_and_weight_cache_equal_naive_reference(name, mp):
    model, raw = make_model(mp)
    model.eval()
    x, t, y = batch()
    with torch.no_grad():
        first = model(x, t, y)
        assert rel_err(first, reference(raw, mp, x, t, y)) < RTOL, name
        assert torch.equal(model(x, t, y), first), f"{name}: cached weights changed the result"
        # An update in place (as an optimiser step, then the forced-WN projection) must invalidate the cache.
        raw2 = perturb_(model, scale=0.3, add=True)
        second = model(x, t, y)
        ref2 = reference(raw2, mp, x, t, y)
        assert rel_err(second, ref2) < RTOL, f"{name}: stale weight cache after an in-place update"
        assert rel_err(first, ref2) > 1e-3
        assert torch.equal(model(x, t, y), second)
        # Swapping the weights for other ones (the EMA / a checkpoint) must too.
        other, raw3 = make_model(mp, seed=7)
        model.load_state_dict(other.state_dict())
        third = model(x, t, y)
        ref3 = reference(raw3, mp, x, t, y)
        assert rel_err(third, ref3) < RTOL, f"{name}: stale cache after load_state_dict"
    # Eval mode with autograd on (no cache) gives the same numbers.
    assert rel_err(model(x, t, y).detach(), ref3) < RTOL


def test_train_and_eval_agree_without_label_dropout():
    model, _ = make_model(MPConfig.all_on())
    model.class_dropout = 0.0
    x, t, y = batch()
    train_out = model.train()(x, t, y)
    with torch.no_grad():
        eval_out = model.eval()(x, t, y)
    assert rel_err(train_out.detach(), eval_out.double()) < 1e-6


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per-layer"])
@pytest.mark.parametrize("name,mp", CONFIGS, ids=CONFIG_IDS)
def test_train_mode_gradients_equal_naive_reference(name, mp, batched):
    """The backward of every fast path (batched weights, custom autograd, fused residuals) is exact, and
    so is the per-layer weight normalisation that DDP runs use.

    The weights are taken as they are after the forced-WN projection (train.py projects after the
    optimiser step, so the gradient does not pass through the projection)."""
    model, _ = make_model(mp)
    model.batch_weight_normalization = batched
    model.train()
    model.class_dropout = 0.5
    x, t, y = batch()
    probe = torch.randn(len(x), 2 * CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(123)
    (model(x, t, y) * probe).sum().backward()
    torch.manual_seed(123)
    drop = torch.rand(y.shape) < model.class_dropout
    params = {n: p.detach().double().requires_grad_() for n, p in model.named_parameters()}
    ref = naive_dit_forward(params, mp, x, t, y, depth=DEPTH, heads=HEADS, patch=PATCH, num_classes=CLASSES,
                            drop=drop, projected=True)
    (ref * probe.double()).sum().backward()
    total_diff = total_ref = 0.0
    for n, p in model.named_parameters():
        expected = params[n].grad
        if expected is None or expected.abs().max() == 0:  # e.g. label rows not used by this batch
            assert p.grad is None or p.grad.abs().max() < 1e-6, n
            continue
        assert p.grad is not None, f"{name}: no gradient for {n}"
        err = (p.grad.double() - expected).norm() / expected.norm()
        assert err < 1e-4, f"{name}: gradient of {n} off by {err:.2e}"
        total_diff += (p.grad.double() - expected).norm().item() ** 2
        total_ref += expected.norm().item() ** 2
    assert math.sqrt(total_diff / total_ref) < RTOL


# ----------------------------------------------------------------------------------------------------
# Forced weight normalisation: the batched projection is per-weight normalize(W).


def test_batched_forced_projection_equals_per_weight_normalize():
    torch.manual_seed(0)
    shapes = [(96, 32), (32, 32), (128, 32), (32, 128), (7, 13), (1001, 32), (5, 13), (64, 16)]
    weights = [torch.randn(s) * (0.1 + i) for i, s in enumerate(shapes)]
    expected = [ref_normalize(w.double()) for w in weights]
    project_forced_weights_(weights)
    for w, e in zip(weights, expected):
        assert w.dtype == torch.float32
        assert torch.allclose(w.double(), e, rtol=1e-6, atol=1e-7)
        assert torch.allclose(w.square().mean(-1), torch.ones(len(w)), atol=1e-3)  # eps 1e-4 in the norm


@pytest.mark.parametrize("mp", [MPConfig.all_on(), MPConfig(use_forced_weight_normalization=True),
                                MPConfig(use_mp_embedding=True)], ids=["all", "forced_wn", "mp_embedding"])
def test_model_projection_covers_exactly_the_forced_weights(mp):
    torch.manual_seed(0)
    model = tiny_dit(mp, depth=DEPTH, width=WIDTH, heads=HEADS, patch=PATCH, in_channels=CHANNELS,
                     input_size=SIZE, num_classes=CLASSES)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 3 + 0.5)
    before = {n: p.detach().clone().double() for n, p in model.named_parameters()}
    model.project_forced_weights_()
    forced_linear = mp.use_forced_weight_normalization
    for n, p in model.named_parameters():
        is_label_table = n == "y_embedder.weight"
        forced = (mp.use_mp_embedding if is_label_table else forced_linear) and n.endswith("weight")
        if forced:
            assert torch.allclose(p.double(), ref_normalize(before[n]), rtol=1e-6, atol=1e-7), n
        else:
            assert torch.equal(p.double(), before[n]), f"{n} changed but is not force-normalised"


def test_projection_of_bf16_weights():
    torch.manual_seed(0)
    wb = [torch.randn(16, 8, dtype=torch.bfloat16) * 5]
    expected = ref_normalize(wb[0].double())
    project_forced_weights_(wb)
    assert wb[0].dtype == torch.bfloat16
    assert torch.allclose(wb[0].double(), expected, rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------------------------------
# torch.compile (as train.py: torch.compile(model)). By default: dynamo traces every configuration, in
# training and in sampling (eval, no grad), without graph breaks, and one full inductor compile of the
# all-eight model runs forward and backward (about a minute on a slow CPU).
# MAPDIT_COMPILE_TESTS=0 skips them all; =all also compiles every configuration, with the aot_eager
# backend (forward, backward, eval) and with inductor.

COMPILE = os.environ.get("MAPDIT_COMPILE_TESTS", "1")
needs_compile = pytest.mark.skipif(COMPILE == "0", reason="MAPDIT_COMPILE_TESTS=0")
compile_all = pytest.mark.skipif(COMPILE != "all", reason="set MAPDIT_COMPILE_TESTS=all")


def _compiled_matches_eager(mp, backend, sampling=True):
    import torch._dynamo
    torch._dynamo.reset()
    model, raw = make_model(mp)
    model.train()
    model.class_dropout = 0.0  # the compiled graph draws its own random numbers
    x, t, y = batch()
    compiled = torch.compile(model, backend=backend)
    eager_out = model(x, t, y)
    eager_out.square().mean().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    out = compiled(x, t, y)
    out.square().mean().backward()
    assert torch.allclose(out, eager_out, rtol=1e-4, atol=1e-5)
    assert set(eager_grads) == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if n in eager_grads:
            scale = eager_grads[n].abs().max().clamp(min=1e-6)
            assert (p.grad - eager_grads[n]).abs().max() / scale < 1e-3, n
    if sampling:  # eval mode, no grad: the weight cache must stay out of the graph's way
        with torch.no_grad():
            ref = reference(raw, mp, x, t, y)
            compiled.eval()
            assert rel_err(compiled(x, t, y), ref) < 1e-4
            assert rel_err(compiled(x, t, y), ref) < 1e-4
    torch._dynamo.reset()


@needs_compile
@pytest.mark.parametrize("name,mp", CONFIGS, ids=CONFIG_IDS)
def test_compile_traces_every_switch_without_graph_breaks(name, mp):
    import torch._dynamo
    torch._dynamo.reset()
    model, _ = make_model(mp)
    x, t, y = batch()
    for training in (True, False):
        model.train(training)
        with torch.set_grad_enabled(training):
            explanation = torch._dynamo.explain(model)(x, t, y)
        assert explanation.graph_break_count == 0, (name, training, [str(b.reason) for b in explanation.break_reasons])
        assert explanation.graph_count == 1
    torch._dynamo.reset()


@needs_compile
def test_inductor_compile_of_all_eight_forward_backward():
    _compiled_matches_eager(MPConfig.all_on(), backend="inductor", sampling=False)


@compile_all
@pytest.mark.parametrize("name,mp", CONFIGS, ids=CONFIG_IDS)
def test_aot_eager_compile_every_switch(name, mp):
    _compiled_matches_eager(mp, backend="aot_eager")


@compile_all
@pytest.mark.parametrize("name,mp", CONFIGS, ids=CONFIG_IDS)
def test_inductor_compile_every_switch(name, mp):
    _compiled_matches_eager(mp, backend="inductor")


# ----------------------------------------------------------------------------------------------------
# bench.py runs end to end (tiny: DiT-XS/8 on 4×8×8, one step) and writes its two reports.


def test_bench_smoke(tmp_path, monkeypatch):
    import json

    import bench
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "res"
    assert bench.main(["--models", "DiT-XS/8:8", "--switches", "none", "all", "--precisions", "fp32",
                       "--batch-size", "2", "--steps", "1", "--warmup", "1", "--rounds", "2", "--device", "cpu",
                       "--no-flush-denormal",
                       "--out", str(out)]) == 0
    result = json.loads((tmp_path / "res.json").read_text())
    rows = {r["switches"]: r for r in result["rows"]}
    assert set(rows) == {"none", "all"} and not any("error" in r for r in rows.values())
    assert all(r["train_img_s"] > 0 and r["fwd_img_s"] > 0 for r in rows.values())
    assert result["ratios"][0]["switches"] == "all" and result["ratios"][0]["train_ratio"] > 0
    assert "| DiT-XS/8 |" in (tmp_path / "res.md").read_text()


# ----------------------------------------------------------------------------------------------------
# normalize's hand-written backward (one autograd node) against autograd through the plain formula.


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_normalize_backward_equals_autograd_of_the_formula(dtype):
    from mp_layers import normalize
    torch.manual_seed(0)
    x = torch.randn(6, 5, 48, dtype=torch.float64)
    x[1, 2] = 0  # a zero row: both give the gradient sqrt(d)/eps·g there (the norm's own gradient is 0)
    x = x.to(dtype)
    g = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    fast = x.clone().requires_grad_()
    normalize(fast).backward(g)
    plain = x.double().clone().requires_grad_()
    norm = torch.linalg.vector_norm(plain, dim=-1, keepdim=True)
    (plain * math.sqrt(48) / (norm + 1e-4)).backward(g.double())
    assert fast.grad.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-2
    assert rel_err(fast.grad.double(), plain.grad) < tol
    assert rel_err(normalize(x).double(), ref_normalize(x.double())) < (1e-12 if dtype == torch.float64 else 1e-2)


# ----------------------------------------------------------------------------------------------------
# benchmarks/profile_step.py runs end to end and counts kernels (operators on a CPU) per step.


def test_profile_step_smoke(capsys):
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "profile_step.py")
    spec = importlib.util.spec_from_file_location("profile_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--model", "DiT-XS/8:8", "--device", "cpu", "--batch-size", "2", "--precision", "fp32",
                        "--compile", "off", "--warmup", "1", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| none") or
            line.startswith("| all")}
    assert set(rows) == {"none", "all"}
    kernels = {k: float(v.split("|")[4]) for k, v in rows.items()}
    assert kernels["none"] > 50 and kernels["all"] > 50
    assert "Kernels per step, all vs none" in out


def test_count_ops_all_eight_switches_cost_few_extra_operations():
    """benchmarks/count_ops.py: an exact count of the operations (eager GPU kernels) of one forward and
    backward. The eight switches add 176 to DiT-XS/2's 437 (266 to 449 before cosine attention normalised
    q and k together and the conditioning's SiLU was shared): a regression here costs eager throughput."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "count_ops.py")
    spec = importlib.util.spec_from_file_location("count_ops", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    none, all_on = (sum(module.count_ops("DiT-XS/2", module.switch_set(s)).values()) for s in ("none", "all"))
    assert 400 <= none <= 480 and all_on - none <= 180, (none, all_on)
    per_switch = module.count_ops("DiT-XS/2", module.switch_set("use_cosine_attention"))
    assert per_switch["linalg_vector_norm"] == 6  # q and k of each of the 6 blocks: one call
