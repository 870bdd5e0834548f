"""fast_paths.py computes the plain model's numbers.

The plain model (mp_layers.py, models.py) is the reference: the fast model, with the same weights, is held
equal to it in float64 for no switch, every switch alone and all of them (with every modulation set),
outputs and gradients, in train and eval mode. Also: the eval-time weights of `frozen_weights`, the batched forced-WN projection,
torch.compile (MAPDIT_COMPILE_TESTS=0 skips those, =all compiles every switch set), state-dict
compatibility, and smoke runs of bench.py and the two benchmark scripts.
"""
import contextlib
import importlib.util
import itertools
import math
import os

import pytest
import torch

import fast_paths
from fast_paths import apply_fast_paths, frozen_weights, project_rows_
from helpers import tiny_dit
from models import build_model
from mp_layers import MODULATION_PARTS, MPConfig, MPLinear, normalize, rotate_pairs

SWITCHES = MPConfig.switch_names()
CONFIGS = ([("none", MPConfig()), ("all", MPConfig(**{n: True for n in SWITCHES}))]
           + [(name.removeprefix("use_"), MPConfig(**{name: True})) for name in SWITCHES])
# Every modulation set, with every switch on.
MODULATION_CONFIGS = [("all+" + "+".join(parts), MPConfig(**{n: True for n in SWITCHES}, modulation="+".join(parts)))
                      for k in range(1, len(MODULATION_PARTS) + 1) for parts in itertools.combinations(MODULATION_PARTS, k)]
COMPILE_CONFIGS = CONFIGS + [c for c in MODULATION_CONFIGS if c[0] == "all+scale+rotation+gate"]
CONFIGS = CONFIGS + MODULATION_CONFIGS
CONFIG_IDS = [c[0] for c in CONFIGS]

# Tiny model: 16 tokens (8×8 input, patch 2), 2 blocks, width 32, 2 heads of 16.
SHAPE = dict(depth=2, width=32, heads=2, patch=2, in_channels=3, input_size=8, num_classes=5)
RTOL = 1e-10  # float64: the two differ only in rounding


def make_pair(mp, seed=0, dtype=torch.float64, ddp=False):
    """A plain and a fast tiny DiT with the same random, non-zero weights (zero-init layers and gains
    included), projected as after an optimiser step."""
    torch.manual_seed(seed)
    plain = tiny_dit(mp, **SHAPE).to(dtype)
    perturb_(plain)
    fast = apply_fast_paths(tiny_dit(mp, **SHAPE).to(dtype), ddp=ddp)
    fast.load_state_dict(plain.state_dict())
    return plain, fast


@torch.no_grad()
def perturb_(model, scale=1.0):
    """New random values for all parameters (plain layers scaled so activations stay O(1)), then the
    forced-WN projection."""
    for name, p in model.named_parameters():
        if name.endswith("gain"):
            p.uniform_(0.5, 1.5)
        elif p.ndim == 2 and "embedder.table" not in name and "y_embedder" not in name:
            p.copy_(scale * torch.randn_like(p) / math.sqrt(p.shape[1]))
        else:
            p.copy_(scale * torch.randn_like(p))
    model.project_forced_weights_()


def batch(seed=1, n=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, SHAPE["in_channels"], SHAPE["input_size"], SHAPE["input_size"], generator=g).to(dtype)
    t = torch.randint(0, 1000, (n,), generator=g)
    t[0], t[1] = 0, 999  # edge steps
    y = torch.randint(0, SHAPE["num_classes"], (n,), generator=g)
    return x, t, y


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def train_forward(model, x, t, y, seed=123):
    model.train()
    model.class_dropout = 0.5  # drop some labels (the same ones in both: same RNG draw)
    torch.manual_seed(seed)
    return model(x, t, y)


# ----------------------------------------------------------------------------------------------------
# The fast model against the plain one, one switch at a time.


