"""Tests for train.py: DDP on CPU (gloo), run folders, kill -9 / SIGTERM and exact resume, bad input,
the lr schedule and the step-addressed batch sampler.

Everything trains DiT-XS/8 on the built-in digits (1x16x16, 10 classes: 4 tokens, ~15 steps/s on one
CPU core at batch 8) for a handful of steps.  Real processes are started with subprocess (and killed
with real signals); the cheap error paths call `train.main` in this process.
"""
import dataclasses
import json
import shutil
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import types

import pytest
import torch

import logs
import runs
import train
from helpers import only_run
import training
from models import build_model
from config import TrainConfig
from mp_layers import MPConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODEL = "DiT-XS/8"
# A tiny, fast run: no EMA snapshot / magnitude record except where a test asks for one.
FAST = ["--model", MODEL, "--batch-size", "8", "--num-workers", "0", "--lr", "1e-3", "--log-every", "1",
        "--ema-snapshot-every", "1000", "--magnitude-every", "1000"]
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# ----------------------------------------------------------------------------------------------------
# helpers


def options(*argv):
    """The TrainConfig of a train.py command line."""
    return TrainConfig.from_args(train.build_parser().parse_args(argv))


def run_train(args, timeout=240, **kw):
    """`python train.py ARGS` in a real process; returns the CompletedProcess (text)."""
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True,
                          text=True, timeout=timeout, **kw)


def torchrun(script, args, timeout=240):
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), script, *args]
    return subprocess.run(cmd, cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=timeout)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkpoint_steps(run_dir):
    return [s for s, _ in runs.list_checkpoints(run_dir)]


def load_ckpt(run_dir, step=None):
    ckpts = dict(runs.list_checkpoints(run_dir))
    step = max(ckpts) if step is None else step
    return torch.load(ckpts[step], map_location="cpu", weights_only=True)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def assert_states_close(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=0, atol=atol, msg=lambda m: f"{k}: {m}")


def assert_emas_close(a, b, atol=1e-6):
    assert sorted(map(float, a)) == sorted(map(float, b))
    bb = {float(k): v for k, v in b.items()}
    for std, state in a.items():
        assert_states_close(state, bb[float(std)], atol)


def all_finite(state):
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def tree_listing(root):
    """{relative path: (size, mtime_ns)} of everything under root (folders too)."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(d, name)
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (st.st_size if name in files else None, st.st_mtime_ns)
    return out


def wait_for(predicate, proc, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def make_latents(folder, n=24, c=4, size=8, num_classes=3, seed=0):
    """A latent folder in the reference format (four files)."""
    g = torch.Generator().manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    means = torch.randn(n, c, size, size, generator=g)
    stds = torch.rand(n, c, size, size, generator=g) * 0.5 + 0.1
    torch.save(means, os.path.join(folder, "posterior_means.pt"))
    torch.save(stds, os.path.join(folder, "posterior_stds.pt"))
    torch.save(torch.arange(n) % num_classes, os.path.join(folder, "labels.pt"))
    torch.save({"mean": means.mean((0, 2, 3)), "std": means.std((0, 2, 3)) + 0.3}, os.path.join(folder, "stats.pt"))
    return str(folder)



def main_in_process(argv, capsys):
    """train.main(argv) here; returns (exit code, stderr lines)."""
    capsys.readouterr()
    code = train.main(argv)
    err = capsys.readouterr().err
    return code, [ln for ln in err.splitlines() if ln.strip()]


# ----------------------------------------------------------------------------------------------------
# 1. two processes (torchrun, gloo): identical weights on both ranks, complete run folder

# Runs train.train(argv) in this rank and saves what this rank holds at the end: the raw model and its
# PowerEMA (captured when train() builds the EMA from the raw, un-wrapped model).
RANK_DUMP_WRAPPER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    import torch, torch.distributed as dist
    import train, training

    held = {{}}

    class CapturingEMA(training.PowerEMA):
        def __init__(self, model, *args, **kwargs):
            super().__init__(model, *args, **kwargs)
            held["model"], held["ema"] = model, self

    training.PowerEMA = CapturingEMA
    try:
        run_dir = train.train(sys.argv[1:])
        rank = int(os.environ["RANK"])
        torch.save({{"model": held["model"].state_dict(), "ema": held["ema"].state_dict(), "run_dir": run_dir,
                    "world_size": dist.get_world_size()}}, os.path.join({out!r}, f"rank{{rank}}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
""")


def test_ddp_two_processes_identical_weights_and_complete_run_folder(tmp_path):
    wrapper = tmp_path / "dump_ranks.py"
    wrapper.write_text(RANK_DUMP_WRAPPER.format(root=ROOT, out=str(tmp_path)))
    results = tmp_path / "results"
    steps = 6
    args = [*FAST, "--num-workers", "1", "--num-steps", str(steps), "--ckpt-every", "3", "--log-every", "2",
            "--ema-snapshot-every", "3", "--results-dir", str(results)]
    p = torchrun(str(wrapper), args)
    assert p.returncode == 0, p.stdout + p.stderr

    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["world_size"] == r1["world_size"] == 2
    run_dir = only_run(results)
    assert r0["run_dir"] == r1["run_dir"] == str(run_dir)

    # Both ranks hold exactly the same weights and EMAs, and the checkpoint holds them too.
    ckpt = load_ckpt(run_dir)
    assert ckpt["step"] == steps
    for r in (r0, r1):
        assert_states_close(r["model"], ckpt["model"], atol=0)
        assert_emas_close(r["ema"], ckpt["ema"], atol=0)
    # ... and training really moved them (the first checkpoint differs from the last).
    first = load_ckpt(run_dir, 3)
    assert any(not torch.equal(first["model"][k], ckpt["model"][k]) for k in ckpt["model"])

    # The run folder is complete.
    config = json.load(open(os.path.join(run_dir, "config.json")))
    assert config["model"] == MODEL and config["world_size"] == 2 and config["args"]["batch_size"] == 8
    assert config["num_classes"] == 10 and config["in_channels"] == 1 and config["input_size"] == 16
    log = open(os.path.join(run_dir, "log.txt")).read()
    assert "2 process(es)" in log and f"step       {steps}/{steps}" in log
    metrics = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    assert [m["step"] for m in metrics] == [2, 4, 6]
    magnitudes = read_jsonl(os.path.join(run_dir, "magnitudes.jsonl"))
    assert magnitudes[-1]["step"] == steps and len(magnitudes[-1]["act_rms"]) == 6  # one per block
    for m in metrics:
        assert {"step", "loss", "lr", "img_per_s"} <= m.keys()
        assert m["loss"] > 0 and m["img_per_s"] > 0 and m["lr"] > 0
    assert checkpoint_steps(run_dir) == [3, 6]
    assert set(ckpt) >= {"model", "ema", "opt", "lr_scheduler", "step", "rng", "args"}
    assert sorted(map(float, ckpt["ema"])) == [0.05, 0.10]
    assert ckpt["args"]["model"] == MODEL
    snaps = sorted(os.listdir(os.path.join(run_dir, "ema")))
    assert snaps == ["ema-0.050-0000003.pt", "ema-0.050-0000006.pt", "ema-0.100-0000003.pt", "ema-0.100-0000006.pt"]
    snap = torch.load(os.path.join(run_dir, "ema", "ema-0.100-0000006.pt"), weights_only=True)
    assert snap["std"] == pytest.approx(0.10) and snap["step"] == steps
    assert_states_close(snap["state"], ckpt["ema"][0.1], atol=1e-2)  # fp16 copy of the tracked EMA
    assert os.path.getsize(os.path.join(run_dir, "loss.png")) > 0
    assert not [f for f in os.listdir(os.path.join(run_dir, "checkpoints")) if not runs.CHECKPOINT_RE.match(f)]


