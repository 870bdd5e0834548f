"""Tests for phema.py: gamma <-> sigma_rel, power-function EMA tracking, snapshots, post-hoc reconstruction;
and for ema.py, its command line.  Tiny and CPU-only (the whole file runs in a few seconds)."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import ema
import phema as E

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flat(sd):
    return torch.cat([v.detach().float().flatten() for v in sd.values()])


def set_params(model, vec):
    i = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(vec[i:i + p.numel()].view_as(p))
            i += p.numel()


# ----------------------------------------------------------------------------------------------
# 1. gamma <-> sigma_rel


@pytest.mark.parametrize("std", [0.005, 0.02, 0.05, 0.07, 0.10, 0.15, 0.25, 0.288])
def test_std_gamma_round_trip(std):
    g = E.std_to_gamma(std)
    assert g > 0
    assert E.gamma_to_std(g) == pytest.approx(std, rel=1e-12)
    # it is a root of the cubic, and the largest real one
    c = std ** -2
    roots = np.roots([1, 7, 16 - c, 12 - c])
    assert g == pytest.approx(max(r.real for r in roots if abs(r.imag) < 1e-9), rel=1e-9)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 6.94, 16.97, 100.0, 5000.0])
def test_gamma_std_round_trip(gamma):
    assert E.std_to_gamma(E.gamma_to_std(gamma)) == pytest.approx(gamma, rel=1e-9, abs=1e-9)


def test_known_values():
    # forward formula at the EDM2 defaults
    for g, s in [(16.97, 0.05), (6.94, 0.10)]:
        assert math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) == pytest.approx(s, rel=2e-3)
    assert E.std_to_gamma(0.05) == pytest.approx(16.9722, abs=1e-3)
    assert E.std_to_gamma(0.10) == pytest.approx(6.9372, abs=1e-3)
    assert E.gamma_to_std(0.0) == pytest.approx(1 / math.sqrt(12), rel=1e-12)


@pytest.mark.parametrize("bad", [0.0, -0.05, 0.2887, 0.3, 1.0, float("nan"), float("inf"), "x"])
def test_invalid_std(bad):
    with pytest.raises(ValueError) as ei:
        E.std_to_gamma(bad)
    msg = str(ei.value)
    assert "(0, 0.2887)" in msg and "\n" not in msg


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")])
def test_invalid_gamma(bad):
    with pytest.raises(ValueError, match="gamma must be a finite number >= 0"):
        E.gamma_to_std(bad)


# ----------------------------------------------------------------------------------------------
# 2. tracking


class Vec(torch.nn.Module):
    def __init__(self, n=3):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(n))
        self.v = torch.nn.Parameter(torch.zeros(2, 2))


def test_first_update_copies_exactly():
    torch.manual_seed(0)
    m = torch.nn.Linear(5, 3)
    pe = E.PowerEMA(m, stds=(0.05, 0.10))
    set_params(m, torch.randn(sum(p.numel() for p in m.parameters())) * 7.3)
    pe.update(m, 1)
    for std in (0.05, 0.10):
        for n, t in m.state_dict().items():
            assert pe.ema_state(std)[n].dtype == torch.float32
            assert torch.equal(pe.ema_state(std)[n], t)


def test_linear_trajectory_matches_closed_form():
    T = 1000
    m = Vec()
    pe = E.PowerEMA(m, stds=(0.05, 0.10))
    for s in range(1, T + 1):
        with torch.no_grad():
            m.w.fill_(float(s))
            m.v.fill_(-2.0 * s)
        pe.update(m, s)
        if s == 1:
            assert torch.equal(pe.ema_state(0.05)["w"], torch.ones(3))
    for std in (0.05, 0.10):
        g = E.std_to_gamma(std)
        # Exact discrete value: the weight of theta_s is (s^(g+1) - (s-1)^(g+1)) / T^(g+1), and
        # summing by parts gives  E[theta] = T - sum_{s=1}^{T-1} (s/T)^(g+1).
        s = np.arange(1, T, dtype=np.float64)
        exact = T - np.sum((s / T) ** (g + 1))
        closed = T * (g + 1) / (g + 2)  # continuous-time value
        got_w = pe.ema_state(std)["w"].double()
        got_v = pe.ema_state(std)["v"].double()
        assert torch.allclose(got_w, torch.full_like(got_w, exact), rtol=1e-5, atol=0)
        assert torch.allclose(got_v, torch.full_like(got_v, -2 * exact), rtol=1e-5, atol=0)
        # Continuous closed form: off by the discretisation offset ~ +1/2 (Euler-Maclaurin),
        # i.e. relative ~5e-4 at T = 1000.
        assert abs(got_w[0].item() - closed) / closed < 1e-3
        assert got_w[0].item() - closed == pytest.approx(0.5, abs=0.01)


def test_wrappers_state_dict_and_dtypes():
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 2)
    pe = E.PowerEMA(torch.nn.DataParallel(m), stds=(0.05,))  # no "module." prefix
    assert set(pe.ema_state(0.05)) == {"weight", "bias"}
    compiled = torch.compile(m)  # creating the wrapper does not compile anything
    pe.update(compiled, 1)
    with torch.no_grad():
        m.weight.add_(1.0)
    pe.update(torch.nn.DataParallel(compiled), 2)
    beta = 0.5 ** (E.std_to_gamma(0.05) + 1)
    expect = beta * (m.weight - 1.0) + (1 - beta) * m.weight
    assert torch.allclose(pe.ema_state(0.05)["weight"], expect.detach(), atol=1e-6)

    # state_dict / load_state_dict round trip into a fresh object
    sd = pe.state_dict()
    assert list(sd) == [0.05] and isinstance(list(sd)[0], float)
    other = E.PowerEMA(torch.nn.Linear(4, 2), stds=(0.05,))
    other.load_state_dict({k: {n: t.clone() for n, t in v.items()} for k, v in sd.items()})
    assert torch.equal(flat(other.ema_state(0.05)), flat(pe.ema_state(0.05)))
    with pytest.raises(ValueError, match=r"holds sigma_rel \[0.05\], this PowerEMA tracks \[0.1\]"):
        E.PowerEMA(torch.nn.Linear(4, 2), stds=(0.10,)).load_state_dict(sd)
    with pytest.raises(ValueError, match="step must be an integer >= 1"):
        pe.update(m, 0)

    # a bf16 model still gets an fp32 EMA
    mb = torch.nn.Linear(4, 2).to(torch.bfloat16)
    pb = E.PowerEMA(mb, stds=(0.10,))
    pb.update(mb, 1)
    assert pb.ema_state(0.10)["weight"].dtype == torch.float32
    assert torch.equal(pb.ema_state(0.10)["weight"], mb.weight.float())


def test_save_snapshots(tmp_path):
    m = Vec()
    pe = E.PowerEMA(m, stds=(0.05, 0.10))
    with torch.no_grad():
        m.w.fill_(3.0)
    pe.update(m, 1)
    paths = pe.save_snapshots(tmp_path, 1000)
    assert sorted(os.listdir(tmp_path)) == ["ema-0.050-0001000.pt", "ema-0.100-0001000.pt"]
    assert [os.path.basename(p) for p in paths] == ["ema-0.050-0001000.pt", "ema-0.100-0001000.pt"]
    d = torch.load(paths[0], weights_only=True)
    assert d["std"] == 0.05 and d["step"] == 1000
    assert d["state"]["w"].dtype == torch.float16 and torch.equal(d["state"]["w"], torch.full((3,), 3.0).half())
    assert E.list_snapshots(tmp_path) == [(paths[0], 0.05, 1000), (paths[1], 0.10, 1000)]
    assert E.snapshot_filename(0.0725, 12) == "ema-0.0725-0000012.pt"


# ----------------------------------------------------------------------------------------------
# 3. post-hoc reconstruction


def test_solve_coefficients_basic():
    ts = np.array([100, 100, 200, 200.0])
    gs = np.array([E.std_to_gamma(0.05), E.std_to_gamma(0.10)] * 2)
    # target equal to one of the inputs -> that input alone
    x = E.solve_posthoc_coefficients(ts, gs, 200.0, gs[1])
    assert x.shape == (4,)
    assert np.allclose(x, [0, 0, 0, 1], atol=1e-8)
    X = E.solve_posthoc_coefficients(ts, gs, np.array([200.0, 150.0]), np.array([gs[0], E.std_to_gamma(0.07)]))
    assert X.shape == (4, 2) and np.allclose(X.sum(axis=0), 1.0)
    # inner product is symmetric and <p,p> = (g+1)^2 / ((2g+1) t)
    a = E.power_profile_inner(100.0, 3.0, 250.0, 7.0)
    assert a == pytest.approx(E.power_profile_inner(250.0, 7.0, 100.0, 3.0))
    assert E.power_profile_inner(50.0, 3.0, 50.0, 3.0) == pytest.approx(16 / (7 * 50))


def synthetic_run(d, every: int, T: int = 2000):
    """A T-step synthetic run of a tiny model: smooth nonlinear drift plus noise; tracked EMAs at 0.05 and
    0.10 snapshotted into `d` every `every` steps, and reference EMAs tracked directly at 0.07 (the state
    at T/2 and at T)."""
    torch.manual_seed(0)
    m = torch.nn.Linear(8, 8)
    n = sum(p.numel() for p in m.parameters())
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    phase, freq = torch.rand(n, generator=g) * 6.28, 1 + 3 * torch.rand(n, generator=g)
    pe = E.PowerEMA(m, stds=(0.05, 0.10))
    ref = E.PowerEMA(m, stds=(0.07,))
    ref_mid = None
    for s in range(1, T + 1):
        u = s / T
        set_params(m, a * u ** 2 + b * torch.sin(freq * math.pi * u + phase) + 0.3 * torch.randn(n, generator=g))
        pe.update(m, s)
        ref.update(m, s)
        if s % every == 0:
            pe.save_snapshots(d, s)
        if s == T // 2:
            ref_mid = {k: v.clone() for k, v in ref.ema_state(0.07).items()}
    return d, pe, ref, ref_mid


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory):
    """synthetic_run snapshotted every 50 steps (40 per profile)."""
    return synthetic_run(tmp_path_factory.mktemp("run") / "ema", every=50)


def test_posthoc_ema_from_the_snapshots_train_py_takes_by_default_is_accurate(tmp_path):
    """train.py's default spacing keeps a short run small (ten snapshots per profile for 2,000 steps);
    the post-hoc EMA of an untracked σ_rel from them is still within 1 % of the one tracked directly."""
    from config import default_snapshot_spacing
    every = default_snapshot_spacing(2000)
    d, pe, ref, _ = synthetic_run(tmp_path / "ema", every=every)
    assert every == 200 and len(E.list_snapshots(d)) == 2 * 10
    target = flat(ref.ema_state(0.07))
    state, _ = E.reconstruct_ema(d, 0.07)
    assert (flat(state) - target).norm() / target.norm() < 0.01


def test_posthoc_untracked_std(trajectory):
    d, pe, ref, ref_mid = trajectory
    assert len(E.list_snapshots(d)) == 80
    target = flat(ref.ema_state(0.07))
    state, info = E.reconstruct_ema(d, 0.07)
    assert info["step"] == 2000 and len(info["sources"]) == 80
    assert all(v.dtype == torch.float32 for v in state.values())
    err = (flat(state) - target).norm() / target.norm()
    assert err < 0.01
    # the test can fail: the nearest tracked EMAs are far from the 0.07 one
    for std in (0.05, 0.10):
        assert (flat(pe.ema_state(std)) - target).norm() / target.norm() > 0.05
    # mid-run target uses only snapshots at or before it
    state_mid, info_mid = E.reconstruct_ema(d, 0.07, step=1000)
    assert max(st for _, _, st, _ in info_mid["sources"]) == 1000 and len(info_mid["sources"]) == 40
    tm = flat(ref_mid)
    assert (flat(state_mid) - tm).norm() / tm.norm() < 0.01


def test_posthoc_tracked_std_is_exact(trajectory):
    d, pe, _, _ = trajectory
    state, _ = E.reconstruct_ema(d, 0.05)
    tracked = flat(pe.ema_state(0.05))
    got = flat(state)
    # equals the fp16 snapshot, i.e. the tracked EMA up to fp16 rounding
    snap = torch.load(os.path.join(d, "ema-0.050-0002000.pt"), weights_only=True)
    assert torch.allclose(got, flat(snap["state"]), rtol=0, atol=1e-6)
    assert torch.allclose(got, tracked, rtol=2.0 ** -11, atol=1e-6)


def test_reconstruct_emas_matches_single(trajectory):
    d, _, _, _ = trajectory
    many = E.reconstruct_emas(d, [0.07, 0.03], step=1500)
    for (state, info), std in zip(many, [0.07, 0.03]):
        single, _ = E.reconstruct_ema(d, std, step=1500)
        assert info["std"] == std and info["step"] == 1500
        assert torch.allclose(flat(state), flat(single), atol=1e-6)


def test_reconstruct_errors(tmp_path, trajectory):
    d, _, _, _ = trajectory
    with pytest.raises(FileNotFoundError, match="no EMA snapshots"):
        E.reconstruct_ema(tmp_path, 0.05)
    with pytest.raises(FileNotFoundError, match="not found"):
        E.reconstruct_ema(tmp_path / "nope", 0.05)
    with pytest.raises(ValueError, match="available steps: 50, 100"):
        E.reconstruct_ema(d, 0.05, step=20)
    with pytest.raises(ValueError, match="after the last snapshot"):
        E.reconstruct_ema(d, 0.05, step=2050)
    with pytest.raises(ValueError, match=r"\(0, 0.2887\)"):
        E.reconstruct_ema(d, 0.3)


# ----------------------------------------------------------------------------------------------
# 4. command line


def run_main(argv, capsys):
    try:
        rc = ema.main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_writes_files(trajectory, tmp_path):
    d, _, ref, _ = trajectory
    run = os.path.dirname(d)
    out = tmp_path / "ph"
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "ema.py"), "--result-dir", run, "--ema-std", "0.07", "0.05",
         "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert sorted(os.listdir(out)) == ["posthoc-0.050-0002000.pt", "posthoc-0.070-0002000.pt"]
    assert "posthoc-0.070-0002000.pt" in p.stdout
    obj = torch.load(out / "posthoc-0.070-0002000.pt", weights_only=True)
    assert obj["std"] == 0.07 and obj["step"] == 2000
    target = flat(ref.ema_state(0.07))
    assert (flat(obj["state"]) - target).norm() / target.norm() < 0.01


def test_cli_default_out_and_step(trajectory, capsys):
    d, _, _, _ = trajectory
    run = os.path.dirname(d)
    rc, out, err = run_main(["--result-dir", run, "--ema-std", "0.08", "--step", "500"], capsys)
    assert rc == 0 and err == ""
    path = os.path.join(run, "posthoc", "posthoc-0.080-0000500.pt")
    assert os.path.isfile(path) and path in out
    assert torch.load(path, weights_only=True)["step"] == 500


def test_cli_errors(trajectory, tmp_path, capsys):
    d, _, _, _ = trajectory
    run = os.path.dirname(d)
    (tmp_path / "empty" / "ema").mkdir(parents=True)
    cases = [
        (["--result-dir", run, "--ema-std", "0.3"], "0.2887"),
        (["--result-dir", run, "--ema-std", "0.05", "--step", "10"], "available steps"),
        (["--result-dir", str(tmp_path / "empty"), "--ema-std", "0.05"], "no EMA snapshots"),
        (["--result-dir", str(tmp_path / "missing"), "--ema-std", "0.05"], "run folder not found"),
        (["--result-dir", str(tmp_path), "--ema-std", "0.05"], "snapshot folder"),
        (["--result-dir", run, "--ema-std", "abc"], "invalid float"),
    ]
    for argv, needle in cases:
        rc, out, err = run_main(argv, capsys)
        assert rc == 2, (argv, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, (argv, err)
    # no file was written by the failing calls
    assert not os.path.exists(os.path.join(run, "posthoc", "posthoc-0.300-0002000.pt"))
    # the script itself: exit 2, one line, no traceback
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "ema.py"), "--result-dir", str(tmp_path / "missing"), "--ema-std", "0.05"],
        capture_output=True, text=True, timeout=120,
    )
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr


def test_cli_full_disk_is_one_error_line_and_no_file(trajectory, tmp_path, capsys, monkeypatch):
    import errno
    d, _, _, _ = trajectory

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"PK partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "ph"
    rc, _, err = run_main(["--result-dir", os.path.dirname(d), "--ema-std", "0.05", "--out", str(out)], capsys)
    target = out / "posthoc-0.050-0002000.pt"
    assert rc == 2 and err == f"error: [Errno 28] No space left on device: '{target}'\n"
    assert os.listdir(out) == []  # no temporary file left behind


# ----------------------------------------------------------------------------------------------
# 5. damaged snapshots: one line naming the file


def damaged_copy(trajectory, tmp_path, damage):
    """A copy of the trajectory's run whose last 0.05 snapshot is damaged by `damage(path)`."""
    import shutil
    d, _, _, _ = trajectory
    run = tmp_path / "run"
    shutil.copytree(os.path.dirname(d), run)
    victim = run / "ema" / "ema-0.050-0002000.pt"
    damage(victim)
    return run, victim


def truncate_half(path):
    os.truncate(path, os.path.getsize(path) // 2)


def make_empty(path):
    os.truncate(path, 0)


def make_malicious(path):
    class RunsCode:
        def __reduce__(self):
            return (os.system, ("echo this must never run",))
    torch.save({"std": 0.05, "step": 2000, "state": RunsCode()}, path)


@pytest.mark.parametrize("damage, needle", [(truncate_half, "is damaged"), (make_empty, "is damaged (empty"),
                                            (make_malicious, "is not a trusted EMA snapshot")])
def test_cli_names_a_damaged_snapshot_in_one_line(trajectory, tmp_path, capsys, damage, needle):
    run, victim = damaged_copy(trajectory, tmp_path, damage)
    # before: RuntimeError / EOFError / UnpicklingError ("retry with weights_only=False") tracebacks
    rc, out, err = run_main(["--result-dir", str(run), "--ema-std", "0.05", "--out", str(tmp_path / "ph")], capsys)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert needle in err and str(victim) in err and "weights_only" not in err
    assert not os.path.exists(tmp_path / "ph")
