"""Training and sampling throughput of MaP-DiT, per model, latent size, MP switches, precision and compile.

The training step is train.py's, with random latents: the DiT hybrid loss (diffusion.training_losses with
random t, noise and labels, label dropout), backward, Adam (fused on CUDA), the lr schedule, the forced-WN
projection `project_forced_weights_()` and the update of two power EMAs (σ_rel 0.05, 0.10); no data loader.
"fwd" is one forward pass in eval mode under no_grad (the cost of one sampling step per image, CFG off).
Peak memory is torch.cuda.max_memory_allocated over the timed training steps ("train GiB"), and over the
forward passes with the training state still resident ("fwd GiB"); n/a on a CPU.

Examples
    python bench.py --preset cpu            # DiT-XS/2 on 4×16×16, batch 32, fp32: none vs all, interleaved
    python bench.py --preset gpu            # the issue's GPU set (~6 min on an H100, compile included)
    python bench.py --models DiT-XS/2:16 DiT-S/4:16 DiT-B/2:32 --switches none all --precisions tf32 bf16 \\
        --compile both --batch-size 256 --steps 20 --warmup 5
    python bench.py --models DiT-XS/2:16 --switches none each all --precisions fp32 --device cpu --batch-size 8

--models NAME:SIZE[:CHANNELS] (latent CHANNELS×SIZE×SIZE, channels 4 by default). --switches takes none,
all, each (the eight switches one at a time), a switch name (cosine_attention or use-cosine-attention) or
several joined by '+'. --rounds N > 1 builds every switch set of a (model, precision, compile) group,
then alternates their timed blocks N times (order reversed every other round) and reports medians: use it
on a noisy machine. --time-budget S skips the groups that would end past S seconds (estimated from the
rows measured so far) and lists them; a failed row (OOM, compile error) is reported and the run goes on.
--dry-run lists the configurations. On a CPU, denormals are flushed to zero as train.py does there
(--no-flush-denormal keeps them). Results go to OUT.json and OUT.md (--out, default bench-results).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

import torch
import torch._dynamo

from diffusion import create_diffusion
from ema import PowerEMA
from models import MODEL_NAMES, MODEL_SIZES, build_model
from mp_layers import MPConfig
from train import COMPILE_MODES, compile_model, configure_precision, make_optimizer, training_step

NUM_CLASSES = 1000
EMA_STDS = (0.05, 0.10)

# Reference implementation (map-dit, the version with the eight flags), from /work/shared/BENCHMARKS.md:
# one NVIDIA H200, PyTorch 2.11, global batch 256, TF32 eager, 20 steps after 5 warm-up steps.
# (model, latent size, switches) -> (train img/s, fwd img/s, peak GiB)
REFERENCE_MAPDIT = {
    ("DiT-XS/2", 16, "none"): (13_367, 88_772, 2.2),
    ("DiT-XS/2", 16, "all"): (5_849, 27_572, 2.5),
    ("DiT-S/4", 16, "none"): (7_556, 46_777, 2.3),
    ("DiT-S/4", 16, "all"): (4_298, 23_726, 2.8),
    ("DiT-S/2", 16, "none"): (7_441, 34_408, 6.6),
    ("DiT-S/2", 16, "all"): (3_397, 21_007, 7.5),
    ("DiT-B/2", 32, "none"): (920, 3_230, 48.9),
    ("DiT-B/2", 32, "all"): (720, 2_721, 54.5),
}
# Vanilla DiT (facebookresearch/DiT), same card and protocol (BENCHMARKS.md):
# (model, latent size, precision, compiled) -> (train img/s, fwd img/s, peak GiB)
REFERENCE_VANILLA = {
    ("DiT-S/4", 16, "tf32", False): (7_473, 36_821, 2.2),
    ("DiT-S/2", 16, "tf32", False): (6_836, 27_837, 6.5),
    ("DiT-B/2", 32, "tf32", False): (818, 2_787, 48.4),
    ("DiT-B/2", 32, "bf16", False): (1_529, 4_342, 30.6),
    ("DiT-B/2", 32, "bf16", True): (2_495, 9_456, 25.7),
}
REFERENCE_NOTE = "reference: BENCHMARKS.md, H200, PyTorch 2.11, batch 256 (map-dit: TF32 eager)"

PRESETS = {
    # The CPU check: all eight switches cost at most 1.15× the step time of none.
    # Short blocks (2 steps), alternated 11 times: on a shared machine, load bursts then hit both sets alike.
    "cpu": dict(models=["DiT-XS/2:16"], switches=["none", "all"], precisions=["fp32"], compile="off",
                batch_size=32, warmup=2, steps=2, rounds=11, min_time=0.0, device="cpu"),
    # The GPU set; eager rows first, then bf16 + torch.compile (B/2 first: it has a vanilla-DiT
    # reference). Fits ~6 minutes on an H100 with compile; --time-budget guards the rest.
    "gpu": dict(models=["DiT-XS/2:16", "DiT-S/4:16", "DiT-B/2:32"], switches=["none", "all"],
                precisions=None, compile=None, batch_size=256, warmup=3, steps=10, rounds=1, min_time=1.0,
                time_budget=320.0,
                rows=[("tf32", False, ["DiT-XS/2:16", "DiT-S/4:16", "DiT-B/2:32"]),
                      ("bf16", False, ["DiT-XS/2:16", "DiT-S/4:16", "DiT-B/2:32"]),
                      ("bf16", True, ["DiT-B/2:32", "DiT-XS/2:16", "DiT-S/4:16"])]),
}


# ----------------------------------------------------------------------------------------------------
# What to run.


@dataclasses.dataclass
class Spec:
    model: str
    size: int
    channels: int
    switches: str  # label: none, all, or switch names joined by '+'
    mp: MPConfig
    precision: str
    compile: bool

    @property
    def group(self):
        return (self.model, self.size, self.channels, self.precision, self.compile)

    @property
    def depth(self) -> int:
        return _depth(self.model)

    def describe(self) -> str:
        return (f"{self.model} {self.channels}×{self.size}×{self.size} [{self.switches}] {self.precision}"
                f"{' compile' if self.compile else ''}")


def parse_model(text: str) -> tuple[str, int, int]:
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[0] not in MODEL_NAMES:
        raise SystemExit(f"error: --models entry {text!r} is not NAME:SIZE[:CHANNELS] with NAME one of "
                         f"{', '.join(MODEL_NAMES)}")
    try:
        size = int(parts[1])
        channels = int(parts[2]) if len(parts) == 3 else 4
    except ValueError:
        raise SystemExit(f"error: --models entry {text!r}: SIZE and CHANNELS must be integers") from None
    patch = int(parts[0].split("/")[1])
    if size % patch:
        raise SystemExit(f"error: --models entry {text!r}: size {size} is not a multiple of the patch {patch}")
    return parts[0], size, channels


def parse_switches(items: list[str]) -> list[tuple[str, MPConfig]]:
    names = MPConfig.switch_names()
    out = []
    for item in items:
        if item == "none":
            out.append(("none", MPConfig()))
        elif item == "all":
            out.append(("all", MPConfig.all_on()))
        elif item == "each":
            out += [(n.removeprefix("use_"), MPConfig(**{n: True})) for n in names]
        else:
            chosen = []
            for part in item.split("+"):
                n = part.strip().lstrip("-").replace("-", "_")
                n = n if n.startswith("use_") else "use_" + n
                if n not in names:
                    raise SystemExit(f"error: unknown switch {part!r}; valid: none, all, each, "
                                     f"{', '.join(x.removeprefix('use_') for x in names)}")
                chosen.append(n)
            out.append(("+".join(c.removeprefix("use_") for c in chosen), MPConfig(**{n: True for n in chosen})))
    seen, unique = set(), []
    for label, mp in out:
        if label not in seen:
            seen.add(label)
            unique.append((label, mp))
    return unique


def build_specs(args) -> list[Spec]:
    switches = parse_switches(args.switches)
    if args.rows_plan is not None:  # preset with an explicit order
        plan = args.rows_plan
    else:
        compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
        plan = [(prec, comp, args.models) for comp in compiles for prec in args.precisions]
    specs = []
    for prec, comp, models in plan:
        for m in models:
            name, size, channels = parse_model(m)
            for label, mp in switches:
                specs.append(Spec(name, size, channels, label, mp, prec, comp))
    return specs


# ----------------------------------------------------------------------------------------------------
# One configuration, alive: model, optimiser, EMAs, and the train.py step.


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Bench:
    def __init__(self, spec: Spec, args, device: torch.device):
        self.spec, self.device, self.batch = spec, device, args.batch_size
        self.autocast = configure_precision(spec.precision, device)
        torch.manual_seed(args.seed)
        self.model = build_model(spec.model, in_channels=spec.channels, input_size=spec.size,
                                 num_classes=NUM_CLASSES, mp=spec.mp).to(device)
        self.model.train()
        self.ema = PowerEMA(self.model, stds=EMA_STDS)
        total = 1_000_000  # a long run's schedule: warm-up steps // 150, decay from steps // 10
        self.opt, self.sched = make_optimizer(self.model, args.lr, total // 150, total // 10, device)
        self.train_model = compile_model(self.model, args.compile_mode) if spec.compile else self.model
        self.diffusion = create_diffusion("")
        self.step = 0
        self.loss_sum = torch.zeros((), device=device)
        g = torch.Generator(device=device).manual_seed(args.seed + 1)
        shape = (self.batch, spec.channels, spec.size, spec.size)
        self.fwd_x = torch.randn(shape, device=device, generator=g)
        self.fwd_t = torch.randint(0, 1000, (self.batch,), device=device, generator=g)
        self.fwd_y = torch.randint(0, NUM_CLASSES, (self.batch,), device=device, generator=g)

    def train_steps(self, n: int) -> float:
        """n training steps exactly as train.py's loop; returns the synchronised wall time."""
        configure_precision(self.spec.precision, self.device)
        model, raw, device = self.train_model, self.model, self.device
        raw.train()
        shape = (self.batch, self.spec.channels, self.spec.size, self.spec.size)
        sync(device)
        start = time.perf_counter()
        for _ in range(n):
            x = torch.randn(shape, device=device)  # random latents and labels (no data loader)
            y = torch.randint(0, NUM_CLASSES, (self.batch,), device=device)
            t = torch.randint(0, self.diffusion.num_timesteps, (self.batch,), device=device)
            self.step += 1
            self.loss_sum += training_step(model, raw, self.diffusion, self.opt, self.sched, self.ema, x, y, t,
                                           step=self.step, autocast=self.autocast, compiled=self.spec.compile)
        sync(device)
        return time.perf_counter() - start

    @torch.no_grad()
    def forward_steps(self, n: int) -> float:
        """n forward passes in eval mode under no_grad (one sampling step each, CFG off)."""
        configure_precision(self.spec.precision, self.device)
        self.model.eval()
        sync(self.device)
        start = time.perf_counter()
        for _ in range(n):
            if self.spec.compile:
                torch.compiler.cudagraph_mark_step_begin()
            with self.autocast():
                self.train_model(self.fwd_x, self.fwd_t, self.fwd_y)
        sync(self.device)
        elapsed = time.perf_counter() - start
        self.model.train()
        return elapsed

    def close(self):
        for name in ("train_model", "model", "ema", "opt", "sched", "fwd_x"):
            setattr(self, name, None)


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def free_memory(device, reset_dynamo: bool):
    gc.collect()
    if reset_dynamo:
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def graph_breaks() -> int:
    try:
        from torch._dynamo.utils import counters
        return int(sum(counters["graph_break"].values()))
    except Exception:  # noqa: BLE001
        return 0


