"""Peak resident memory of one training step on the CPU, with and without gradient checkpointing.

python -m benchmarks.step_memory [--model DiT-S/2 --batch 16 --size 16]

Each setting runs in its own process (the peak resident size of a process only grows), all eight
switches, and reports the process's peak before and after the step (getrusage's ru_maxrss): the
difference is what the step itself needs (activations, gradients, Adam's moments on the first step).
"""
import argparse
import contextlib
import os
import resource
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__" and not __package__:  # (run as a file, the repository root is not importable)
    print("error: run it from the repository root as a module: python -m benchmarks.step_memory", file=sys.stderr)
    sys.exit(2)


def one_step(model_name: str, batch: int, size: int, checkpointing: bool) -> None:
    import torch  # (the child's imports: the parent only starts the children)
    import training
    from config import TrainConfig
    from diffusion import create_diffusion
    from models import build_model
    from mp_layers import MPConfig
    torch.manual_seed(0)
    mp = MPConfig.from_dict({k: True for k in MPConfig.switch_names()})
    model = build_model(model_name, in_channels=4, input_size=size, num_classes=1000, mp=mp)
    step_model = training.wrap_model(model, TrainConfig(grad_checkpointing=checkpointing), world_size=1,
                                     device=torch.device("cpu"))
    opt, sched = training.make_optimizer(model, 1e-4, 0, 0, torch.device("cpu"))
    x, y = torch.randn(batch, 4, size, size), torch.randint(0, 1000, (batch,))
    t = torch.randint(0, 1000, (batch,))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    training.training_step(step_model, model, create_diffusion(""), opt, sched, training.PowerEMA(model), x, y, t,
                           step=1, autocast=contextlib.nullcontext, compiled=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{model_name} batch {batch}, 4x{size}x{size}, grad checkpointing {'on ' if checkpointing else 'off'}: "
          f"peak {peak / 1024:.0f} MiB, the step adds {(peak - before) / 1024:.0f} MiB")


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-S/2")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=16, help="latent resolution")
    p.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)  # the child process
    args = p.parse_args()
    if args.one:
        one_step(args.model, args.batch, args.size, args.one == "on")
        return 0
    for setting in ("off", "on"):
        subprocess.run([sys.executable, "-m", "benchmarks.step_memory", "--model", args.model,
                        "--batch", str(args.batch), "--size", str(args.size), "--one", setting], check=True, cwd=ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