def test_two_nodes_on_one_machine_train_identical_weights_into_one_run_folder(tmp_path):
    # The README's two-node command with one process per node: two torchrun agents meet at a c10d
    # rendezvous on localhost and give their processes global ranks 0 and 1, each with LOCAL_RANK 0.
    wrapper = tmp_path / "dump_ranks.py"
    wrapper.write_text(RANK_DUMP_WRAPPER.format(root=ROOT, out=str(tmp_path)))
    results = tmp_path / "results"
    args = [*FAST, "--num-steps", "4", "--ckpt-every", "2", "--log-every", "2", "--ema-snapshot-every", "2",
            "--results-dir", str(results)]
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}", "--rdzv-id=two-nodes",
                               str(wrapper), *args], cwd=ROOT, env=SUBPROCESS_ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(outputs)

    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["world_size"] == r1["world_size"] == 2
    run_dir = only_run(results)  # one run folder, written by global rank 0 alone
    assert r0["run_dir"] == r1["run_dir"] == str(run_dir)
    ckpt = load_ckpt(run_dir)
    for r in (r0, r1):
        assert_states_close(r["model"], ckpt["model"], atol=0)
        assert_emas_close(r["ema"], ckpt["ema"], atol=0)
    assert checkpoint_steps(run_dir) == [2, 4] and ckpt["step"] == 4
    assert json.load(open(os.path.join(run_dir, "config.json")))["world_size"] == 2
    assert [m["step"] for m in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))] == [2, 4]  # one writer
    log = open(os.path.join(run_dir, "log.txt")).read()
    assert log.count("step       4/4") == 1 and "done:" in log
    assert sorted(os.listdir(os.path.join(run_dir, "ema"))) == [
        "ema-0.050-0000002.pt", "ema-0.050-0000004.pt", "ema-0.100-0000002.pt", "ema-0.100-0000004.pt"]


def test_batch_not_divisible_by_processes(tmp_path):
    results = tmp_path / "results"
    p = torchrun("train.py", [*FAST, "--batch-size", "5", "--num-steps", "2", "--results-dir", str(results)])
    assert p.returncode != 0
    assert "error: --batch-size 5 is not divisible by the 2 processes" in p.stderr
    assert not results.exists() or not os.listdir(results)


# ----------------------------------------------------------------------------------------------------
# 2. kill -9 and exact resume


@pytest.mark.parametrize("micro", [[], ["--batch-gpu", "2"]], ids=["whole-batch", "micro-batches"])
def test_kill9_and_resume_equals_uninterrupted_run(tmp_path, micro):
    steps, every = 12, 4
    common = [*FAST, *micro, "--num-steps", str(steps), "--ckpt-every", str(every), "--ema-snapshot-every", "4"]

    res_a = tmp_path / "a"
    p = run_train([*common, "--results-dir", str(res_a)])
    assert p.returncode == 0, p.stderr
    run_a = only_run(res_a)

    # Run B: the same command, killed with SIGKILL right after its first checkpoint appears.
    res_b = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "train.py", *common, "--results-dir", str(res_b)], cwd=ROOT,
                            env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = lambda: os.path.isdir(res_b) and any(  # noqa: E731
        os.path.isfile(os.path.join(res_b, r, "checkpoints", f"{every:07d}.pt")) for r in os.listdir(res_b))
    try:
        wait_for(first, proc, 120, "the first checkpoint")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    run_b = only_run(res_b)
    killed_at = checkpoint_steps(run_b)
    assert killed_at and max(killed_at) < steps, f"run B was not interrupted ({killed_at})"

    # A kill during a checkpoint write leaves a temporary file: it must not disturb resuming.
    for junk in ("0000999.pt.tmp-123", ".0000999.pt.abc123.tmp", ".0000999.pt.abc123.tmp.pt"):
        with open(os.path.join(run_b, "checkpoints", junk), "wb") as f:
            f.write(b"partial")

    p = run_train(["--resume", run_b])
    assert p.returncode == 0, p.stderr
    assert f"from step {max(killed_at)}" in p.stdout
    # The temporaries of the killed writes are gone (a file of another name is not train.py's to remove).
    assert "removed 2 temporary file(s)" in p.stdout
    assert [f for f in os.listdir(os.path.join(run_b, "checkpoints")) if not runs.CHECKPOINT_RE.match(f)] == \
        ["0000999.pt.tmp-123"]

    a, b = load_ckpt(run_a), load_ckpt(run_b)
    assert a["step"] == b["step"] == steps
    assert_states_close(b["model"], a["model"])
    assert_emas_close(b["ema"], a["ema"])
    snaps = sorted(os.listdir(os.path.join(run_a, "ema")))
    assert snaps == sorted(os.listdir(os.path.join(run_b, "ema"))) and len(snaps) == 2 * steps // every
    for name in snaps:
        sa, sb = (torch.load(os.path.join(r, "ema", name), weights_only=True) for r in (run_a, run_b))
        assert_states_close(sb["state"], sa["state"], atol=1e-3)  # fp16 copies
    # Same losses at every step, each step recorded once (records written after the kill were dropped).
    ma, mb = read_jsonl(os.path.join(run_a, "metrics.jsonl")), read_jsonl(os.path.join(run_b, "metrics.jsonl"))
    assert [m["step"] for m in mb] == list(range(1, steps + 1))
    assert [m["loss"] for m in mb] == pytest.approx([m["loss"] for m in ma], rel=1e-5)
    assert [m["lr"] for m in mb] == pytest.approx([m["lr"] for m in ma])
    # The logged lr is the one each step used: defaults W = 12//150 = 0 and D = 12//10 = 1.
    assert [m["lr"] for m in ma] == pytest.approx([1e-3 * design_lr(s - 1, 0, 1) for s in range(1, steps + 1)])

    # A resume with a larger --num-steps continues the same run.
    p = run_train(["--resume", run_b, "--num-steps", str(steps + 3)])
    assert p.returncode == 0, p.stderr
    c = load_ckpt(run_b)
    assert c["step"] == steps + 3 and checkpoint_steps(run_b)[-1] == steps + 3
    assert any(not torch.equal(c["model"][k], b["model"][k]) for k in c["model"])
    assert [m["step"] for m in read_jsonl(os.path.join(run_b, "metrics.jsonl"))] == list(range(1, steps + 4))
    assert json.load(open(os.path.join(run_b, "config.json")))["args"]["num_steps"] == steps  # config unchanged