def n_timed(steps: int, min_time: float, last_step_s: float) -> int:
    if min_time <= 0 or last_step_s <= 0:
        return steps
    return int(min(max(steps, math.ceil(min_time / last_step_s)), 20 * steps))


# ----------------------------------------------------------------------------------------------------
# Measuring a group of configurations (same model, precision, compile).


def base_row(spec: Spec, args, device) -> dict:
    return {"model": spec.model, "latent": f"{spec.channels}x{spec.size}x{spec.size}", "size": spec.size,
            "channels": spec.channels, "switches": spec.switches, "mp": spec.mp.enabled(),
            "precision": spec.precision, "compile": spec.compile,
            "compile_mode": args.compile_mode if spec.compile else None, "batch_size": args.batch_size,
            "device": str(device)}


def warm_up(b: Bench, args, row: dict) -> None:
    """Warm-up steps; the first training and forward calls are timed alone (they include compilation)."""
    t0 = time.perf_counter()
    row["first_train_step_s"] = b.train_steps(1)
    last = b.train_steps(1) if args.warmup > 1 else row["first_train_step_s"]
    if args.warmup > 2:
        b.train_steps(args.warmup - 2)
    row["train_steps_timed"] = n_timed(args.steps, args.min_time, last)
    row["first_fwd_s"] = b.forward_steps(1)
    last = b.forward_steps(1) if args.warmup > 1 else row["first_fwd_s"]
    if args.warmup > 2:
        b.forward_steps(args.warmup - 2)
    row["fwd_steps_timed"] = n_timed(args.steps, args.min_time, last)
    row["warmup_s"] = time.perf_counter() - t0


