"""Hostile input, second round: run folders that cannot be turned against their user (links), files that lie
about themselves (config.json, checkpoints, snapshots, latent folders, image headers), sizes that cannot be
allocated, output paths that cannot be written, and signals.

Each case must end in exactly one `error:` line and a non-zero exit code, never a traceback, and must leave
the shared run's results folder and everything under the case's temporary folder exactly as they were:
listing, sizes, mtimes, file contents, link targets (so a link's target outside the run is unchanged too).
The harness and the shared run are tests/test_hostile.py's.

    python -m pytest -q tests/test_hostile_second.py
"""
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from test_hostile import (ENV, FAST, ROOT, assert_one_error_line, config_edited, config_replaced, latents,  # noqa: F401
                          linked_copy, results_of, run, run_main, write)


# ----------------------------------------------------------------------------------------------------
# What must stay unchanged, and builders of the hostile inputs


def state_of(root):
    """{relative path: what it is}: a link's target, a folder's mtime, a file's size, mtime and contents."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(d, name)
            st = os.lstat(p)
            if os.path.islink(p):
                out[os.path.relpath(p, root)] = ("link", os.readlink(p))
            elif name in dirs:
                out[os.path.relpath(p, root)] = ("dir", st.st_mtime_ns)
            else:
                with open(p, "rb") as f:
                    digest = hashlib.sha1(f.read()).hexdigest()
                out[os.path.relpath(p, root)] = ("file", st.st_size, st.st_mtime_ns, digest)
    return out


def outside(t, name="precious.txt"):
    """A file outside every run folder, which a link in a run points to: it must never change."""
    return write(os.path.join(t, "outside", name), "a file of the user's that no tool may touch\n")


def run_with_link(r, t, rel, target=None, dangling=False):
    """A linked copy of the run whose entry `rel` is a symbolic link: to `target`, to a copy of the entry
    kept outside the run, or (dangling) to a path that does not exist."""
    copy = linked_copy(r, os.path.join(t, "linked"))
    entry = os.path.join(copy, rel)
    if dangling:
        target = os.path.join(t, "outside", "does-not-exist")
        os.makedirs(os.path.dirname(target), exist_ok=True)
    elif target is None:
        target = os.path.join(t, "outside", os.path.basename(rel))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.isdir(entry):
            import shutil
            shutil.copytree(entry, target)
        else:
            os.rename(entry, target)
    if os.path.isdir(entry) and not os.path.islink(entry):
        import shutil
        shutil.rmtree(entry)
    elif os.path.lexists(entry):
        os.remove(entry)
    os.symlink(target, entry)
    return copy


def edited_torch(path, edit):
    """Replace the torch file `path` by an edited copy (a new inode: the shared run's hard link stays whole)."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    edit(obj)
    os.remove(path)
    torch.save(obj, path)


def run_with_edited(r, t, pattern, edit):
    """A linked copy of the run with the torch files matching `pattern` edited by `edit`."""
    import glob
    copy = linked_copy(r, os.path.join(t, "edited"))
    paths = sorted(glob.glob(os.path.join(copy, pattern)))
    assert paths, pattern
    for p in paths:
        edited_torch(p, edit)
    return copy


def first_param(state):
    return next(k for k, v in state.items() if v.is_floating_point() and v.dim() >= 2)


def set_value(value):
    def edit(snap):
        state = snap["state"] if "state" in snap else snap["model"]
        state[first_param(state)].view(-1)[3] = value
    return edit


def edit_ckpt(key, value):
    """Set a value of the checkpoint's `key` ("model", "ema" or "opt") to `value`."""
    def edit(ckpt):
        if key == "model":
            ckpt["model"][first_param(ckpt["model"])].view(-1)[0] = value
        elif key == "ema":
            ema = next(iter(ckpt["ema"].values()))
            ema[first_param(ema)].view(-1)[0] = value
        else:
            next(iter(ckpt["opt"]["state"].values()))["exp_avg_sq"].view(-1)[0] = value
    return edit


def ema_of_another_shape(ckpt):
    ema = next(iter(ckpt["ema"].values()))
    ema[first_param(ema)] = torch.zeros(3, 5)


def adam_of_another_shape(ckpt):
    next(iter(ckpt["opt"]["state"].values()))["exp_avg"] = torch.zeros(7)


def adam_of_fewer_parameters(ckpt):
    group = ckpt["opt"]["param_groups"][0]
    dropped = group["params"].pop()
    ckpt["opt"]["state"].pop(dropped, None)


def rng_without(key):
    def edit(ckpt):
        del ckpt["rng"][key]
    return edit


def rng_of_floats(ckpt):
    ckpt["rng"]["cpu"] = torch.zeros(5)


def config_data_edited(r, t, **changes):
    config = json.load(open(os.path.join(r, "config.json")))
    config["data"] = {k: v for k, v in {**config["data"], **changes}.items() if v is not None}
    return config_replaced(r, t, json.dumps(config))


def config_args_edited(r, t, **changes):
    config = json.load(open(os.path.join(r, "config.json")))
    config["args"].update(changes)
    return config_replaced(r, t, json.dumps(config))


def latent_stats(t, mean, std):
    folder = latents(os.path.join(t, "lat"))
    torch.save({"mean": torch.tensor(mean), "std": torch.tensor(std)}, os.path.join(folder, "stats.pt"))
    return folder


def latents_of_size(t, size, width=None):
    folder = os.path.join(t, "lat")
    os.makedirs(folder)
    shape = (6, 4, size, width or size)
    torch.save(torch.randn(shape), os.path.join(folder, "posterior_means.pt"))
    torch.save(torch.rand(shape) + 0.1, os.path.join(folder, "posterior_stds.pt"))
    torch.save(torch.tensor([0, 1, 2] * 2), os.path.join(folder, "labels.pt"))
    return folder


def non_square_latents(t):
    return latents_of_size(t, 8, 16)


def latent_incomplete(t, only_marker=False):
    """A latent folder as a kill between prepare_latents.py's first and last rename leaves it."""
    folder = os.path.join(t, "lat")
    if only_marker:
        os.makedirs(folder)
        write(os.path.join(folder, ".posterior_means.pt.abc123.tmp.pt"), "partial")
    else:
        latents(folder)
    write(os.path.join(folder, "INCOMPLETE"), "prepare_latents.py is writing this folder\n")
    return folder


def image_folder(t, classes=("a", "b"), n=2, size=(20, 18), mode="RGB"):
    root = os.path.join(t, "images")
    rng = np.random.default_rng(0)
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode).save(
                os.path.join(root, c, f"{i}.png"))
    return root