# ----------------------------------------------------------------------------------------------------
# 3. SIGTERM / SIGINT: checkpoint, clean exit, resume


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_checkpoint_and_resume_continues(tmp_path, sig):
    results = tmp_path / "results"
    proc = subprocess.Popen([sys.executable, "train.py", *FAST, "--num-steps", "100000", "--ckpt-every", "100000",
                             "--results-dir", str(results)], cwd=ROOT, env=SUBPROCESS_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = lambda: [os.path.join(results, r, "metrics.jsonl") for r in (os.listdir(results)  # noqa: E731
                                                                          if results.exists() else [])]
    started = lambda: any(os.path.isfile(m) and len(read_jsonl(m)) >= 2 for m in metrics())  # noqa: E731
    try:
        wait_for(started, proc, 120, "two logged steps")
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, err  # not 0: a scheduler tells an interrupted run from a finished one
    run_dir = only_run(results)
    [stopped] = checkpoint_steps(run_dir)
    assert 2 <= stopped < 100000
    assert f"interrupted by {signal.Signals(sig).name} at step {stopped}; the checkpoint is saved" in out
    assert "done:" not in out
    assert load_ckpt(run_dir)["step"] == stopped
    # Warm-up of 100000 // 150 = 666 steps: step s used lr 1e-3 * s / 666.
    lrs = [m["lr"] for m in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))]
    assert lrs == pytest.approx([1e-3 * s / 666 for s in range(1, stopped + 1)])

    if sig == signal.SIGTERM:
        p = run_train(["--resume", run_dir, "--num-steps", str(stopped + 2)])
        assert p.returncode == 0, p.stderr
        assert checkpoint_steps(run_dir) == [stopped, stopped + 2]
        steps = [m["step"] for m in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))]
        assert steps == list(range(1, stopped + 3))


def test_a_signal_at_the_last_step_says_the_run_is_complete_not_to_resume(tmp_path, capsys, monkeypatch):
    step_once = training.training_step

    def signalled_at_step_2(*args, step, **kwargs):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # StopSignal records it; the step goes on
        return step_once(*args, step=step, **kwargs)

    monkeypatch.setattr(training, "training_step", signalled_at_step_2)
    results = tmp_path / "results"
    assert train.main([*FAST, "--num-steps", "2", "--results-dir", str(results)]) == 128 + signal.SIGTERM
    out = capsys.readouterr().out
    assert "interrupted by SIGTERM at step 2; the checkpoint is saved: the run is complete" in out
    assert "--resume" not in out and "done:" not in out
    assert checkpoint_steps(only_run(results)) == [2]


# ----------------------------------------------------------------------------------------------------
# 4. bad input: one "error:" line, non-zero exit, no new run folder, existing runs untouched


@pytest.fixture(scope="module")
def existing(tmp_path_factory):
    """A results folder holding one finished run (3 steps, one checkpoint) and a tiny latent folder."""
    base = tmp_path_factory.mktemp("bad_input")
    results = base / "results"
    assert train.main([*FAST, "--num-steps", "3", "--ckpt-every", "3", "--results-dir", str(results)]) == 0
    return {"results": results, "run": only_run(results), "base": base}


def test_bad_input_subprocess_one_line_exit_code(existing, tmp_path):
    before = tree_listing(existing["results"])
    p = run_train([*FAST, "--num-steps", "2", "--data-path", str(tmp_path / "nope"),
                   "--results-dir", str(existing["results"])])
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data path not found"), p.stderr
    assert tree_listing(existing["results"]) == before


def _bad_data_cases(tmp):
    cases = {"missing data path": (str(tmp / "does-not-exist"), [], "not found")}
    empty = tmp / "empty"
    empty.mkdir()
    cases["empty data folder"] = (str(empty), [], "empty")
    missing = make_latents(tmp / "missing")
    os.remove(os.path.join(missing, "posterior_stds.pt"))
    cases["latent folder missing a file"] = (missing, [], "posterior_stds.pt")
    short = make_latents(tmp / "short")
    torch.save(torch.zeros(23, dtype=torch.long), os.path.join(short, "labels.pt"))
    cases["mismatched lengths"] = (short, [], "mismatched lengths")
    labels = make_latents(tmp / "labels", num_classes=3)
    cases["labels >= --num-classes"] = (labels, ["--num-classes", "2"], "label 2 >= num_classes=2")
    return cases


@pytest.mark.parametrize("case", ["missing data path", "empty data folder", "latent folder missing a file",
                                  "mismatched lengths", "labels >= --num-classes"])
def test_bad_data(existing, tmp_path, capsys, case):
    data_path, extra, message = _bad_data_cases(tmp_path)[case]
    before = tree_listing(existing["results"])
    code, err = main_in_process([*FAST, "--num-steps", "2", "--data-path", data_path, *extra,
                                 "--results-dir", str(existing["results"])], capsys)
    assert code != 0
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert tree_listing(existing["results"]) == before


