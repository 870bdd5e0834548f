"""What a training run reports: its jsonl logs (`append_jsonl`, `read_jsonl`, `truncate_jsonl` at a resume),
the ETA of its log lines, and the experiment trackers (`--tensorboard`, `--wandb`) that receive every record
the run appends to its jsonl logs.

The trackers are fed from the jsonl records themselves (runs.Run.append hands each one over), so a curve in
TensorBoard or W&B is the jsonl log by construction:

    metrics.jsonl              -> train/loss, train/lr (plain parameters), train/mp_lr (MP ones; each only
                                  where the model has such parameters), train/img_per_s, ...
    magnitudes.jsonl           -> magnitudes/act_rms/blockNN, magnitudes/weight_rms/blockNN
    fid_during_training.jsonl  -> fid_during_training/fid, .../cost_fraction, .../samples (a grid)

Only global rank 0 opens a tracker. TensorBoard writes RUN/tensorboard/; a resumed run purges the events
after the checkpoint it resumed from, so the curve continues as metrics.jsonl does. W&B is optional: it is
not a dependency, and --wandb without it installed is one error line before anything is loaded.
"""
from __future__ import annotations

import collections
import json
import math
import os
import uuid

import numpy as np

from atomic import atomic_write_text, nofollow_opener
from config import TrainConfig


TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_id.txt"
# Which jsonl record becomes which scalars: the log's name -> the tag prefix.
PREFIXES = {"metrics.jsonl": "train", "fid_during_training.jsonl": "fid_during_training",
            "magnitudes.jsonl": "magnitudes"}
GRID_IMAGES = 64  # FID samples shown per evaluation


def check_trackers(cfg: TrainConfig, error: type[Exception] = ValueError) -> None:
    """Raises `error` (one line naming the fix) before anything is loaded: --wandb without wandb installed.
    (The trackers' options are TrainConfig's; they may change on --resume, as they never touch the weights.)"""
    if cfg.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise error("--wandb needs the wandb package, which is not installed: pip install wandb "
                        "(or drop --wandb)") from None


# ----------------------------------------------------------------------------------------------------
# ETA


def format_duration(seconds: float) -> str:
    """12m03s, 3h05m, 2d04h, 42s: two units, the larger first."""
    s = max(0, round(seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{s:02d}s"
    return f"{s}s"


def format_rates(record: dict) -> str:
    """The learning rates in `record` as the step lines and the plot titles show them: "lr 1.00e-04  mp_lr
    1.00e-02", or one of them where the model has only that kind of parameter."""
    return "  ".join(f"{k} {float(record[k]):.2e}" for k in ("lr", "mp_lr") if k in record)


class RateWindow:
    """Steps per second over the last `size` log intervals of this process: recent enough to follow a
    change of speed, long enough not to jump. The first interval after a start or a resume carries
    start-up and compilation, so it leaves the window as soon as a second one is there."""

    def __init__(self, size: int = 10):
        self.intervals = collections.deque(maxlen=size + 1)  # (steps, seconds)

    def add(self, steps: int, seconds: float) -> None:
        self.intervals.append((steps, seconds))

    def rate(self) -> float:
        kept = list(self.intervals)[1:] if len(self.intervals) > 1 else list(self.intervals)
        steps, seconds = sum(s for s, _ in kept), sum(t for _, t in kept)
        return steps / seconds if seconds > 0 else math.inf

    def eta(self, steps_left: int) -> str:
        rate = self.rate()
        return format_duration(steps_left / rate if steps_left > 0 and rate > 0 else 0)


# ----------------------------------------------------------------------------------------------------
# Trackers


def scalars(name: str, record: dict) -> dict[str, float]:
    """The scalars of one jsonl record of the log `name` (see the table above), keyed by tag."""
    prefix = PREFIXES.get(name)
    if prefix is None:
        return {}
    if prefix == "magnitudes":
        return {f"magnitudes/{key}/block{i:02d}": float(v) for key in ("act_rms", "weight_rms")
                for i, v in enumerate(record.get(key, []))}
    keys = ["fid", "cost_fraction"] if prefix == "fid_during_training" else [k for k in record if k != "step"]
    return {f"{prefix}/{k}": float(record[k]) for k in keys
            if isinstance(record.get(k), (int, float)) and not isinstance(record.get(k), bool)}


def grid(images: np.ndarray, cols: int = 8) -> np.ndarray:
    """uint8 N×H×W×C tiles as one H'×W'×C image, `cols` per row (the rest of the last row black)."""
    n, h, w, c = images.shape
    cols = min(cols, n)
    rows = -(-n // cols)
    canvas = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        canvas[r * h:(r + 1) * h, k * w:(k + 1) * w] = img
    return canvas


class Trackers:
    """The trackers a run asked for (none: every call does nothing). Open it on global rank 0 only."""

    def __init__(self, cfg: TrainConfig, run_path: str, resumed_step: int):
        self.tensorboard = self.wandb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step: events a killed run wrote after the checkpoint we resume from are dropped by readers
            self.tensorboard = SummaryWriter(os.path.join(run_path, TENSORBOARD_DIR),
                                             purge_step=resumed_step + 1 if resumed_step else None)
        if cfg.wandb:
            self.wandb = open_wandb(cfg, run_path)

    def record(self, name: str, record: dict) -> None:
        """One record appended to the jsonl log `name`, as scalars at its step."""
        values = scalars(name, record)
        if not values:
            return
        step = int(record["step"])
        if self.tensorboard is not None:
            for tag, value in values.items():
                self.tensorboard.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def images(self, tag: str, images: np.ndarray, step: int) -> None:
        """A grid of the first GRID_IMAGES of uint8 N×H×W×C `images`."""
        if self.tensorboard is None and self.wandb is None:
            return
        picture = grid(images[:GRID_IMAGES])
        if self.tensorboard is not None:
            self.tensorboard.add_image(tag, picture, step, dataformats="HWC")
        if self.wandb is not None:
            import wandb
            self.wandb.log({tag: wandb.Image(picture)}, step=step)

    def flush(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.tensorboard = self.wandb = None


def open_wandb(cfg: TrainConfig, run_path: str):
    """A W&B run for the run folder: the same W&B run again on resume (its id is kept in RUN/wandb_id.txt).
    WANDB_MODE (online, offline, disabled) and the other WANDB_* variables are wandb's own."""
    import wandb
    id_path = os.path.join(run_path, WANDB_ID_FILE)
    if os.path.isfile(id_path):
        with open(id_path) as f:
            run_id = f.read().strip()
    else:
        run_id = uuid.uuid4().hex[:16]
        atomic_write_text(id_path, run_id + "\n")
    return wandb.init(project=cfg.wandb_project, name=cfg.wandb_name or os.path.basename(run_path), id=run_id,
                      resume="allow", dir=run_path, config=cfg.to_dict())


# The jsonl logs of a run folder (metrics, magnitudes, FIDs): appended to, read back, cut at a resume.


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


def append_jsonl(path: str, record: dict) -> None:
    """One JSON record per line. After a line cut short (a crash or a full disk mid-append) it starts a new
    line, so that only the cut line is lost (read_jsonl skips it)."""
    with open(path, "ab+", opener=nofollow_opener) as f:  # (a linked log never appends outside the run)
        if f.seek(0, os.SEEK_END):
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write((json.dumps(record) + "\n").encode())


def truncate_jsonl(path: str, last_step: int) -> None:
    """Drop records after `last_step` (written after the checkpoint we resume from), and a last line cut
    short by the interruption."""
    if os.path.isfile(path):
        kept = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
