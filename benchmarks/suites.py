"""What bench.py runs and in which order: presets, the plan of configurations, interleaved rounds, and a
time budget checked per group of configurations."""
from __future__ import annotations

import itertools
import time
import traceback

from benchmarks import core
from benchmarks.report import compile_label, fmt
from models import MODEL_SIZES

PRESETS = {
    # The CPU check: the all-eight step time against none, eager and compiled (inductor's C++ backend), and
    # compiled against eager. Short blocks (2 steps), alternated 11 times: on a shared machine, load bursts
    # then hit every row alike.
    "cpu": dict(models=["DiT-XS/2:16"], switches=["none", "all"], precisions=["fp32"], compile="both",
                batch_size=32, warmup=2, steps=2, rounds=11, min_time=0.0, device="cpu"),
    # The GPU set: eager rows first, then bf16 + torch.compile (B/2 first: it has a vanilla-DiT
    # reference). Fits ~6 minutes on an H100 with compile; --time-budget guards the rest.
    "gpu": dict(models=["DiT-XS/2:16", "DiT-S/4:16", "DiT-B/2:32"], switches=["none", "all"],
                precisions=None, compile=None, batch_size=256, warmup=3, steps=10, rounds=1, min_time=1.0,
                time_budget=320.0,
                rows=[("tf32", False, ["DiT-XS/2:16", "DiT-S/4:16", "DiT-B/2:32"]),
                      ("bf16", False, ["DiT-XS/2:16", "DiT-S/4:16", "DiT-B/2:32"]),
                      ("bf16", True, ["DiT-B/2:32", "DiT-XS/2:16", "DiT-S/4:16"])]),
}


def build_specs(args) -> list[core.Spec]:
    """Every configuration, in order: a preset's explicit rows, or compile × precision × model × switches."""
    switches = core.parse_switches(args.switches)
    if args.rows_plan is not None:
        plan = args.rows_plan
    else:
        compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
        plan = [(prec, comp, args.models) for comp in compiles for prec in args.precisions]
    specs = []
    for prec, comp, models in plan:
        for m in models:
            name, size, channels = core.parse_model(m)
            for label, mp in switches:
                specs.append(core.Spec(name, size, channels, label, mp, prec, comp))
    return specs


def run_interleaved(specs: list[core.Spec], args, device) -> list[dict]:
    """All configurations of a group alive at once; timed blocks alternate (ABBA…), medians reported.

    Peak memory on CUDA: the group's other configurations sit idle with a constant footprint (weights,
    gradients, Adam moments, EMAs), measured after their warm-up and subtracted."""
    rows = [core.base_row(s, args, device) for s in specs]
    benches: list[core.Bench | None] = [None] * len(specs)
    start = time.perf_counter()
    core.free_memory(device, reset_dynamo=any(s.compile for s in specs))
    resident = [0] * len(specs)

    def fail(i, e):
        rows[i]["error"] = core.error_text(e)
        rows[i]["traceback"] = traceback.format_exc(limit=6)
        if benches[i] is not None:
            benches[i].close()
        benches[i] = None
        core.free_memory(device, reset_dynamo=False)

    for i, spec in enumerate(specs):
        try:
            before = core.resident_bytes(device)
            benches[i] = core.Bench(spec, args, device)
            core.warm_up(benches[i], args, rows[i])
            resident[i] = core.resident_bytes(device) - before
        except Exception as e:  # noqa: BLE001 - one failed configuration must not stop the others
            fail(i, e)
    live = [i for i in range(len(specs)) if benches[i] is not None]
    # Every configuration times the same number of steps per block (the largest asked for).
    n_train = max([rows[i]["train_steps_timed"] for i in live], default=args.steps)
    n_fwd = max([rows[i]["fwd_steps_timed"] for i in live], default=args.steps)
    times = {i: ([], []) for i in live}
    peaks = {i: [0, 0] for i in live}
    for r in range(args.rounds):
        for i in live if r % 2 == 0 else live[::-1]:
            b = benches[i]
            if b is None:
                continue
            rows[i]["train_steps_timed"], rows[i]["fwd_steps_timed"] = n_train, n_fwd
            others = sum(resident[j] for j in live if j != i and benches[j] is not None)
            try:
                compiled_before = core.compilations()
                for k, (run, n) in enumerate(((b.train_steps, n_train), (b.forward_steps, n_fwd))):
                    core.peak_reset(device)
                    times[i][k].append(run(n))
                    p = core.peak_bytes(device)
                    peaks[i][k] = max(peaks[i][k], (p - others) if p is not None else 0)
                rows[i]["compiled_while_timed"] = (rows[i].get("compiled_while_timed", 0)
                                                   + core.compilations() - compiled_before)
            except Exception as e:  # noqa: BLE001
                fail(i, e)
    for i in live:
        if "error" not in rows[i]:
            cuda = device.type == "cuda"
            rows[i]["train_peak_gib"] = core.gib(peaks[i][0]) if cuda else None
            rows[i]["fwd_peak_gib"] = core.gib(peaks[i][1]) if cuda else None
            core.finish_row(rows[i], benches[i], *times[i])
            rows[i]["rounds"] = args.rounds
    for b in benches:
        if b is not None:
            b.close()
    benches = None
    core.free_memory(device, reset_dynamo=any(s.compile for s in specs))
    elapsed = time.perf_counter() - start
    for row in rows:
        row["row_s"] = elapsed / len(rows)
    return rows


