"""Sample images of chosen classes from a trained run and save them as a PNG grid (one row per class).

python sample.py --result-dir results/000-DiT-XS-2 --class-label 0 3 7 --num-samples 8
python sample.py --result-dir RUN --ckpt 50000 --sampler ddim --num-sampling-steps 50

The model is rebuilt from the run's config.json; its weights are the post-hoc EMA for --ema-std
(reconstructed from the run's snapshots), or the raw weights of checkpoint --ckpt. Pixel runs are
denormalised; latent runs are decoded with the VAE recorded in the run.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys

import numpy as np
import torch
from PIL import Image

import data
from atomic import atomic_path
from diffusion import sample_images
from diffusion.sampling import SAMPLERS
from fast_paths import apply_fast_paths, frozen_weights
from runs import RunError, load_run_model
from training import configure_precision


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--result-dir", required=True, help="run folder written by train.py")
    p.add_argument("--class-label", type=int, nargs="+", default=None, help="class(es) to sample (default: all)")
    p.add_argument("--num-samples", type=int, default=8, help="images per class")
    add_sampling_arguments(p, cfg_scale=4.0, seed=0)
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument("--output", default=None, help="PNG path (default RUN/samples/<weights>-cfg<scale>.png)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return p


def add_sampling_arguments(p: argparse.ArgumentParser, *, cfg_scale: float, seed: int) -> None:
    """The weights (post-hoc EMA or a checkpoint), sampler and speed options shared by sample.py and
    eval/sample_fid.py; the CFG scale and the seed default differently in the two."""
    p.add_argument("--ema-std", type=float, default=0.05, help="σ_rel of the post-hoc EMA")
    p.add_argument("--step", type=int, default=None, help="snapshot step of the post-hoc EMA (default: last)")
    p.add_argument("--ckpt", type=int, default=None, metavar="STEP", help="the raw weights of this checkpoint instead")
    p.add_argument("--cfg-scale", type=float, default=cfg_scale)
    p.add_argument("--num-sampling-steps", type=int, default=250)
    p.add_argument("--sampler", choices=SAMPLERS, default="ddpm")
    p.add_argument("--seed", type=int, default=seed)
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32",
                   help="the model's forward passes in fp32 (default), with TF32 matmuls, or under bf16 autocast "
                        "(same as fp32 on a CPU except bf16); the sampler's own arithmetic stays in fp32 or wider")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model's forward (pays off over many sampling steps on a GPU)")


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
             precision: str = "fp32", compile: bool = False) -> np.ndarray:
    """Samples for `labels` as uint8 N×H×W×3, in batches of `batch_size`. `first_index` is the global position of
    labels[0] (a process's offset in a sharded run); the noise of a batch depends only on (seed, the global position
    of its first image, its size), so shards whose offsets are multiples of `batch_size` reproduce one process.
    `precision` and `compile` are those of the CLI (add_sampling_arguments)."""
    info = config["data"]
    if info.get("kind") == "latent" and vae is None:
        vae = data.load_vae(info.get("vae") or data.DEFAULT_VAE, device)
    shape = (config["in_channels"], config["input_size"], config["input_size"])
    out = []
    with (precision_for_sampling(precision, torch.device(device)) as autocast, frozen_weights(model),
          compiled_forward(model) if compile else contextlib.nullcontext()):
        for start in range(0, len(labels), batch_size):
            chunk = labels[start: start + batch_size]
            g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + first_index + start)
            with autocast():
                z = sample_images(model, chunk, shape, cfg_scale=cfg_scale, num_steps=num_steps, sampler=sampler,
                                  generator=g, device=device, progress=progress)
            out.append(data.to_uint8_images(data.decode_samples(z.float(), info, vae=vae)))
    return np.concatenate(out)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        if args.num_samples < 1:
            raise RunError(f"--num-samples must be at least 1, got {args.num_samples}")
        model, config, what = load_run_model(args.result_dir, ema_std=None if args.ckpt is not None else args.ema_std,
                                             ckpt_step=args.ckpt, step=args.step, device=device)
        apply_fast_paths(model)
        num_classes = config["num_classes"]
        classes = args.class_label if args.class_label is not None else list(range(num_classes))
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise RunError(f"class label {bad[0]} is out of range: this run has {num_classes} classes "
                           f"(0..{num_classes - 1})")
        labels = torch.tensor(classes, device=device).repeat_interleave(args.num_samples)
        print(f"sampling {len(labels)} images of classes {classes} with {what}, cfg {args.cfg_scale:g}, "
              f"{args.num_sampling_steps} {args.sampler} steps, on {device}")
        images = generate(model, config, labels, cfg_scale=args.cfg_scale, num_steps=args.num_sampling_steps,
                          sampler=args.sampler, seed=args.seed, batch_size=args.batch_size, device=device,
                          precision=args.precision, compile=args.compile)
        tag = f"ckpt{args.ckpt:07d}" if args.ckpt is not None else f"ema{args.ema_std:g}"
        tag += f"-cfg{args.cfg_scale:g}" + precision_tag(args.precision)
        output = args.output or os.path.join(args.result_dir, "samples", f"{tag}.png")
        save_png(image_grid(images, rows=len(classes)), output)
        print(f"wrote {output} ({len(classes)} rows = classes {classes}, {args.num_samples} samples each)")
    except (RunError, data.DatasetError, ValueError, OSError) as e:  # OSError: missing files, a full disk
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