@pytest.mark.parametrize("name,mp", CONFIGS, ids=CONFIG_IDS)
def test_fast_model_output_equals_plain_in_train_mode(name, mp):
    plain, fast = make_pair(mp)
    x, t, y = batch()
    ref = train_forward(plain, x, t, y)
    out = train_forward(fast, x, t, y)
    assert ref.norm() > 0 and (ref[0] - ref[1]).norm() > 1e-3 * ref.norm()  # not trivially constant
    assert rel_err(out, ref) < RTOL, f"{name}: relative error {rel_err(out, ref):.2e}"


@pytest.mark.parametrize("ddp", [False, True], ids=["batched", "per-layer"])
@pytest.mark.parametrize("name,mp", CONFIGS, ids=CONFIG_IDS)
def test_fast_model_gradients_equal_plain(name, mp, ddp):
    """Every fast backward (batched weights, custom normalize, fused residuals), and the per-layer weight
    normalisation of DDP runs (`ddp=True`), gives the plain model's gradients."""
    plain, fast = make_pair(mp, ddp=ddp)
    x, t, y = batch()
    probe = torch.randn(len(x), 2 * SHAPE["in_channels"], 8, 8, generator=torch.Generator().manual_seed(5)).double()
    for model in (plain, fast):
        (train_forward(model, x, t, y) * probe).sum().backward()
    expected = dict(plain.named_parameters())
    used = 0
    for n, p in fast.named_parameters():
        ref = expected[n].grad
        if ref is None or ref.abs().max() == 0:  # e.g. label rows not used by this batch
            assert p.grad is None or p.grad.abs().max() == 0, n
            continue
        used += 1
        assert p.grad is not None, f"{name}: no gradient for {n}"
        assert rel_err(p.grad, ref) < 1e-9, f"{name}: gradient of {n} off by {rel_err(p.grad, ref):.2e}"
    assert used > len(expected) // 2


@pytest.mark.parametrize("name,mp", CONFIGS, ids=CONFIG_IDS)
def test_fast_model_equals_plain_in_eval_mode_with_and_without_frozen_weights(name, mp):
    plain, fast = make_pair(mp)
    x, t, y = batch()
    with torch.no_grad():
        ref = plain.eval()(x, t, y)
        assert rel_err(fast.eval()(x, t, y), ref) < RTOL, name
        with frozen_weights(fast):
            assert rel_err(fast(x, t, y), ref) < RTOL, name
            assert torch.equal(fast(x, t, y), fast(x, t, y))
    assert rel_err(fast(x, t, y).detach(), ref) < RTOL  # eval mode with autograd on


def test_plain_and_fast_state_dicts_are_interchangeable():
    plain, fast = make_pair(MPConfig(**{n: True for n in SWITCHES}))
    assert list(plain.state_dict()) == list(fast.state_dict())
    x, t, y = batch()
    other = tiny_dit(plain.mp, **SHAPE).double()
    other.load_state_dict(fast.state_dict())
    with torch.no_grad():
        assert torch.equal(other.eval()(x, t, y), plain.eval()(x, t, y))


@pytest.mark.parametrize("modulation", ["adaln", "scale+rotation+gate"])
def test_adam_steps_with_the_forced_projection_equal_plain(modulation):
    """Two optimiser steps (forward, backward, Adam, forced-WN projection) of the fast model, whose
    weight-normalised groups share one storage on a CPU, give the plain model's parameters."""
    plain, fast = make_pair(MPConfig(**{n: True for n in SWITCHES}, modulation=modulation))
    assert fast.stored_rows()  # the groups are stored together
    x, t, y = batch()
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (plain, fast)]
    for step in range(2):
        for model, opt in zip((plain, fast), opts):
            opt.zero_grad(set_to_none=True)
            train_forward(model, x, t, y, seed=step).square().mean().backward()
            opt.step()
            model.project_forced_weights_()
    assert fast.stored_rows()  # still stored together
    for (n, p), q in zip(plain.named_parameters(), fast.parameters()):
        assert rel_err(q, p) < 1e-9, n