def test_latent_folder_trains_and_workers_do_not_change_results(tmp_path):
    """The same latent run (fresh posterior samples per item) with 0 and 1 loader workers."""
    latents = make_latents(tmp_path / "latents")
    finals = []
    for workers in ("0", "1"):
        results = tmp_path / f"w{workers}"
        assert train.main([*FAST, "--data-path", latents, "--num-steps", "3", "--ckpt-every", "3",
                           "--num-workers", workers, "--results-dir", str(results)]) == 0
        finals.append(load_ckpt(only_run(results)))
    assert_states_close(finals[0]["model"], finals[1]["model"])
    config = json.load(open(os.path.join(only_run(tmp_path / "w0"), "config.json")))
    assert config["in_channels"] == 4 and config["input_size"] == 8 and config["num_classes"] == 3


def test_resume_without_checkpoint(existing, capsys):
    results = existing["results"]
    no_ckpt = os.path.join(results, "099-no-checkpoint")
    os.makedirs(no_ckpt)
    with open(os.path.join(existing["run"], "config.json")) as f, open(os.path.join(no_ckpt, "config.json"), "w") as g:
        g.write(f.read())
    try:
        before = tree_listing(results)
        code, err = main_in_process(["--resume", no_ckpt], capsys)
        assert code != 0 and len(err) == 1 and err[0].startswith("error:") and "no checkpoint" in err[0], err
        code, err = main_in_process(["--resume", os.path.join(results, "does-not-exist")], capsys)
        assert code != 0 and len(err) == 1 and err[0].startswith("error:"), err
        assert tree_listing(results) == before
    finally:
        shutil.rmtree(no_ckpt)


@pytest.mark.parametrize("flag", [["--model", "DiT-S/8"], ["--batch-size", "16"], ["--use-all-mp"]])
def test_resume_with_different_run_options(existing, capsys, flag):
    before = tree_listing(existing["results"])
    code, err = main_in_process(["--resume", existing["run"], *flag], capsys)
    assert code != 0 and len(err) == 1 and err[0].startswith("error:"), err
    assert (flag[0] if flag[0] != "--use-all-mp" else "MP switches") in err[0]
    assert tree_listing(existing["results"]) == before


def test_compile_mode_without_compile(existing, capsys):
    before = tree_listing(existing["results"])
    code, err = main_in_process([*FAST, "--num-steps", "2", "--compile-mode", "reduce-overhead",
                                 "--results-dir", str(existing["results"])], capsys)
    assert code != 0 and len(err) == 1 and "--compile-mode reduce-overhead needs --compile" in err[0], err
    assert tree_listing(existing["results"]) == before


def test_resuming_a_run_that_reached_its_steps_says_there_is_nothing_to_train(existing, tmp_path, capsys):
    run = shutil.copytree(existing["run"], tmp_path / "run")
    assert train.main(["--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"the run is already at step 3 of --num-steps 3: nothing to train; to go on, give the new end: " \
           f"--resume {run} --num-steps 6" in out
    assert [ln for ln in out.splitlines() if " step " in ln and "/3 " in ln] == []  # no step was taken


def test_resume_a_run_made_before_an_option_existed(existing, tmp_path):
    """A run folder whose config.json predates --compile-mode resumes with that option's default."""
    old = tmp_path / "old-run"
    shutil.copytree(existing["run"], old)
    config = json.load(open(old / "config.json"))
    del config["args"]["compile_mode"]
    (old / "config.json").write_text(json.dumps(config))
    args, _ = train.resolve_args(["--resume", str(old)])
    assert args.compile_mode is None and not args.compile
    args, _ = train.resolve_args(["--resume", str(old), "--compile", "--compile-mode", "reduce-overhead"])
    assert args.compile and args.compile_mode == "reduce-overhead"


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    results = tmp_path / "results"
    # No MP switches and lr 1e30: step 1 is fine, its update makes the weights ~1e30 and step 2's loss inf/NaN.
    code, err = main_in_process([*FAST, "--lr", "1e30", "--num-steps", "4", "--ckpt-every", "1",
                                 "--results-dir", str(results)], capsys)
    assert code != 0 and len(err) == 1 and err[0].startswith("error: non-finite"), err
    run_dir = only_run(results)
    assert checkpoint_steps(run_dir) == [1]
    ckpt = load_ckpt(run_dir)
    assert all_finite(ckpt["model"]) and all(all_finite(s) for s in ckpt["ema"].values())
    assert max(v.abs().max().item() for v in ckpt["model"].values()) > 1e25  # the step really blew up
    assert [m["step"] for m in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))] == [1]


def test_non_finite_weights_after_a_finite_loss_are_never_saved(tmp_path, capsys, monkeypatch):
    """An update can make the weights non-finite while the loss it came from was finite (e.g. overflowing
    gradients): the checkpoint and EMA snapshots of that step must not be written."""
    original = torch.optim.Adam.step
    calls = {"n": 0}

    def step_then_poison(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", step_then_poison)
    results = tmp_path / "results"
    code, err = main_in_process([*FAST, "--num-steps", "4", "--ckpt-every", "1", "--ema-snapshot-every", "1",
                                 "--results-dir", str(results)], capsys)
    assert code != 0 and len(err) == 1 and err[0].startswith("error: non-finite"), err
    run_dir = only_run(results)
    assert checkpoint_steps(run_dir) == [1]
    assert sorted(os.listdir(os.path.join(run_dir, "ema"))) == ["ema-0.050-0000001.pt", "ema-0.100-0000001.pt"]


def test_full_disk_is_one_line_error_and_the_run_resumes(tmp_path, capsys, monkeypatch):
    """A full disk while writing the EMA snapshots of step 4: one error line, the checkpoint of step 2 and no
    temporary file left; once there is space again, --resume finishes the run (a metrics line cut short by
    the interruption is dropped)."""
    import errno
    original, calls = torch.save, {"n": 0}

    def save_until_the_disk_fills(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 2:  # call 1: the checkpoint of step 2; call 2: the first snapshot of step 4
            f.write(b"PK\x03\x04 half a file")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    results = tmp_path / "results"
    code, err = main_in_process([*FAST, "--num-steps", "4", "--ckpt-every", "2", "--results-dir", str(results)],
                                capsys)
    run_dir = only_run(results)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: disk full at step 4 writing ema/ema-0.050-0000004.pt (No space left on device)") and f"--resume {run_dir}" in err[0]
    assert checkpoint_steps(run_dir) == [2] and all_finite(load_ckpt(run_dir)["model"])
    assert not [f for f in tree_listing(run_dir) if ".tmp" in f]
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 5, "lo')  # an append the full disk cut short

    monkeypatch.setattr(torch, "save", original)
    assert main_in_process(["--resume", run_dir], capsys)[0] == 0
    assert checkpoint_steps(run_dir) == [2, 4]
    assert sorted(os.listdir(os.path.join(run_dir, "ema"))) == ["ema-0.050-0000004.pt", "ema-0.100-0000004.pt"]
    assert [m["step"] for m in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))] == [1, 2, 3, 4]


