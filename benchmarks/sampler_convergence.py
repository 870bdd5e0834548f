"""How fast each sampler converges to the probability-flow ODE's solution, on a small trained model.

python -m benchmarks.sampler_convergence [--train-steps 400] [--out benchmarks/results/sampler_convergence.md]
(from the repository root)

Trains a small DiT (depth 4, width 64, patch 2, learned variance) on the built-in digits at 8×8 for
--train-steps Adam steps (a minute or two on a CPU), then samples the same initial noise and labels with
every ODE sampler at several step counts and reports the RMS distance (in the model's normalised pixel
space) to a 1,000-step DDIM (η = 0) image, the reference solution of the same ODE. DDPM is not in the table:
it is stochastic and solves another equation. The table is printed and written as Markdown; the numbers are
deterministic on a given machine (seeded training and noise).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:  # (run as a file, the repository root is not importable)
    print("error: run it from the repository root as a module: python -m benchmarks.sampler_convergence",
          file=sys.stderr)
    sys.exit(2)

import torch  # noqa: E402

import data  # noqa: E402
from atomic import atomic_path  # noqa: E402
from diffusion import create_diffusion, sample_images  # noqa: E402
from diffusion.sampling import num_model_calls  # noqa: E402
from models import DiT  # noqa: E402
from mp_layers import MPConfig  # noqa: E402

SAMPLERS = ("ddim", "dpm-solver++", "unipc", "heun")
STEPS = (5, 10, 15, 25, 50, 100)


def small_dit(mp: MPConfig = MPConfig(), **kw) -> DiT:
    shape = dict(depth=4, width=64, num_heads=4, patch_size=2, in_channels=1, input_size=8, num_classes=10)
    return DiT(**{**shape, **kw}, mp=mp)


def train_small_model(model: DiT, images: torch.Tensor, labels: torch.Tensor, steps: int, *, batch: int = 64,
                      lr: float = 2e-3, seed: int = 0, log_every: int = 0) -> list[float]:
    """Plain Adam on the DiT loss (ε MSE + VB term); returns the loss of every step."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # class dropout draws from the global generator
    diffusion = create_diffusion("")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(images), (batch,), generator=g)
        t = torch.randint(0, diffusion.num_timesteps, (batch,), generator=g)
        noise = torch.randn(images[idx].shape, generator=g)
        loss = diffusion.training_losses(model, images[idx], t, {"y": labels[idx]}, noise=noise)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.project_forced_weights_()
        losses.append(loss.item())
        if log_every and step % log_every == 0:
            rate = step / (time.perf_counter() - start)
            print(f"train step {step}/{steps}  loss {sum(losses[-log_every:]) / log_every:.4f}  "
                  f"{rate:.1f} steps/s  ETA {(steps - step) / rate:.0f} s", flush=True)
    model.eval()
    return losses


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).square().mean().sqrt().item()


def convergence_table(model, labels, *, cfg_scale=1.0, samplers=SAMPLERS, steps=STEPS, seed=1,
                      reference_steps=1000) -> dict:
    """{"reference_rms": …, "rows": {sampler: {steps: rms}}}: RMS distance of each sampler's images to the
    `reference_steps`-step DDIM images, all from the same noise (seed) and labels."""
    shape = (model.in_channels, model.input_size, model.input_size)

    def run(sampler, n):
        return sample_images(model, labels, shape, cfg_scale=cfg_scale, num_steps=n, sampler=sampler,
                             generator=torch.Generator().manual_seed(seed))

    reference = run("ddim", reference_steps)
    rows = {s: {n: rms(run(s, n), reference) for n in steps} for s in samplers}
    return {"reference_rms": reference.double().square().mean().sqrt().item(), "rows": rows}


def markdown(result: dict, steps, meta: str) -> str:
    head = "| sampler | " + " | ".join(f"{n} steps" for n in steps) + " |"
    lines = [meta, "", head, "|" + "---|" * (len(steps) + 1)]
    for sampler, row in result["rows"].items():
        cells = [f"{row[n]:.4f} ({num_model_calls(sampler, n)})" for n in steps]
        lines.append(f"| {sampler} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"RMS of the reference images themselves: {result['reference_rms']:.4f}. "
                 "In brackets: network evaluations per image.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sampler_convergence", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-steps", type=int, default=400)
    p.add_argument("--num-images", type=int, default=20)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "sampler_convergence.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    dataset = data.load_dataset("digits", image_size=8)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
    model = small_dit()
    losses = train_small_model(model, images, labels, args.train_steps, log_every=50)
    sample_labels = torch.arange(args.num_images) % 10
    start = time.perf_counter()
    result = convergence_table(model, sample_labels, cfg_scale=args.cfg_scale)
    meta = (f"Sampler convergence: small DiT (depth 4, width 64, patch 2) trained {args.train_steps} Adam steps on "
            f"digits 8×8 (final loss {sum(losses[-50:]) / 50:.4f}); {args.num_images} images, CFG scale "
            f"{args.cfg_scale:g}; RMS distance to 1,000-step DDIM (η = 0) from the same noise "
            f"(`python -m benchmarks.sampler_convergence --train-steps {args.train_steps}`, "
            f"{time.perf_counter() - start:.0f} s of sampling).")
    text = markdown(result, STEPS, meta)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with atomic_path(args.out, suffix=".md") as tmp:
        Path(tmp).write_text(text)
    with atomic_path(os.path.splitext(args.out)[0] + ".json", suffix=".json") as tmp:
        Path(tmp).write_text(json.dumps({"train_steps": args.train_steps, "cfg_scale": args.cfg_scale, **result},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
