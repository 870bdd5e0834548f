"""Pictures of a run: the loss curve and the magnitudes of activations and weights over training.

python plots.py RUN                                         # RUN/magnitudes.png (again)
python plots.py RUN_A RUN_B ... [--out magnitudes.png]      # magnitudes of runs side by side
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from atomic import atomic_path  # noqa: E402
from cli import Parser  # noqa: E402
from logs import format_rates, read_jsonl  # noqa: E402
from mp_layers import MPConfig  # noqa: E402


def save_figure(fig, path: str) -> None:
    """Atomic PNG write (a reader never sees half a picture)."""
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)


def run_label(run_dir: str) -> str:
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            config = json.load(f)
        mp = MPConfig.from_dict(config["mp"]).describe()
        return f"{os.path.basename(os.path.normpath(run_dir))}: {mp}, {run_rates(config)}"
    except (OSError, KeyError, ValueError):
        return os.path.basename(os.path.normpath(run_dir))


def run_rates(config: dict) -> str:
    """The learning rates the run's parameters train at, as its step lines show them: config.json's
    "learning_rates" (only the kinds of parameters the model has); a run written before it existed
    shows both of its options' rates."""
    rates = config.get("learning_rates")
    if not isinstance(rates, dict):
        args = config["args"]
        rates = {"lr": args["lr"], "mp_lr": args.get("mp_lr") or args["lr"]}
    return format_rates(rates)


