"""Why ten FIDs at once stalled: the Fréchet distance's matrix square root under BLAS oversubscription.

The one-GPU ablation ran ten training processes side by side; at step 500 each scored its first FID and none
came back in 5.5 minutes. Every process did the 2048x2048 square root of the Fréchet distance on the host
with one BLAS thread per core (16), 160 spinning threads on 16 cores. This script reproduces that at a
small scale: P processes each compute one Fréchet distance of random D x D covariances at once, with T BLAS
threads each, by scipy's sqrtm (pytorch-fid's route) and by two symmetric eigendecompositions (eval/fid.py's
default, the same number), and prints the slowest process's wall time per (method, P, T):

    python benchmarks/fid_threads.py                               # D 512, P 1 2 4, T 1 2
    python benchmarks/fid_threads.py --dim 2048 --processes 1 --threads 2 --methods sqrtm eigh

On a machine with C cores, P x T > C is oversubscription; ablate.py gives each of its --jobs processes
C // jobs threads.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

# One process: random covariances (seeded, the same in every process), one Fréchet distance, its seconds.
WORKER = """
import sys, time
import numpy as np
from eval.fid import frechet_distance
d, method = {dim}, {method!r}
rng = np.random.default_rng(0)
a, b = rng.standard_normal((d, d + 16)), rng.standard_normal((d, d + 16))
s1, s2 = a @ a.T / d, b @ b.T / d
t = time.perf_counter()
fid = frechet_distance(np.zeros(d), s1, np.full(d, 0.1), s2, method=method)
print(time.perf_counter() - t, fid)
"""


def run(method: str, dim: int, processes: int, threads: int) -> tuple[float, float]:
    """(wall seconds of the slowest of `processes` concurrent distances, the distance)."""
    env = {**os.environ, **{v: str(threads) for v in THREAD_VARS}}
    code = WORKER.format(dim=dim, method=method)  # (run in the repository root, where `eval` is importable)
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True, cwd=ROOT)
             for _ in range(processes)]
    outs = [p.communicate()[0].split() for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"error: a worker failed ({method}, {processes} processes, {threads} threads)")
    return max(float(o[0]) for o in outs), float(outs[0][1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=512, help="covariance size (Inception's is 2048)")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="BLAS threads per process")
    p.add_argument("--methods", nargs="+", choices=["sqrtm", "eigh"], default=["sqrtm", "eigh"])
    args = p.parse_args(argv)
    if args.dim < 2 or min(args.processes) < 1 or min(args.threads) < 1:
        print("error: --dim must be >= 2, --processes and --threads >= 1", file=sys.stderr)
        return 2
    cores = os.cpu_count()
    print(f"Fréchet distance of {args.dim}x{args.dim} covariances, {cores} cores; seconds of the slowest process",
          flush=True)
    print("| method | processes | BLAS threads each | threads / cores | seconds | distance |")
    print("| --- | --- | --- | --- | --- | --- |", flush=True)
    for method in args.methods:
        for procs in args.processes:
            for threads in args.threads:
                seconds, fid = run(method, args.dim, procs, threads)
                print(f"| {method} | {procs} | {threads} | {procs * threads / cores:.1f} | {seconds:.2f} | "
                      f"{fid:.10g} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