def with_loop(t):
    root = image_folder(t)
    os.symlink("..", os.path.join(root, "a", "loop"))
    return root


def with_duplicate_class(t):
    root = image_folder(t, classes=("a",))
    os.symlink(os.path.join(root, "a"), os.path.join(root, "b"))
    return root


def bomb_png(path, side=30000):
    """A PNG of a few hundred bytes whose header claims side x side pixels (its data is not even there)."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def with_bomb(t):
    root = image_folder(t)
    bomb_png(os.path.join(root, "b", "bomb.png"))
    return root


def with_garbage_image(t):
    root = image_folder(t)
    write(os.path.join(root, "b", "zz-broken.png"), "this is no PNG")
    return root


def tiny_vae(t):
    from helpers import save_tiny_vae
    return save_tiny_vae(os.path.join(t, "vae"))


def lying_npz(t, key="arr_0", shape=(10 ** 6, 512, 512, 3), descr="|u1"):
    """An .npz of a few bytes whose member's header claims `shape` (numpy would allocate it all first)."""
    import io
    import zipfile
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, {"descr": descr, "fortran_order": False, "shape": shape})
    member.write(b"\0" * 64)
    path = os.path.join(t, "lying.npz")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(key + ".npy", member.getvalue())
        if key == "mu":
            z.writestr("sigma.npy", member.getvalue())
    return path


