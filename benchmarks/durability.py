"""Durability: kill -9 at random moments (some inside checkpoint and snapshot writes) and a full disk, then
resume; the resumed run must end with exactly the weights, EMAs, Adam state and snapshots of a run that was
never interrupted, and no temporary file may be left.

python -m benchmarks.durability [--tries 6] [--tool-tries 4] [--seed 0] [--work /tmp/durability]

Each try starts the same small run (DiT-XS/8 on the built-in digits, 12 steps, a checkpoint every 4 and
snapshots every 2), kills it with SIGKILL one to three times (at a random moment, or the instant a
temporary file of a checkpoint or snapshot write appears), resumes it after every kill, and compares the
end with the reference run bit for bit. Then prepare_latents.py and ema.py --export are killed (at a random
moment, or the instant a temporary file of theirs appears): what a kill leaves must be the reference output,
nothing, or (a latent folder) one every reader refuses, and the command run again must write the reference
bit for bit with no temporary file left. The full-disk try runs in a small tmpfs (needs root and `mount`;
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

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__" and not __package__:  # (run as a file, the repository root is not importable)
    print("error: run it from the repository root as a module: python -m benchmarks.durability", file=sys.stderr)
    sys.exit(2)

import data  # noqa: E402
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


# ----------------------------------------------------------------------------------------------------
# Kills of the other writers: prepare_latents.py (all files or none) and ema.py --export (the file whole or
# absent). After each kill the output must be the reference's or unusable by every reader (a latent folder
# marked INCOMPLETE is refused), and the command run again must write exactly the reference, leaving no
# temporary file.


def tool(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def kill_tool(proc: subprocess.Popen, folder: str, rng: random.Random, when: str | None, timeout: float = 300) -> str:
    """SIGKILL `proc` the instant a temporary file appears in `folder` (when="write"), the instant the file
    INCOMPLETE does (when="renames": prepare_latents.py is renaming its files into place), or at a random
    moment 0-3 s after its start (None). Returns what was interrupted."""
    start, delay = time.monotonic(), rng.uniform(0.0, 3.0)
    while proc.poll() is None and time.monotonic() - start < timeout:
        names = os.listdir(folder) if os.path.isdir(folder) else []
        found = [f for f in names if TEMP_RE.match(f)] if when == "write" else \
            [f for f in names if f == "INCOMPLETE"] if when == "renames" else []
        if found or (when is None and time.monotonic() - start > delay):
            proc.kill()
            proc.wait()
            return (f"the write of {min(found)}" if when == "write" else "the renames (INCOMPLETE present)"
                    if when == "renames" else f"its work ({delay:.1f} s after its start)")
        time.sleep(0.0005)
    proc.wait()
    return "nothing (it ended first)"


def tree_contents(folder: str) -> dict:
    """{file name: tensors or text} of the files in `folder` (none: {})."""
    if not os.path.isdir(folder):
        return {}
    out = {}
    for name in sorted(n for n in os.listdir(folder) if not TEMP_RE.match(n)):
        path = os.path.join(folder, name)
        out[name] = (torch.load(path, map_location="cpu", weights_only=True) if name.endswith(".pt")
                     else open(path, "rb").read())
    return out


def same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and not differences({k: v for k, v in a.items() if not isinstance(v, bytes)},
                                                {k: v for k, v in b.items() if not isinstance(v, bytes)}) \
        and all(a[k] == b[k] for k in a if isinstance(a[k], bytes))


def latent_folder_state(folder: str, reference: dict) -> str:
    """How a reader sees the folder a kill left: the reference, absent, or refused (marked INCOMPLETE)."""
    contents = tree_contents(folder)
    if not any(name in contents for name in data.LATENT_FILES):
        return "no latent files"
    try:
        data.LatentDataset(folder)
    except data.DatasetError as e:
        return "refused by readers" if "incomplete" in str(e) else f"BROKEN ({e})"
    return "the reference" if same(contents, reference) else "ACCEPTED BUT DIFFERENT"


def prepare_try(work: str, k: int, rng: random.Random, images: str, vae: str, reference: dict) -> tuple[bool, str]:
    out = os.path.join(work, f"latents{k}")
    command = [os.path.join(ROOT, "prepare_latents.py"), "--data-path", images, "--vae", vae, "--image-size", "16",
               "--batch-size", "4", "--device", "cpu", "--out", out]
    what = kill_tool(tool(command), out, rng, rng.choice(["write", "renames", None]))
    left = latent_folder_state(out, reference)
    again = subprocess.run([sys.executable, *command, "--overwrite"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    if again.returncode != 0:
        return False, f"killed during {what}: the run again failed: {again.stderr.strip()[-300:]}"
    temporaries_left = [f for f in os.listdir(out) if TEMP_RE.match(f) or f == "INCOMPLETE"]
    exact = same(tree_contents(out), reference)
    ok = left in ("no latent files", "refused by readers", "the reference") and exact and not temporaries_left
    return ok, (f"killed during {what}: left {left}; run again: {'bit-exact' if exact else 'DIFFERS'}, "
                f"{len(temporaries_left)} temporary file(s) left")


def export_try(work: str, k: int, rng: random.Random, run_dir: str, reference: dict) -> tuple[bool, str]:
    folder = os.path.join(work, f"export{k}")
    os.makedirs(folder)
    target = os.path.join(folder, "weights.safetensors" if k % 2 else "weights.pt")
    command = [os.path.join(ROOT, "ema.py"), "--result-dir", run_dir, "--ema-std", "0.07", "--export", target]
    what = kill_tool(tool(command), folder, rng, rng.choice(["write", None]))
    whole = tree_contents(folder)  # (a temporary file is no output: the export again removes it)
    expected = reference[os.path.basename(target)]
    left_ok = all(n in expected for n in whole) and same(whole, {n: expected[n] for n in whole})
    again = subprocess.run([sys.executable, *command], cwd=ROOT, env=ENV, capture_output=True, text=True)
    if again.returncode != 0:
        return False, f"killed during {what}: the export again failed: {again.stderr.strip()[-300:]}"
    exact = same(tree_contents(folder), expected) and not any(TEMP_RE.match(n) for n in os.listdir(folder))
    return left_ok and exact, (f"killed during {what}: left {sorted(whole) or 'nothing'} "
                               f"({'whole' if left_ok else 'DAMAGED'}); again: "
                               f"{'bit-exact, no temporary file' if exact else 'DIFFERS or temporaries left'}")


def tiny_inputs(work: str) -> tuple[str, str]:
    """An ImageFolder of 24 images (2 classes) and a tiny random VAE (saved with save_pretrained)."""
    from diffusers import AutoencoderKL  # (lazy: diffusers takes seconds to import, and only this part needs it)
    images = os.path.join(work, "images")
    gen = np.random.default_rng(0)
    for i in range(24):
        os.makedirs(os.path.join(images, f"c{i % 2}"), exist_ok=True)
        Image.fromarray(gen.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
            os.path.join(images, f"c{i % 2}", f"{i}.png"))
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=32)
    vae.save_pretrained(os.path.join(work, "vae"))
    return images, os.path.join(work, "vae")


def other_writers(work: str, tries: int, rng: random.Random) -> list[bool]:
    """The kill tries of prepare_latents.py and ema.py --export (`tries` each); prints a line per try."""
    images, vae = tiny_inputs(work)
    ref_out = os.path.join(work, "latents-reference")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "prepare_latents.py"), "--data-path", images, "--vae", vae,
                        "--image-size", "16", "--batch-size", "4", "--device", "cpu", "--out", ref_out],
                       cwd=ROOT, env=ENV, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"the reference prepare_latents.py failed: {p.stderr.strip()[-300:]}")
    latent_reference = tree_contents(ref_out)
    run_dir = only_run(os.path.join(work, "reference"))
    export_reference = {}
    for name in ("weights.pt", "weights.safetensors"):
        folder = os.path.join(work, "export-reference-" + name)
        subprocess.run([sys.executable, os.path.join(ROOT, "ema.py"), "--result-dir", run_dir, "--ema-std", "0.07",
                        "--export", os.path.join(folder, name)], cwd=ROOT, env=ENV, check=True, capture_output=True)
        export_reference[name] = tree_contents(folder)
    outcomes = []
    for k in range(tries):
        ok, note = prepare_try(work, k, rng, images, vae, latent_reference)
        outcomes.append(ok)
        print(f"prepare_latents.py kill -9 try {k + 1}: {'ok' if ok else 'FAILED'}: {note}", flush=True)
    for k in range(tries):
        ok, note = export_try(work, k, rng, run_dir, export_reference)
        outcomes.append(ok)
        print(f"ema.py --export kill -9 try {k + 1}: {'ok' if ok else 'FAILED'}: {note}", flush=True)
    return outcomes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.durability", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tries", type=int, default=6, help="kill -9 tries (each 1-3 kills)")
    p.add_argument("--tool-tries", type=int, default=4,
                   help="kill -9 tries of prepare_latents.py and of ema.py --export (each)")
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
    outcomes += other_writers(args.work, args.tool_tries, rng)
    ok, note = full_disk_try(args.work, reference)
    print(f"full disk: {'ok' if ok else ('skipped' if ok is None else 'FAILED')}: {note}")
    if ok is not None:
        outcomes.append(ok)
    print(f"{sum(outcomes)} of {len(outcomes)} tries resumed (or ran again) to bit-exact weights, EMAs, Adam state, "
          f"snapshots, latent folders and exports with no temporary file left")
    shutil.rmtree(args.work, ignore_errors=True)
    return 0 if all(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