def test_keep_checkpoints_keeps_the_newest_and_a_short_disk_warns(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runs.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 10**6, 10**6))
    results = tmp_path / "results"
    capsys.readouterr()
    assert train.main([*FAST, "--num-steps", "5", "--ckpt-every", "1", "--keep-checkpoints", "2",
                       "--results-dir", str(results)]) == 0
    assert checkpoint_steps(only_run(results)) == [4, 5]
    out = capsys.readouterr().out
    assert "disk: about 0.5 GB to write (2 EMA snapshots (0.03 GB) and 3 checkpoint(s) (0.44 GB)); 0.0 GB free" in out
    assert "warning: the run needs more than the 0.0 GB free" in out
    code, err = main_in_process([*FAST, "--keep-checkpoints", "-1", "--results-dir", str(results)], capsys)
    assert code == 2 and err == ["error: --keep-checkpoints must be >= 0 (0 keeps all), got -1"]


def test_unusable_results_folder_is_one_error_line(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    code, err = main_in_process([*FAST, "--num-steps", "1", "--results-dir", str(tmp_path / "a-file" / "results")],
                                capsys)
    assert code == 2 and err == [f"error: [Errno 20] Not a directory: '{tmp_path / 'a-file' / 'results'}'"]


def test_resume_can_set_an_option_back_to_its_default(tmp_path):
    """--keep-checkpoints 0 on resume turns pruning off for a run made with --keep-checkpoints 2 (an option
    given with its default value is still given), and a run-defining option given with its default
    value is a conflict when the run used another."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "0000002.pt").write_bytes(b"")
    cfg = options(*FAST, "--keep-checkpoints", "2", "--lr", "1e-2")
    (run / "config.json").write_text(json.dumps({"args": cfg.to_dict(), "model": MODEL, "mp": MPConfig().to_dict(),
                                                 "data": {}, "num_classes": 10, "in_channels": 1, "input_size": 16}))
    assert train.resolve_args(["--resume", str(run)])[0].keep_checkpoints == 2
    assert train.resolve_args(["--resume", str(run), "--keep-checkpoints", "0"])[0].keep_checkpoints == 0
    with pytest.raises(training.TrainingError, match="--lr differ"):
        train.resolve_args(["--resume", str(run), "--lr", "1e-4"])


# The config.json that train.py at a9696b4 (before TrainConfig) wrote for
#   train.py [FAST] --num-steps 6 --ckpt-every 3 --use-all-mp
# Its "args" are that parser's namespace: the switches as given (off) with "use_all_mp": true, and "resume".
OLD_CONFIG = os.path.join(ROOT, "tests", "fixtures", "config_a9696b4.json")
OLD_RUN = [*FAST, "--num-steps", "6", "--ckpt-every", "3", "--use-all-mp"]


def test_a_run_folder_of_the_config_json_before_train_config_resumes_exactly(tmp_path):
    old = json.load(open(OLD_CONFIG))
    assert old["args"]["use_all_mp"] and not old["args"]["use_mp_silu"] and "resume" in old["args"]  # (that format)
    assert train.main([*OLD_RUN, "--results-dir", str(tmp_path / "a")]) == 0
    assert train.main([*OLD_RUN, "--results-dir", str(tmp_path / "b")]) == 0
    run_a, run_b = only_run(tmp_path / "a"), only_run(tmp_path / "b")
    # Run B as a kill after its first checkpoint leaves it, with the old code's config.json.
    os.remove(os.path.join(run_b, "checkpoints", "0000006.pt"))
    shutil.copy(OLD_CONFIG, os.path.join(run_b, "config.json"))
    assert train.main(["--resume", run_b]) == 0
    a, b = load_ckpt(run_a), load_ckpt(run_b)
    assert a["step"] == b["step"] == 6
    assert_states_close(b["model"], a["model"], atol=0)
    assert_emas_close(b["ema"], a["ema"], atol=0)
    assert [m["loss"] for m in read_jsonl(os.path.join(run_b, "metrics.jsonl"))] == \
        [m["loss"] for m in read_jsonl(os.path.join(run_a, "metrics.jsonl"))]


def test_a_runs_config_json_as_config_trains_the_same_run(existing, tmp_path):
    config = os.path.join(existing["run"], "config.json")
    assert train.main(["--config", config, "--results-dir", str(tmp_path / "again")]) == 0
    again = only_run(tmp_path / "again")
    assert_states_close(load_ckpt(again)["model"], load_ckpt(existing["run"])["model"], atol=0)
    args = {k: v for k, v in json.load(open(os.path.join(again, "config.json")))["args"].items() if k != "results_dir"}
    assert args == {k: v for k, v in json.load(open(config))["args"].items() if k != "results_dir"}


def test_a_flag_overrides_the_config_file(existing, tmp_path):
    config = os.path.join(existing["run"], "config.json")
    assert train.main(["--config", config, "--num-steps", "2", "--ckpt-every", "2",
                       "--results-dir", str(tmp_path / "shorter")]) == 0
    run = only_run(tmp_path / "shorter")
    assert checkpoint_steps(run) == [2]
    args = json.load(open(os.path.join(run, "config.json")))["args"]
    assert (args["num_steps"], args["model"], args["lr"]) == (2, MODEL, 1e-3)  # the rest from the file


def test_the_options_are_checked_together_once_the_flags_are_applied_to_the_file(tmp_path):
    (tmp_path / "c.json").write_text('{"compile_mode": "reduce-overhead"}')  # alone: needs --compile
    cfg, _ = train.resolve_args(["--config", str(tmp_path / "c.json"), "--compile"])
    assert cfg.compile and cfg.compile_mode == "reduce-overhead"
    with pytest.raises(ValueError, match="--compile-mode reduce-overhead needs --compile"):
        train.resolve_args(["--config", str(tmp_path / "c.json")])


def test_a_yaml_config_file_is_read_as_yaml(tmp_path):
    (tmp_path / "c.yaml").write_text("# a short run\nnum_steps: 7\nema_stds: [0.05]\nuse_all_mp: true\n")
    cfg, _ = train.resolve_args(["--config", str(tmp_path / "c.yaml")])
    assert (cfg.num_steps, cfg.ema_stds, cfg.mp) == (7, (0.05,), MPConfig.all_on())


@pytest.mark.parametrize("content, message", [
    (None, "cannot read it"),
    ("{num_steps: 3}", "is not valid JSON"),
    ('["--num-steps", "3"]', "holds a list"),
    ('{"num_step": 3}', "'num_step' is no option of train.py"),
    ('{"num_steps": "3"}', "option num_steps is \"3\", where an integer belongs"),
    ('{"ema_stds": 0.05}', "option ema_stds is 0.05, where a list of numbers belongs"),
    ('{"precision": "fp8"}', "option precision is \"fp8\", where one of fp32, tf32, bf16 belongs"),
    ('{"use_all_mp": "yes"}', "option use_all_mp is \"yes\", where true or false belongs"),
], ids=["missing", "not-json", "not-a-dict", "unknown-option", "int-as-string", "number-for-list", "bad-choice",
        "switch-as-string"])
def test_a_bad_config_file_is_one_error_line_before_any_work(tmp_path, capsys, content, message):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    code, err = main_in_process(["--config", str(path), "--results-dir", str(tmp_path / "results")], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: --config {path}") and message in err[0], err
    assert not (tmp_path / "results").exists()


def test_an_option_a_later_train_py_dropped_is_ignored_on_resume_and_said(existing, tmp_path):
    run = shutil.copytree(existing["run"], tmp_path / "run")
    config = json.load(open(run / "config.json"))
    config["args"]["old_option"] = 3
    (run / "config.json").write_text(json.dumps(config))
    cfg, resume = train.resolve_args(["--resume", str(run)])
    assert cfg.num_steps == 3 and resume.notes == ["config.json's option old_option is no option of this train.py: "
                                                   "ignored"]


def test_the_config_round_trips_through_its_dict():
    cfg = options(*FAST, "--use-all-mp", "--modulation", "gate+scale", "--ema-stds", "0.05", "0.1", "0.2",
                  "--eval-every", "5", "--eval-ref-images", "all")
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_append_after_a_line_cut_short_loses_only_that_line(tmp_path):
    path = tmp_path / "fid.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "fi')
    logs.append_jsonl(str(path), {"step": 3})
    assert logs.read_jsonl(str(path)) == [{"step": 1}, {"step": 3}]
    logs.append_jsonl(str(tmp_path / "new.jsonl"), {"step": 1})
    assert (tmp_path / "new.jsonl").read_text() == '{"step": 1}\n'


@pytest.mark.parametrize("start, snapshots, checkpoints", [(0, 500, 3), (600, 200, 2), (950, 26, 1), (1000, 0, 0)])
def test_disk_plan_counts_the_files_still_to_write(start, snapshots, checkpoints):
    """1000 steps, snapshots of two profiles every 4 steps and at the end; checkpoints at 300, 600, 900 and
    1000, of which 2 are kept (3 at the peak: the newest is written before the oldest goes). Snapshots are
    fp16, checkpoints fp32 weights + 2 Adam moments + 2 EMAs."""
    cfg = options("--num-steps", "1000", "--ema-snapshot-every", "4", "--ckpt-every", "300", "--keep-checkpoints", "2")
    need, account = runs.disk_plan(cfg, n_params=1000, start_step=start)
    assert need == snapshots * 1000 * 2 + checkpoints * 1000 * 4 * 5
    assert account.startswith(f"{snapshots} EMA snapshots") and f"and {checkpoints} checkpoint(s)" in account


def test_seed_fixes_the_initial_weights(tmp_path, monkeypatch):
    """The initial weights depend on --seed only (else two identical commands train different models)."""
    class Built(Exception):
        pass

    class CapturingEMA(training.PowerEMA):  # train() builds the EMA right after the model: stop there
        def __init__(self, model, *args, **kwargs):
            raise Built({k: v.clone() for k, v in model.state_dict().items()})

    monkeypatch.setattr(training, "PowerEMA", CapturingEMA)
    states = {}
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        torch.manual_seed(int(name.encode()[0]))  # whatever the global RNG held before
        with pytest.raises(Built) as e:
            train.train([*FAST, "--seed", seed, "--num-steps", "2", "--results-dir", str(tmp_path)])
        states[name] = e.value.args[0]
    assert_states_close(states["a"], states["b"], atol=0)
    assert not torch.equal(states["a"]["x_embedder.weight"], states["c"]["x_embedder.weight"])
    assert not os.listdir(tmp_path)


# ----------------------------------------------------------------------------------------------------
# 5. lr schedule


def design_lr(s, W, D):
    """docs/design.md, "Training": the schedule as a multiple of the base lr."""
    if s + 1 < W:
        return (s + 1) / W
    if D > 0 and s >= D:
        return 1 / (s / D) ** 0.5
    return 1.0


@pytest.mark.parametrize("W,D", [(10, 100), (1, 1), (0, 50), (20, 0), (0, 0), (100, 10)])
def test_lr_factor_matches_design(W, D):
    for s in [0, 1, 4, 8, 9, 10, 11, 49, 50, 51, 99, 100, 101, 400, 10_000]:
        assert training.lr_factor(s, W, D) == pytest.approx(design_lr(s, W, D), rel=1e-12), s
    assert training.lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert training.lr_factor(400, 10, 100) == pytest.approx(0.5)


@pytest.mark.parametrize("steps, every, snapshots", [(5, 1, 5), (40, 4, 10), (2000, 200, 10), (20_000, 1000, 20),
                                                     (100_000, 1000, 100), (400_000, 1600, 250)])
def test_default_snapshot_spacing_is_one_per_thousand_steps_between_10_and_250_a_run(steps, every, snapshots):
    assert options("--num-steps", str(steps)).ema_snapshot_every == every
    assert runs.saves_between(0, steps, every) == snapshots


def test_the_readme_example_plans_under_a_gigabyte():
    """python train.py --model DiT-XS/2 --use-all-mp --num-steps 20000: 7.8 GB with the old steps//250."""
    cfg = options("--use-all-mp", "--num-steps", "20000")
    n_params = sum(p.numel() for p in build_model("DiT-XS/2", in_channels=1, input_size=16, num_classes=10,
                                                  mp=MPConfig.all_on()).parameters())
    need, account = runs.disk_plan(cfg, n_params, 0)
    assert need < 1e9 and account.startswith("40 EMA snapshots")


def test_loader_processes_default_to_none_for_a_set_in_memory(tmp_path, monkeypatch):
    import data
    digits = data.load_dataset("digits")
    assert digits.in_memory and train.default_num_workers(digits) == 0
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert train.default_num_workers(types.SimpleNamespace(in_memory=False)) == 2
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert train.default_num_workers(types.SimpleNamespace(in_memory=False)) == 4
    results = tmp_path / "results"
    assert train.main([a for a in FAST if a not in ("--num-workers", "0")] + [
        "--num-steps", "1", "--results-dir", str(results)]) == 0
    assert json.load(open(os.path.join(only_run(results), "config.json")))["args"]["num_workers"] == 0


def test_lr_defaults_and_logged_schedule(tmp_path):
    cfg = options("--num-steps", "1500")
    assert (cfg.num_lin_warmup, cfg.start_decay) == (10, 150)
    # W = 0 and D = 0 train without error; the logged lr then stays the base lr.
    results = tmp_path / "results"
    assert train.main([*FAST, "--num-steps", "3", "--ckpt-every", "3", "--num-lin-warmup", "0", "--start-decay", "0",
                       "--results-dir", str(results)]) == 0
    assert [m["lr"] for m in read_jsonl(os.path.join(only_run(results), "metrics.jsonl"))] == [1e-3] * 3


# ----------------------------------------------------------------------------------------------------
# 6. StepBatchSampler


@pytest.mark.parametrize("n,batch", [(23, 8), (16, 4), (5, 8)])
def test_step_sampler_batch_of_a_step_does_not_depend_on_where_it_started(n, batch):
    full = training.StepBatchSampler(n, batch, rank=0, world_size=1, seed=3, start_step=0)
    it = iter(full)
    from_zero = [next(it) for _ in range(12)]
    for s in (0, 1, 5, 11):
        assert next(iter(training.StepBatchSampler(n, batch, 0, 1, seed=3, start_step=s))) == from_zero[s]
    # Each epoch is a permutation of the items.
    stream = [i for b in from_zero for i, _ in b]
    for e in range(len(stream) // n):
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))
    # Different seeds give different orders; per-item seeds differ between items.
    other = next(iter(training.StepBatchSampler(n, batch, 0, 1, seed=4, start_step=0)))
    assert other != from_zero[0]
    assert len({seed for b in from_zero for _, seed in b}) == len(stream)


