"""Post-hoc EMA from the command line: rebuild EMAs from a run's snapshots, or export one set of weights.
The library it uses (PowerEMA, reconstruct_emas) is phema.py.

    python ema.py --run-dir RUN --ema-std 0.03 0.05 0.08 [--step S] [--out DIR]

reads the snapshots in ``RUN/ema/`` and writes ``DIR/posthoc-<std>-<step>.pt`` (default
``DIR = RUN/posthoc``), each holding ``{"std": float, "step": int, "state": {name: fp32 tensor}}``.

    python ema.py --run-dir RUN --ema-std 0.05 [--step S] --export model.safetensors   (or model.pt)
    python ema.py --run-dir RUN --ckpt STEP|PATH [--ckpt-ema --ema-std 0.05] --export model.pt

writes one set of weights (a post-hoc EMA; or a checkpoint's raw weights or tracked EMA) as a plain
state dict for another codebase: the keys of ``build_model(...).state_dict()``, fp32, loadable with
``strict=True`` (a ``.pt`` with ``torch.load(..., weights_only=True)``), and next to it ``model.json``
with what rebuilds the model (also in the ``.safetensors`` metadata under "config").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

import torch

from atomic import (atomic_path, atomic_torch_save, atomic_write_text, check_output_dir, check_output_file,
                    interruptible, refuse_links, remove_stale_temporaries_of)
from cli import Parser
from phema import posthoc_filename, reconstruct_emas, std_to_gamma
from runs import load_run_model


EXPORT_FORMATS = (".safetensors", ".pt", ".pth")


def export_config_path(path: str) -> str:
    """The JSON next to an exported state dict: model.safetensors -> model.json."""
    return os.path.splitext(path)[0] + ".json"


def export_weights(run_dir: str, path: str, *, ema_std: Optional[float] = 0.05, step: Optional[int] = None,
                   ckpt=None, ckpt_ema: bool = False) -> str:
    """Writes the weights runs.load_run_model picks (the same arguments) to `path` (.safetensors or .pt, by
    its extension) as a plain fp32 state dict, and their model's description to export_config_path(path).
    The weights are stored as the run holds them: the plain model computes its effective weights (weight
    normalisation, gains, 1/sqrt(fan_in)) in every forward, so a plain build_model(...) in eval mode gives
    what sample.py gives. Returns a description of the weights."""
    model, config, what = load_run_model(run_dir, ema_std=ema_std, ckpt_step=ckpt, step=step, ckpt_ema=ckpt_ema)
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    description = {
        "model": config["model"], "in_channels": config["in_channels"], "input_size": config["input_size"],
        "num_classes": config["num_classes"], "mp": config["mp"], "data": config.get("data"), "weights": what,
        "rebuild": "models.build_model(model, in_channels=, input_size=, num_classes=, mp=MPConfig(**mp))",
    }
    text = json.dumps(description, indent=2, ensure_ascii=False)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file
        with atomic_path(path) as tmp:
            save_file(state, tmp, metadata={"config": text})
    else:
        atomic_torch_save(state, path)
    atomic_write_text(export_config_path(path), text + "\n")
    return what


@interruptible("the files already written are whole, and no partial file is left")
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = Parser(description="Post-hoc EMA reconstruction from the snapshots in RUN/ema/.")
    p.add_argument("--run-dir", metavar="RUN", default=None, help="run folder (snapshots are read from RUN/ema/)")
    p.add_argument("--result-dir", dest="run_dir", help=argparse.SUPPRESS)  # (the earlier name, still taken)
    p.add_argument("--ema-std", type=float, nargs="+", default=None, help="target sigma_rel value(s)")
    p.add_argument("--step", type=int, default=None, help="target step (default: last snapshot step)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/posthoc/)")
    g = p.add_argument_group("export one set of weights as a plain state dict (for another codebase)")
    g.add_argument("--export", default=None, metavar="PATH",
                   help="write PATH (.safetensors or .pt) and PATH's .json (the model to rebuild): the post-hoc "
                        "EMA of the one --ema-std, or with --ckpt a checkpoint's weights")
    g.add_argument("--ckpt", default=None, metavar="STEP|PATH",
                   help="with --export: the raw weights of this checkpoint (a step of the run or its file)")
    g.add_argument("--ckpt-ema", action="store_true", help="with --ckpt: its tracked EMA of --ema-std instead")
    args = p.parse_args(argv)
    try:
        if args.run_dir is None:
            raise ValueError("--run-dir RUN is required: the run folder train.py wrote")
        if args.export is not None:
            return _export(args)
        if args.ckpt is not None or args.ckpt_ema:
            raise ValueError("--ckpt and --ckpt-ema go with --export PATH")
        if args.ema_std is None:
            raise ValueError("--ema-std is required: the sigma_rel value(s) to rebuild, e.g. --ema-std 0.05")
        for s in args.ema_std:
            std_to_gamma(s)
        if not os.path.isdir(args.run_dir):
            raise FileNotFoundError(f"run folder not found: {args.run_dir}")
        snap_dir = os.path.join(args.run_dir, "ema")
        if not os.path.isdir(snap_dir):
            raise FileNotFoundError(f"no EMA snapshot folder in the run: {snap_dir}")
        out_dir = args.out if args.out is not None else os.path.join(args.run_dir, "posthoc")
        if args.out is None:
            refuse_links(args.run_dir, ["posthoc"])  # never written through a link out of the run folder
        check_output_dir(out_dir, "--out")
        results = reconstruct_emas(snap_dir, args.ema_std, step=args.step)
        for state, info in results:
            path = os.path.join(out_dir, posthoc_filename(info["std"], info["step"]))
            atomic_torch_save({"std": info["std"], "step": info["step"], "state": state}, path)
            print(
                f"wrote {path} (sigma_rel {info['std']:.3f}, gamma {info['gamma']:.3f}, step {info['step']}, "
                f"from {len(info['sources'])} snapshots)"
            )
    except (ValueError, OSError) as e:  # OSError: missing folders, a full disk (RunError is a ValueError)
        msg = " ".join(str(e).split())
        sys.stderr.write(f"error: {msg}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted (Ctrl-C); the files already written are whole\n")
        return 130
    return 0


def _export(args) -> int:
    """ema.py --export: checks the options, then writes the file and its JSON."""
    if not args.export.endswith(EXPORT_FORMATS):
        raise ValueError(f"--export {args.export}: the format comes from the extension; end it in .safetensors "
                         f"or .pt")
    if args.out is not None:
        raise ValueError("--out is the folder of post-hoc EMA files; with --export the path names the file")
    stds = args.ema_std or []
    if len(stds) > 1:
        raise ValueError(f"--export writes one set of weights; pass one --ema-std, not {len(stds)}")
    if args.ckpt is None and (not stds or args.ckpt_ema):
        raise ValueError("--export needs --ema-std S (a post-hoc EMA) or --ckpt STEP|PATH (a checkpoint's weights)"
                         if not args.ckpt_ema else "--ckpt-ema needs --ckpt STEP|PATH")
    if args.ckpt is not None and args.step is not None:
        raise ValueError("--step picks the post-hoc EMA's step; with --ckpt the checkpoint names the step")
    if args.ckpt is not None and stds and not args.ckpt_ema:
        raise ValueError("--ckpt exports the raw weights; add --ckpt-ema to export its tracked EMA of --ema-std")
    std = stds[0] if stds else None
    if std is not None:
        std_to_gamma(std)
    for path, option in ((args.export, "--export"), (export_config_path(args.export), "--export's .json")):
        check_output_file(path, option)
    # What a kill -9 of an earlier export of these files left (nothing else writes them meanwhile).
    remove_stale_temporaries_of([args.export, export_config_path(args.export)])
    what = export_weights(args.run_dir, args.export, ema_std=std, step=args.step, ckpt=args.ckpt,
                          ckpt_ema=args.ckpt_ema)
    print(f"wrote {args.export} ({what}) and {export_config_path(args.export)} (the model to rebuild)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