def test_weights_stored_together_are_regrouped_by_to_and_given_up_for_own_storage_and_ddp():
    """`.to()` gives every weight a new storage: the groups are stored together again. A weight given a
    storage of its own (load_state_dict(assign=True)) makes its group concatenate: the outputs stay the
    plain model's. Under DDP each weight has its own storage."""
    plain, fast = make_pair(MPConfig.all_on(), dtype=torch.float32)
    plain.double(), fast.double()
    x, t, y = batch()
    assert fast.stored_rows() and all(rows.dtype == torch.float64 for rows in fast.stored_rows().values())
    with torch.no_grad():
        ref = plain.eval()(x, t, y)
        assert rel_err(fast.eval()(x, t, y), ref) < RTOL
        fast.load_state_dict({k: v.clone() for k, v in plain.state_dict().items()}, assign=True)
        assert not fast.stored_rows()
        assert rel_err(fast(x, t, y), ref) < RTOL
        apply_fast_paths(fast.float())
        assert fast.stored_rows()
        apply_fast_paths(fast, ddp=True)
        assert not fast.stored_rows()
        storages = [p.untyped_storage().data_ptr() for p in fast.parameters()]
        assert len(set(storages)) == len(storages)
        assert rel_err(fast(x.float(), t, y), ref) < 1e-5


# ----------------------------------------------------------------------------------------------------
# Eval-time weights: computed once inside `frozen_weights`, never cached outside it.


def test_data_copy_swap_gives_the_new_weights_output():
    """The EMA-swap idiom `p.data.copy_(...)` does not bump a tensor's version counter; after it the model
    must compute with the new weights (DiT-XS/8, all eight switches, eval mode), inside a new frozen_weights
    block and outside any."""
    mp = MPConfig.all_on()
    torch.manual_seed(0)
    model = apply_fast_paths(build_model("DiT-XS/8", in_channels=4, input_size=16, num_classes=10, mp=mp)).eval()
    perturb_(model)
    torch.manual_seed(1)
    fresh = build_model("DiT-XS/8", in_channels=4, input_size=16, num_classes=10, mp=mp).eval()
    perturb_(fresh)
    x, t, y = torch.randn(4, 4, 16, 16), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 7, 10])
    with torch.no_grad():
        with frozen_weights(model):
            before = model(x, t, y)
        model(x, t, y)  # an eval forward outside the block, as a sampler between two blocks would
        for p, q in zip(model.parameters(), fresh.parameters()):
            p.data.copy_(q.data)
        expected = fresh(x, t, y)
        assert (before - expected).abs().max() > 1e-2  # the swap changes the output
        assert rel_err(model(x, t, y), expected) < 1e-5
        with frozen_weights(model):
            assert rel_err(model(x, t, y), expected) < 1e-5


def test_frozen_weights_are_dropped_on_exit():
    _, fast = make_pair(MPConfig.all_on())
    with frozen_weights(fast):
        assert all(layer.given_weight is not None for layer in fast._scaled_layers)
        with frozen_weights(fast):  # nested: the inner block leaves the outer one's weights alone
            pass
        assert all(layer.given_weight is not None for layer in fast._scaled_layers)
    assert all(layer.given_weight is None for layer in fast._scaled_layers) and not fast.frozen


def test_frozen_weights_refuse_to_train():
    _, fast = make_pair(MPConfig.all_on())
    x, t, y = batch()
    with frozen_weights(fast), pytest.raises(RuntimeError, match="frozen_weights.*no gradient"):
        fast(x, t, y)


def test_frozen_weights_leave_a_plain_model_alone():
    plain, _ = make_pair(MPConfig.all_on())
    x, t, y = batch()
    with torch.no_grad():
        ref = plain.eval()(x, t, y)
        with frozen_weights(plain):
            assert torch.equal(plain(x, t, y), ref)