@pytest.mark.parametrize("world_size", [2, 4])
def test_step_sampler_ranks_get_disjoint_slices_of_the_global_batch(world_size):
    n, batch = 37, 8
    for start in (0, 3, 9):
        global_batches = iter(training.StepBatchSampler(n, batch, 0, 1, seed=0, start_step=start))
        ranks = [iter(training.StepBatchSampler(n, batch, r, world_size, seed=0, start_step=start))
                 for r in range(world_size)]
        for _ in range(6):
            g = next(global_batches)
            parts = [next(it) for it in ranks]
            assert all(len(p) == batch // world_size for p in parts)
            assert sum(parts, []) == g  # rank r gets slice r: together exactly the global batch, no overlap


# ----------------------------------------------------------------------------------------------------
# --compile: the compiled step trains on the same batch, timesteps and noise as the eager one.


@pytest.mark.skipif(os.environ.get("MAPDIT_COMPILE_TESTS", "1") == "0", reason="MAPDIT_COMPILE_TESTS=0")
def test_compiled_training_step_matches_eager_at_init(tmp_path):
    """At init the adaLN-Zero model outputs exactly 0 whatever the labels, so the first loss depends only on
    the batch, t and the noise: compiled (with the CUDA-graph mode's per-step mark; on a CPU inductor runs
    without graphs) and eager runs must log the same value. Later steps differ only by the label dropout,
    which the compiled graph draws from its own random stream."""
    losses = {}
    for name, extra in [("eager", []), ("compiled", ["--compile", "--compile-mode", "reduce-overhead"])]:
        results = tmp_path / name
        assert train.main([*FAST, "--use-all-mp", "--lr", "1e-2", "--num-steps", "3", "--ckpt-every", "3",
                           "--results-dir", str(results), *extra]) == 0
        run_dir = only_run(results)
        losses[name] = [m["loss"] for m in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))]
        assert len(losses[name]) == 3 and all(map(torch.isfinite, torch.tensor(losses[name])))
    assert losses["compiled"][0] == pytest.approx(losses["eager"][0], rel=1e-5)
    assert losses["compiled"][1:] == pytest.approx(losses["eager"][1:], rel=0.05)
    config = json.load(open(os.path.join(only_run(tmp_path / "compiled"), "config.json")))
    assert config["args"]["compile"] and config["args"]["compile_mode"] == "reduce-overhead"


