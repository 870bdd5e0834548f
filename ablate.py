"""Ablation that can rank something: a ladder of MP configurations, each trained at a few learning rates
and with several seeds on the same budget, scored with FID at the end and (--eval-every) during training.

OMP_NUM_THREADS=1 MAPDIT_FID_METHOD=eigh python ablate.py --preset cpu --out-dir /tmp/ablation-cpu  # CPU
python ablate.py --preset gpu-mnist --out-dir abl                   # one GPU (benchmarks/ablation_gpu.sh)
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
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import data  # noqa: E402
from atomic import atomic_write_text  # noqa: E402
from diffusion.sampling import SAMPLERS  # noqa: E402
from eval.fid import FIDError  # noqa: E402
from models import DiT, count_parameters  # noqa: E402
from mp_layers import MPConfig  # noqa: E402
from plots import plot_fid_bands, save_figure  # noqa: E402
from runs import list_checkpoints, load_run_config, model_from_config, read_jsonl  # noqa: E402
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
    # One GPU, under 8 minutes: MNIST 16x16, DiT-XS/2, batch 256, 2,500 steps; FID-2K of 100 DDPM steps, CFG 1.5,
    # post-hoc EMA σ_rel 0.05, against the 10,000 MNIST test images; FID-2K (20 DPM-Solver++ steps) every 500.
    # No switches at lr 1e-3 and 1e-4; all eight at MP lr 1e-2 and 3e-3; all eight, scale+rotation+gate at 1e-2.
    "gpu-mnist": dict(data_path="mnist", model="DiT-XS/2", batch_size=256, num_steps=2500, rungs=[0, 5, 7],
                      lrs=["0=1e-3,1e-4", "5=1e-2,3e-3", "7=1e-2"], seeds=2, fid_samples=2000, fid_steps=100,
                      sampler="ddpm", cfg_scale=1.5, eval_every=500, eval_samples=2000, eval_sampler="dpm-solver++",
                      eval_sampling_steps=20, jobs=10, num_workers=1, ema_snapshot_every=100),
    # The 2-core CPU: the digits, DiT-XS/8, batch 32, 200 steps; no MP at lr 1e-4, all eight at MP lr 1e-2 and at
    # the plain default 1e-4; two seeds; FID of 64 samples (10 DDIM steps) at steps 100 and 200, the last one
    # ranks (Inception on a loaded CPU, ~2 images/s, is most of the cost).
    "cpu": dict(data_path="digits", model="DiT-XS/8", batch_size=32, num_steps=200, rungs=[0, 5],
                lrs=["0=1e-4", "5=1e-2,1e-4"], seeds=2, fid_samples=0, eval_every=100, eval_samples=64,
                eval_sampler="ddim", eval_sampling_steps=10, jobs=1, num_workers=0, ema_snapshot_every=25),
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
    if args.nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
                os.path.join(REPO, script), *script_args]
    return [sys.executable, os.path.join(REPO, script), *script_args]


def call(args, job: Job, script: str, script_args: list[str]) -> None:
    """Runs a step of the ablation; with --jobs > 1 its output goes to RESULTS/ablate.log, not the terminal."""
    cmd = command(args, script, script_args)
    if args.jobs == 1:
        subprocess.run(cmd, check=True, cwd=REPO)
        return
    os.makedirs(job.results_dir, exist_ok=True)
    with open(os.path.join(job.results_dir, "ablate.log"), "a") as log:
        subprocess.run(cmd, check=True, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def eval_args(args, job: Job) -> list[str]:
    if not args.eval_every:
        return []
    return ["--eval-every", str(args.eval_every), "--eval-samples", str(args.eval_samples), "--eval-sampler",
            args.eval_sampler, "--eval-sampling-steps", str(args.eval_sampling_steps), "--eval-cfg-scale",
            str(args.cfg_scale), "--eval-seed", str(job.fid_seed), "--eval-ref", args.ref]


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


def fid_of(args, job: Job, run: str) -> float:
    """The run's FID: eval/sample_fid.py with the ablation's budget and the job's sampling seed (reused when
    already computed), or with --fid-samples 0 the last FID during training."""
    if not args.fid_samples:
        records = read_jsonl(os.path.join(run, "fid_during_training.jsonl"))
        if not records or records[-1]["step"] != args.num_steps:
            raise FIDError(f"{run} has no FID during training at step {args.num_steps}; re-run with --eval-every")
        return float(records[-1]["fid"])
    record_matches = lambda r: (r.get("num_samples") == args.fid_samples and r.get("sampler") == args.sampler
                                and r.get("num_sampling_steps") == args.fid_steps and r.get("cfg_scale") == args.cfg_scale
                                and r.get("seed") == job.fid_seed and r.get("reference") == args.ref)
    done = [r for r in read_jsonl(os.path.join(run, "fid", "fid.jsonl")) if record_matches(r)]
    if not done:
        fid_args = ["--result-dir", run, "--num-samples", str(args.fid_samples), "--num-sampling-steps",
                    str(args.fid_steps), "--sampler", args.sampler, "--cfg-scale", str(args.cfg_scale),
                    "--seed", str(job.fid_seed), "--ref", args.ref]
        call(args, job, "eval/sample_fid.py", fid_args)
        done = [r for r in read_jsonl(os.path.join(run, "fid", "fid.jsonl")) if record_matches(r)]
    return float(done[-1]["fid"])


def do_job(args, job: Job) -> dict:
    start = time.perf_counter()
    run = train_run(args, job)
    fid = fid_of(args, job, run)
    metrics = read_jsonl(os.path.join(run, "metrics.jsonl"))
    tail = metrics[-max(1, len(metrics) // 5):]  # mean over the last fifth: less noisy than one log line
    speeds = sorted(r["img_per_s"] for r in metrics[1:] or metrics)
    curve = [(r["step"], r["fid"]) for r in read_jsonl(os.path.join(run, "fid_during_training.jsonl"))]
    print(f"[ablate] {job}: FID {fid:.2f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return {"rung": job.rung, "lr": job.lr, "mp_lr": job.mp_lr, "plain_lr": job.plain_lr, "seed": job.seed, "fid_seed": job.fid_seed, "run": run, "fid": fid,
            "final_loss": sum(r["loss"] for r in tail) / len(tail), "img_per_s": speeds[len(speeds) // 2],
            "curve": curve}


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


def write_report(args, rows: list[dict], pairs: list[dict], results: list[dict]) -> None:
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
    text = ("# Ablation\n\n" + budget + "\n\n" + "\n".join(lines) + "\n\n" + lr_note(args) + "\n\nCriterion: "
            + CRITERION + ".\n\n" + "\n".join(comparisons) + "\n\nEvery run: `ablation.json` (\"results\"); FID "
            "over training: `ablation_curves.png`.\n")
    atomic_write_text(os.path.join(args.out_dir, "ablation.md"), text)
    atomic_write_text(os.path.join(args.out_dir, "ablation.json"), json.dumps(
        {"budget": budget, "criterion": CRITERION, "learning_rates": lr_note(args), "plain_lr": args.plain_lr,
         "command": args.command, "rows": rows, "pairs": pairs, "results": results}, indent=2))
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
    if any(curves for _, curves in groups):
        plot_fid_bands([(label, curves) for label, curves in groups if curves],
                       os.path.join(args.out_dir, "ablation_curves.png"), title=budget)
    print(text, flush=True)


# ----------------------------------------------------------------------------------------------------
# Command line.


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    preset = p.parse_known_args(argv)[0].preset
    if preset:
        p.set_defaults(**PRESETS[preset])
    args = p.parse_args(argv)
    args.command = "python ablate.py " + " ".join(sys.argv[1:] if argv is None else argv)
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
        raise ValueError(f"FID reference not found: {args.ref}; pass a statistics .npz (eval/ref_stats.py) or "
                         f"--ref auto for a built-in dataset")


def resolve_reference(args) -> str:
    """--ref as given, or (auto) the built-in dataset's statistics computed once for the whole ablation in
    OUT_DIR/refs/ (as eval/sample_fid.py caches them); every run then scores against this one file."""
    if args.ref != "auto":
        return args.ref
    from eval.sample_fid import resolve_reference as resolve
    dataset = data.load_dataset(args.data_path)
    print(f"[ablate] reference statistics of {dataset.describe()['name']} (computed once)", flush=True)
    return os.path.abspath(resolve("auto", {"data": dataset.describe(), "input_size": dataset.resolution},
                                   args.out_dir))


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out_dir = os.path.abspath(args.out_dir)  # train.py and sample_fid.py run in the repository folder
    if args.ref != "auto":
        args.ref = os.path.abspath(args.ref)
    if os.path.exists(args.data_path):  # a folder, not a built-in name
        args.data_path = os.path.abspath(args.data_path)
    try:
        check_args(args)
        os.makedirs(args.out_dir, exist_ok=True)
        args.ref = resolve_reference(args)
        jobs = [Job(args, rung, lr, k) for rung in args.rungs for lr in rung_lrs(rung, args) for k in range(args.seeds)]
        print(f"[ablate] {len(jobs)} runs ({args.jobs} at a time): {budget_text(args)}", flush=True)
        start, results = time.perf_counter(), []
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for result in pool.map(lambda job: do_job(args, job), jobs):
                results.append(result)
                rows, pairs = summarize(args, results)
                write_report(args, rows, pairs, results)  # a partial report after each run
        print(f"[ablate] done: {len(jobs)} runs in {(time.perf_counter() - start) / 60:.1f} min; "
              f"{os.path.join(args.out_dir, 'ablation.md')}", flush=True)
    except (FIDError, data.DatasetError, ValueError) as e:  # e.g. no automatic reference for this dataset
        print(f"error: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        where = " (its output: RESULTS/ablate.log of that run)" if args.jobs > 1 else ""
        print(f"error: a step of the ablation failed ({' '.join(e.cmd[1:3])}){where}; fix it and re-run the same "
              f"command: finished runs are kept", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
