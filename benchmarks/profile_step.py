"""Where a training step's time goes: kernel count, device time and host wall time per step.

Runs bench.py's training step (the same loss, backward, Adam, forced WN and EMA update) for each switch
set, then records a few steps with torch.profiler and prints, per switch set:
  wall ms/step    host wall time per step (synchronised at the ends);
  device ms/step  the summed time of the device kernels (CUDA only; on a CPU the summed operator time);
  kernels/step    how many device kernels one step launches;
and the kernels that differ most in count between the switch sets. When wall time is well above device
time, the step is bound by launching kernels, not by computing them: fewer kernels or CUDA graphs
(--compile-mode reduce-overhead) is then what makes it faster.

    python -m benchmarks.profile_step --model DiT-S/4:16 --precision bf16 --compile on
    python -m benchmarks.profile_step --model DiT-XS/2:8 --device cpu --batch-size 8   # smoke test
"""
from __future__ import annotations

import argparse
import collections
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

if __name__ == "__main__" and not __package__:  # (run as a file, the repository root is not importable)
    print("error: run it from the repository root as a module: python -m benchmarks.profile_step", file=sys.stderr)
    sys.exit(2)

from benchmarks import core  # noqa: E402
from config import COMPILE_MODES  # noqa: E402


def profile_switch_set(spec: core.Spec, args, device: torch.device) -> dict:
    b = core.Bench(spec, args, device)
    b.train_steps(args.warmup)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        wall = b.train_steps(args.steps)
    counts, times = collections.Counter(), collections.Counter()
    for e in prof.events():
        on_device = e.device_type == torch.autograd.DeviceType.CUDA if cuda else e.cpu_parent is None
        if on_device:
            counts[e.name] += 1
            times[e.name] += e.device_time if cuda else e.cpu_time
    # Timing outside the profiler too: the profiler itself adds host overhead.
    plain_wall = b.train_steps(args.steps)
    b.close()
    core.free_memory(device, reset_dynamo=spec.compile)
    n = args.steps
    return {"switches": spec.switches, "wall_ms": 1e3 * plain_wall / n, "profiled_wall_ms": 1e3 * wall / n,
            "device_ms": sum(times.values()) / 1e3 / n, "kernels": sum(counts.values()) / n,
            "counts": {k: v / n for k, v in counts.items()}, "times_us": {k: v / n for k, v in times.items()}}


def short(name: str, width: int = 70) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-S/4:16", help="NAME:SIZE[:CHANNELS] as in bench.py")
    p.add_argument("--switches", nargs="+", default=["none", "all"], help="as in bench.py")
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="bf16")
    p.add_argument("--compile", choices=["off", "on"], default="on")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="profiled steps")
    p.add_argument("--top", type=int, default=12, help="kernels listed per comparison")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    if min(args.warmup, args.steps, args.batch_size) < 1:
        raise SystemExit("error: --warmup, --steps and --batch-size must be at least 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.seed, args.lr = 0, 1e-4  # what core.Bench reads
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # as train.py and bench.py do on a CPU
    name, size, channels = core.parse_model(args.model)
    specs = [core.Spec(name, size, channels, label, mp, args.precision, args.compile == "on")
             for label, mp in core.parse_switches(args.switches)]
    mode = f", mode {args.compile_mode}" if args.compile == "on" else ""
    print(f"{args.model} on {core.device_name(device)}, torch {torch.__version__}, batch {args.batch_size}, "
          f"{args.precision}, compile {args.compile}{mode}", flush=True)
    t0 = time.perf_counter()
    results = [profile_switch_set(s, args, device) for s in specs]
    unit = "device" if device.type == "cuda" else "operator (CPU)"
    print(f"\n| switches | wall ms/step | {unit} ms/step | kernels/step | wall ms/step under the profiler |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['switches']} | {r['wall_ms']:.2f} | {r['device_ms']:.2f} | {r['kernels']:.0f} | "
              f"{r['profiled_wall_ms']:.2f} |")
    base = results[0]
    for r in results[1:]:
        names = set(base["counts"]) | set(r["counts"])
        diff = sorted(names, key=lambda k: -abs(r["counts"].get(k, 0) - base["counts"].get(k, 0)))[: args.top]
        print(f"\nKernels per step, {r['switches']} vs {base['switches']} (largest count differences):\n")
        print(f"| kernel | {base['switches']} | {r['switches']} | {r['switches']} µs |")
        print("| --- | --- | --- | --- |")
        for k in diff:
            print(f"| {short(k)} | {base['counts'].get(k, 0):.0f} | {r['counts'].get(k, 0):.0f} | "
                  f"{r['times_us'].get(k, 0):.0f} |")
    for r in results:
        top = sorted(r["times_us"], key=lambda k: -r["times_us"][k])[: args.top]
        print(f"\nLongest kernels per step, {r['switches']}: "
              + "; ".join(f"{short(k, 50)} {r['times_us'][k]:.0f} µs ×{r['counts'][k]:.0f}" for k in top))
    print(f"\n{time.perf_counter() - t0:.0f} s in all", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