# ----------------------------------------------------------------------------------------------------
# Magnitude records: by default about 1 % of the training time.


@pytest.mark.parametrize("record_s, step_s, steps, every", [
    (0.2, 1.0, 80, 20),            # a record costs a fifth of a step: one every 20 steps costs 1 %
    (0.2, 1.0, 400_000, 4000),     # long runs: ~100 records (steps // 100) cost less still
    (0.001, 1.0, 50, 1),           # nearly free records: every step of a short run
    (3.0, 1.0, 1000, 300),
])
def test_default_magnitude_spacing_keeps_records_to_a_percent(record_s, step_s, steps, every):
    assert training.magnitude_spacing(record_s, step_s, steps) == every
    assert record_s / (every * step_s) <= 0.01 or every == steps // 100


def test_default_magnitude_recording_is_timed_spaced_and_logged(tmp_path, capsys, monkeypatch):
    """Without --magnitude-every: the record 10 steps in is timed against the steps before it, the spacing
    follows from the ratio, and the last step is recorded. The measured times are replaced by a record
    worth 0.25 steps (the recorder's clock advances 1 s per step and 0.25 s per record)."""
    clock = {"now": 0.0}
    monkeypatch.setattr(training.MagnitudeRecorder, "_now", lambda self: clock["now"])
    real_step, real_measure = training.training_step, training.measure_magnitudes

    def timed_step(*args, **kwargs):
        clock["now"] += 1.0
        return real_step(*args, **kwargs)

    def timed_measure(*args, **kwargs):
        clock["now"] += 0.25
        return real_measure(*args, **kwargs)

    monkeypatch.setattr(training, "training_step", timed_step)
    monkeypatch.setattr(training, "measure_magnitudes", timed_measure)
    results = tmp_path / "results"
    i = FAST.index("--magnitude-every")
    argv = FAST[:i] + FAST[i + 2:]
    capsys.readouterr()
    assert train.main([*argv, "--num-steps", "30", "--ckpt-every", "30", "--log-every", "30",
                       "--results-dir", str(results)]) == 0
    out = capsys.readouterr().out
    assert "magnitudes: a record takes 250.0 ms, 0.25 training steps; recording every 25 steps (1.00 %" in out
    magnitudes = read_jsonl(os.path.join(only_run(results), "magnitudes.jsonl"))
    assert [m["step"] for m in magnitudes] == [10, 25, 30]
    assert len(magnitudes[-1]["act_rms"]) == len(magnitudes[-1]["weight_rms"]) == 6


