"""Sample images of chosen classes from a trained run and save them as a PNG grid (one row per class).

python sample.py --run-dir results/000-DiT-XS-2 --class-label 0 3 7 --num-samples 8
python sample.py --run-dir RUN --ckpt 50000 --sampler ddim --num-sampling-steps 50
python sample.py --run-dir RUN --sampler dpm-solver++ --num-sampling-steps 25 --guidance-interval 0.3 5
python sample.py --run-dir RUN --guide ema:0.02 --cfg-scale 2       # autoguidance by a shorter EMA

The model is rebuilt from the run's config.json; its weights are the post-hoc EMA for --ema-std
(reconstructed from the run's snapshots), or the raw weights of checkpoint --ckpt. Pixel runs are
denormalised; latent runs are decoded with the VAE recorded in the run. Every option, the run and the
guide are checked before the first sampling step: a bad one is one "error:" line and exit status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys

import numpy as np
import torch
from PIL import Image

import data
import limits
from atomic import LinkError, atomic_path, check_output_dir, check_output_file, interruptible, refuse_links
from diffusion import sample_images
from diffusion.sampling import SAMPLERS, check_guidance_interval
from fast_paths import apply_fast_paths, frozen_weights
from runs import RunError, find_checkpoint, load_run_config, load_run_model, with_vae
from cli import Parser
from training import configure_precision, parse_device


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__)
    p.add_argument("--run-dir", metavar="RUN", default=None,
                   help="run folder written by train.py (may be left out when --ckpt is a file of its checkpoints/)")
    p.add_argument("--result-dir", dest="run_dir", help=argparse.SUPPRESS)  # (the earlier name, still taken)
    p.add_argument("--class-label", type=int, nargs="+", default=None, help="class(es) to sample (default: all)")
    p.add_argument("--num-samples", type=int, default=8, help="images per class")
    add_sampling_arguments(p, cfg_scale=4.0, seed=0)
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument("--output", default=None, help="PNG path (default RUN/samples/<weights>-cfg<scale>.png)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def resolve_run_dir(args) -> str:
    """--run-dir, or the run a --ckpt file lies in (RUN/checkpoints/NNNNNNN.pt): sets and returns args.run_dir."""
    if args.run_dir is None and args.ckpt is not None and os.path.isfile(args.ckpt):
        run = os.path.dirname(os.path.dirname(os.path.abspath(args.ckpt)))
        if os.path.isfile(os.path.join(run, "config.json")):
            args.run_dir = run
    if args.run_dir is None:
        raise RunError("--run-dir RUN is required: the run folder train.py wrote (or --ckpt RUN/checkpoints/"
                       "NNNNNNN.pt, which names it)")
    return args.run_dir


def add_sampling_arguments(p: argparse.ArgumentParser, *, cfg_scale: float, seed: int) -> None:
    """The weights (post-hoc EMA or a checkpoint), sampler, guidance and speed options shared by sample.py and
    eval/sample_fid.py; the CFG scale and the seed default differently in the two."""
    p.add_argument("--ema-std", type=float, default=0.05, help="σ_rel of the post-hoc EMA")
    p.add_argument("--step", type=int, default=None, help="snapshot step of the post-hoc EMA (default: last)")
    p.add_argument("--ckpt", default=None, metavar="STEP|PATH",
                   help="the raw weights of this checkpoint instead: its step, or its file (RUN/checkpoints/NNNNNNN.pt)")
    p.add_argument("--cfg-scale", type=float, default=cfg_scale,
                   help="guidance weight s: ε = ε_ref + s·(ε(c) − ε_ref), ε_ref the unconditional prediction "
                        "(or the guide's, with --guide); 1 = no guidance")
    p.add_argument("--num-sampling-steps", type=int, default=250,
                   help="sampler steps (heun: N steps cost 2N − 1 network calls); 20-30 suffice for the ODE solvers")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddpm",
                   help="ddpm (ancestral, learned variance), ddim, or an ODE solver through diffusers: "
                        "dpm-solver++ (DPM-Solver++(2M)), heun (Karras σ grid), unipc")
    p.add_argument("--ddim-eta", type=float, default=0.0, help="DDIM's η (0: deterministic; 1: DDPM-like noise)")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="guide only at noise levels σ in (LO, HI] (Kynkäänniemi et al. 2024; σ = "
                        "sqrt((1 − ᾱ_t)/ᾱ_t), 0.01 at the last step and 157 at the first); elsewhere the "
                        "conditional prediction alone, at one network pass per step. Default: every step")
    p.add_argument("--guide", default=None, metavar="GUIDE",
                   help="autoguidance by a weaker model of the same condition instead of the null label: "
                        "ema:STD (this run's post-hoc EMA with σ_rel STD, e.g. a shorter one), step:N (this run's "
                        "post-hoc EMA at the earlier snapshot step N), ckpt:N (this run's checkpoint N), or the "
                        "folder of another run (its post-hoc EMA at --ema-std); combinable with --guidance-interval")
    p.add_argument("--seed", type=int, default=seed, help=f"0..{MAX_SEED}")
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32",
                   help="the model's forward passes in fp32 (default), with TF32 matmuls, or under bf16 autocast "
                        "(same as fp32 on a CPU except bf16); the sampler's own arithmetic stays in fp32 or wider")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model's forward (pays off over many sampling steps on a GPU)")
    p.add_argument("--vae", default=None, metavar="NAME_OR_PATH",
                   help="the VAE that decodes a latent run's samples, where it is now (default: the run's "
                        "recorded one; a VAE folder in the results folder is found after the results folder moved)")


MAX_SEED = 2**32 - 1  # each batch seeds its generator with seed·1,000,003 + its position: must fit 64 bits


def check_sampling_args(args) -> None:
    """The sampling options' values (not the files they name); raises RunError with the option's name."""
    def finite(name, value):
        if not math.isfinite(value):
            raise RunError(f"{name} must be a finite number, got {value}")

    finite("--cfg-scale", args.cfg_scale)
    finite("--ema-std", args.ema_std)
    finite("--ddim-eta", args.ddim_eta)
    if args.ckpt is None and args.ema_std <= 0:
        raise RunError(f"--ema-std must be > 0, got {args.ema_std:g}")
    if not 1 <= args.num_sampling_steps <= 1000:
        raise RunError(f"--num-sampling-steps must be in 1..1000, got {args.num_sampling_steps}")
    if args.sampler == "heun" and args.num_sampling_steps < 2:
        raise RunError("--sampler heun needs --num-sampling-steps of at least 2")
    if args.ddim_eta < 0:
        raise RunError(f"--ddim-eta must be >= 0, got {args.ddim_eta:g}")
    if args.ddim_eta != 0 and args.sampler != "ddim":
        raise RunError(f"--ddim-eta applies to --sampler ddim only (this is {args.sampler})")
    if not 0 <= args.seed <= MAX_SEED:
        raise RunError(f"--seed must be an integer in 0..{MAX_SEED}, got {args.seed}")
    if args.batch_size < 1:
        raise RunError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.guidance_interval is not None:
        try:
            check_guidance_interval(args.guidance_interval)
        except ValueError as e:
            raise RunError(f"--guidance-interval: {e}; e.g. --guidance-interval 0.3 5") from None
    if args.guide is not None and args.cfg_scale == 1:
        raise RunError("--guide has no effect at --cfg-scale 1; give the guidance weight, e.g. --cfg-scale 2")


def resolve_device(arg: str | None) -> torch.device:
    """--device (None or "auto": CUDA when there is one), checked as train.py checks it."""
    return parse_device(arg, RunError)


GUIDE_FORMS = ("ema:STD", "step:N", "ckpt:N", "RUN_FOLDER")


def load_guide(spec: str, args, run_dir: str, config: dict, device):
    """The autoguidance model named by --guide (see add_sampling_arguments) and a description of it; a guide
    that cannot guide this run (another image size, channel or class count) is a RunError."""
    kind, _, value = spec.partition(":")
    if kind in ("ema", "step", "ckpt") and not os.path.isdir(spec):
        try:
            number = float(value) if kind == "ema" else int(value)
        except ValueError:
            raise RunError(f"--guide {spec}: {kind}: needs a number, e.g. --guide "
                           f"{'ema:0.02' if kind == 'ema' else kind + ':10000'}") from None
        if kind == "ema" and not (math.isfinite(number) and number > 0):
            raise RunError(f"--guide {spec}: σ_rel must be a finite number > 0")
        weights = {"ema": dict(ema_std=number, step=args.step), "step": dict(ema_std=args.ema_std, step=number),
                   "ckpt": dict(ema_std=None, ckpt_step=number)}[kind]
        guide_dir, guide_config = run_dir, config
    elif os.path.isdir(spec):
        guide_dir, guide_config = spec, load_run_config(spec)
        weights = dict(ema_std=args.ema_std)
        for key, what in (("input_size", "image size"), ("in_channels", "channel count"),
                          ("num_classes", "class count")):
            if guide_config.get(key) != config.get(key):
                raise RunError(f"--guide {spec}: its {what} is {guide_config.get(key)}, this run's is "
                               f"{config.get(key)}; a guide must model the same images and classes")
        theirs, ours = (c.get("data", {}).get("name") for c in (guide_config, config))
        if theirs != ours:  # (the same shapes, so it can run; but it guides towards another distribution)
            print(f"warning: --guide {spec} was trained on {theirs}, this run on {ours}; autoguidance wants a "
                  f"weaker model of the same data (Karras et al. 2024), else it steers towards the other set",
                  file=sys.stderr)
    else:
        raise RunError(f"--guide {spec}: not a run folder, nor one of {', '.join(GUIDE_FORMS[:3])}")
    guide, _, what = load_run_model(guide_dir, device=device, **weights)
    apply_fast_paths(guide)
    return guide, f"guide {what}" + ("" if guide_dir == run_dir else f" of {guide_dir}")


def sampling_tag(args) -> str:
    """The sampler and guidance part of an output's name: other options, other file."""
    tag = f"-{args.sampler}{args.num_sampling_steps}"
    if args.ddim_eta:
        tag += f"-eta{args.ddim_eta:g}"
    if args.guidance_interval:
        tag += "-gi{:g}-{:g}".format(*args.guidance_interval)
    if args.guide:
        tag += "-guide-" + re.sub(r"[^A-Za-z0-9.]+", "-", os.path.basename(os.path.normpath(args.guide)))
    return tag