def test_apply_fast_paths_twice_only_changes_the_ddp_choice():
    plain, fast = make_pair(MPConfig.all_on())
    assert apply_fast_paths(fast, ddp=True) is fast and not fast.batched
    apply_fast_paths(fast)
    x, t, y = batch()
    with torch.no_grad():
        assert rel_err(fast.eval()(x, t, y), plain.eval()(x, t, y)) < RTOL  # MP-SiLU's gain folded once


def test_apply_fast_paths_refuses_other_modules():
    with pytest.raises(TypeError, match="apply_fast_paths takes a models.DiT, not a Linear"):
        apply_fast_paths(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------------------------------
# Forced weight normalisation: the batched projection is per-weight normalize(W).


def test_batched_forced_projection_equals_per_weight_normalize():
    torch.manual_seed(0)
    shapes = [(96, 32), (32, 32), (128, 32), (32, 128), (7, 13), (1001, 32), (5, 13), (64, 16)]
    weights = [torch.randn(s) * (0.1 + i) for i, s in enumerate(shapes)]
    expected = [normalize(w.double()) for w in weights]
    project_rows_(weights)
    for w, e in zip(weights, expected):
        assert w.dtype == torch.float32
        assert torch.allclose(w.double(), e, rtol=1e-6, atol=1e-7)
        assert torch.allclose(w.square().mean(-1), torch.ones(len(w)), atol=1e-3)  # eps 1e-4 in the norm


@pytest.mark.parametrize("mp", [MPConfig.all_on(), MPConfig(use_forced_weight_normalization=True),
                                MPConfig(use_mp_embedding=True)], ids=["all", "forced_wn", "mp_embedding"])
def test_fast_projection_equals_plain_projection(mp):
    plain, fast = make_pair(mp)
    with torch.no_grad():
        for p in plain.parameters():
            p.copy_(torch.randn_like(p) * 3 + 0.5)
    fast.load_state_dict(plain.state_dict())
    before = {n: p.detach().clone() for n, p in plain.named_parameters()}
    plain.project_forced_weights_()
    fast.project_forced_weights_()
    changed = 0
    for (n, p), q in zip(plain.named_parameters(), fast.parameters()):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-12), n
        changed += not torch.equal(p, before[n])
    assert changed == len(plain.forced_weights()) > 0


