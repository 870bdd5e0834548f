"""Reading run folders written by train.py: config, checkpoints, and the model with chosen weights."""
from __future__ import annotations

import json
import os
import re

import torch

from ema import reconstruct_ema
from models import DiT, build_model
from mp_layers import MPConfig

CHECKPOINT_RE = re.compile(r"^(\d{7})\.pt$")


class RunError(ValueError):
    """A run folder that cannot be used as asked: reported as one line."""


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint, oldest first (temp files of interrupted writes are ignored)."""
    folder = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), os.path.join(folder, f)) for f in os.listdir(folder) if (m := CHECKPOINT_RE.match(f))]
    return sorted(found)


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSON-lines log (metrics, magnitudes, FIDs); [] if it does not exist. A line that
    is not JSON (cut short by a crash or a full disk in the middle of an append) is skipped."""
    if not os.path.isfile(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def load_run_config(run_dir: str) -> dict:
    if not os.path.isdir(run_dir):
        raise RunError(f"run folder not found: {run_dir}")
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise RunError(f"{run_dir} is not a run folder (no config.json); pass a folder made by train.py")
    with open(path) as f:
        return json.load(f)


def model_from_config(config: dict) -> DiT:
    return build_model(config["model"], in_channels=config["in_channels"], input_size=config["input_size"],
                       num_classes=config["num_classes"], mp=MPConfig.from_dict(config["mp"]))


def load_run_model(run_dir: str, *, ema_std: float | None = 0.05, ckpt_step: int | None = None,
                   step: int | None = None, device="cpu") -> tuple[DiT, dict, str]:
    """The run's model in eval mode with either the post-hoc EMA for `ema_std` (at snapshot step `step`,
    default the last) or, with `ckpt_step`, the raw training weights of that checkpoint.

    Returns (model, config, a short description of the weights).
    """
    config = load_run_config(run_dir)
    model = model_from_config(config)
    if ckpt_step is not None:
        checkpoints = dict(list_checkpoints(run_dir))
        if ckpt_step not in checkpoints:
            have = ", ".join(str(s) for s in checkpoints) or "none"
            raise RunError(f"no checkpoint at step {ckpt_step} in {run_dir} (available: {have})")
        state = torch.load(checkpoints[ckpt_step], map_location="cpu", weights_only=True)["model"]
        what = f"raw weights of checkpoint {ckpt_step}"
    else:
        state, info = reconstruct_ema(os.path.join(run_dir, "ema"), ema_std, step=step)
        what = f"post-hoc EMA σ_rel={ema_std:g} at step {info['step']}"
    model.load_state_dict(state)
    return model.to(device).eval(), config, what
