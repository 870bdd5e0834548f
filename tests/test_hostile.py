"""Hostile but fair input to every command line: each bad input must end in one `error:` line and a non-zero
exit code, never a traceback, and must leave the run folder exactly as it was (its listing and mtimes).

One tiny trained run (DiT-XS/8 on the built-in digits, 2 steps, a checkpoint and snapshots at each step) is
shared by all cases. The CLIs' `main(argv)` runs in this process (argument errors exit through SystemExit
like the scripts do), which is fast; the cases where an exit code comes from a signal or a second process
start real processes.
"""
import fcntl
import importlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODEL = "DiT-XS/8"
FAST = ["--model", MODEL, "--batch-size", "4", "--num-workers", "0", "--lr", "1e-3", "--log-every", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# ----------------------------------------------------------------------------------------------------
# The shared run and the harness


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import train
    results = tmp_path_factory.mktemp("hostile") / "results"
    assert train.main([*FAST, "--num-steps", "2", "--ckpt-every", "1", "--ema-snapshot-every", "1",
                       "--magnitude-every", "1", "--results-dir", str(results)]) == 0
    close_train_logger()
    [name] = os.listdir(results)
    return os.path.join(results, name)


def close_train_logger():
    logger = logging.getLogger("train")
    for h in list(logger.handlers):
        h.close()
        logger.removeHandler(h)


def tree_listing(root):
    """{relative path: (size, mtime_ns)} of everything under root (folders too)."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(d, name)
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (st.st_size if name in files else None, st.st_mtime_ns)
    return out


def run_main(module: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """`python MODULE ARGV` in this process: (exit code, stdout, stderr). An exception that escapes main is
    what the script would have shown as a traceback: it is returned as such, in stderr."""
    mod = importlib.import_module(module)
    capsys.readouterr()
    try:
        code = mod.main(argv)
    except SystemExit as e:
        code = e.code
        if isinstance(code, str):  # SystemExit("error: ..."): Python prints the text and exits 1
            print(code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001
        print(traceback.format_exc(), file=sys.stderr)
        code = 1
    finally:
        close_train_logger()
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code, out, err, needle):
    """`needle`: the words the line must hold, or a tuple of them (the problem, and the input it names)."""
    assert code not in (0, None), f"exit code {code}\n{out}\n{err}"
    assert "Traceback" not in err, err
    lines = [ln for ln in (out + err).splitlines() if "error:" in ln]
    assert len(lines) == 1, out + err
    for words in needle if isinstance(needle, tuple) else (needle,):
        assert words in lines[0], lines[0]


def linked_copy(run_dir, dest):
    """A copy of a run whose checkpoints and snapshots are hard links (instant, no disk; train.py only ever
    replaces them, never writes into them), and whose other files (logs appended to, the lock) are copies."""
    def link_or_copy(src, dst):
        return os.link(src, dst) if src.endswith(".pt") else shutil.copy2(src, dst)
    shutil.copytree(run_dir, dest, copy_function=link_or_copy)
    return str(dest)


def damage(path, how):
    """Replace `path` by a damaged file (a new inode: the shared run's hard-linked original stays whole)."""
    data = open(path, "rb").read()
    os.remove(path)
    if how == "truncated":
        open(path, "wb").write(data[:len(data) // 2])
    elif how == "empty":
        open(path, "wb").close()
    elif how == "malicious":
        class RunsCode:
            def __reduce__(self):
                return (os.system, ("echo this must never run",))
        torch.save({"model": RunsCode(), "args": {}}, path)
    elif how == "no args":
        ckpt = torch.load(__import__("io").BytesIO(data), weights_only=True)
        del ckpt["args"]
        torch.save(ckpt, path)
    else:
        raise ValueError(how)


def damaged_run(run_dir, tmp, rel_paths, how):
    """A linked copy of the run with the files `rel_paths` (a glob under the run) damaged `how`."""
    import glob
    copy = linked_copy(run_dir, os.path.join(tmp, "damaged"))
    for p in sorted(glob.glob(os.path.join(copy, rel_paths))):
        damage(p, how)
    return copy


def bad_npz(tmp, name):
    """One of the evaluation inputs that can only fail (or ok.npz, a usable images file), written under tmp."""
    import numpy as np
    path = os.path.join(tmp, name)
    ok = os.path.join(tmp, "ok.npz")
    np.savez(ok, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    if name == "images.npy":
        np.save(path, np.zeros((4, 8, 8, 3), np.uint8))
    elif name == "truncated.npz":
        whole = open(ok, "rb").read()
        open(path, "wb").write(whole[: len(whole) // 2])
    elif name == "object.npz":
        np.savez(path, arr_0=np.array([None, 1], dtype=object))
    elif name == "strings.npz":
        np.savez(path, mu=np.array(["x"] * 3), sigma=np.array([["x"] * 3] * 3))
    elif name == "stats.npz":
        np.savez(path, mu=np.zeros(3), sigma=np.eye(3))
    elif name == "dim64.npz":
        np.savez(path, mu=np.zeros(64), sigma=np.eye(64))
    elif name == "16x16.npz":
        np.savez(path, arr_0=np.zeros((4, 16, 16, 3), np.uint8))
    return path


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


def latents(folder, labels=None, nan=False):
    """A small latent folder (4 x 8 x 8) with `labels` (default 0, 1, 2 repeating)."""
    n = 12
    os.makedirs(folder, exist_ok=True)
    means = torch.randn(n, 4, 8, 8)
    if nan:
        means[5, 1, 2, 3] = float("nan")
    torch.save(means, os.path.join(folder, "posterior_means.pt"))
    torch.save(torch.rand(n, 4, 8, 8) * 0.5 + 0.1, os.path.join(folder, "posterior_stds.pt"))
    torch.save(torch.tensor(labels if labels is not None else [i % 3 for i in range(n)]),
               os.path.join(folder, "labels.pt"))
    return str(folder)


def hf_images(tmp):
    """A Hugging Face dataset on disk (splits train and test; columns image, label, caption)."""
    from helpers import save_tiny_hf_dataset
    return save_tiny_hf_dataset(os.path.join(tmp, "hf"), n=2, splits=("train", "test"))


def hf_run(*extra):
    """train.py on a Hugging Face dataset on disk, with `extra`."""
    return lambda r, t: new_run("--data-path", hf_images(t), "--image-size", "8", *extra)(r, t)


def config_replaced(run_dir, tmp, text):
    copy = linked_copy(run_dir, os.path.join(tmp, "edited"))
    os.remove(os.path.join(copy, "config.json"))
    write(os.path.join(copy, "config.json"), text)
    return copy


def config_edited(run_dir, tmp, **changes):
    config = json.load(open(os.path.join(run_dir, "config.json")))
    config.update(changes)
    return config_replaced(run_dir, tmp, json.dumps(config))


def magnitudes_replaced(run_dir, tmp, lines):
    copy = linked_copy(run_dir, os.path.join(tmp, "edited"))
    os.remove(os.path.join(copy, "magnitudes.jsonl"))
    write(os.path.join(copy, "magnitudes.jsonl"), "".join(line + "\n" for line in lines))
    return copy


# ----------------------------------------------------------------------------------------------------
# The cases: (command, argv from (run folder, a fresh temporary folder), text the error line must hold).
# Each returns the folder that must stay unchanged as the first element of its argv's "watch" (the run,
# or the damaged copy the case made); see `test_bad_input`.


def results_of(run_dir):
    return os.path.dirname(run_dir)


def new_run(*extra):
    """train.py starting a new run in the shared results folder, with FAST options and `extra`."""
    return lambda r, t: [*FAST, "--num-steps", "2", "--results-dir", results_of(r), *extra]


TRAIN = {
    "num-steps 0": (new_run("--num-steps", "0"), "--num-steps must be positive"),
    "num-steps not a number": (new_run("--num-steps", "ten"), "invalid int value"),
    "batch-size -1": (new_run("--batch-size", "-1"), "--batch-size must be positive"),
    "lr nan": (new_run("--lr", "nan"), "--lr must be a positive number"),
    "lr -1": (new_run("--lr", "-1"), "--lr must be a positive number"),
    "lr inf": (new_run("--lr", "inf"), "--lr must be a positive number"),
    "image-size 0": (new_run("--image-size", "0"), "--image-size must be positive"),
    "image-size -4": (new_run("--image-size", "-4"), "--image-size must be positive"),
    "grad-clip nan": (new_run("--grad-clip", "nan"), "--grad-clip must be a finite number >= 0"),
    "grad-clip -1": (new_run("--grad-clip", "-1"), "--grad-clip must be a finite number >= 0"),
    "grad-clip inf": (new_run("--grad-clip", "inf"), "--grad-clip must be a finite number >= 0"),
    "num-workers -1": (new_run("--num-workers", "-1"), "--num-workers must be >= 0"),
    "num-classes 0": (new_run("--num-classes", "0"), "--num-classes must be positive"),
    "ema-stds 0.5": (new_run("--ema-stds", "0.5"), "outside (0, 0.2887)"),
    "ema-stds nan": (new_run("--ema-stds", "nan"), "outside (0, 0.2887)"),
    "ema-stds twice the same": (new_run("--ema-stds", "0.05", "0.05"), "duplicate"),
    "keep-checkpoints -1": (new_run("--keep-checkpoints", "-1"), "--keep-checkpoints must be >= 0"),
    "log-every 0": (new_run("--log-every", "0"), "--log-every must be positive"),
    "ckpt-every 0": (new_run("--ckpt-every", "0"), "--ckpt-every must be positive"),
    "magnitude-every 0": (new_run("--magnitude-every", "0"), "--magnitude-every must be positive"),
    "num-lin-warmup -1": (new_run("--num-lin-warmup", "-1"), "--num-lin-warmup"),
    "seed beyond 63 bits": (new_run("--seed", str(2 ** 70)), "--seed must be in 0 .."),
    "seed -1": (new_run("--seed", "-1"), "--seed must be in 0 .."),
    "model unknown": (new_run("--model", "DiT-Q/3"), "invalid choice"),
    "precision fp8": (new_run("--precision", "fp8"), "invalid choice"),
    "compile-mode without compile": (new_run("--compile-mode", "reduce-overhead"), "needs --compile"),
    "device bogus": (new_run("--device", "bogus"), "--device bogus"),
    "device cuda:99": (new_run("--device", "cuda:99"), "--device cuda:99"),
    "data-path missing": (lambda r, t: new_run("--data-path", os.path.join(t, "nope"))(r, t), "not found"),
    "data-path a text file": (lambda r, t: new_run("--data-path", write(os.path.join(t, "d.txt"), "x"))(r, t),
                              "d.txt is a file; pass a latent folder"),
    "results-dir a file": (lambda r, t: [*FAST, "--num-steps", "2", "--results-dir",
                                         write(os.path.join(t, "results"), "x")], "is a file"),
    "one stray label of 10^6": (lambda r, t: new_run("--data-path", latents(os.path.join(t, "lat"),
                                                     labels=[0, 1, 2] * 3 + [0, 1, 10 ** 6]))(r, t),
                                "--num-classes 1000001"),
    "data with NaN": (lambda r, t: new_run("--data-path", latents(os.path.join(t, "lat"), nan=True))(r, t),
                      "non-finite"),
    "hf split unknown": (hf_run("--split", "validation"), "no split 'validation'; pass --split with one of: train"),
    "hf image column missing": (hf_run("--image-column", "picture"), "no column 'picture'"),
    "hf image column not images": (hf_run("--image-column", "caption"), "not images; pass --image-column"),
    "hf label column missing": (hf_run("--label-column", "class"), "pass --label-column NAME"),
    "hf label column text": (hf_run("--label-column", "caption"), "not integer class labels"),
    "hf images without image-size": (lambda r, t: new_run("--data-path", hf_images(t))(r, t), "pass --image-size"),
    "vae folder missing": (lambda r, t: hf_run("--vae", os.path.join(t, "no-vae"))(r, t), "VAE folder not found"),
    "vae with a built-in set": (new_run("--vae", "some/vae"), "built-in set trained in pixel space; drop --vae"),
    "vae with a latent folder": (lambda r, t: new_run("--data-path", latents(os.path.join(t, "lat")), "--vae",
                                                      "some/vae")(r, t), "already encoded"),
    "random-flip without mirrored latents": (lambda r, t: new_run("--data-path", latents(os.path.join(t, "lat")),
                                                                  "--random-flip")(r, t),
                                             "prepare_latents.py --random-flip"),
    "resume missing folder": (lambda r, t: ["--resume", os.path.join(t, "nope")], "not found"),
    "resume not a run folder": (lambda r, t: ["--resume", t], "no config.json"),
    "resume config.json '{}'": (lambda r, t: ["--resume", config_replaced(r, t, "{}")],
                                ("config.json is not a train.py run config", "no 'args'")),
    "resume config.json not JSON": (lambda r, t: ["--resume", config_replaced(r, t, "{'model':")],
                                    "config.json is not valid JSON"),
    "resume config.json a list": (lambda r, t: ["--resume", config_replaced(r, t, "[1, 2]")],
                                  ("config.json is not a train.py run config", "holds a list")),
    "resume config args not a dict": (lambda r, t: ["--resume", config_edited(r, t, args=3)],
                                      ("config.json is not a train.py run config", "as 'args'")),
    "resume every checkpoint truncated": (lambda r, t: ["--resume", damaged_run(r, t, "checkpoints/*.pt",
                                                                                "truncated")], "is damaged"),
    "resume every checkpoint empty": (lambda r, t: ["--resume", damaged_run(r, t, "checkpoints/*.pt", "empty")],
                                      "is damaged (empty"),
    "resume a malicious checkpoint": (lambda r, t: ["--resume", damaged_run(r, t, "checkpoints/*.pt",
                                                                            "malicious")], "not a trusted checkpoint"),
    "resume a checkpoint without args": (lambda r, t: ["--resume", damaged_run(r, t, "checkpoints/*.pt",
                                                                               "no args")], "'args'"),
    "resume with another model": (lambda r, t: ["--resume", r, "--model", "DiT-S/8"], "--model"),
    "resume with another lr": (lambda r, t: ["--resume", r, "--lr", "5"], "--lr"),
    "resume with MP switches": (lambda r, t: ["--resume", r, "--use-all-mp"], "MP switches"),
    "resume with num-steps 0": (lambda r, t: ["--resume", r, "--num-steps", "0"], "--num-steps must be positive"),
    "resume with device bogus": (lambda r, t: ["--resume", r, "--device", "bogus"], "--device bogus"),
}
if importlib.util.find_spec("wandb") is None:  # (an optional package: the case exists where it is missing)
    TRAIN["wandb not installed"] = (new_run("--wandb"), "pip install wandb")

SAMPLE = {
    "result-dir missing": (lambda r, t: ["--result-dir", os.path.join(t, "nope")], "not found"),
    "not a run folder": (lambda r, t: ["--result-dir", t], "no config.json"),
    "ckpt not there": (lambda r, t: ["--result-dir", r, "--ckpt", "999"], "no checkpoint at step 999"),
    "ckpt truncated": (lambda r, t: ["--result-dir", damaged_run(r, t, "checkpoints/0000002.pt", "truncated"),
                                     "--ckpt", "2"], "0000002.pt is damaged"),
    "ckpt empty": (lambda r, t: ["--result-dir", damaged_run(r, t, "checkpoints/0000002.pt", "empty"),
                                 "--ckpt", "2"], "0000002.pt is damaged (empty"),
    "ckpt malicious": (lambda r, t: ["--result-dir", damaged_run(r, t, "checkpoints/0000002.pt", "malicious"),
                                     "--ckpt", "2"], "not a trusted checkpoint"),
    "snapshot truncated": (lambda r, t: ["--result-dir", damaged_run(r, t, "ema/ema-0.050-0000002.pt",
                                                                     "truncated")], "is damaged"),
    "config of another model": (lambda r, t: ["--result-dir", config_edited(r, t, model="DiT-S/8"), "--ckpt",
                                              "2"], "does not fit"),
    "config '{}'": (lambda r, t: ["--result-dir", config_replaced(r, t, "{}")],
                    ("config.json is not a train.py run config", "no 'args'")),
    "ema-std 0.5": (lambda r, t: ["--result-dir", r, "--ema-std", "0.5"], "0.2887"),
    "step after the last snapshot": (lambda r, t: ["--result-dir", r, "--step", "99"], "after the last snapshot"),
    "class-label 99": (lambda r, t: ["--result-dir", r, "--class-label", "99"], "out of range"),
    "num-samples 0": (lambda r, t: ["--result-dir", r, "--num-samples", "0"], "--num-samples"),
    "sampler unknown": (lambda r, t: ["--result-dir", r, "--sampler", "euler"], "invalid choice"),
    "seed 1e23": (lambda r, t: ["--result-dir", r, "--seed", "1e23"], "invalid int value"),
    "seed 10**23": (lambda r, t: ["--result-dir", r, "--seed", str(10**23)], "--seed must be an integer in 0.."),
    "cfg-scale nan": (lambda r, t: ["--result-dir", r, "--cfg-scale", "nan"], "--cfg-scale must be a finite"),
    "cfg-scale inf": (lambda r, t: ["--result-dir", r, "--cfg-scale", "inf"], "--cfg-scale must be a finite"),
    "batch-size 0": (lambda r, t: ["--result-dir", r, "--batch-size", "0"], "--batch-size must be at least 1"),
    "device bogus": (lambda r, t: ["--result-dir", r, "--device", "bogus"], "--device bogus: not a device"),
    "device cuda:7": (lambda r, t: ["--result-dir", r, "--device", "cuda:7"], "--device cuda:7"),
    "num-sampling-steps 0": (lambda r, t: ["--result-dir", r, "--num-sampling-steps", "0"], "in 1..1000"),
    "heun 1 step": (lambda r, t: ["--result-dir", r, "--sampler", "heun", "--num-sampling-steps", "1"],
                    "at least 2"),
    "ddim-eta -1": (lambda r, t: ["--result-dir", r, "--sampler", "ddim", "--ddim-eta", "-1"], "--ddim-eta"),
    "guidance-interval reversed": (lambda r, t: ["--result-dir", r, "--guidance-interval", "5", "1"],
                                   "--guidance-interval"),
    "guidance-interval one number": (lambda r, t: ["--result-dir", r, "--guidance-interval", "5"],
                                     "expected 2 arguments"),
    "guide not a run": (lambda r, t: ["--result-dir", r, "--guide", os.path.join(t, "nope")], "not a run folder"),
    "guide ema:abc": (lambda r, t: ["--result-dir", r, "--guide", "ema:abc"], "needs a number"),
    "guide ckpt:99": (lambda r, t: ["--result-dir", r, "--guide", "ckpt:99"], "no checkpoint at step 99"),
    "guide of another size": (lambda r, t: ["--result-dir", r, "--guide", config_edited(r, t, input_size=32)],
                              "its image size is 32"),
    "guide of another class count": (lambda r, t: ["--result-dir", r, "--guide", config_edited(r, t, num_classes=3)],
                                     "its class count is 3"),
}

EMA = {
    "ema-std 0.3": (lambda r, t: ["--result-dir", r, "--ema-std", "0.3"], "0.2887"),
    "ema-std nan": (lambda r, t: ["--result-dir", r, "--ema-std", "nan"], "0.2887"),
    "ema-std not a number": (lambda r, t: ["--result-dir", r, "--ema-std", "abc"], "invalid float"),
    "no ema-std": (lambda r, t: ["--result-dir", r], "required"),
    "result-dir missing": (lambda r, t: ["--result-dir", os.path.join(t, "nope"), "--ema-std", "0.05"],
                           "not found"),
    "step not there": (lambda r, t: ["--result-dir", r, "--ema-std", "0.05", "--step", "-5"], "no snapshots"),
    "snapshot truncated": (lambda r, t: ["--result-dir", damaged_run(r, t, "ema/ema-0.100-0000002.pt",
                                                                     "truncated"), "--ema-std", "0.05"],
                           "ema-0.100-0000002.pt is damaged"),
    "snapshot empty": (lambda r, t: ["--result-dir", damaged_run(r, t, "ema/ema-0.050-0000001.pt", "empty"),
                                     "--ema-std", "0.05"], "is damaged (empty"),
    "snapshot malicious": (lambda r, t: ["--result-dir", damaged_run(r, t, "ema/ema-0.050-0000001.pt",
                                                                     "malicious"), "--ema-std", "0.05"],
                           "not a trusted EMA snapshot"),
    "out under a file": (lambda r, t: ["--result-dir", r, "--ema-std", "0.05", "--out",
                                       os.path.join(write(os.path.join(t, "f"), "x"), "sub")],
                         "a file stands where a folder should be"),
}

PLOTS = {
    "nothing to plot": (lambda r, t: [], "give run folders"),
    "run folder missing": (lambda r, t: [os.path.join(t, "nope")], "not found"),
    "no magnitudes": (lambda r, t: [t, "--out", os.path.join(t, "m.png")], "no magnitudes.jsonl records"),
    "magnitudes without act_rms": (lambda r, t: [magnitudes_replaced(r, t, ['{"step": 1, "weight_rms": [1]}']),
                                                 "--out", os.path.join(t, "m.png")], "'act_rms'"),
    "magnitudes with a string": (lambda r, t: [magnitudes_replaced(r, t, [
        '{"step": 1, "act_rms": ["big"], "weight_rms": [1]}']), "--out", os.path.join(t, "m.png")], "'act_rms'"),
    "magnitudes of two depths": (lambda r, t: [magnitudes_replaced(r, t, [
        '{"step": 1, "act_rms": [1, 2], "weight_rms": [1, 2]}',
        '{"step": 2, "act_rms": [1], "weight_rms": [1]}']), "--out", os.path.join(t, "m.png")], "record 2"),
    "magnitudes step a string": (lambda r, t: [magnitudes_replaced(r, t, [
        '{"step": "one", "act_rms": [1], "weight_rms": [1]}']), "--out", os.path.join(t, "m.png")], "'step'"),
    "loss curve missing": (lambda r, t: ["--loss-curves", os.path.join(t, "nope.jsonl"),
                                         "--out", os.path.join(t, "l.png")], "no records"),
    "loss curve without loss": (lambda r, t: ["--loss-curves", write(os.path.join(t, "m.jsonl"), '{"step": 1}\n'),
                                              "--out", os.path.join(t, "l.png")], "'loss'"),
    "out under a file": (lambda r, t: [r, "--out", os.path.join(write(os.path.join(t, "f"), "x"), "m.png")],
                         "a file stands where a folder should be"),
}

EVALUATE = {
    "a missing": (lambda r, t: [os.path.join(t, "a.npz"), os.path.join(t, "b.npz")],
                  ("no such file or folder: ", "a.npz")),
    "only one path": (lambda r, t: [os.path.join(t, "a.npz")], "required"),
    "batch-size 0": (lambda r, t: [t, t, "--batch-size", "0"], "--batch-size"),
    "method unknown": (lambda r, t: [t, t, "--method", "svd"], "invalid choice"),
    "a .npy": (lambda r, t: [bad_npz(t, "images.npy"), bad_npz(t, "ok.npz")], "single .npy array"),
    "a truncated .npz": (lambda r, t: [bad_npz(t, "truncated.npz"), bad_npz(t, "ok.npz")], "not a readable .npz"),
    "an object arr_0": (lambda r, t: [bad_npz(t, "object.npz"), bad_npz(t, "ok.npz")], "not a plain numeric array"),
    "string statistics": (lambda r, t: [bad_npz(t, "ok.npz"), bad_npz(t, "strings.npz")], "must be numbers"),
    "garbage file": (lambda r, t: [write(os.path.join(t, "g.npz"), "garbage"), bad_npz(t, "ok.npz")],
                     "not a readable .npz"),
    "device bogus": (lambda r, t: [bad_npz(t, "ok.npz"), bad_npz(t, "ok.npz"), "--device", "bogus"],
                     "--device bogus: "),
    "images of two sizes": (lambda r, t: [bad_npz(t, "ok.npz"), bad_npz(t, "16x16.npz")], "image sizes differ"),
    "samples' statistics of 3 features": (lambda r, t: [bad_npz(t, "stats.npz"), bad_npz(t, "ok.npz")],
                                          "have 3 features but this Inception network gives 2048"),
    "metric unknown": (lambda r, t: [t, t, "--metrics", "kid"], "invalid choice"),
    "classifier garbage": (lambda r, t: [bad_npz(t, "ok.npz"), bad_npz(t, "ok.npz"), "--inception-classifier",
                                         write(os.path.join(t, "c.pth"), "x")], "not usable as the Inception"),
    "classifier missing": (lambda r, t: [bad_npz(t, "ok.npz"), bad_npz(t, "ok.npz"), "--inception-classifier",
                                         os.path.join(t, "none.pth")], "classifier weights not found"),
    "statistics of 64 features": (lambda r, t: [bad_npz(t, "ok.npz"), bad_npz(t, "dim64.npz")],
                                  "have 64 features but this Inception network gives 2048"),
}

SAMPLE_FID = {
    "result-dir missing": (lambda r, t: ["--result-dir", os.path.join(t, "nope")], "not found"),
    "ref missing": (lambda r, t: ["--result-dir", r, "--ref", os.path.join(t, "ref.npz")],
                    ("reference not found: ", "ref.npz")),
    "num-samples 1": (lambda r, t: ["--result-dir", r, "--num-samples", "1", "--ref", "none"], "--num-samples"),
    "ckpt truncated": (lambda r, t: ["--result-dir", damaged_run(r, t, "checkpoints/0000002.pt", "truncated"),
                                     "--ckpt", "2", "--ref", "none"], "is damaged"),
    "ref garbage": (lambda r, t: ["--result-dir", r, "--ref", write(os.path.join(t, "g.npz"), "garbage")],
                    "not a readable .npz"),
    "ref truncated": (lambda r, t: ["--result-dir", r, "--ref", bad_npz(t, "truncated.npz")], "not a readable .npz"),
    "ref of 64-dim statistics": (lambda r, t: ["--result-dir", r, "--ref", bad_npz(t, "dim64.npz")],
                                 "have 64 features but this Inception network gives 2048"),
    "ref an empty folder": (lambda r, t: ["--result-dir", r, "--ref", t], "contains no images"),
    "inception-weights missing": (lambda r, t: ["--result-dir", r, "--inception-weights", os.path.join(t, "w.pt")],
                                  "Inception weights file not found"),
    "inception-weights garbage": (lambda r, t: ["--result-dir", r, "--inception-weights",
                                                write(os.path.join(t, "w.pt"), "x")], "could not load Inception"),
    "cfg-scale nan": (lambda r, t: ["--result-dir", r, "--cfg-scale", "nan", "--ref", "none"], "finite number"),
    "cfg-scale inf": (lambda r, t: ["--result-dir", r, "--cfg-scale", "inf", "--ref", "none"], "finite number"),
    "batch-size 0": (lambda r, t: ["--result-dir", r, "--batch-size", "0", "--ref", "none"], "--batch-size"),
    "guide of another size": (lambda r, t: ["--result-dir", r, "--guide", config_edited(r, t, input_size=32),
                                            "--ref", "none"], "its image size is 32"),
}

REF_STATS = {
    "data-path missing": (lambda r, t: ["--data-path", os.path.join(t, "nope"), "--out", os.path.join(t, "s.npz")],
                          "not found"),
    "out exists": (lambda r, t: ["--data-path", "digits", "--out", write(os.path.join(t, "s.npz"), "x")], "exists"),
    "no out": (lambda r, t: ["--data-path", "digits"], "required"),
}

PREPARE = {
    "data-path missing": (lambda r, t: ["--data-path", os.path.join(t, "nope"), "--out", os.path.join(t, "o")],
                          ("data path not found: ", "nope")),
    "image-size 0": (lambda r, t: ["--data-path", t, "--out", os.path.join(t, "o"), "--image-size", "0"],
                     "--image-size must be positive"),
    "batch-size 0": (lambda r, t: ["--data-path", t, "--out", os.path.join(t, "o"), "--batch-size", "0"],
                     "--batch-size must be positive"),
    "empty image folder": (lambda r, t: ["--data-path", t, "--out", os.path.join(t, "o")], "is empty"),
    "hf split unknown": (lambda r, t: ["--data-path", hf_images(t), "--out", os.path.join(t, "o"), "--split", "val"],
                         "no split 'val'"),
    "hf image column not images": (lambda r, t: ["--data-path", hf_images(t), "--out", os.path.join(t, "o"),
                                                 "--image-column", "label"], "not images"),
    "a latent folder as input": (lambda r, t: ["--data-path", latents(os.path.join(t, "lat")), "--out",
                                               os.path.join(t, "o")], "latent folder already"),
}

ABLATE = {
    "rung 99": (lambda r, t: ["--out-dir", os.path.join(t, "a"), "--rungs", "99"], "rung 99 does not exist"),
    "num-steps 0": (lambda r, t: ["--out-dir", os.path.join(t, "a"), "--num-steps", "0"], "--num-steps must be >= 1"),
    "ref missing": (lambda r, t: ["--out-dir", os.path.join(t, "a"), "--ref", os.path.join(t, "r.npz")],
                    "FID reference not found"),
}

BENCH = {
    "models entry malformed": (lambda r, t: ["--models", "DiT-XS/2", "--dry-run"], "--models entry"),
    "unknown switch": (lambda r, t: ["--switches", "warp", "--dry-run"], "unknown switch"),
    "steps 0": (lambda r, t: ["--steps", "0", "--dry-run"], "must be at least 1"),
    "precision unknown": (lambda r, t: ["--precisions", "fp8"], "invalid choice"),
}

COMMANDS = {"train": TRAIN, "sample": SAMPLE, "ema": EMA, "plots": PLOTS, "eval.evaluate": EVALUATE,
            "eval.sample_fid": SAMPLE_FID, "eval.ref_stats": REF_STATS, "prepare_latents": PREPARE,
            "ablate": ABLATE, "bench": BENCH}
CASES = [(module, name) for module, cases in COMMANDS.items() for name in cases]


def test_every_command_line_of_the_repository_has_bad_input_cases():
    # A script added without cases here would be the one whose bad input nobody tried. (benchmarks/ are
    # developer tools, not the user's command lines.)
    import glob
    scripts = set()
    for path in glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "eval", "*.py")):
        source = open(path).read()
        if "def main(" in source and '__name__ == "__main__"' in source:
            scripts.add(os.path.relpath(path, ROOT)[:-3].replace(os.sep, "."))
    assert scripts == set(COMMANDS), f"scripts without cases: {sorted(scripts - set(COMMANDS))}"


@pytest.mark.parametrize("module, name", CASES, ids=[f"{m}: {n}" for m, n in CASES])
def test_bad_input(run, tmp_path, capsys, module, name):
    make_argv, needle = COMMANDS[module][name]
    argv = make_argv(run, str(tmp_path))
    watched = [results_of(run)] + [a for a in argv if a.startswith(str(tmp_path)) and os.path.isdir(a)]
    before = {w: tree_listing(w) for w in watched}
    code, out, err = run_main(module, argv, capsys)
    assert_one_error_line(code, out, err, needle)
    for w in watched:
        assert tree_listing(w) == before[w], f"{w} changed"


# ----------------------------------------------------------------------------------------------------
# The faults behind the cases, one test each: the reproduction, then the behaviour it has now.


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_resume_skips_a_damaged_newest_checkpoint_and_says_so(run, tmp_path, capsys):
    # before: a truncated newest checkpoint was a RuntimeError traceback and the run did not resume
    copy = damaged_run(run, str(tmp_path), "checkpoints/0000002.pt", "truncated")
    code, out, err = run_main("train", ["--resume", copy], capsys)
    assert code == 0, err
    damaged = os.path.join(copy, "checkpoints", "0000002.pt")
    assert f"warning: skipped a checkpoint that does not load: checkpoint {damaged} is damaged" in out
    assert "from step 1 (" in out and "0000001.pt)" in out
    # It trained step 2 again, to exactly the checkpoint the uninterrupted run wrote.
    again, original = load(damaged), load(os.path.join(run, "checkpoints", "0000002.pt"))
    for key in ("model", "ema"):
        assert all(torch.equal(a, b) for a, b in zip(torch.utils._pytree.tree_leaves(again[key]),
                                                       torch.utils._pytree.tree_leaves(original[key])))


def test_a_second_writer_of_a_run_folder_gets_one_line_naming_the_first(run, tmp_path, capsys):
    # before: two `train.py --resume RUN` at once both ran, and metrics.jsonl read 13, 13, 14, 15, 14, 15, ...
    import runs
    copy = linked_copy(run, tmp_path / "run")
    with runs.RunLock(copy) as held:
        held.name_holder()
        before = tree_listing(copy)
        code, out, err = run_main("train", ["--resume", copy], capsys)
        assert_one_error_line(code, out, err, f"is in use by train.py (pid {os.getpid()} on ")
        assert tree_listing(copy) == before
    code, out, err = run_main("train", ["--resume", copy, "--num-steps", "3"], capsys)  # the lock is free again
    assert code == 0, err


def test_a_killed_writer_does_not_leave_its_run_folder_locked(tmp_path):
    import runs
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, runs; lock = runs.RunLock(sys.argv[1]); "
                               "print('locked', flush=True); time.sleep(600)", str(tmp_path)],
                              cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(runs.RunError, match="is in use by"):
            runs.RunLock(str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    runs.RunLock(str(tmp_path)).release()  # kill -9 released it


def test_resume_removes_the_temporaries_of_killed_writes_only(run, tmp_path, capsys):
    # before: every kill -9 inside a checkpoint write left a full-size .*.tmp.pt behind, for ever
    copy = linked_copy(run, tmp_path / "run")
    stale = [os.path.join(copy, "checkpoints", ".0000003.pt.k2j4h1x9.tmp.pt"),
             os.path.join(copy, "ema", ".ema-0.050-0000003.pt.a8d7f6s5.tmp.pt"),
             os.path.join(copy, ".metrics.jsonl.q1w2e3r4.tmp.jsonl")]
    kept = [os.path.join(copy, "samples", ".ema0.05-cfg4.png.z9x8c7v6.tmp.png"),  # sample.py's, not train.py's
            os.path.join(copy, "notes.tmp")]
    for p in stale + kept:
        write(p, "x" * 1000)
    code, out, err = run_main("train", ["--resume", copy, "--num-steps", "3"], capsys)
    assert code == 0, err
    assert "removed 3 temporary file(s) (0.0 MB) of interrupted writes" in out
    assert not any(map(os.path.exists, stale)) and all(map(os.path.exists, kept))


def test_ctrl_c_during_start_up_is_one_line_and_exit_130(run, tmp_path, capsys, monkeypatch):
    # before: a KeyboardInterrupt traceback
    import data
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(data, "load_dataset", interrupted)
    results = tmp_path / "results"
    code, out, err = run_main("train", [*FAST, "--num-steps", "2", "--results-dir", str(results)], capsys)
    assert code == 130 and "Traceback" not in err
    assert err.strip() == "error: interrupted (Ctrl-C) during start-up; nothing was trained"
    assert not results.exists()