def finish_row(row: dict, b: Bench, train_times: list[float], fwd_times: list[float]) -> None:
    n_train, n_fwd, batch = row["train_steps_timed"], row["fwd_steps_timed"], row["batch_size"]
    step = statistics.median(train_times) / n_train
    fwd = statistics.median(fwd_times) / n_fwd
    row.update(train_step_ms=1e3 * step, train_img_s=batch / step, fwd_ms=1e3 * fwd, fwd_img_s=batch / fwd,
               train_step_ms_rounds=[1e3 * t / n_train for t in train_times],
               fwd_ms_rounds=[1e3 * t / n_fwd for t in fwd_times])
    loss = float(b.loss_sum) / max(b.step, 1)
    row["mean_loss"] = loss
    if not math.isfinite(loss):
        row.setdefault("notes", []).append("non-finite loss")
    add_reference(row)


def add_reference(row: dict) -> None:
    key = (row["model"], row["size"], row["switches"])
    if row["channels"] == 4 and key in REFERENCE_MAPDIT:
        tr, fw, gib = REFERENCE_MAPDIT[key]
        row["ref_mapdit"] = {"train_img_s": tr, "fwd_img_s": fw, "peak_gib": gib}
        row["x_ref_train"] = row["train_img_s"] / tr
        row["x_ref_fwd"] = row["fwd_img_s"] / fw
    vkey = (row["model"], row["size"], row["precision"], row["compile"])
    if row["channels"] == 4 and vkey in REFERENCE_VANILLA:
        tr, fw, gib = REFERENCE_VANILLA[vkey]
        row["ref_vanilla"] = {"train_img_s": tr, "fwd_img_s": fw, "peak_gib": gib}
        row["x_vanilla_train"] = row["train_img_s"] / tr
        row["x_vanilla_fwd"] = row["fwd_img_s"] / fw