def npz_images(t, name="ok.npz"):
    path = os.path.join(t, name)
    np.savez(path, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    return path


def new_run(*extra):
    return lambda r, t: [*FAST, "--num-steps", "2", "--results-dir", results_of(r), *extra]


def resume(make):
    return lambda r, t: ["--resume", make(r, t)]


# ----------------------------------------------------------------------------------------------------
# The cases, by family: (command, argv from (run folder, a fresh temporary folder), text the error line holds)


LINKS = {
    "train --resume: .lock a link to a file outside": (
        "train", resume(lambda r, t: run_with_link(r, t, ".lock", outside(t))), ".lock in "),
    "train --resume: log.txt a link to a file outside": (
        "train", resume(lambda r, t: run_with_link(r, t, "log.txt", outside(t))), "log.txt in "),
    "train --resume: .lock a dangling link": (
        "train", resume(lambda r, t: run_with_link(r, t, ".lock", dangling=True)), ".lock in "),
    "train --resume: log.txt a dangling link": (
        "train", resume(lambda r, t: run_with_link(r, t, "log.txt", dangling=True)), "log.txt in "),
    "train --resume: metrics.jsonl a link": (
        "train", resume(lambda r, t: run_with_link(r, t, "metrics.jsonl")), "metrics.jsonl in "),
    "train --resume: magnitudes.jsonl a link": (
        "train", resume(lambda r, t: run_with_link(r, t, "magnitudes.jsonl")), "magnitudes.jsonl in "),
    "train --resume: config.json a link": (
        "train", resume(lambda r, t: run_with_link(r, t, "config.json")), "config.json in "),
    "train --resume: loss.png a link": (
        "train", resume(lambda r, t: run_with_link(r, t, "loss.png")), "loss.png in "),
    "train --resume: checkpoints/ a linked folder": (
        "train", resume(lambda r, t: run_with_link(r, t, "checkpoints")), "checkpoints in "),
    "train --resume: ema/ a linked folder": (
        "train", resume(lambda r, t: run_with_link(r, t, "ema")), "ema in "),
    "train --resume: a checkpoint a link": (
        "train", resume(lambda r, t: run_with_link(r, t, "checkpoints/0000001.pt")), "0000001.pt in "),
    "train --resume: a snapshot a link": (
        "train", resume(lambda r, t: run_with_link(r, t, "ema/ema-0.050-0000001.pt")), "ema-0.050-0000001.pt in "),
    "train --resume: tensorboard/ a link": (
        "train", resume(lambda r, t: run_with_link(r, t, "tensorboard", os.path.dirname(outside(t)))),
        "tensorboard in "),
    "train --resume: wandb/ a linked folder": (
        "train", resume(lambda r, t: run_with_link(r, t, "wandb", os.path.dirname(outside(t)))), "wandb in "),
    "train --resume RUN/checkpoints/N.pt: log.txt a link": (
        "train", lambda r, t: ["--resume", os.path.join(run_with_link(r, t, "log.txt", outside(t)), "checkpoints",
                                                         "0000002.pt")], "log.txt in "),
    "sample.py: samples/ a link out of the run": (
        "sample", lambda r, t: ["--result-dir", run_with_link(r, t, "samples", os.path.dirname(outside(t))),
                                "--num-sampling-steps", "2"], "samples in "),
    "ema.py: posthoc/ a link out of the run": (
        "ema", lambda r, t: ["--result-dir", run_with_link(r, t, "posthoc", os.path.dirname(outside(t))),
                             "--ema-std", "0.05"], "posthoc in "),
    "sample_fid.py: fid/ a link out of the run": (
        "eval.sample_fid", lambda r, t: ["--result-dir", run_with_link(r, t, "fid", os.path.dirname(outside(t))),
                                         "--ref", "none", "--num-samples", "2"], "fid in "),
    "prepare_latents.py --overwrite: a latent file a link": (
        "prepare_latents", lambda r, t: ["--data-path", image_folder(t), "--out",
                                         run_with_latent_link(t), "--overwrite", "--vae", tiny_vae(t)],
        "posterior_means.pt in "),
}


def run_with_latent_link(t):
    folder = latents(os.path.join(t, "lat"))
    os.rename(os.path.join(folder, "posterior_means.pt"), outside(t, "means.pt"))
    os.symlink(os.path.join(t, "outside", "means.pt"), os.path.join(folder, "posterior_means.pt"))
    return folder


LYING_FILES = {
    # config.json, field by field
    "resume: config args.batch_size a string": (
        "train", resume(lambda r, t: config_args_edited(r, t, batch_size="4")), "args.batch_size"),
    "resume: config args.ema_stds a number": (
        "train", resume(lambda r, t: config_args_edited(r, t, ema_stds=0.05)), "args.ema_stds"),
    "resume: config args.lr a string": (
        "train", resume(lambda r, t: config_args_edited(r, t, lr="fast")), "args.lr"),
    "resume: config args.num_steps null": (
        "train", resume(lambda r, t: config_args_edited(r, t, num_steps=None)), "args.num_steps"),
    "resume: config args.precision unknown": (
        "train", resume(lambda r, t: config_args_edited(r, t, precision="fp8")), "args.precision"),
    "resume: config args.use_all_mp a string": (
        "train", resume(lambda r, t: config_args_edited(r, t, use_all_mp="yes")), "args.use_all_mp"),
    "resume: config args.ema_stds a list of strings": (
        "train", resume(lambda r, t: config_args_edited(r, t, ema_stds=["0.05"])), "args.ema_stds"),
    "ema --export: config data without stats": (
        "ema", lambda r, t: ["--result-dir", config_data_edited(r, t, stats=None), "--ema-std", "0.05", "--export",
                             os.path.join(t, "w.pt")], "data.stats"),
    "sample: config data without stats": (
        "sample", lambda r, t: ["--result-dir", config_data_edited(r, t, stats=None)], "data.stats"),
    "sample: config data.stats.std of zeros": (
        "sample", lambda r, t: ["--result-dir", config_data_edited(r, t, stats={"mean": [0.0], "std": [0.0]})],
        "data.stats.std"),
    "sample: config data.stats.mean of two channels": (
        "sample", lambda r, t: ["--result-dir", config_data_edited(r, t, stats={"mean": [0.0, 0.0], "std": [1.0]})],
        "data.stats.mean"),
    "sample: config data.stats.mean a string": (
        "sample", lambda r, t: ["--result-dir", config_data_edited(r, t, stats={"mean": ["0"], "std": [1.0]})],
        "data.stats.mean"),
    "sample: config input_size edited 16 to 32": (
        "sample", lambda r, t: ["--result-dir", config_edited(r, t, input_size=32)], "input_size is 32"),
    "ema --export: config input_size edited 16 to 32": (
        "ema", lambda r, t: ["--result-dir", config_edited(r, t, input_size=32), "--ema-std", "0.05", "--export",
                             os.path.join(t, "w.pt")], "input_size is 32"),
    "sample: config in_channels edited": (
        "sample", lambda r, t: ["--result-dir", config_edited(r, t, in_channels=3)], "in_channels"),
    "sample: config num_classes 0": (
        "sample", lambda r, t: ["--result-dir", config_edited(r, t, num_classes=0)], "num_classes"),
    "sample: config num_classes a string": (
        "sample", lambda r, t: ["--result-dir", config_edited(r, t, num_classes="10")], "num_classes"),
    # weights: finite or refused
    "sample: a snapshot holds NaN": (
        "sample", lambda r, t: ["--result-dir", run_with_edited(r, t, "ema/ema-0.050-0000002.pt",
                                                                 set_value(float("nan")))], "non-finite"),
    "sample: a snapshot holds inf": (
        "sample", lambda r, t: ["--result-dir", run_with_edited(r, t, "ema/ema-0.100-0000001.pt",
                                                                 set_value(float("inf")))], "non-finite"),
    "ema --export: a snapshot holds NaN": (
        "ema", lambda r, t: ["--result-dir", run_with_edited(r, t, "ema/ema-0.050-0000001.pt", set_value(float("nan"))),
                             "--ema-std", "0.05", "--export", os.path.join(t, "w.safetensors")], "non-finite"),
    "ema post-hoc: a snapshot holds inf": (
        "ema", lambda r, t: ["--result-dir", run_with_edited(r, t, "ema/ema-0.100-0000002.pt", set_value(float("inf"))),
                             "--ema-std", "0.07"], "non-finite"),
    "sample_fid: a snapshot holds NaN": (
        "eval.sample_fid", lambda r, t: ["--result-dir", run_with_edited(r, t, "ema/ema-0.050-0000002.pt",
                                                                         set_value(float("nan"))),
                                         "--ref", "none", "--num-samples", "2"], "non-finite"),
    "sample --ckpt: its weights hold NaN": (
        "sample", lambda r, t: ["--result-dir", run_with_edited(r, t, "checkpoints/0000002.pt",
                                                                 edit_ckpt("model", float("nan"))), "--ckpt", "2"],
        "non-finite"),
    "ema --export --ckpt --ckpt-ema: its EMA holds inf": (
        "ema", lambda r, t: ["--result-dir", run_with_edited(r, t, "checkpoints/0000002.pt",
                                                              edit_ckpt("ema", float("inf"))), "--ckpt", "2",
                             "--ckpt-ema", "--ema-std", "0.05", "--export", os.path.join(t, "w.pt")], "non-finite"),
    "resume: every checkpoint's weights hold NaN": (
        "train", resume(lambda r, t: run_with_edited(r, t, "checkpoints/*.pt", edit_ckpt("model", float("nan")))),
        "non-finite"),
    "resume: every checkpoint's Adam state holds inf": (
        "train", resume(lambda r, t: run_with_edited(r, t, "checkpoints/*.pt", edit_ckpt("opt", float("inf")))),
        "non-finite"),
    # checkpoint contents of another shape
    "resume: an EMA of another shape": (
        "train", resume(lambda r, t: run_with_edited(r, t, "checkpoints/*.pt", ema_of_another_shape)),
        "holds an EMA"),
    "resume: Adam moments of another shape": (
        "train", resume(lambda r, t: run_with_edited(r, t, "checkpoints/*.pt", adam_of_another_shape)),
        "Adam's exp_avg"),
    "resume: Adam state of fewer parameters": (
        "train", resume(lambda r, t: run_with_edited(r, t, "checkpoints/*.pt", adam_of_fewer_parameters)),
        "Adam state of"),
    "resume: every checkpoint claims step -5": (
        "train", resume(lambda r, t: run_with_edited(r, t, "checkpoints/*.pt", lambda c: c.update(step=-5))),
        "claims step -5"),
    "sample --guide: the guide's snapshot holds NaN": (
        "sample", lambda r, t: ["--result-dir", r, "--cfg-scale", "2", "--guide", run_with_edited(
            r, t, "ema/ema-0.050-0000002.pt", set_value(float("nan")))], "non-finite"),
    "sample_fid --ckpt: its weights hold inf": (
        "eval.sample_fid", lambda r, t: ["--result-dir", run_with_edited(r, t, "checkpoints/0000002.pt",
                                                                         edit_ckpt("model", float("inf"))),
                                         "--ckpt", "2", "--ref", "none", "--num-samples", "2"], "non-finite"),
    "sample: config data.stats.std Infinity": (
        "sample", lambda r, t: ["--result-dir", config_data_edited(r, t, stats={"mean": [0.0], "std": [float("inf")]})],
        "data.stats.std"),
    "sample_fid: config data.stats.mean NaN": (
        "eval.sample_fid", lambda r, t: ["--result-dir", config_data_edited(r, t, stats={"mean": [float("nan")],
                                                                                         "std": [1.0]}),
                                         "--ref", "none", "--num-samples", "2"], "data.stats.mean"),
    "sample: config data a list": (
        "sample", lambda r, t: ["--result-dir", config_edited(r, t, data=[1, 2])], "'data'"),
    "resume: rng without its cpu state": (
        "train", resume(lambda r, t: run_with_edited(r, t, "checkpoints/*.pt", rng_without("cpu"))), "rng.cpu"),
    "resume: rng of floats": (
        "train", resume(lambda r, t: run_with_edited(r, t, "checkpoints/*.pt", rng_of_floats)), "rng.cpu"),
    # latent folders
    "train: latent stats.pt with std inf": (
        "train", lambda r, t: new_run("--data-path", latent_stats(t, [0.0] * 4, [1.0, float("inf"), 1.0, 1.0]))(r, t),
        "non-finite"),
    "train: latent stats.pt with mean NaN": (
        "train", lambda r, t: new_run("--data-path", latent_stats(t, [float("nan")] * 4, [1.0] * 4))(r, t),
        "non-finite"),
    "train: latent folder that prepare_latents.py left INCOMPLETE": (
        "train", lambda r, t: new_run("--data-path", latent_incomplete(t))(r, t), "is incomplete"),
    "train: latent folder of a marker and temporaries only": (
        "train", lambda r, t: new_run("--data-path", latent_incomplete(t, only_marker=True))(r, t), "is incomplete"),
    "train: latents that are not square": (
        "train", lambda r, t: new_run("--data-path", non_square_latents(t))(r, t), "square latents"),
    "train: latents of a size the patch does not divide": (
        "train", lambda r, t: new_run("--data-path", latents_of_size(t, 6))(r, t), "not divisible"),
    # image folders and image headers
    "train: an image folder with a symlink loop": (
        "train", lambda r, t: new_run("--data-path", with_loop(t), "--image-size", "8")(r, t), "symbolic-link loop"),
    "train: a class folder linked to another": (
        "train", lambda r, t: new_run("--data-path", with_duplicate_class(t), "--image-size", "8")(r, t),
        "already read"),
    "prepare_latents: an image folder with a symlink loop": (
        "prepare_latents", lambda r, t: ["--data-path", with_loop(t), "--out", os.path.join(t, "o")],
        "symbolic-link loop"),
    "train: a PNG whose header claims 30000x30000": (
        "train", lambda r, t: new_run("--data-path", with_bomb(t), "--image-size", "8")(r, t), "30000 x 30000"),
    "prepare_latents: a PNG whose header claims 30000x30000": (
        "prepare_latents", lambda r, t: ["--data-path", with_bomb(t), "--out", os.path.join(t, "o"), "--vae",
                                         tiny_vae(t)], "30000 x 30000"),
    "prepare_latents: images above a lowered --max-image-pixels": (
        "prepare_latents", lambda r, t: ["--data-path", image_folder(t), "--out", os.path.join(t, "o"),
                                         "--max-image-pixels", "100", "--vae", tiny_vae(t)], "--max-image-pixels"),
    "prepare_latents: --max-image-pixels 0": (
        "prepare_latents", lambda r, t: ["--data-path", image_folder(t), "--out", os.path.join(t, "o"),
                                         "--max-image-pixels", "0"], "--max-image-pixels must be positive"),
    "prepare_latents: a file that is no image, found before encoding": (
        "prepare_latents", lambda r, t: ["--data-path", with_garbage_image(t), "--out", os.path.join(t, "o"),
                                         "--vae", tiny_vae(t)], ("cannot read image ", "zz-broken.png")),
    "prepare_latents: a latent folder left INCOMPLETE, without --overwrite": (
        "prepare_latents", lambda r, t: ["--data-path", image_folder(t), "--out", latent_incomplete(t)],
        "INCOMPLETE"),
}

SIZES = {
    "evaluate: an .npz whose header claims 786 GB": (
        "eval.evaluate", lambda r, t: [lying_npz(t), npz_images(t)], "claims an array of shape (1000000, 512, 512, 3)"),
    "evaluate: statistics whose header claims 10**12 features": (
        "eval.evaluate", lambda r, t: [npz_images(t), lying_npz(t, "mu", (10 ** 12,), "<f8")], "claims an array"),
    "sample --num-samples 10**12": (
        "sample", lambda r, t: ["--result-dir", r, "--num-samples", str(10 ** 12)], "--num-samples"),
    "sample --num-samples 10**10 of one class": (
        "sample", lambda r, t: ["--result-dir", r, "--num-samples", str(10 ** 10), "--class-label", "3"],
        "--num-samples"),
    "sample_fid --num-samples 10**12": (
        "eval.sample_fid", lambda r, t: ["--result-dir", r, "--num-samples", str(10 ** 12), "--ref", "none"],
        "--num-samples"),
    "train --batch-size 10**9": ("train", new_run("--batch-size", str(10 ** 9)), "--batch-size"),
    "train --batch-size 10**12": ("train", new_run("--batch-size", str(10 ** 12)), "--batch-size"),
    "train --image-size 1048576": ("train", new_run("--image-size", "1048576"), "--image-size"),
    "train --image-size 2**31 of an image folder": (
        "train", lambda r, t: new_run("--data-path", image_folder(t), "--image-size", str(2 ** 31))(r, t),
        "--image-size"),
    "train --num-classes 2**40": ("train", new_run("--num-classes", str(2 ** 40)), "--num-classes"),
    "train --num-classes 10**15": ("train", new_run("--num-classes", str(10 ** 15)), "--num-classes"),
    "train --batch-gpu with --batch-size 10**10": (
        "train", new_run("--batch-size", str(10 ** 10), "--batch-gpu", str(10 ** 10)), "--batch-size"),
    "prepare_latents --image-size 1048576": (
        "prepare_latents", lambda r, t: ["--data-path", image_folder(t), "--out", os.path.join(t, "o"),
                                         "--image-size", "1048576"], "--image-size"),
    "prepare_latents --batch-size 10**12": (
        "prepare_latents", lambda r, t: ["--data-path", image_folder(t), "--out", os.path.join(t, "o"),
                                         "--batch-size", str(10 ** 12)], "--batch-size"),
}

OUTPUTS = {
    "sample --output an existing folder": (
        "sample", lambda r, t: ["--result-dir", r, "--output", t], "is a folder"),
    "sample --output under a file": (
        "sample", lambda r, t: ["--result-dir", r, "--output", os.path.join(write(os.path.join(t, "f"), "x"), "s.png")],
        "a file stands where a folder should be"),
    "sample --output a link": (
        "sample", lambda r, t: ["--result-dir", r, "--output", linked_output(t)], "symbolic link"),
    "sample: samples/ is a file in the run": (
        "sample", lambda r, t: ["--result-dir", run_with_file(r, t, "samples")],
        "a file stands where a folder should be"),
    "sample_fid --out an existing folder": (
        "eval.sample_fid", lambda r, t: ["--result-dir", r, "--out", t, "--ref", "none"], "is a folder"),
    "evaluate --json naming a folder": (
        "eval.evaluate", lambda r, t: [npz_images(t), npz_images(t), "--json", t], "--json"),
    "evaluate --save-ref naming a folder": (
        "eval.evaluate", lambda r, t: [npz_images(t), npz_images(t), "--save-ref", t], "--save-ref"),
    "evaluate --json under a file": (
        "eval.evaluate", lambda r, t: [npz_images(t), npz_images(t), "--json",
                                       os.path.join(write(os.path.join(t, "f"), "x"), "m.json")], "--json"),
    "evaluate --save-samples naming a folder": (
        "eval.evaluate", lambda r, t: [npz_images(t), npz_images(t), "--save-samples", t], "--save-samples"),
    "evaluate --save-samples under a file": (
        "eval.evaluate", lambda r, t: [npz_images(t), npz_images(t), "--save-samples",
                                       os.path.join(write(os.path.join(t, "f"), "x"), "s.npz")], "--save-samples"),
    "evaluate --save-samples S where S.npz, the file it would write, is a folder": (
        "eval.evaluate", lambda r, t: [npz_images(t), npz_images(t), "--save-samples",
                                       mkdir(t, "s.npz").removesuffix(".npz")], "s.npz is a folder"),
    "ema --export naming a folder": (
        "ema", lambda r, t: ["--result-dir", r, "--ema-std", "0.05", "--export", mkdir(t, "w.pt")], "is a folder"),
    "ema --export under a file": (
        "ema", lambda r, t: ["--result-dir", r, "--ema-std", "0.05", "--export",
                             os.path.join(write(os.path.join(t, "f"), "x"), "w.pt")], "a file stands"),
    "ema --export whose .json is a folder": (
        "ema", lambda r, t: ["--result-dir", r, "--ema-std", "0.05", "--export", export_json_folder(t)],
        "is a folder"),
    "ema --out an existing file": (
        "ema", lambda r, t: ["--result-dir", r, "--ema-std", "0.05", "--out", write(os.path.join(t, "o"), "x")],
        "a file stands"),
    "prepare_latents --out under a file": (
        "prepare_latents", lambda r, t: ["--data-path", image_folder(t), "--out",
                                         os.path.join(write(os.path.join(t, "f"), "x"), "o")], "a file stands"),
    "ablate --cfg-scale nan": (
        "ablate", lambda r, t: ["--out-dir", os.path.join(t, "a"), "--cfg-scale", "nan"], "--cfg-scale"),
    "ablate --cfg-scale inf": (
        "ablate", lambda r, t: ["--out-dir", os.path.join(t, "a"), "--cfg-scale", "inf"], "--cfg-scale"),
    "ablate --lr nan": ("ablate", lambda r, t: ["--out-dir", os.path.join(t, "a"), "--lr", "nan"], "--lr"),
    "ablate --lr-grid -1": ("ablate", lambda r, t: ["--out-dir", os.path.join(t, "a"), "--lr-grid", "-1"],
                            "--lr-grid"),
}


def mkdir(t, name):
    os.makedirs(os.path.join(t, name))
    return os.path.join(t, name)


def linked_output(t):
    os.symlink(outside(t), os.path.join(t, "s.png"))
    return os.path.join(t, "s.png")


def run_with_file(r, t, name):
    copy = linked_copy(r, os.path.join(t, "copy"))
    write(os.path.join(copy, name), "x")
    return copy


def export_json_folder(t):
    mkdir(t, "w.json")
    return os.path.join(t, "w.pt")


FAMILIES = {"links": LINKS, "files lying about themselves": LYING_FILES, "sizes": SIZES, "output paths": OUTPUTS}
CASES = [(family, name) for family, cases in FAMILIES.items() for name in cases]


@pytest.mark.parametrize("family, name", CASES, ids=[f"{f}: {n}" for f, n in CASES])
def test_bad_input(run, tmp_path, capsys, family, name):
    module, make_argv, needle = FAMILIES[family][name]
    argv = make_argv(run, str(tmp_path))
    watched = [results_of(run), str(tmp_path)]
    before = {w: state_of(w) for w in watched}
    code, out, err = run_main(module, argv, capsys)
    assert_one_error_line(code, out, err, needle)
    for w in watched:
        assert state_of(w) == before[w], f"{w} changed"


# ----------------------------------------------------------------------------------------------------
# Signals: Ctrl-C and SIGTERM in every long-running tool end it with one line and 128 + the signal, and
# leave no partial output. In this process a stand-in for the long step sends the signal to the process.


def signal_during(monkeypatch, target, attribute, signum):
    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler raises here
        raise AssertionError("the signal did not interrupt")
    monkeypatch.setattr(target, attribute, interrupted)


def assert_interrupted(code, out, err, signum):
    assert code == 128 + signum, (code, out, err)
    assert "Traceback" not in err, err
    lines = [ln for ln in (out + err).splitlines() if "error:" in ln]
    assert len(lines) == 1 and "interrupted (" + ("Ctrl-C" if signum == signal.SIGINT else "SIGTERM") in lines[0], \
        out + err


SIGNALS = [signal.SIGINT, signal.SIGTERM]


@pytest.mark.parametrize("signum", SIGNALS, ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_sample_py_samples(run, tmp_path, capsys, monkeypatch, signum):
    import sample
    signal_during(monkeypatch, sample, "generate", signum)
    before = state_of(run)
    code, out, err = run_main("sample", ["--result-dir", run, "--num-sampling-steps", "2"], capsys)
    assert_interrupted(code, out, err, signum)
    assert state_of(run) == before


@pytest.mark.parametrize("signum", SIGNALS, ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_sample_fid_samples(run, tmp_path, capsys, monkeypatch, signum):
    import eval.sample_fid as sample_fid
    signal_during(monkeypatch, sample_fid, "generate", signum)
    out_path = os.path.join(tmp_path, "s.npz")
    code, out, err = run_main("eval.sample_fid", ["--result-dir", run, "--ref", "none", "--num-samples", "2",
                                                  "--out", out_path], capsys)
    assert_interrupted(code, out, err, signum)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("signum", SIGNALS, ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_evaluate_py_computes_features_writes_no_statistics(tmp_path, capsys, monkeypatch, signum):
    import eval.evaluate as evaluate
    signal_during(monkeypatch, evaluate, "featurize", signum)
    a, stats = npz_images(str(tmp_path)), os.path.join(tmp_path, "a-stats.npz")
    code, out, err = run_main("eval.evaluate", [a, a, "--save-samples", stats], capsys)
    assert_interrupted(code, out, err, signum)
    assert os.listdir(tmp_path) == ["ok.npz"]


@pytest.mark.parametrize("signum", SIGNALS, ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_evaluate_py_reads(tmp_path, capsys, monkeypatch, signum):
    import eval.evaluate as evaluate
    signal_during(monkeypatch, evaluate, "read_set", signum)
    a = npz_images(str(tmp_path))
    code, out, err = run_main("eval.evaluate", [a, a, "--json", os.path.join(tmp_path, "m.json")], capsys)
    assert_interrupted(code, out, err, signum)
    assert os.listdir(tmp_path) == ["ok.npz"]


@pytest.mark.parametrize("signum", SIGNALS, ids=["SIGINT", "SIGTERM"])
def test_a_signal_inside_the_write_of_an_export_leaves_no_file(run, tmp_path, capsys, monkeypatch, signum):
    import atomic

    def half_written(obj, path):
        with open(path, "wb") as f:
            f.write(b"half a file")
        os.kill(os.getpid(), signum)
        time.sleep(5)
    monkeypatch.setattr(atomic, "torch_save_file", half_written)
    code, out, err = run_main("ema", ["--result-dir", run, "--ema-std", "0.05", "--export",
                                      os.path.join(tmp_path, "w.pt")], capsys)
    assert_interrupted(code, out, err, signum)
    assert os.listdir(tmp_path) == []  # neither the export, its temporary, nor its .json


@pytest.mark.parametrize("signum", SIGNALS, ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_prepare_latents_encodes(tmp_path, capsys, monkeypatch, request, signum):
    import diffusers
    import prepare_latents
    monkeypatch.setattr(diffusers.utils.logging, "_default_handler", None)  # (bound to an earlier test's stderr)
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    request.addfinalizer(lambda: diffusers.utils.logging.set_verbosity(verbosity))  # (later tests read warnings)
    signal_during(monkeypatch, prepare_latents, "encode_posterior", signum)
    t = str(tmp_path)
    argv = ["--data-path", image_folder(t), "--out", os.path.join(t, "o"), "--vae", tiny_vae(t), "--device", "cpu"]
    code, out, err = run_main("prepare_latents", argv, capsys)
    assert_interrupted(code, out, err, signum)
    assert not os.path.exists(os.path.join(t, "o"))


def test_sigterm_during_train_start_up_is_one_line_and_exit_143(tmp_path, capsys, monkeypatch):
    import data
    signal_during(monkeypatch, data, "load_dataset", signal.SIGTERM)
    results = tmp_path / "results"
    code, out, err = run_main("train", [*FAST, "--num-steps", "2", "--results-dir", str(results)], capsys)
    assert code == 143 and "Traceback" not in err
    assert err.strip() == "error: interrupted (SIGTERM) during start-up; nothing was trained"
    assert not results.exists()


def test_a_signal_while_train_draws_its_last_plot_says_the_run_is_complete(tmp_path, capsys, monkeypatch):
    import plots
    signal_during(monkeypatch, plots, "plot_magnitudes", signal.SIGTERM)
    results = tmp_path / "results"
    code, out, err = run_main("train", [*FAST, "--num-steps", "2", "--results-dir", str(results)], capsys)
    assert code == 143 and "Traceback" not in err and "start-up" not in out + err, out + err
    (run_dir,) = results.iterdir()
    assert (f"interrupted (SIGTERM) after the checkpoint of step 2 was saved: the run is complete (python plots.py "
            f"{run_dir} draws magnitudes.png)") in out
    assert os.listdir(run_dir / "checkpoints") == ["0000002.pt"] and not (run_dir / "magnitudes.png").exists()


def test_ctrl_c_in_a_real_sample_py_process_is_one_line_and_exit_130(run, tmp_path):
    out_path = os.path.join(tmp_path, "s.png")
    proc = subprocess.Popen([sys.executable, "sample.py", "--result-dir", run, "--num-sampling-steps", "1000",
                             "--num-samples", "16", "--output", out_path], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("sampling ")  # the model is loaded; sampling has begun
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert [ln for ln in err.splitlines() if "error:" in ln] == ["error: interrupted (Ctrl-C); no image was written"]
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------------
# The behaviours behind the cases, one test each.


def test_a_tool_never_follows_a_link_where_it_writes_a_file(tmp_path):
    import logs
    import runs
    target = outside(str(tmp_path))
    before = open(target).read()
    os.symlink(target, tmp_path / "metrics.jsonl")
    os.symlink(target, tmp_path / ".lock")
    os.symlink(target, tmp_path / "log.txt")
    for write in (lambda: logs.append_jsonl(str(tmp_path / "metrics.jsonl"), {"step": 1}),
                  lambda: runs.RunLock(str(tmp_path)), lambda: runs.setup_logging(str(tmp_path), 0)):
        with pytest.raises(OSError) as refused:
            write()
        assert refused.value.errno == errno.ELOOP  # O_NOFOLLOW refused the link (not some other failure)
    assert open(target).read() == before


def test_prepare_latents_leaves_no_incomplete_marker_and_its_folder_trains(tmp_path, capsys):
    t = str(tmp_path)
    out = os.path.join(t, "o")
    code, _, err = run_main("prepare_latents", ["--data-path", image_folder(t, size=(16, 16)), "--out", out,
                                                "--image-size", "8", "--vae", tiny_vae(t), "--device", "cpu"], capsys)
    assert code == 0, err
    assert "INCOMPLETE" not in os.listdir(out) and os.path.isfile(os.path.join(out, "meta.json"))
    import data
    assert len(data.load_dataset(out)) == 4


@pytest.mark.parametrize("mode", ["I;16", "RGBA", "CMYK", "P", "LA", "L"])
def test_images_of_other_modes_are_read_as_rgb_as_a_user_expects(tmp_path, mode):
    import data
    grey = np.full((8, 8), 128, np.uint8)
    if mode == "I;16":
        image = Image.fromarray(np.full((8, 8), 128 * 257, np.uint16))  # 16-bit mid-grey
    elif mode == "LA":
        image = Image.fromarray(np.stack([grey, np.zeros_like(grey)], -1), "LA")
    elif mode == "P":
        image = Image.fromarray(np.stack([grey] * 3, -1)).convert("P", palette=Image.Palette.ADAPTIVE)
        image.info["transparency"] = 7  # a palette entry no pixel uses
    else:
        image = Image.fromarray(np.stack([grey] * 3, -1)).convert(mode)
    path = str(tmp_path / "x.png") if mode != "CMYK" else str(tmp_path / "x.tif")
    image.save(path)
    x = data.load_image(path, 8)
    assert x.shape == (3, 8, 8)
    assert torch.allclose(x, torch.full_like(x, 128 / 127.5 - 1), atol=0.02), (mode, x.flatten()[:3])