def plot_loss(run_dir: str, out: str | None = None) -> str | None:
    """The run's loss curve (RUN/loss.png by default); None while it has no records."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not read_jsonl(path):
        return None
    return plot_loss_curves([path], [None], out or os.path.join(run_dir, "loss.png"), title=run_label(run_dir))


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_records(path: str, fields: dict[str, str]) -> list[dict]:
    """The records of a JSON-lines log, each checked to have `fields` ({name: "number" or "list"}: a list of
    finite numbers as long as the first record's); a record that has not is a ValueError naming its line."""
    records = read_jsonl(path)
    for i, r in enumerate(records):
        for name, kind in fields.items():
            v = r.get(name)
            ok = (_is_number(v) if kind == "number" else
                  isinstance(v, list) and len(v) == len(records[0].get(name) or []) > 0 and all(map(_is_number, v)))
            if not ok:
                raise ValueError(f"{path}: record {i + 1} has no valid {name!r} (a {kind} of finite numbers, "
                                 f"as train.py writes); delete that line or the file")
    return records


def plot_magnitudes(run_dirs: list[str], out: str) -> str:
    """One column per run: activation RMS leaving each block (top), and the RMS of each block's weights
    relative to its first record (bottom: 1 = unchanged, so plain and normalised weights compare)."""
    fields = {"step": "number", "act_rms": "list", "weight_rms": "list"}
    runs = [(d, read_records(os.path.join(d, "magnitudes.jsonl"), fields)) for d in run_dirs]
    missing = [d for d, records in runs if not records]
    if missing:
        raise FileNotFoundError(f"no magnitudes.jsonl records in {', '.join(missing)}")
    fig, axes = plt.subplots(2, len(runs), figsize=(5 * len(runs), 6.5), squeeze=False, sharex="col")
    for col, (run_dir, records) in enumerate(runs):
        steps = [r["step"] for r in records]
        depth = len(records[0]["act_rms"])
        colors = plt.cm.viridis([i / max(1, depth - 1) for i in range(depth)])
        for key, row, ylabel in (("act_rms", 0, "activation RMS leaving block"),
                                 ("weight_rms", 1, "weight RMS of block / at first record")):
            ax = axes[row, col]
            curves = []
            for b in range(depth):
                first = (records[0][key][b] or 1.0) if row == 1 else 1.0  # (a block without weights: RMS 0)
                curves.append([r[key][b] / first for r in records])
                ax.plot(steps, curves[-1], color=colors[b], lw=1.2, label=f"block {b + 1}")
            ax.set_ylabel(ylabel)
            ax.set_yscale("log" if row == 0 else "linear")
            ax.grid(alpha=0.3)
            mark_if_constant(ax, curves)
        axes[0, col].set_title(run_label(run_dir), fontsize=9)
        axes[1, col].set_xlabel("step")
    axes[0, -1].legend(fontsize=7, loc="best")
    # Same y-range across runs so that flat and drifting curves compare at a glance.
    for row in range(2):
        lo = min(a.get_ylim()[0] for a in axes[row])
        hi = max(a.get_ylim()[1] for a in axes[row])
        for a in axes[row]:
            a.set_ylim(lo, hi)
    save_figure(fig, out)
    return out


ROUND_OFF = 1e-6  # relative changes below this are float round-off, not a signal


def mark_if_constant(ax, curves: list[list[float]]) -> bool:
    """Where every curve stays within ROUND_OFF (relative) of its first value, as the weights of forced weight
    normalisation do, the axis is widened to ±10 % so the lines are flat, and says so; otherwise matplotlib
    would zoom into the round-off (an axis of 1e-8 + 1) and draw it as if it were a signal."""
    values = [v for c in curves for v in c]
    change = max((abs(v - c[0]) / abs(c[0]) for c in curves for v in c if c[0]), default=0.0)
    if not values or change > ROUND_OFF:
        return False
    centre = sum(values) / len(values)
    ax.set_ylim(centre * 0.9, centre * 1.1) if centre > 0 else ax.set_ylim(-1, 1)
    ax.ticklabel_format(axis="y", useOffset=False, style="plain") if ax.get_yscale() == "linear" else None
    ax.text(0.5, 0.5, f"constant to round-off (largest relative change {change:.1e})", transform=ax.transAxes,
            ha="center", va="center", fontsize=8, color="0.3")
    return True


def plot_loss_curves(metrics_files: list[str], labels: list[str | None], out: str, title: str | None = None) -> str:
    """Loss curves of several metrics.jsonl files in one picture (e.g. fp32 vs bf16)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for path, label in zip(metrics_files, labels):
        records = read_records(path, {"step": "number", "loss": "number"})
        if not records:
            raise FileNotFoundError(f"no records in {path}")
        ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1.2, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mse + vb)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    if any(labels):
        ax.legend()
    save_figure(fig, out)
    return out


FID_FIELDS = {"step": "number", "fid": "number"}


def plot_fid_curves(run_dirs: list[str], out: str, labels: list[str] | None = None) -> str:
    """FID over training of runs trained with --eval-every (RUN/fid_during_training.jsonl), one line each."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, run_dir in enumerate(run_dirs):
        records = read_records(os.path.join(run_dir, "fid_during_training.jsonl"), FID_FIELDS)
        if not records:
            raise FileNotFoundError(f"no fid_during_training.jsonl records in {run_dir}")
        label = labels[i] if labels else (run_label(run_dir) if len(run_dirs) > 1 else None)
        ax.plot([r["step"] for r in records], [r["fid"] for r in records], "o-", ms=3, lw=1.2, label=label)
        last = records[-1]
    ax.set_xlabel("step")
    ax.set_ylabel(f"FID ({last['num_samples']} samples, {last['sampler']} {last['num_sampling_steps']})")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.set_title(run_label(run_dirs[0]) if len(run_dirs) == 1 else "FID during training", fontsize=9)
    if len(run_dirs) > 1:
        ax.legend(fontsize=7)
    save_figure(fig, out)
    return out


def plot_fid_bands(groups: list[tuple[str, list[list[tuple[int, float]]]]], out: str, title: str = "") -> str:
    """One line per group (the mean over its runs of FID at each step) and a band of ± one standard
    deviation over the runs (ddof 1; none for a single run). `groups`: (label, [[(step, fid), ...] per run])."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, curves in groups:
        steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves))) if curves else []
        if not steps:
            continue
        by_run = [dict(c) for c in curves]
        values = [[run[s] for run in by_run] for s in steps]
        mean = [sum(v) / len(v) for v in values]
        line, = ax.plot(steps, mean, "o-", ms=3, lw=1.4, label=f"{label} (n={len(curves)})")
        if len(curves) > 1:
            std = [math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) for v, m in zip(values, mean)]
            ax.fill_between(steps, [max(m - s, 1e-3) for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel("step")
    ax.set_ylabel("FID (mean over seeds; band ± 1 std)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=7, wrap=True)
    save_figure(fig, out)
    return out


def main(argv=None) -> int:
    p = Parser(description=__doc__)
    p.add_argument("runs", nargs="*", help="run folders written by train.py")
    p.add_argument("--out", default=None,
                   help="the picture (default: RUN/magnitudes.png for one run, ./magnitudes.png for several)")
    p.add_argument("--loss-curves", nargs="+", metavar="METRICS_JSONL",
                   help="instead: plot the loss of these metrics.jsonl files together (label = file name)")
    args = p.parse_args(argv)
    try:
        if args.loss_curves:
            labels = [os.path.splitext(os.path.basename(f))[0] for f in args.loss_curves]
            print(f"wrote {plot_loss_curves(args.loss_curves, labels, args.out or 'loss_curves.png')}")
            return 0
        if not args.runs:
            raise FileNotFoundError("give run folders, or --loss-curves files")
        for run in args.runs:
            if not os.path.isdir(run):
                raise FileNotFoundError(f"run folder not found: {run}")
        out = args.out or (os.path.join(args.runs[0], "magnitudes.png") if len(args.runs) == 1 else "magnitudes.png")
        print(f"wrote {plot_magnitudes(args.runs, out)}")
    except (ValueError, OSError) as e:  # OSError: missing files, an unwritable --out, a full disk
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