def error_text(e: BaseException) -> str:
    kind = "OOM" if isinstance(e, torch.OutOfMemoryError) else type(e).__name__
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{kind}: {first[:300]}"


def run_sequential(spec: Spec, args, device) -> dict:
    """Build, warm up, time training then forward, free: exact peak memory of this configuration."""
    row = base_row(spec, args, device)
    start = time.perf_counter()
    breaks_before = graph_breaks()
    b = None
    try:
        free_memory(device, reset_dynamo=spec.compile)
        peak_reset(device)
        b = Bench(spec, args, device)
        warm_up(b, args, row)
        peak_reset(device)
        train_t = b.train_steps(row["train_steps_timed"])
        row["train_peak_gib"] = _gib(peak_bytes(device))
        b.opt.zero_grad(set_to_none=True)
        peak_reset(device)
        fwd_t = b.forward_steps(row["fwd_steps_timed"])
        row["fwd_peak_gib"] = _gib(peak_bytes(device))
        finish_row(row, b, [train_t], [fwd_t])
    except Exception as e:  # noqa: BLE001 - one failed row must not stop the benchmark
        row["error"] = error_text(e)
        row["traceback"] = traceback.format_exc(limit=6)
    finally:
        if b is not None:
            b.close()
        del b
        if spec.compile:
            row["graph_breaks"] = graph_breaks() - breaks_before
        free_memory(device, reset_dynamo=spec.compile)
    row["row_s"] = time.perf_counter() - start
    return row


