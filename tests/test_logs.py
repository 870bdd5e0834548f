"""The ETA of the training log lines, and the experiment trackers (logs.py): TensorBoard event files
read back with tensorboard's own reader hold the numbers of the jsonl logs, also across a resume; --wandb
without wandb installed is one error line; with a stand-in wandb module it receives the same scalars.

DiT-XS/8 on the built-in digits, 4 steps, trained in this process; the FID of the in-training evaluation
is replaced by a cheap stand-in (its number is tested in test_fid_during_training.py).
"""
import math
import os
import re
import sys
import types

import numpy as np
import pytest

import logs
import train
from logs import read_jsonl
from helpers import only_run

FAST = ["--model", "DiT-XS/8", "--batch-size", "8", "--num-workers", "0", "--lr", "1e-3", "--mp-lr", "1e-2",
        "--use-weight-normalization",  # (both kinds of parameters: weight-normalised layers, a plain label table)
        "--log-every", "1", "--ema-snapshot-every", "2", "--ckpt-every", "2", "--magnitude-every", "2"]
FID = ["--eval-every", "2", "--eval-samples", "4", "--eval-sampling-steps", "2", "--eval-sampler", "ddim"]


def reference_stats(folder):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2048, 64))
    path = os.path.join(folder, "ref.npz")
    np.savez(path, mu=rng.normal(size=2048) * 0.1, sigma=a @ a.T / 64)
    return path


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """A 4-step run with --tensorboard and FID every 2 steps, then resumed from its step-2 checkpoint to
    step 4 again (the events of steps 3 and 4 are written twice; readers must see the second ones)."""
    import eval.during_training as during_training
    tmp = tmp_path_factory.mktemp("tracked")
    results = tmp / "results"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(during_training.TrainingFID, "_fid", lambda self, images: float(images.mean()))
        ref = reference_stats(str(tmp))
        assert train.main([*FAST, *FID, "--eval-ref", ref, "--num-steps", "4", "--results-dir", str(results),
                           "--tensorboard"]) == 0
        run = only_run(results)
        first = read_jsonl(os.path.join(run, "metrics.jsonl"))
        assert train.main(["--resume", os.path.join(run, "checkpoints", "0000002.pt")]) == 0
    return run, first


def scalar_events(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(run, logs.TENSORBOARD_DIR))
    acc.Reload()
    return acc


# ----------------------------------------------------------------------------------------------------
# ETA


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (42.4, "42s"), (723, "12m03s"), (3 * 3600 + 5 * 60 + 9, "3h05m"),
                                           (2 * 86400 + 4 * 3600 + 59, "2d04h")])
def test_durations_read_as_two_units(seconds, text):
    assert logs.format_duration(seconds) == text


def test_eta_is_the_steps_left_over_the_rate_of_the_recent_intervals():
    window = logs.RateWindow(size=3)
    window.add(100, 60.0)  # the first interval after a start (compilation): left out once others exist
    assert window.rate() == pytest.approx(100 / 60)
    for seconds in (10.0, 10.0, 20.0, 20.0):  # only the last three count
        window.add(100, seconds)
    assert window.rate() == pytest.approx(300 / 50)
    assert window.eta(3600) == logs.format_duration(3600 / 6) == "10m00s"
    assert window.eta(0) == "0s"


def test_training_log_lines_carry_an_eta(tracked_run):
    run, _ = tracked_run
    lines = [ln for ln in open(os.path.join(run, "log.txt")) if re.search(r"step +\d+/4 ", ln)]
    assert len(lines) == 4 + 2  # steps 1-4, then 3-4 after the resume
    for line in lines:
        assert re.search(r"\d+\.\d\d steps/s .* eta (\d+s|\d+m\d\ds)$", line.strip()), line
    assert all(line.strip().endswith("eta 0s") for line in lines if "step       4/4" in line)


# ----------------------------------------------------------------------------------------------------
# TensorBoard


def test_tensorboard_scalars_equal_metrics_jsonl_across_a_resume(tracked_run):
    run, first = tracked_run
    metrics = read_jsonl(os.path.join(run, "metrics.jsonl"))
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    # The resumed steps 3 and 4 repeat the first run's losses exactly; their measured rate tells them apart.
    assert metrics[2]["img_per_s"] != first[2]["img_per_s"]
    events = scalar_events(run)
    loss, rate = events.Scalars("train/loss"), events.Scalars("train/img_per_s")
    assert [e.step for e in loss] == [1, 2, 3, 4]  # the first run's steps 3 and 4 purged, not doubled
    assert [e.value for e in loss] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)  # (float32)
    assert [e.value for e in rate] == pytest.approx([m["img_per_s"] for m in metrics], rel=1e-6)  # the second ones


