"""One-command ablation: a ladder of MP configurations trained with the same budget, each at a small grid
of learning rates, then sampled and scored with FID.

python ablate.py --out-dir ablation-cpu                                   # small CPU budget on the digits
python ablate.py --out-dir abl --data-path mnist --num-steps 20000 --batch-size 256 --nproc 8 \
    --fid-samples 10000 --fid-steps 250 --sampler ddpm                     # a real GPU budget

Rungs (cumulative): none; + weight normalisation; + forced WN; + MP residual, SiLU, embedding and
positional encoding; + cosine attention; + no layer norm (all eight switches).

Fair learning rates: weight-normalised layers want ~100× the lr of plain ones (docs/design.md), so each rung
is trained at `--lr-grid` multiples of its own base (1e-4 without weight normalisation, 1e-2 with it);
`--lr X` forces one value everywhere. The table reports the best lr of each rung (lowest FID) and the FID
at every lr tried. Finished runs and FIDs are reused and unfinished runs resumed, so the command can be
re-run after an interruption, or with more rungs or learning rates.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from atomic import atomic_write_text  # noqa: E402
from models import count_parameters  # noqa: E402
from eval.fid import FIDError  # noqa: E402
from plots import save_figure  # noqa: E402
from runs import list_checkpoints, load_run_config, model_from_config, read_jsonl  # noqa: E402

REPO = os.path.dirname(os.path.abspath(__file__))
MP_BASE_LR, PLAIN_BASE_LR = 1e-2, 1e-4
RUNGS = [  # (short name, flags added by this rung)
    ("none", []),
    ("+WN", ["--use-weight-normalization"]),
    ("+forced WN", ["--use-forced-weight-normalization"]),
    ("+MP res/SiLU/emb/pos", ["--use-mp-residual", "--use-mp-silu", "--use-mp-embedding", "--use-mp-pos-enc"]),
    ("+cosine attn", ["--use-cosine-attention"]),
    ("+no LN (all 8)", ["--use-no-layernorm"]),
]


def rung_flags(index: int) -> list[str]:
    return [flag for _, flags in RUNGS[: index + 1] for flag in flags]


def rung_lrs(index: int, args) -> list[float]:
    if args.lr is not None:
        return [args.lr]
    base = MP_BASE_LR if "--use-weight-normalization" in rung_flags(index) else PLAIN_BASE_LR
    return [float(f"{base * m:.3g}") for m in args.lr_grid]


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


def train_rung(args, index: int, lr: float) -> str:
    """Trains (or resumes, or reuses) one (rung, lr) run; returns its run folder."""
    results_dir = os.path.join(args.out_dir, "runs", f"rung{index}-lr{lr:g}")
    run = find_run(results_dir)
    if run is not None:
        steps = [s for s, _ in list_checkpoints(run)]
        if steps and steps[-1] >= args.num_steps:
            print(f"[ablate] rung {index} lr {lr:g}: finished run {run} reused", flush=True)
            return run
        if steps:
            cmd = command(args, "train.py", ["--resume", run, "--num-steps", str(args.num_steps)])
            print(f"[ablate] rung {index} lr {lr:g}: resuming {run} from step {steps[-1]}", flush=True)
            subprocess.run(cmd, check=True, cwd=REPO)
            return run
        shutil.rmtree(run)  # killed before its first checkpoint: nothing worth keeping
    train_args = ["--data-path", args.data_path, "--model", args.model, "--results-dir", results_dir,
                  "--num-steps", str(args.num_steps), "--batch-size", str(args.batch_size), "--lr", str(lr),
                  "--seed", str(args.seed), "--num-workers", str(args.num_workers),
                  "--log-every", str(max(1, args.num_steps // 20)), "--ckpt-every", str(args.num_steps),
                  "--ema-snapshot-every", str(args.ema_snapshot_every or max(1, args.num_steps // 25)),
                  "--precision", args.precision, *rung_flags(index)]
    if args.compile:
        train_args.append("--compile")
    print(f"[ablate] rung {index} ({RUNGS[index][0]}) lr {lr:g}: training", flush=True)
    subprocess.run(command(args, "train.py", train_args), check=True, cwd=REPO)
    return find_run(results_dir)


def reference_for(args, run: str) -> str:
    """The FID reference: --ref as given, or (auto) the built-in dataset's statistics computed once for the
    whole ablation in OUT_DIR/refs/ (as eval/sample_fid.py caches them)."""
    from eval.sample_fid import resolve_reference
    return resolve_reference(args.ref, load_run_config(run), args.out_dir)


def fid_of(args, run: str) -> float:
    """FID of a run with the ablation's sampling budget (reused when already computed)."""
    record_matches = lambda r: (r.get("num_samples") == args.fid_samples and r.get("sampler") == args.sampler
                                and r.get("num_sampling_steps") == args.fid_steps and r.get("cfg_scale") == args.cfg_scale)
    done = [r for r in read_jsonl(os.path.join(run, "fid", "fid.jsonl")) if record_matches(r)]
    if not done:
        fid_args = ["--result-dir", run, "--num-samples", str(args.fid_samples), "--num-sampling-steps",
                    str(args.fid_steps), "--sampler", args.sampler, "--cfg-scale", str(args.cfg_scale),
                    "--ref", reference_for(args, run)]
        subprocess.run(command(args, "eval/sample_fid.py", fid_args), check=True, cwd=REPO)
        done = [r for r in read_jsonl(os.path.join(run, "fid", "fid.jsonl")) if record_matches(r)]
    return float(done[-1]["fid"])