def depth(model: str) -> int:
    return MODEL_SIZES[model.removeprefix("DiT-").split("/")[0]][0]


def estimate_s(spec: core.Spec, done: list[dict]) -> float:
    """Rough cost of a row from the rows measured so far. Compiling dominates compiled rows and grows
    about linearly with depth (on an H200: DiT-XS/2 ~25 s a row, S/4 ~40 s, B/2 ~45 s, train + eval)."""
    same = [r for r in done if "row_s" in r and r["compile"] == spec.compile and "error" not in r]
    like = [r["row_s"] for r in same if r["model"] == spec.model and r["size"] == spec.size]
    if like:
        return max(like)
    if spec.compile:
        scaled = [r["row_s"] * (depth(spec.model) + 2) / (depth(r["model"]) + 2) for r in same]
        return max(scaled) if scaled else 4.0 * (depth(spec.model) + 2)
    return 10.0


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        if "error" in r:
            print(f"  FAILED {r['model']} [{r['switches']}] {r['precision']}: {r['error']}", flush=True)
        else:
            print(f"  {r['model']} [{r['switches']}] {r['precision']} compile {compile_label(r)}: "
                  f"train {r['train_img_s']:,.0f} img/s ({r['train_step_ms']:.1f} ms/step), "
                  f"fwd {r['fwd_img_s']:,.0f} img/s, peak {fmt(r.get('train_peak_gib'), '{:.2f}')} GiB, "
                  f"first step {r['first_train_step_s']:.1f} s, row {r['row_s']:.0f} s"
                  + (f"; {r['compiled_while_timed']} graph(s) compiled while timed: the times include them"
                     if r.get("compiled_while_timed") else ""), flush=True)


def run_all(specs: list[core.Spec], args, device) -> tuple[list[dict], list[str]]:
    """Runs the configurations group by group (consecutive ones of one model, precision and compile, e.g.
    none and all). The budget is checked for a whole group before it starts, so that its all/none ratio
    is not cut in half. Returns the rows and the descriptions of the skipped configurations."""
    rows, skipped = [], []
    t0 = time.perf_counter()

    def skip(s, elapsed, cost):
        skipped.append(f"{s.describe()} (at {elapsed:.0f} s, estimated {cost:.0f} s more)")
        print(f"skip  {s.describe()}: {elapsed:.0f} s spent, about {cost:.0f} s more needed", flush=True)

    def done(new):
        print_rows(new)
        rows.extend(new)

    for _, group in itertools.groupby(specs, key=lambda s: s.group):
        group = list(group)
        elapsed = time.perf_counter() - t0
        if args.time_budget is not None:
            cost = sum(estimate_s(s, rows) for s in group)
            if args.rounds > 1:
                cost *= 1 + args.rounds / 4
            if elapsed + cost > args.time_budget:
                for s in group:
                    skip(s, elapsed, cost)
                continue
        if args.rounds > 1:
            for s in group:
                print(f"run   {s.describe()}", flush=True)
            done(run_interleaved(group, args, device))
            continue
        for s in group:
            elapsed = time.perf_counter() - t0
            if args.time_budget is not None and elapsed > args.time_budget:
                skip(s, elapsed, estimate_s(s, rows))
                continue
            print(f"run   {s.describe()}", flush=True)
            done([core.measure(s, args, device)])
    return rows, skipped