def precision_tag(precision: str) -> str:
    """The file-name tag of samples made at `precision` ("" for fp32, the default): other precision, other samples."""
    return "" if precision == "fp32" else f"-{precision}"


@contextlib.contextmanager
def compiled_forward(model: torch.nn.Module):
    """Within the block, `model.forward` (which forward_with_cfg calls too) is compiled."""
    missing = object()
    before = vars(model).get("forward", missing)  # an instance override, if any
    model.forward = torch.compile(model.forward)
    try:
        yield
    finally:
        if before is missing:
            del model.forward  # back to the class's method
        else:
            model.forward = before


@contextlib.contextmanager
def precision_for_sampling(precision: str, device: torch.device):
    """Yields the autocast context of `precision`; TF32 settings are restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        yield configure_precision(precision, device)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def image_grid(images: np.ndarray, rows: int, min_tile: int = 64, pad: int = 2) -> Image.Image:
    """uint8 N×H×W×3 → one image, `rows` rows; small images are enlarged (nearest) to at least `min_tile`."""
    n, h, w, _ = images.shape
    cols = math.ceil(n / rows)
    zoom = max(1, math.ceil(min_tile / h))
    th, tw = h * zoom, w * zoom
    canvas = np.full((rows * (th + pad) + pad, cols * (tw + pad) + pad, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        big = img.repeat(zoom, axis=0).repeat(zoom, axis=1)
        canvas[pad + r * (th + pad): pad + r * (th + pad) + th, pad + c * (tw + pad): pad + c * (tw + pad) + tw] = big
    return Image.fromarray(canvas)


def save_png(image: Image.Image, path: str) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        image.save(tmp)


@torch.no_grad()
def generate(model, config: dict, labels: torch.Tensor, *, cfg_scale: float, num_steps: int, sampler: str,
             seed: int, batch_size: int, device, progress: bool = True, vae=None, first_index: int = 0,
             precision: str = "fp32", compile: bool = False, eta: float = 0.0, guide=None,
             guidance_interval=None) -> np.ndarray:
    """Samples for `labels` as uint8 N×H×W×3, in batches of `batch_size`. `first_index` is the global position of
    labels[0] (a process's offset in a sharded run); the noise of a batch depends only on (seed, the global position
    of its first image, its size), so shards whose offsets are multiples of `batch_size` reproduce one process.
    `precision`, `compile`, `eta` (DDIM's η), `guide` (a model, autoguidance) and `guidance_interval` (σ LO, HI)
    are those of the CLI (add_sampling_arguments)."""
    info = config["data"]
    if info.get("kind") == "latent" and vae is None:
        vae = data.load_vae(info.get("vae") or data.DEFAULT_VAE, device)
    shape = (config["in_channels"], config["input_size"], config["input_size"])
    out = []
    with (precision_for_sampling(precision, torch.device(device)) as autocast, frozen_weights(model),
          frozen_weights(guide) if guide is not None else contextlib.nullcontext(),
          compiled_forward(model) if compile else contextlib.nullcontext()):
        for start in range(0, len(labels), batch_size):
            chunk = labels[start: start + batch_size]
            g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + first_index + start)
            with autocast():
                z = sample_images(model, chunk, shape, cfg_scale=cfg_scale, num_steps=num_steps, sampler=sampler,
                                  generator=g, device=device, progress=progress, eta=eta, guide=guide,
                                  guidance_interval=guidance_interval)
            out.append(data.to_uint8_images(data.decode_samples(z.float(), info, vae=vae)))
    return np.concatenate(out)


@interruptible("no image was written")  # (the PNG is written atomically at the end: nothing partial is left)
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_sampling_args(args)
        resolve_run_dir(args)
        if args.num_samples < 1:
            raise RunError(f"--num-samples must be at least 1, got {args.num_samples}")
        device = resolve_device(args.device)
        check_output(args.output, args.run_dir, "samples")  # found now, not after all the sampling
        model, config, what = load_run_model(args.run_dir, ema_std=None if args.ckpt is not None else args.ema_std,
                                             ckpt_step=args.ckpt, step=args.step, device=device)
        config = with_vae(config, args.run_dir, args.vae)
        apply_fast_paths(model)
        guide, guide_what = load_guide(args.guide, args, args.run_dir, config, device) if args.guide else (None, "")
        num_classes = config["num_classes"]
        classes = args.class_label if args.class_label is not None else list(range(num_classes))
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise RunError(f"class label {bad[0]} is out of range: this run has {num_classes} classes "
                           f"(0..{num_classes - 1})")
        check_sample_count(len(classes) * args.num_samples, config)
        labels = torch.tensor(classes, device=device).repeat_interleave(args.num_samples)
        print(f"sampling {len(labels)} images of classes {classes} with {what}, cfg {args.cfg_scale:g}"
              f"{', ' + guide_what if guide else ''}, {args.num_sampling_steps} {args.sampler} steps, on {device}")
        images = generate(model, config, labels, cfg_scale=args.cfg_scale, num_steps=args.num_sampling_steps,
                          sampler=args.sampler, seed=args.seed, batch_size=args.batch_size, device=device,
                          precision=args.precision, compile=args.compile, eta=args.ddim_eta, guide=guide,
                          guidance_interval=args.guidance_interval, progress=not args.no_progress)
        tag = f"ckpt{find_checkpoint(args.run_dir, args.ckpt)[0]:07d}" if args.ckpt is not None else f"ema{args.ema_std:g}"
        tag += f"-cfg{args.cfg_scale:g}" + sampling_tag(args) + precision_tag(args.precision)
        output = args.output or os.path.join(args.run_dir, "samples", f"{tag}.png")
        save_png(image_grid(images, rows=len(classes)), output)
        print(f"wrote {output} ({len(classes)} rows = classes {classes}, {args.num_samples} sample{'s' if args.num_samples != 1 else ''} each)")
    except (RunError, data.DatasetError, ValueError, OSError) as e:  # OSError: missing files, a full disk
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def check_output(output: str | None, run_dir: str, sub: str, option: str = "--output") -> None:
    """The output file (`option`, else the run's `sub` folder) checked before the work: not a folder, in a
    folder this process may write, and never through a link out of the run folder."""
    if output is not None:
        check_output_file(output, option)
    elif os.path.isdir(run_dir):
        try:
            refuse_links(run_dir, [sub])
        except LinkError as e:
            raise RunError(str(e)) from None
        check_output_dir(os.path.join(run_dir, sub), "the run folder's", named=os.path.join(run_dir, sub))


def check_sample_count(n: int, config: dict) -> None:
    """Refuses, before any allocation, a number of samples whose images alone cannot fit in memory."""
    size = config["input_size"] * (8 if config["data"].get("kind") == "latent" else 1)  # (the VAE's 8x)
    limits.check_fits(n * (3 * size * size + 8), f"{n:,} samples of {size}x{size}",
                      "pass a smaller --num-samples (or fewer --class-label)", RunError)


if __name__ == "__main__":
    sys.exit(main())
