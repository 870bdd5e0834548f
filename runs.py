"""Reading run folders written by train.py: config, checkpoints, and the model with chosen weights."""
from __future__ import annotations

import json
import os
import re

import torch

from atomic import DamagedFileError, load_torch_file
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
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):  # (a cut line can also parse, as a bare number)
                records.append(record)
    return records


# What train.py writes into config.json and into every checkpoint (and what readers rely on).
CONFIG_KEYS = {"args": dict, "model": str, "mp": dict, "data": dict, "num_classes": int, "in_channels": int,
               "input_size": int}
CHECKPOINT_KEYS = {"model": dict, "ema": dict, "opt": dict, "lr_scheduler": dict, "step": int, "rng": dict,
                   "args": dict}


def load_run_config(run_dir: str) -> dict:
    if not os.path.isdir(run_dir):
        raise RunError(f"run folder not found: {run_dir}")
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise RunError(f"{run_dir} is not a run folder (no config.json); pass a folder made by train.py")
    try:
        with open(path) as f:
            config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"{path} is not valid JSON ({e}); restore the file train.py wrote") from None
    _check_keys(config, CONFIG_KEYS, f"{path} is not a train.py run config", "restore the file train.py wrote")
    return config


def _check_keys(obj, keys: dict, what: str, fix: str) -> None:
    if not isinstance(obj, dict):
        raise RunError(f"{what} (it holds a {type(obj).__name__}, not a dict); {fix}")
    for key, kind in keys.items():
        if not isinstance(obj.get(key), kind) or isinstance(obj.get(key), bool):
            found = "no" if key not in obj else f"a {type(obj[key]).__name__} as"
            raise RunError(f"{what} ({found} {key!r}, where a {kind.__name__} belongs); {fix}")


def read_checkpoint(path: str) -> dict:
    """A checkpoint written by train.py; DamagedFileError (one line naming the file) if it is damaged, not
    trusted, or lacks what train.py writes."""
    ckpt = load_torch_file(path, "checkpoint")
    try:
        _check_keys(ckpt, CHECKPOINT_KEYS, f"checkpoint {path} is not one train.py wrote",
                    "delete it, or restore it from a copy")
    except RunError as e:
        raise DamagedFileError(str(e)) from None
    return ckpt


def load_weights(model: torch.nn.Module, state: dict, source: str) -> None:
    """model.load_state_dict(state), with a mismatch told in one line that says what differs."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # "Error(s) in loading state_dict for DiT:" and the differences below it
        details = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()]
        first = details[0] if details else str(e).splitlines()[0]
        more = f" (and {len(details) - 1} more difference(s))" if len(details) > 1 else ""
        raise RunError(f"{source} does not fit the model the run's config.json describes: "
                       f"{first[:300]}{more}") from None


def model_from_config(config: dict) -> DiT:
    try:
        return build_model(config["model"], in_channels=config["in_channels"], input_size=config["input_size"],
                           num_classes=config["num_classes"], mp=MPConfig.from_dict(config["mp"]))
    except (TypeError, ValueError, KeyError) as e:  # an edited config.json: unknown model, switch or size
        raise RunError(f"the run's config.json describes no model this code builds ({e}); restore the file "
                       f"train.py wrote") from None


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
        state = read_checkpoint(checkpoints[ckpt_step])["model"]
        what, source = f"raw weights of checkpoint {ckpt_step}", f"checkpoint {checkpoints[ckpt_step]}"
    else:
        state, info = reconstruct_ema(os.path.join(run_dir, "ema"), ema_std, step=step)
        what = f"post-hoc EMA σ_rel={ema_std:g} at step {info['step']}"
        source = f"the EMA snapshots in {os.path.join(run_dir, 'ema')}"
    load_weights(model, state, source)
    return model.to(device).eval(), config, what