# ----------------------------------------------------------------------------------------------------
# --resume with a checkpoint file (DiT style)


def test_resume_from_a_checkpoint_file_continues_from_that_step(tmp_path, capsys):
    """--resume RUN/checkpoints/0000002.pt resumes from step 2, not from the newest checkpoint (6), and
    retraces the run exactly: the checkpoint of step 6 it writes equals the one the run wrote before."""
    results = tmp_path / "results"
    assert train.main([*FAST, "--num-steps", "6", "--ckpt-every", "2", "--results-dir", str(results)]) == 0
    run_dir = only_run(results)
    before = load_ckpt(run_dir, 6)
    capsys.readouterr()
    assert train.main(["--resume", os.path.join(run_dir, "checkpoints", "0000002.pt")]) == 0
    out = capsys.readouterr().out
    assert f"resuming {run_dir} from step 2" in out and "before the newest checkpoint (6)" in out
    assert_states_close(load_ckpt(run_dir, 6)["model"], before["model"])
    assert [m["step"] for m in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))] == [1, 2, 3, 4, 5, 6]


def test_resume_from_a_file_outside_a_run_is_one_error_line(existing, tmp_path, capsys):
    stray = tmp_path / "0000003.pt"
    shutil.copy(runs.list_checkpoints(existing["run"])[-1][1], stray)
    code, err = main_in_process(["--resume", str(stray)], capsys)
    assert code == 2 and err == [f"error: --resume {stray}: a checkpoint to resume from is a run's "
                                 f"checkpoints/NNNNNNN.pt; pass that file, or the run folder"]


# ----------------------------------------------------------------------------------------------------
# Gradient accumulation (--batch-gpu): the same parameters as the whole batch at once


def test_micro_batches_train_the_parameters_of_the_whole_batch(tmp_path):
    finals = {}
    for name, extra in [("whole", []), ("micro", ["--batch-gpu", "2"])]:
        results = tmp_path / name
        assert train.main([*FAST, "--use-all-mp", "--lr", "1e-2", "--precision", "fp32", "--num-steps", "4",
                           "--ckpt-every", "4", "--results-dir", str(results), *extra]) == 0
        finals[name] = load_ckpt(only_run(results))
    assert_states_close(finals["micro"]["model"], finals["whole"]["model"], atol=1e-6)
    assert_states_close(finals["micro"]["opt"]["state"][0], finals["whole"]["opt"]["state"][0], atol=1e-6)
    assert finals["whole"]["opt"]["state"][0]["exp_avg"].abs().max() > 0  # gradients flowed


def test_micro_batches_under_ddp_train_the_parameters_of_the_whole_batch(tmp_path):
    """Two processes (gloo), 4 items each in micro-batches of 2 (the first backward without all-reduce):
    the weights of the whole batch."""
    finals = {}
    for name, extra in [("whole", []), ("micro", ["--batch-gpu", "2"])]:
        results = tmp_path / name
        p = torchrun("train.py", [*FAST, "--use-all-mp", "--lr", "1e-2", "--precision", "fp32", "--num-steps", "3",
                                  "--ckpt-every", "3", "--results-dir", str(results), *extra])
        assert p.returncode == 0, p.stdout + p.stderr
        finals[name] = load_ckpt(only_run(results))["model"]
    assert_states_close(finals["micro"], finals["whole"], atol=1e-6)


def test_batch_gpu_must_divide_the_share_of_each_process(tmp_path, capsys):
    code, err = main_in_process([*FAST, "--batch-gpu", "3", "--results-dir", str(tmp_path)], capsys)
    assert code == 2 and err == ["error: --batch-gpu 3 does not divide the 8 items of each process (--batch-size 8 "
                                 "over 1); pass a divisor of 8"]


# ----------------------------------------------------------------------------------------------------
# Gradient checkpointing (--grad-checkpointing): the same gradients, and it trains with bf16 and compile


@pytest.mark.parametrize("switches", [[], ["--use-all-mp"]], ids=["no-switches", "all-eight"])
def test_gradient_checkpointing_gives_the_gradients_of_the_plain_step(switches):
    import copy
    from diffusion import create_diffusion
    cfg = options(*FAST, *switches)
    torch.manual_seed(0)
    base = build_model(MODEL, in_channels=1, input_size=16, num_classes=10, mp=cfg.mp)
    diffusion = create_diffusion("")
    g = torch.Generator().manual_seed(1)
    x, noise = torch.randn(8, 1, 16, 16, generator=g), torch.randn(8, 1, 16, 16, generator=g)
    y, t = torch.randint(0, 10, (8,), generator=g), torch.randint(0, 1000, (8,), generator=g)
    drop = torch.rand(8, generator=g) < 0.1
    grads = {}
    for name, checkpointing in (("plain", False), ("checkpointed", True)):
        model = copy.deepcopy(base).train()
        step_model = training.wrap_model(model, dataclasses.replace(cfg, grad_checkpointing=checkpointing),
                                         world_size=1, device=torch.device("cpu"))
        loss = diffusion.training_losses(step_model, x, t, model_kwargs={"y": y, "drop": drop}, noise=noise)["loss"]
        loss.mean().backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["plain"].keys() == grads["checkpointed"].keys() and len(grads["plain"]) > 10
    for n, grad in grads["plain"].items():
        torch.testing.assert_close(grads["checkpointed"][n], grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("extra", [["--precision", "bf16"], ["--compile"]], ids=["bf16", "compile"])
def test_gradient_checkpointing_trains_with_bf16_and_compile(tmp_path, extra):
    if "--compile" in extra and os.environ.get("MAPDIT_COMPILE_TESTS", "1") == "0":
        pytest.skip("MAPDIT_COMPILE_TESTS=0")
    results = tmp_path / "results"
    assert train.main([*FAST, "--use-all-mp", "--lr", "1e-2", "--grad-checkpointing", *extra, "--num-steps", "2",
                       "--ckpt-every", "2", "--results-dir", str(results)]) == 0
    losses = [m["loss"] for m in read_jsonl(os.path.join(only_run(results), "metrics.jsonl"))]
    assert len(losses) == 2 and all(0 < v < 10 for v in losses)
