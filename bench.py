"""Training and sampling throughput of MaP-DiT for one model, switch set, precision and compile setting.

The training step is train.py's, with random latents: the DiT hybrid loss (diffusion.training_losses with
random t, noise and labels, label dropout), backward, Adam (fused on CUDA), the lr schedule, the forced-WN
projection `project_forced_weights_()` and the update of two power EMAs (σ_rel 0.05, 0.10); no data loader.
"fwd" is one forward pass in eval mode under no_grad (the cost of one sampling step per image, CFG off).
Peak memory is torch.cuda.max_memory_allocated over the timed training steps ("train GiB"), and over the
forward passes with the training state still resident ("fwd GiB"); n/a on a CPU.

Examples
    python bench.py --preset cpu            # DiT-XS/2 on 4×16×16, batch 32, fp32: none vs all, interleaved
    python bench.py --preset gpu            # the GPU set (~6 min on an H100, compile included)
    python bench.py --models DiT-XS/2:16 DiT-S/4:16 DiT-B/2:32 --switches none all --precisions tf32 bf16 \\
        --compile both --batch-size 256 --steps 20 --warmup 5
    python bench.py --models DiT-XS/2:16 --switches none each all --precisions fp32 --device cpu --batch-size 8

--models NAME:SIZE[:CHANNELS] (latent CHANNELS×SIZE×SIZE, channels 4 by default). --switches takes none,
all, each (the eight switches one at a time), a switch name (cosine_attention or use-cosine-attention) or
several joined by '+'. --rounds N > 1 builds every switch set and compile setting of a (model, precision)
group, then alternates their timed blocks N times (order reversed every other round) and reports medians:
use it on a noisy machine. With --compile both the report adds each switch set's compiled ÷ eager step time.
A compiled row counts the graphs compiled inside its timed steps (0 unless something recompiles, e.g. on
switching between training and sampling) and the report flags any row whose times include compilation. --time-budget S skips the groups that would end past S seconds (estimated from the
rows measured so far) and lists them; a failed row (OOM, compile error) is reported and the run goes on.
--dry-run lists the configurations. On a CPU, denormals are flushed to zero as train.py does there
(--no-flush-denormal keeps them). Results go to OUT.json and OUT.md (--out, default bench-results).

One configuration and its measurement are in benchmarks/core.py, the presets, the interleaved rounds and the
time budget in benchmarks/suites.py, the reports in benchmarks/report.py, and the reference figures of the
GPU tables in benchmarks/reference.py.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time

import torch
import torch._dynamo

from benchmarks import reference, report, suites
from benchmarks.core import device_name
from cli import Parser
from config import COMPILE_MODES

# ----------------------------------------------------------------------------------------------------
# Command line.


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__)
    p.add_argument("--preset", choices=["cpu", "gpu"], help="a ready-made set (explicit options override it)")
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


def resolve(args, presets: dict) -> argparse.Namespace:
    preset = presets.get(args.preset, {}) if args.preset else {}
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
    args = resolve(build_parser().parse_args(argv), suites.PRESETS)
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
    specs = suites.build_specs(args)
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
    rows, skipped = suites.run_all(specs, args, device)
    for row in rows:
        reference.add_reference(row)

    note = None
    if device.type == "cpu":
        note = ("CPU timings: memory is not measured (n/a); the ratios, not the absolute numbers, are what "
                "this run is for; a shared machine adds noise (see the per-round values in the JSON). "
                + ("Denormals flushed to zero (torch.set_flush_denormal), as train.py does on a CPU."
                   if args.flush_denormal else "Denormals not flushed (--no-flush-denormal): the early-training "
                   "transient of denormal Adam moments is included."))
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "python": sys.version.split()[0], "device": str(device), "device_name": device_name(device),
            "threads": torch.get_num_threads(), "commit": report.commit(),
            "argv": sys.argv[1:] if argv is None else argv,
            "args": {k: v for k, v in vars(args).items() if k != "rows_plan"}, "reference": reference.NOTE,
            "skipped": skipped, "total_s": time.perf_counter() - t0, "note": note,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "flush_denormal": args.flush_denormal}
    result = {"meta": meta, "rows": rows, "ratios": report.ratio_rows(rows),
              "compile_ratios": report.compile_ratio_rows(rows)}
    text, out = report.write(result, args.out)
    print()
    print(text)
    print(f"wrote {out}.json and {out}.md")
    failed = [r for r in rows if "error" in r]
    return 1 if failed and len(failed) == len(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
