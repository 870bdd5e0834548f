"""How many tensor operations one forward and backward of a model runs, per switch set.

In eager mode on a GPU every operation is one kernel launched from Python; for the small models the
launches, not the arithmetic, bound the step (see profile_step.py). This counts the operations that
compute something (views, reshapes and dtype queries excluded), with a dispatch mode on the CPU, so
the count is exact and the same on every machine. The table lists each operation whose count differs
between the first switch set and the others. On a CPU the speed layer reads each weight-normalised group of
weights from one shared storage; a GPU concatenates them, one operation per group of several layers more.

    python -m benchmarks.count_ops                                  # DiT-XS/2, none vs all eight
    python -m benchmarks.count_ops --model DiT-S/4 --switches none use_weight_normalization all
    python -m benchmarks.count_ops --switches none all all:scale+rotation+gate   # SET:MODULATION
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

if __name__ == "__main__" and not __package__:  # (run as a file, the repository root is not importable)
    print("error: run it from the repository root as a module: python -m benchmarks.count_ops", file=sys.stderr)
    sys.exit(2)

from benchmarks import core  # noqa: E402
from fast_paths import apply_fast_paths  # noqa: E402
from models import MODEL_NAMES, build_model  # noqa: E402
from mp_layers import MPConfig  # noqa: E402

# Operations that only reinterpret memory or metadata: no kernel on a GPU.
NOT_COMPUTE = {"detach", "view", "_unsafe_view", "t", "transpose", "permute", "unsqueeze", "squeeze", "expand",
               "split", "split_with_sizes", "unbind", "select", "slice", "as_strided", "alias", "_reshape_alias",
               "reshape", "chunk", "empty", "empty_like", "promote_types", "is_same_size", "lift_fresh"}


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name not in NOT_COMPUTE:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def switch_set(name: str) -> MPConfig:
    """A switch set as bench.py reads it (none, all, or switch names joined by +), optionally followed by
    :MODULATION (e.g. all:scale+rotation+gate)."""
    switches, _, modulation = name.partition(":")
    sets = core.parse_switches([switches])
    if len(sets) != 1:
        raise SystemExit(f"error: {name!r} names {len(sets)} switch sets; give each one on its own")
    return dataclasses.replace(sets[0][1], modulation=modulation) if modulation else sets[0][1]


def count_ops(model_name: str, mp: MPConfig, batch: int = 2, size: int = 16, channels: int = 4) -> collections.Counter:
    """Operations of one training-mode forward and backward (the second one: the first builds caches)."""
    torch.manual_seed(0)
    model = apply_fast_paths(build_model(model_name, in_channels=channels, input_size=size, num_classes=10, mp=mp))
    x, t, y = torch.randn(batch, channels, size, size), torch.randint(0, 1000, (batch,)), torch.randint(0, 10, (batch,))
    model(x, t, y).square().mean().backward()
    model.zero_grad(set_to_none=True)  # as train.py: no gradient accumulation ops
    with _Count() as counter:
        model(x, t, y).square().mean().backward()
    return counter.counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.count_ops", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-XS/2", choices=MODEL_NAMES, metavar="NAME")
    p.add_argument("--switches", nargs="+", default=["none", "all"],
                   help="none, all, or switch names joined by + (e.g. use_weight_normalization+use_mp_silu), each "
                        "optionally with :MODULATION (e.g. all:scale+rotation+gate)")
    args = p.parse_args(argv)
    counts = {s: count_ops(args.model, switch_set(s)) for s in args.switches}
    base = args.switches[0]
    print(f"{args.model}, one forward and backward, batch 2, on the CPU\n")
    print("| switches | operations | vs " + base + " |\n| --- | --- | --- |")
    for s, c in counts.items():
        print(f"| {s} | {sum(c.values())} | {sum(c.values()) - sum(counts[base].values()):+d} |")
    names = sorted({n for c in counts.values() for n in c}, key=lambda n: (-max(abs(c[n] - counts[base][n]) for c in counts.values()), n))
    print("\n| operation | " + " | ".join(args.switches) + " |\n|" + " --- |" * (len(args.switches) + 1))
    for n in names:
        if any(c[n] != counts[base][n] for c in counts.values()):
            print(f"| {n} | " + " | ".join(str(c[n]) for c in counts.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