def run_interleaved(specs: list[Spec], args, device) -> list[dict]:
    """All configurations of a group alive at once; timed blocks alternate (ABBA…), medians reported.

    Peak memory on CUDA: the group's other configurations sit idle with a constant footprint (weights,
    gradients, Adam moments, EMAs), measured after their warm-up and subtracted."""
    rows = [base_row(s, args, device) for s in specs]
    benches: list[Bench | None] = [None] * len(specs)
    start = time.perf_counter()
    free_memory(device, reset_dynamo=any(s.compile for s in specs))
    resident = [0] * len(specs)
    for i, spec in enumerate(specs):
        try:
            before = benches_resident(device)
            benches[i] = Bench(spec, args, device)
            warm_up(benches[i], args, rows[i])
            resident[i] = benches_resident(device) - before
        except Exception as e:  # noqa: BLE001
            rows[i]["error"] = error_text(e)
            rows[i]["traceback"] = traceback.format_exc(limit=6)
            if benches[i] is not None:
                benches[i].close()
            benches[i] = None
            free_memory(device, reset_dynamo=False)
    live = [i for i in range(len(specs)) if benches[i] is not None]
    # Every configuration times the same number of steps per block (the largest asked for).
    n_train = max([rows[i]["train_steps_timed"] for i in live], default=args.steps)
    n_fwd = max([rows[i]["fwd_steps_timed"] for i in live], default=args.steps)
    times = {i: ([], []) for i in live}
    peaks = {i: [0, 0] for i in live}
    for r in range(args.rounds):
        order = live if r % 2 == 0 else live[::-1]
        for i in order:
            b, row = benches[i], rows[i]
            if b is None:
                continue
            row["train_steps_timed"], row["fwd_steps_timed"] = n_train, n_fwd
            others = sum(resident[j] for j in live if j != i and benches[j] is not None)
            try:
                peak_reset(device)
                times[i][0].append(b.train_steps(n_train))
                p = peak_bytes(device)
                peaks[i][0] = max(peaks[i][0], (p - others) if p is not None else 0)
                peak_reset(device)
                times[i][1].append(b.forward_steps(n_fwd))
                p = peak_bytes(device)
                peaks[i][1] = max(peaks[i][1], (p - others) if p is not None else 0)
            except Exception as e:  # noqa: BLE001
                row["error"] = error_text(e)
                row["traceback"] = traceback.format_exc(limit=6)
                b.close()
                benches[i] = None
                free_memory(device, reset_dynamo=False)
    for i in live:
        if "error" not in rows[i]:
            if device.type == "cuda":
                rows[i]["train_peak_gib"] = _gib(peaks[i][0])
                rows[i]["fwd_peak_gib"] = _gib(peaks[i][1])
            else:
                rows[i]["train_peak_gib"] = rows[i]["fwd_peak_gib"] = None
            finish_row(rows[i], benches[i], *times[i])
            rows[i]["rounds"] = args.rounds
    for i, b in enumerate(benches):
        if b is not None:
            b.close()
    benches = None
    free_memory(device, reset_dynamo=any(s.compile for s in specs))
    elapsed = time.perf_counter() - start
    for row in rows:
        row["row_s"] = elapsed / len(rows)
    return rows


def benches_resident(device) -> int:
    gc.collect()
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _gib(n):
    return None if n is None else n / 2**30


# ----------------------------------------------------------------------------------------------------
# Budget, ratios and reports.


def _depth(model: str) -> int:
    return MODEL_SIZES[model.removeprefix("DiT-").split("/")[0]][0]


def estimate_s(spec: Spec, done: list[dict], args) -> float:
    """Rough cost of a row from the rows measured so far. Compiling dominates compiled rows and grows
    about linearly with depth (on an H200: DiT-XS/2 ~25 s a row, S/4 ~40 s, B/2 ~45 s, train + eval)."""
    same = [r for r in done if "row_s" in r and r["compile"] == spec.compile and "error" not in r]
    like = [r["row_s"] for r in same if r["model"] == spec.model and r["size"] == spec.size]
    if like:
        return max(like)
    if spec.compile:
        scaled = [r["row_s"] * (spec.depth + 2) / (_depth(r["model"]) + 2) for r in same]
        return max(scaled) if scaled else 4.0 * (spec.depth + 2)
    return 10.0


