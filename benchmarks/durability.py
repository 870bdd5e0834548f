"""Durability: kill -9 at random moments (some inside checkpoint and snapshot writes) and a full disk, then
resume; the resumed run must end with exactly the weights, EMAs, Adam state and snapshots of a run that was
never interrupted, and no temporary file may be left.

python benchmarks/durability.py [--tries 6] [--seed 0] [--work /tmp/durability]

Each try starts the same small run (DiT-XS/8 on the built-in digits, 12 steps, a checkpoint every 4 and
snapshots every 2), kills it with SIGKILL one to three times (at a random moment, or the instant a
temporary file of a checkpoint or snapshot write appears), resumes it after every kill, and compares the
end with the reference run bit for bit. The full-disk try runs in a small tmpfs (needs root and `mount`;
skipped elsewhere) that fills up mid-run, then grows the tmpfs and resumes. Prints one line per try and a
summary; exit status 1 if any try differs.
"""
from __future__ import annotations

import argparse
import glob
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from atomic import TEMP_RE  # noqa: E402
from runs import list_checkpoints  # noqa: E402

STEPS = 12
COMMAND = ["--model", "DiT-XS/8", "--batch-size", "4", "--num-workers", "0", "--lr", "1e-3", "--log-every", "1",
           "--num-steps", str(STEPS), "--ckpt-every", "4", "--ema-snapshot-every", "2", "--magnitude-every", "3"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def only_run(results: str) -> str | None:
    found = glob.glob(os.path.join(results, "*-DiT-XS-8"))
    return found[0] if found else None


def temporaries(run_dir: str, subs=("",)) -> list[str]:
    """The temporary files of writes under the run folder (or under its sub-folders `subs`)."""
    return [os.path.join(d, f) for sub in subs for d, _, files in os.walk(os.path.join(run_dir, sub))
            for f in files if TEMP_RE.match(f)]


def kill_at_random(proc: subprocess.Popen, results: str, rng: random.Random, during_write: str | None,
                   timeout: float = 300) -> str:
    """SIGKILL `proc` either the instant a temporary file appears in `during_write` ("checkpoints" or "ema":
    a checkpoint or snapshot being written), or at a random moment of its training (0-4 s after a logged
    step); not before the run has a checkpoint to resume from. Returns what was interrupted."""
    start, delay, trained_at = time.monotonic(), rng.uniform(0.0, 4.0), None
    run = only_run(results)
    earlier = set(temporaries(run)) if run else set()  # left by an earlier kill (a resume removes them)
    while proc.poll() is None and time.monotonic() - start < timeout:
        run = only_run(results)
        if not (run and list_checkpoints(run)):
            time.sleep(0.002)
            continue
        if during_write and (tmp := set(temporaries(run, (during_write,))) - earlier):
            proc.kill()
            proc.wait()
            return f"the write of {os.path.basename(min(tmp))}"
        if not during_write and trained_at is None and run and os.path.isfile(os.path.join(run, "metrics.jsonl")):
            trained_at = time.monotonic()
        if trained_at is not None and time.monotonic() - trained_at > delay:
            proc.kill()
            proc.wait()
            return f"training ({delay:.1f} s after a logged step)"
        time.sleep(0.002)
    proc.wait()
    return "nothing (the run ended first)"


def finish(results: str) -> None:
    """Resume until the run is complete."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--resume", only_run(results)], cwd=ROOT,
                       env=ENV, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"resume failed (exit {p.returncode}): {p.stderr.strip()[-500:]}")


def final_state(run_dir: str) -> dict:
    [(step, path)] = list_checkpoints(run_dir)[-1:]
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    snapshots = {os.path.basename(p): torch.load(p, map_location="cpu", weights_only=True)["state"]
                 for p in sorted(glob.glob(os.path.join(run_dir, "ema", "ema-*.pt")))}
    return {"step": step, "model": ckpt["model"], "ema": ckpt["ema"], "opt": ckpt["opt"]["state"],
            "snapshots": snapshots}


def differences(a, b, where="") -> list[str]:
    """Where two nested structures of tensors differ (bit for bit)."""
    if isinstance(a, torch.Tensor):
        return [] if isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b) else [where]
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            return [f"{where} (keys)"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}/{k}")]
    return [] if a == b else [where]


def kill_try(work: str, k: int, rng: random.Random, reference: dict) -> tuple[bool, str, int]:
    """One run killed 1-3 times, resumed after each kill; (bit-exact and clean, account, kills in writes)."""
    results = os.path.join(work, f"try{k}")
    kills, notes, in_writes, leftovers = rng.randint(1, 3), [], 0, set()
    proc = train([*COMMAND, "--results-dir", results])
    for i in range(kills):
        during_write = rng.choice(["checkpoints", "ema", None])
        notes.append(kill_at_random(proc, results, rng, during_write))
        in_writes += notes[-1].startswith("the write")
        leftovers |= set(temporaries(only_run(results)))
        if i + 1 < kills:
            proc = train(["--resume", only_run(results)])
    finish(results)
    run = only_run(results)
    diff = differences(reference, final_state(run))
    left = temporaries(run)
    ok = not diff and not left
    return ok, (f"killed during {', '.join(notes)}; the kills left {len(leftovers)} temporary file(s), "
                f"{len(left)} remain after the resume; "
                f"{'bit-exact' if not diff else 'DIFFERS at ' + ', '.join(diff[:3])}"), in_writes


def full_disk_try(work: str, reference: dict) -> tuple[bool | None, str]:
    mount = os.path.join(work, "disk")
    os.makedirs(mount, exist_ok=True)
    # 250 MB: the first two checkpoints (~100 MB each) fit, the third does not.
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=250m", "tmpfs", mount], capture_output=True).returncode:
        return None, "skipped (cannot mount a tmpfs here)"
    try:
        results = os.path.join(mount, "results")
        p = train([*COMMAND, "--results-dir", results])
        _, err = p.communicate()
        first = f"exit {p.returncode}: {err.strip().splitlines()[-1] if err.strip() else ''}"
        if p.returncode == 0:
            return False, f"the disk did not fill up ({first})"
        left_before = len(temporaries(only_run(results)))
        subprocess.run(["mount", "-o", "remount,size=1g", mount], check=True)  # "free some space"
        finish(results)
        run = only_run(results)
        diff = differences(reference, final_state(run))
        left = temporaries(run)
        return not diff and not left, (f"{first}; {left_before} temporary file(s) before the resume, {len(left)} "
                                       f"after; {'bit-exact' if not diff else 'DIFFERS at ' + ', '.join(diff[:3])}")
    finally:
        subprocess.run(["umount", mount], capture_output=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tries", type=int, default=6, help="kill -9 tries (each 1-3 kills)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="/tmp/durability", help="scratch folder (emptied first)")
    args = p.parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    rng = random.Random(args.seed)

    ref = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *COMMAND, "--results-dir",
                          os.path.join(args.work, "reference")], cwd=ROOT, env=ENV, capture_output=True, text=True)
    if ref.returncode != 0:
        print(f"error: the reference run failed: {ref.stderr.strip()[-300:]}", file=sys.stderr)
        return 2
    reference = final_state(only_run(os.path.join(args.work, "reference")))
    print(f"reference: {STEPS} steps, {len(reference['snapshots'])} snapshots")

    outcomes, kills_in_writes = [], 0
    for k in range(args.tries):
        ok, note, in_writes = kill_try(args.work, k, rng, reference)
        outcomes.append(ok)
        kills_in_writes += in_writes
        print(f"kill -9 try {k + 1}: {'ok' if ok else 'FAILED'}: {note}", flush=True)
    print(f"{kills_in_writes} of the kills came inside a checkpoint or snapshot write")
    ok, note = full_disk_try(args.work, reference)
    print(f"full disk: {'ok' if ok else ('skipped' if ok is None else 'FAILED')}: {note}")
    if ok is not None:
        outcomes.append(ok)
    print(f"{sum(outcomes)} of {len(outcomes)} tries resumed to bit-exact weights, EMAs, Adam state and snapshots "
          f"with no temporary file left")
    shutil.rmtree(args.work, ignore_errors=True)
    return 0 if all(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