def test_projection_of_bf16_weights():
    torch.manual_seed(0)
    wb = [torch.randn(16, 8, dtype=torch.bfloat16) * 5]
    expected = normalize(wb[0].double())
    project_rows_(wb)
    assert wb[0].dtype == torch.bfloat16
    assert torch.allclose(wb[0].double(), expected, rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------------------------------
# normalize's hand-written backward (one autograd node) against autograd through mp_layers.normalize.


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_normalize_backward_equals_autograd_of_the_formula(dtype):
    torch.manual_seed(0)
    x = torch.randn(6, 5, 48, dtype=torch.float64)
    x[1, 2] = 0  # a zero row: both give the gradient sqrt(d)/eps·g there (the norm's own gradient is 0)
    x = x.to(dtype)
    g = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    fast = x.clone().requires_grad_()
    fast_paths.fused_normalize(fast).backward(g)
    plain = x.double().clone().requires_grad_()
    normalize(plain).backward(g.double())
    assert fast.grad.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-2
    assert rel_err(fast.grad, plain.grad) < tol
    assert rel_err(fast_paths.fused_normalize(x), normalize(x.double())) < tol


def test_batched_weights_with_gains_equal_each_layers_effective_weight():
    """The batched pass (one concatenation, one node for normalisation and gains) against each layer's own
    MPLinear.effective_weight, outputs and gradients of weights and gains, float64; layers with and
    without gains share a group, one of another fan-in has its own."""
    torch.manual_seed(0)
    mp = MPConfig.all_on()
    layers = [fast_paths.FastMPLinear(16, 24, mp, zero_init=True), fast_paths.FastMPLinear(16, 8, mp),
              fast_paths.FastMPLinear(16, 5, mp, zero_init=True), fast_paths.FastMPLinear(7, 3, mp, zero_init=True)]
    layers = [layer.double() for layer in layers]
    with torch.no_grad():
        for layer in layers:
            layer.weight.mul_(torch.rand(len(layer.weight), 1, dtype=torch.float64) + 0.5)
            if layer.gain is not None:
                layer.gain.uniform_(-1.5, 1.5)
    probes = [torch.randn(layer.weight.shape, dtype=torch.float64) for layer in layers]
    fast = fast_paths.batched_effective_weights(layers)
    sum((w * p).sum() for w, p in zip(fast, probes)).backward()
    fast_grads = [(layer.weight.grad.clone(), None if layer.gain is None else layer.gain.grad.clone()) for layer in layers]
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    plain = [MPLinear.effective_weight(layer) for layer in layers]
    sum((w * p).sum() for w, p in zip(plain, probes)).backward()
    for layer, w, ref, (weight_grad, gain_grad) in zip(layers, fast, plain, fast_grads):
        assert rel_err(w, ref) < 1e-12
        assert rel_err(weight_grad, layer.weight.grad) < 1e-12
        if layer.gain is not None:
            assert abs(gain_grad - layer.gain.grad) <= 1e-12 * abs(layer.gain.grad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_rotation_node_equals_autograd_of_rotate_pairs(dtype):
    """fast_rotate_pairs (one node, analytic backward) against autograd through mp_layers.rotate_pairs:
    the rotated tokens and the gradients of tokens and angles."""
    torch.manual_seed(0)
    h = torch.randn(3, 5, 8, dtype=torch.float64).to(dtype)
    angles = (4 * torch.randn(3, 4, dtype=torch.float64)).to(dtype)
    g = torch.randn(3, 5, 8, dtype=torch.float64).to(dtype)
    fast_h, fast_angles = h.clone().requires_grad_(), angles.clone().requires_grad_()
    out = fast_paths.fast_rotate_pairs(fast_h, fast_angles)
    out.backward(g)
    plain_h, plain_angles = h.double().requires_grad_(), angles.double().requires_grad_()
    ref = rotate_pairs(plain_h, plain_angles)
    ref.backward(g.double())
    tol = 1e-12 if dtype == torch.float64 else 2e-2
    assert out.dtype == dtype and fast_h.grad.dtype == dtype and fast_angles.grad.dtype == dtype
    assert rel_err(out, ref) < tol
    assert rel_err(fast_h.grad, plain_h.grad) < tol
    assert rel_err(fast_angles.grad, plain_angles.grad) < tol


# ----------------------------------------------------------------------------------------------------
# torch.compile of the fast model (as train.py: torch.compile(model)). By default: dynamo traces every
# configuration, in training and in sampling (eval, no grad, frozen weights), without graph breaks, and one
# full inductor compile of the all-eight model runs forward and backward (about a minute on a slow CPU).
# MAPDIT_COMPILE_TESTS=0 skips them all; =all also compiles every configuration, with the aot_eager
# backend (forward, backward, eval) and with inductor.

COMPILE = os.environ.get("MAPDIT_COMPILE_TESTS", "1")
needs_compile = pytest.mark.skipif(COMPILE == "0", reason="MAPDIT_COMPILE_TESTS=0")
compile_all = pytest.mark.skipif(COMPILE != "all", reason="set MAPDIT_COMPILE_TESTS=all")


def _compiled_matches_eager(mp, backend, sampling=True):
    import torch._dynamo
    torch._dynamo.reset()
    plain, model = make_pair(mp, dtype=torch.float32)
    model.train()
    model.class_dropout = 0.0  # the compiled graph draws its own random numbers
    x, t, y = batch(dtype=torch.float32)
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
    if sampling:
        with torch.no_grad():
            ref = plain.eval()(x, t, y)
            compiled.eval()
            assert rel_err(compiled(x, t, y), ref) < 1e-4
            with frozen_weights(model):
                assert rel_err(compiled(x, t, y), ref) < 1e-4
    torch._dynamo.reset()


@needs_compile
@pytest.mark.parametrize("name,mp", COMPILE_CONFIGS, ids=[c[0] for c in COMPILE_CONFIGS])
def test_compile_traces_every_switch_without_graph_breaks(name, mp):
    import torch._dynamo
    torch._dynamo.reset()
    _, model = make_pair(mp, dtype=torch.float32)
    x, t, y = batch(dtype=torch.float32)
    for training in (True, False):
        model.train(training)
        with torch.set_grad_enabled(training), (contextlib.nullcontext() if training else frozen_weights(model)):
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
# bench.py and the benchmark scripts run end to end.


def _load_benchmark(name):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", name + ".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def _bench_row(switches, compile, step_ms, fwd_ms, **extra):
    return {"model": "DiT-XS/2", "latent": "4x16x16", "size": 16, "channels": 4, "switches": switches,
            "precision": "fp32", "compile": compile, "compile_mode": "default" if compile else None,
            "train_img_s": 32e3 / step_ms, "fwd_img_s": 32e3 / fwd_ms, "train_step_ms": step_ms, "fwd_ms": fwd_ms,
            **extra}


def test_bench_report_gives_each_switch_sets_compiled_over_eager_step_time():
    from benchmarks import report
    rows = [_bench_row("all", False, 500, 100), _bench_row("all", True, 450, 40), _bench_row("none", True, 400, 30)]
    (entry,) = report.compile_ratio_rows(rows)  # "none" has no eager twin
    assert entry["switches"] == "all" and entry["train_ratio"] == pytest.approx(0.9)
    assert entry["fwd_ratio"] == pytest.approx(0.4)


def test_bench_report_flags_a_row_that_compiled_inside_its_timed_steps():
    from benchmarks import report
    rows = [_bench_row("all", True, 1000, 40, compiled_while_timed=1), _bench_row("none", True, 400, 30)]
    meta = {"device_name": "CPU", "torch": "x", "date": "d", "total_s": 1.0, "device": "cpu", "skipped": [],
            "args": {"batch_size": 32, "warmup": 2, "steps": 2, "rounds": 1}}
    text = report.markdown({"meta": meta, "rows": rows, "ratios": [], "compile_ratios": []})
    flagged = text.split("times include compilation")[1]
    assert "[all] fp32 compile on: 1 graph(s)" in flagged and "[none]" not in flagged


def test_profile_step_smoke(capsys):
    module = _load_benchmark("profile_step")
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
    backward of the fast model. DiT-XS/2 had 437 (none) and 613 (all eight) before the plain model and the
    speed layer were separated, 399 and 610 after; now 399 and 582 (the gains in the batched node, the row
    dots as matrix products, the weights read from one storage). A rise here costs eager throughput."""
    module = _load_benchmark("count_ops")
    none, all_on = (sum(module.count_ops("DiT-XS/2", module.switch_set(s)).values()) for s in ("none", "all"))
    assert none <= 399 and all_on <= 582, (none, all_on)
    per_switch = module.count_ops("DiT-XS/2", module.switch_set("use_cosine_attention"))
    assert per_switch["linalg_vector_norm"] == 6  # q and k of each of the 6 blocks: one call


def test_count_ops_rotation_modulation_costs_few_operations_more_than_adaln():
    """All eight with scale+rotation+gate: 1,253 operations on DiT-XS/2 when every part was its own product
    and the rotation autograd's; 768 with the parts in one product per block and the rotation one node."""
    module = _load_benchmark("count_ops")
    counts = module.count_ops("DiT-XS/2", module.switch_set("all:scale+rotation+gate"))
    assert sum(counts.values()) <= 768, sum(counts.values())
    assert counts["cos"] == counts["sin"] == 13  # one rotation node per modulated branch (6 blocks × 2 + final)