def ratio_rows(rows: list[dict]) -> list[dict]:
    """all/none step-time ratios per (model, latent, precision, compile), with the reference's."""
    out = []
    groups = {}
    for r in rows:
        if "error" in r or "train_img_s" not in r:
            continue
        groups.setdefault((r["model"], r["latent"], r["precision"], r["compile"]), {})[r["switches"]] = r
    for (model, latent, prec, comp), by in groups.items():
        if "none" not in by:
            continue
        for label, r in by.items():
            if label == "none":
                continue
            none = by["none"]
            entry = {"model": model, "latent": latent, "precision": prec, "compile": comp,
                     "compile_mode": none.get("compile_mode"), "switches": label,
                     "train_ratio": none["train_img_s"] / r["train_img_s"],
                     "fwd_ratio": none["fwd_img_s"] / r["fwd_img_s"]}
            rounds_none, rounds_r = none.get("train_step_ms_rounds", []), r.get("train_step_ms_rounds", [])
            if len(rounds_none) > 1 and len(rounds_none) == len(rounds_r):
                entry["train_ratio_paired_median"] = statistics.median(a / b for a, b in zip(rounds_r, rounds_none))
                entry["train_ratio_rounds"] = [a / b for a, b in zip(rounds_r, rounds_none)]
                fr_none, fr_r = none["fwd_ms_rounds"], r["fwd_ms_rounds"]
                entry["fwd_ratio_paired_median"] = statistics.median(a / b for a, b in zip(fr_r, fr_none))
                # Best of the rounds: interference on a shared machine only ever adds time.
                entry["train_ratio_min"] = min(rounds_r) / min(rounds_none)
                entry["fwd_ratio_min"] = min(fr_r) / min(fr_none)
            ref_none = REFERENCE_MAPDIT.get((model, none["size"], "none"))
            ref_r = REFERENCE_MAPDIT.get((model, none["size"], label))
            if ref_none and ref_r and none["channels"] == 4:
                entry["ref_train_ratio"] = ref_none[0] / ref_r[0]
                entry["ref_fwd_ratio"] = ref_none[1] / ref_r[1]
            out.append(entry)
    return out


def compile_label(row: dict) -> str:
    """off, on (torch.compile's default mode) or the mode's name."""
    if not row["compile"]:
        return "off"
    mode = row.get("compile_mode") or "default"
    return "on" if mode == "default" else mode


def fmt(v, spec="{:,.0f}", na="n/a"):
    return na if v is None else spec.format(v)