def test_tensorboard_holds_both_learning_rates_the_image_rate_magnitudes_fid_and_samples(tracked_run):
    run, _ = tracked_run
    acc = scalar_events(run)
    metrics = read_jsonl(os.path.join(run, "metrics.jsonl"))
    for key in ("lr", "mp_lr", "img_per_s"):
        assert [e.value for e in acc.Scalars(f"train/{key}")] == pytest.approx([m[key] for m in metrics], rel=1e-6)
    assert acc.Scalars("train/mp_lr")[0].value == pytest.approx(10 * acc.Scalars("train/lr")[0].value)
    magnitudes = read_jsonl(os.path.join(run, "magnitudes.jsonl"))
    assert [m["step"] for m in magnitudes] == [2, 4]
    for block in range(len(magnitudes[0]["act_rms"])):
        events = acc.Scalars(f"magnitudes/act_rms/block{block:02d}")
        assert [e.value for e in events] == pytest.approx([m["act_rms"][block] for m in magnitudes], rel=1e-6)
    fids = read_jsonl(os.path.join(run, "fid_during_training.jsonl"))
    events = acc.Scalars("fid_during_training/fid")
    assert [e.step for e in events] == [f["step"] for f in fids] == [2, 4]
    assert [e.value for e in events] == pytest.approx([f["fid"] for f in fids], rel=1e-6)
    grids = acc.Images("fid_during_training/samples")
    assert [g.step for g in grids] == [2, 4]
    assert (grids[-1].width, grids[-1].height) == (4 * 16, 16)  # four 16x16 digits in a row


def test_an_all_mp_run_shows_its_mp_rate_in_log_lines_tensorboard_config_and_plot_titles(tmp_path, monkeypatch):
    """--use-all-mp: every parameter trains at --mp-lr (1e-2); the plain rate (1e-4) belongs to no parameter
    and is shown nowhere, so no reader takes it for the model's rate."""
    import json

    import matplotlib.axes
    import eval.during_training as during_training
    monkeypatch.setattr(during_training.TrainingFID, "_fid", lambda self, images: float(images.mean()))
    titles = []
    set_title = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda ax, t, *a, **k: titles.append(t) or set_title(ax, t, *a, **k))
    results = tmp_path / "results"
    assert train.main(["--model", "DiT-XS/8", "--batch-size", "8", "--num-workers", "0", "--log-every", "1",
                       "--num-lin-warmup", "0", "--start-decay", "0", "--ema-snapshot-every", "2", "--ckpt-every", "2",
                       "--magnitude-every", "1", *FID, "--eval-ref", reference_stats(str(tmp_path)),
                       "--num-steps", "2", "--use-all-mp", "--results-dir", str(results), "--tensorboard"]) == 0
    run = only_run(results)
    steps = [ln for ln in open(os.path.join(run, "log.txt")) if re.search(r"step +\d+/2 ", ln)]
    assert len(steps) == 2 and all("mp_lr 1.00e-02" in ln and " lr " not in ln for ln in steps)
    assert json.load(open(os.path.join(run, "config.json")))["learning_rates"] == {"mp_lr": 1e-2}
    acc = scalar_events(run)
    assert [e.value for e in acc.Scalars("train/mp_lr")] == pytest.approx([1e-2, 1e-2])
    assert "train/lr" not in acc.Tags()["scalars"]
    kinds = {"loss.png", "magnitudes.png", "fid_during_training.png"}
    assert kinds <= set(os.listdir(run))
    assert len(titles) >= 3 and all("mp_lr 1.00e-02" in t and "1.00e-04" not in t for t in titles)


# ----------------------------------------------------------------------------------------------------
# W&B


def test_wandb_without_the_package_is_one_error_line_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    results = tmp_path / "results"
    assert train.main([*FAST, "--num-steps", "2", "--results-dir", str(results), "--wandb"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --wandb") and "pip install wandb" in err[0]
    assert not results.exists()


def test_wandb_receives_the_scalars_of_metrics_jsonl(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or types.SimpleNamespace(
        log=lambda values, step: calls.append(("log", step, values)), finish=lambda: calls.append(("finish",)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    results = tmp_path / "results"
    assert train.main([*FAST, "--num-steps", "2", "--results-dir", str(results), "--wandb",
                       "--wandb-project", "p"]) == 0
    run = only_run(results)
    (init,) = [c[1] for c in calls if c[0] == "init"]
    assert init["project"] == "p" and init["name"] == os.path.basename(run) and init["resume"] == "allow"
    assert init["id"] == open(os.path.join(run, logs.WANDB_ID_FILE)).read().strip()
    losses = [(c[1], c[2]["train/loss"]) for c in calls if c[0] == "log" and "train/loss" in c[2]]
    assert losses == [(m["step"], m["loss"]) for m in read_jsonl(os.path.join(run, "metrics.jsonl"))]
    assert calls[-1] == ("finish",) and not math.isnan(losses[0][1])
