"""Write a random latent folder in the reference format, for timing training end to end without a VAE.

python benchmarks/random_latents.py OUT [--num 2048 --channels 4 --size 16 --classes 10]

Four files: posterior_means.pt (N×C×S×S), posterior_stds.pt (same shape, positive), labels.pt (N), and
stats.pt ({"mean": [C], "std": [C]}, the mixture statistics train.py and the paper's code normalise with).
Only the shapes matter for speed; the values are drawn from fixed seeds.
"""
import argparse
import os

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--num", type=int, default=2048)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--classes", type=int, default=10)
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    shape = (args.num, args.channels, args.size, args.size)
    means = torch.randn(shape, generator=g) * 0.8 + 0.1
    stds = torch.rand(shape, generator=g) * 0.3 + 0.05
    mean_c = means.mean((0, 2, 3))
    var_c = stds.square().mean((0, 2, 3)) + (means - mean_c[:, None, None]).square().mean((0, 2, 3))
    os.makedirs(args.out, exist_ok=True)
    for name, value in [("posterior_means", means), ("posterior_stds", stds),
                        ("labels", torch.arange(args.num) % args.classes),
                        ("stats", {"mean": mean_c, "std": var_c.sqrt()})]:
        torch.save(value, os.path.join(args.out, f"{name}.pt"))
    print(f"wrote {args.out}: {args.num} latents {args.channels}x{args.size}x{args.size}, {args.classes} classes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