def markdown(result: dict) -> str:
    meta, rows = result["meta"], result["rows"]
    lines = [f"# MaP-DiT benchmark ({meta['device_name']}, torch {meta['torch']})", "",
             f"{meta['date']}; batch {meta['args']['batch_size']}, {meta['args']['warmup']} warm-up + "
             f"{meta['args']['steps']}+ timed steps" + (f", {meta['args']['rounds']} interleaved rounds (medians)"
                                                       if meta['args']['rounds'] > 1 else "")
             + f"; commit {meta.get('commit') or '?'}; {meta['total_s']:.0f} s in all.", ""]
    cuda = meta["device"].startswith("cuda")
    head = ["model", "latent", "switches", "precision", "compile", "train img/s", "step ms", "fwd img/s",
            "train GiB", "fwd GiB", "first step s"]
    if cuda:
        head += ["× ref train", "× ref fwd", "× vanilla train", "× vanilla fwd"]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["model"], r["latent"], r["switches"], r["precision"], compile_label(r)]
        if "error" in r:
            cells += [f"FAILED: {r['error'][:120]}"] + [""] * (len(head) - len(cells) - 1)
        else:
            cells += [fmt(r["train_img_s"]), fmt(r["train_step_ms"], "{:.1f}"), fmt(r["fwd_img_s"]),
                      fmt(r.get("train_peak_gib"), "{:.2f}"), fmt(r.get("fwd_peak_gib"), "{:.2f}"),
                      fmt(r.get("first_train_step_s"), "{:.1f}")]
            if cuda:
                cells += [fmt(r.get("x_ref_train"), "{:.2f}×", "–"), fmt(r.get("x_ref_fwd"), "{:.2f}×", "–"),
                          fmt(r.get("x_vanilla_train"), "{:.2f}×", "–"), fmt(r.get("x_vanilla_fwd"), "{:.2f}×", "–")]
        lines.append("| " + " | ".join(cells) + " |")
    if result["ratios"]:
        lines += ["", "Step-time ratio of each switch set to none (train, fwd; 1.00 = MP is free):", ""]
        head = ["model", "latent", "precision", "compile", "switches", "train ×", "fwd ×"]
        paired = any("train_ratio_paired_median" in e for e in result["ratios"])
        if paired:
            head += ["train × (median of paired rounds)", "fwd × (paired)", "train × (best rounds)",
                     "fwd × (best)"]
        head += ["ref train ×", "ref fwd ×"]
        lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for e in result["ratios"]:
            cells = [e["model"], e["latent"], e["precision"], compile_label(e), e["switches"],
                     f"{e['train_ratio']:.3f}", f"{e['fwd_ratio']:.3f}"]
            if paired:
                cells += [fmt(e.get(k), "{:.3f}", "–") for k in ("train_ratio_paired_median",
                          "fwd_ratio_paired_median", "train_ratio_min", "fwd_ratio_min")]
            cells += [fmt(e.get("ref_train_ratio"), "{:.2f}", "–"), fmt(e.get("ref_fwd_ratio"), "{:.2f}", "–")]
            lines.append("| " + " | ".join(cells) + " |")
    if cuda:
        lines += ["", f"× ref / ref ×: {REFERENCE_NOTE}. × vanilla: facebookresearch/DiT, same source, same "
                  "precision and compile. Compare with care on another card (this run: "
                  f"{meta['device_name']})."]
    if meta["skipped"]:
        lines += ["", "Skipped (time budget):", ""] + [f"- {s}" for s in meta["skipped"]]
    if meta.get("note"):
        lines += ["", meta["note"]]
    return "\n".join(lines) + "\n"


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def commit() -> str | None:
    """The short hash of HEAD, with -dirty when the working tree has uncommitted changes."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=here, timeout=10).stdout.strip()
        return (head + ("-dirty" if dirty else "")) or None
    except Exception:  # noqa: BLE001
        return None


# ----------------------------------------------------------------------------------------------------
# Command line.


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a ready-made set (explicit options override it)")
    p.add_argument("--models", nargs="+", help="NAME:SIZE[:CHANNELS], e.g. DiT-XS/2:16 DiT-B/2:32")
    p.add_argument("--switches", nargs="+", help="none, all, each, or switch names (joined by +)")
    p.add_argument("--precisions", nargs="+", choices=["fp32", "tf32", "bf16"])
    p.add_argument("--compile", choices=["off", "on", "both"], help="torch.compile(model) as train.py --compile")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile mode of the compiled rows (reduce-overhead: CUDA graphs)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--steps", type=int, help="timed steps (training and forward)")
    p.add_argument("--warmup", type=int, help="warm-up steps (training and forward)")
    p.add_argument("--min-time", type=float, help="time at least this many seconds per block (more steps)")
    p.add_argument("--rounds", type=int, help="interleaved timing rounds per group (medians)")
    p.add_argument("--time-budget", type=float, help="seconds; rows that would start past it are skipped")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    p.add_argument("--flush-denormal", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.set_flush_denormal(True); default: on for a CPU device, as train.py does. Early "
                        "in training the gains of the zero-initialised WN layers are ~0, so the other layers' "
                        "gradients are ~1e-20 and Adam's second moments are denormal numbers, 10-100× slower on "
                        "x86 CPUs (not on GPUs); --no-flush-denormal measures that")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-results", help="writes OUT.json and OUT.md")
    p.add_argument("--dry-run", action="store_true", help="print the configurations in order and exit")
    return p


DEFAULTS = dict(models=["DiT-XS/2:16"], switches=["none", "all"], precisions=["tf32"], compile="off",
                batch_size=256, steps=20, warmup=5, min_time=0.0, rounds=1, time_budget=None, device=None)


def resolve(args) -> argparse.Namespace:
    preset = PRESETS.get(args.preset, {}) if args.preset else {}
    explicit_plan = any(getattr(args, k) is not None for k in ("models", "precisions", "compile"))
    for key, default in DEFAULTS.items():
        if getattr(args, key) is None:
            value = preset.get(key, default)
            setattr(args, key, default if value is None else value)
    args.rows_plan = None if explicit_plan else preset.get("rows")
    if args.steps < 1 or args.warmup < 1 or args.rounds < 1 or args.batch_size < 1:
        raise SystemExit("error: --steps, --warmup, --rounds and --batch-size must be at least 1")
    return args


def main(argv=None) -> int:
    args = resolve(build_parser().parse_args(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    if args.flush_denormal is None:
        args.flush_denormal = device.type == "cpu"  # train.py flushes denormals when it trains on a CPU
    if args.flush_denormal and not torch.set_flush_denormal(True):
        args.flush_denormal = False
        print("warning: flushing denormals is not supported on this CPU", flush=True)
    specs = build_specs(args)
    if args.dry_run:
        for s in specs:
            print(s.describe())
        print(f"{len(specs)} configurations; batch {args.batch_size}, warm-up {args.warmup}, timed {args.steps}+ "
              f"(min {args.min_time:g} s), rounds {args.rounds}, budget {args.time_budget}, device {device}")
        return 0
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))  # many models, one forward
    t0 = time.perf_counter()
    print(f"{len(specs)} configurations on {device_name(device)}, torch {torch.__version__}, batch "
          f"{args.batch_size}" + (f", budget {args.time_budget:.0f} s" if args.time_budget else ""), flush=True)

    rows, skipped = [], []
    # Groups: consecutive configurations of one (model, precision, compile), e.g. none and all. The budget
    # is checked for a whole group before it starts, so that its all/none ratio is not cut in half.
    todo = [list(g) for _, g in itertools.groupby(specs, key=lambda s: s.group)]

    def skip(s, elapsed, cost):
        skipped.append(f"{s.describe()} (at {elapsed:.0f} s, estimated {cost:.0f} s more)")
        print(f"skip  {s.describe()}: {elapsed:.0f} s spent, about {cost:.0f} s more needed", flush=True)

    def report(new):
        for r in new:
            if "error" in r:
                print(f"  FAILED {r['model']} [{r['switches']}] {r['precision']}: {r['error']}", flush=True)
            else:
                print(f"  {r['model']} [{r['switches']}] {r['precision']} compile {compile_label(r)}: "
                      f"train {r['train_img_s']:,.0f} img/s ({r['train_step_ms']:.1f} ms/step), "
                      f"fwd {r['fwd_img_s']:,.0f} img/s, peak {fmt(r.get('train_peak_gib'), '{:.2f}')} GiB, "
                      f"first step {r['first_train_step_s']:.1f} s, row {r['row_s']:.0f} s", flush=True)
        rows.extend(new)

    for group in todo:
        elapsed = time.perf_counter() - t0
        if args.time_budget is not None:
            cost = sum(estimate_s(s, rows, args) for s in group)
            if args.rounds > 1:
                cost *= 1 + args.rounds / 4
            if elapsed + cost > args.time_budget:
                for s in group:
                    skip(s, elapsed, cost)
                continue
        if args.rounds > 1:
            for s in group:
                print(f"run   {s.describe()}", flush=True)
            report(run_interleaved(group, args, device))
            continue
        for s in group:
            elapsed = time.perf_counter() - t0
            if args.time_budget is not None and elapsed > args.time_budget:
                skip(s, elapsed, estimate_s(s, rows, args))
                continue
            print(f"run   {s.describe()}", flush=True)
            report([run_sequential(s, args, device)])

    ratios = ratio_rows(rows)
    note = None
    if device.type == "cpu":
        note = ("CPU timings: memory is not measured (n/a); the ratios, not the absolute numbers, are what "
                "this run is for; a shared machine adds noise (see the per-round values in the JSON). "
                + ("Denormals flushed to zero (torch.set_flush_denormal), as train.py does on a CPU."
                   if args.flush_denormal else "Denormals not flushed (--no-flush-denormal): the early-training "
                   "transient of denormal Adam moments is included."))
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "python": sys.version.split()[0], "device": str(device), "device_name": device_name(device),
            "threads": torch.get_num_threads(), "commit": commit(), "argv": sys.argv[1:] if argv is None else argv,
            "args": {k: v for k, v in vars(args).items() if k != "rows_plan"}, "reference": REFERENCE_NOTE,
            "skipped": skipped, "total_s": time.perf_counter() - t0, "note": note,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "flush_denormal": args.flush_denormal}
    result = {"meta": meta, "rows": rows, "ratios": ratios}
    out = args.out
    for suffix in (".json", ".md"):
        out = out[: -len(suffix)] if out.endswith(suffix) else out
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=2, default=str)
    text = markdown(result)
    with open(out + ".md", "w") as f:
        f.write(text)
    print()
    print(text)
    print(f"wrote {out}.json and {out}.md")
    failed = [r for r in rows if "error" in r]
    return 1 if failed and len(failed) == len(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