def summarize_run(run: str) -> dict:
    metrics = read_jsonl(os.path.join(run, "metrics.jsonl"))
    tail = metrics[-max(1, len(metrics) // 5):]  # mean over the last fifth: less noisy than one log line
    speeds = sorted(r["img_per_s"] for r in metrics[1:] or metrics)
    return {"final_loss": sum(r["loss"] for r in tail) / len(tail), "img_per_s": speeds[len(speeds) // 2],
            "params": count_parameters(model_from_config(load_run_config(run)))}


def write_report(args, rows: list[dict]) -> None:
    lines = [f"| rung | configuration | parameters | best lr | final loss | FID | img/s | FID at each lr |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        each = ", ".join(f"{lr:g}: {fid:.2f}" for lr, fid in r["fid_by_lr"].items())
        lines.append(f"| {r['rung']} | {r['name']} | {r['params']:,} | {r['best_lr']:g} | {r['final_loss']:.4f} | "
                     f"{r['fid']:.2f} | {r['img_per_s']:.0f} | {each} |")
    budget = (f"{args.model} on {args.data_path}, {args.num_steps} steps at batch {args.batch_size}, "
              f"precision {args.precision}; FID of {args.fid_samples} samples ({args.sampler}, {args.fid_steps} steps, "
              f"CFG {args.cfg_scale:g}, post-hoc EMA σ_rel 0.05) against {args.ref}")
    text = "# Ablation\n\n" + budget + "\n\n" + "\n".join(lines) + "\n"
    atomic_write_text(os.path.join(args.out_dir, "ablation.md"), text)
    atomic_write_text(os.path.join(args.out_dir, "ablation.json"), json.dumps({"budget": budget, "rows": rows}, indent=2))
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.bar(range(len(rows)), [r["fid"] for r in rows], color="tab:blue")
    ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("FID (best lr)")
    ax.set_title(budget, fontsize=7, wrap=True)
    for i, r in enumerate(rows):
        ax.text(i, r["fid"], f"{r['fid']:.1f}\nlr {r['best_lr']:g}", ha="center", va="bottom", fontsize=7)
    save_figure(fig, os.path.join(args.out_dir, "ablation.png"))
    print(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="ablation")
    p.add_argument("--data-path", default="digits")
    p.add_argument("--model", default="DiT-XS/2")
    p.add_argument("--num-steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr-grid", type=float, nargs="+", default=[0.3, 1.0, 3.0],
                   help="multiples of each rung's base lr (1e-4 plain, 1e-2 with weight normalisation)")
    p.add_argument("--lr", type=float, default=None, help="force this single lr for every rung")
    p.add_argument("--rungs", type=int, nargs="+", default=list(range(len(RUNGS))), help="which rungs (0-5)")
    p.add_argument("--precision", default="tf32", choices=["fp32", "tf32", "bf16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun), e.g. the number of GPUs")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--ema-snapshot-every", type=int, default=None,
                   help="default steps//25: 25 snapshots per EMA profile and run, a tenth of train.py's default "
                        "(with which a 200-step CPU ladder wrote 35 GB); post-hoc EMA still works, from fewer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fid-samples", type=int, default=500)
    p.add_argument("--fid-steps", type=int, default=50)
    p.add_argument("--sampler", default="ddim", choices=["ddpm", "ddim"])
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--ref", default="auto", help="FID reference (see eval/sample_fid.py)")
    args = p.parse_args(argv)
    args.out_dir = os.path.abspath(args.out_dir)  # train.py and sample_fid.py run in the repository folder
    if args.ref != "auto":
        args.ref = os.path.abspath(args.ref)
    if os.path.exists(args.data_path):  # a folder, not a built-in name
        args.data_path = os.path.abspath(args.data_path)
    bad = [r for r in args.rungs if not 0 <= r < len(RUNGS)]
    if bad or args.num_steps < 1 or args.fid_samples < 2 or args.ref == "none":
        print(f"error: rungs must be in 0..{len(RUNGS) - 1}, --num-steps >= 1, --fid-samples >= 2, and --ref "
              f"a reference (the table ranks by FID)", file=sys.stderr)
        return 2
    if args.ref != "auto" and not os.path.exists(args.ref):  # found out now, not after hours of training
        print(f"error: FID reference not found: {args.ref}; pass a statistics .npz (eval/ref_stats.py) or "
              f"--ref auto for a built-in dataset", file=sys.stderr)
        return 2
    os.makedirs(args.out_dir, exist_ok=True)
    rows = []
    try:
        for index in args.rungs:
            results = {}
            for lr in rung_lrs(index, args):
                run = train_rung(args, index, lr)
                results[lr] = (run, fid_of(args, run))
            best_lr = min(results, key=lambda lr: results[lr][1])
            run, fid = results[best_lr]
            rows.append({"rung": index, "name": RUNGS[index][0], "flags": rung_flags(index), "best_lr": best_lr,
                         "fid": fid, "fid_by_lr": {lr: f for lr, (_, f) in results.items()}, "run": run,
                         **summarize_run(run)})
            write_report(args, rows)  # a partial table after each rung
    except FIDError as e:  # e.g. no automatic reference for this dataset: pass --ref
        print(f"error: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        print(f"error: a step of the ablation failed ({' '.join(e.cmd[1:3])}); fix it and re-run the same "
              f"command: finished runs are kept", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
