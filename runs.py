"""The run folder: creating it, its logs, its checkpoints (write, read, list, prune), its config, and
loading its model with chosen weights.

A run folder `RESULTS/NNN-DiT-XS-2/` holds config.json (everything needed to rebuild the model and the
data normalisation), log.txt, metrics.jsonl, magnitudes.jsonl, checkpoints/NNNNNNN.pt, ema/ snapshots
and PNGs of the loss and the magnitudes. Global rank 0 writes it; every write is atomic (write, then
rename) or an append of whole lines, so a crash or a full disk at any moment leaves a folder to resume.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import time

import torch
import torch.distributed as dist

from atomic import (TEMP_RE, DamagedFileError, LinkError, atomic_torch_save, atomic_write_text, load_torch_file,
                    non_finite_entry, nofollow_opener, refuse_links, sync_files, temp_prefix)
from config import TrainConfig
from logs import RateWindow, Trackers, append_jsonl, format_rates, truncate_jsonl
from models import DiT, build_model
from mp_layers import MPConfig
from phema import reconstruct_ema


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


# What train.py writes into config.json and into every checkpoint (and what readers rely on).
CONFIG_KEYS = {"args": dict, "model": str, "mp": dict}  # what resuming needs; rebuilding the model needs more:
MODEL_KEYS = {"data": dict, "num_classes": int, "in_channels": int, "input_size": int}
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
    if ckpt["step"] < 0:
        raise DamagedFileError(f"checkpoint {path} claims step {ckpt['step']}; it is damaged: delete it, or restore "
                               f"it from a copy")
    bad = non_finite_entry({k: ckpt[k] for k in ("model", "ema", "opt")})
    if bad is not None:  # train.py never saves such a checkpoint (it stops at a non-finite loss)
        raise DamagedFileError(f"checkpoint {path} holds non-finite values (NaN or inf) in {bad}; it is damaged: "
                               f"delete it, or restore it from a copy")
    return ckpt


def check_model_config(config: dict, path: str) -> None:
    """RunError (one line naming the file and the field) unless config.json's fields that rebuild the model
    and its data normalisation have their types, and agree with each other: an edited input_size would
    otherwise sample images of a size the model never saw."""
    fix = "restore the file train.py wrote"
    _check_keys(config, MODEL_KEYS, f"{path} is not a train.py run config", fix)
    for key in ("num_classes", "in_channels", "input_size"):
        if config[key] < 1:
            raise RunError(f"{path}: field {key} is {config[key]}, where a positive integer belongs; {fix}")
    data = config["data"]
    for field, key in (("channels", "in_channels"), ("resolution", "input_size"), ("num_classes", "num_classes")):
        if field in data and data[field] != config[key]:
            raise RunError(f"{path}: field {key} is {config[key]!r} but the run's data had {field} "
                           f"{data[field]!r} (data.{field}): the file was edited; {fix}")
    stats = data.get("stats")
    if not isinstance(stats, dict):
        raise RunError(f"{path}: field data.stats (the data's normalisation) is "
                       f"{'missing' if stats is None else 'a ' + type(stats).__name__}; {fix}")
    for key in ("mean", "std"):
        values = stats.get(key)
        if not (isinstance(values, list) and len(values) == config["in_channels"]
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                        and (key == "mean" or v > 0) for v in values)):
            raise RunError(f"{path}: field data.stats.{key} must be a list of {config['in_channels']} finite "
                           f"numbers{' > 0' if key == 'std' else ''} (one per channel), got {str(values)[:80]}; {fix}")


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


def find_checkpoint(run_dir: str, ckpt: int | str) -> tuple[int, str]:
    """(step, path) of a checkpoint named by its step in the run, or by its file's path (as DiT users
    pass them: RUN/checkpoints/0050000.pt, or a copy elsewhere)."""
    if isinstance(ckpt, int) or ckpt.isdigit():
        checkpoints = dict(list_checkpoints(run_dir))
        if int(ckpt) not in checkpoints:
            have = ", ".join(str(s) for s in checkpoints) or "none"
            raise RunError(f"no checkpoint at step {int(ckpt)} in {run_dir} (available: {have})")
        return int(ckpt), checkpoints[int(ckpt)]
    if not os.path.isfile(ckpt):
        raise RunError(f"checkpoint file not found: {ckpt}; pass a step of the run or a path to its .pt file")
    named = CHECKPOINT_RE.match(os.path.basename(ckpt))
    return (int(named.group(1)) if named else read_checkpoint(ckpt)["step"]), ckpt


def load_run_model(run_dir: str, *, ema_std: float | None = 0.05, ckpt_step: int | str | None = None,
                   step: int | None = None, device="cpu", ckpt_ema: bool = False) -> tuple[DiT, dict, str]:
    """The run's model in eval mode with either the post-hoc EMA for `ema_std` (at snapshot step `step`,
    default the last) or, with `ckpt_step` (a step, or a checkpoint file's path), the raw training weights
    of that checkpoint (with `ckpt_ema`, its tracked fp32 EMA of `ema_std` instead).

    Returns (model, config, a short description of the weights).
    """
    config = load_run_config(run_dir)
    check_model_config(config, os.path.join(run_dir, "config.json"))
    model = model_from_config(config)
    if ckpt_step is not None:
        ckpt_step, path = find_checkpoint(run_dir, ckpt_step)
        ckpt = read_checkpoint(path)
        what, source = f"raw weights of checkpoint {ckpt_step}", f"checkpoint {path}"
        state = ckpt["model"]
        if ckpt_ema:
            tracked = {float(s): ema for s, ema in ckpt["ema"].items()}
            match = [s for s in tracked if abs(s - ema_std) < 1e-9]
            if not match:
                raise RunError(f"checkpoint {ckpt_step} tracks no EMA of σ_rel {ema_std:g} (it tracks "
                               f"{', '.join(f'{s:g}' for s in sorted(tracked))}); pass one of them as --ema-std")
            state, what = tracked[match[0]], f"tracked EMA σ_rel={ema_std:g} of checkpoint {ckpt_step}"
    else:
        state, info = reconstruct_ema(os.path.join(run_dir, "ema"), ema_std, step=step)
        what = f"post-hoc EMA σ_rel={ema_std:g} at step {info['step']}"
        source = f"the EMA snapshots in {os.path.join(run_dir, 'ema')}"
    bad = non_finite_entry(state)
    if bad is not None:  # (each snapshot and checkpoint was checked; a sum of huge values can still overflow)
        raise RunError(f"the weights from {source} hold non-finite values (NaN or inf) in {bad}; they cannot "
                       f"sample")
    load_weights(model, state, source)
    return model.to(device).eval(), config, what


# ----------------------------------------------------------------------------------------------------
# Writing a run folder (train.py).


def create_run_dir(results_dir: str, model_name: str) -> str:
    """A new folder RESULTS/NNN-MODEL with the next free index NNN."""
    os.makedirs(results_dir, exist_ok=True)
    existing = [int(m.group(1)) for m in (re.match(r"^(\d{3,})-", d) for d in os.listdir(results_dir)) if m]
    index = max(existing, default=-1) + 1
    while True:  # another process may create the same index at the same moment
        path = os.path.join(results_dir, f"{index:03d}-{model_name.replace('/', '-')}")
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            index += 1


def new_config(cfg: TrainConfig, dataset, world_size: int, learning_rates: dict | None = None) -> dict:
    """config.json of a new run: its options, the base learning rates its parameters train at ("lr" plain,
    "mp_lr" MP, each only where the model has such parameters), and what rebuilds its model and its data
    normalisation."""
    rates = {"learning_rates": learning_rates} if learning_rates is not None else {}
    return {"args": cfg.to_dict(), "model": cfg.model, "mp": cfg.mp.to_dict(), **rates, "data": dataset.describe(),
            "num_classes": dataset.num_classes, "in_channels": dataset.channels, "input_size": dataset.resolution,
            "world_size": world_size, "torch": torch.__version__}


def record_vae(config: dict, run_dir: str) -> dict:
    """config.json's data record with the VAE's place for a run folder that moves: a hub name stays a name;
    a local folder (recorded absolute) is also recorded relative to the run ("vae_from_run", e.g. ../vae)
    when it lies inside the run's results folder, so that it is found after the results folder moves."""
    vae = config.get("data", {}).get("vae")
    if vae and os.path.isdir(vae):
        parent = os.path.dirname(os.path.abspath(run_dir))
        if os.path.abspath(vae).startswith(parent + os.sep):
            config["data"]["vae_from_run"] = os.path.relpath(os.path.abspath(vae), os.path.abspath(run_dir))
    return config


def run_vae(config: dict, run_dir: str, given: str | None = None) -> str | None:
    """The VAE that decodes the run's latents: `given` (a tool's --vae) first, then the recorded folder
    relative to the run (wherever the results folder now lies), then the recorded hub name or path."""
    if given:
        return os.path.abspath(os.path.expanduser(given)) if os.path.isdir(os.path.expanduser(given)) else given
    data = config.get("data", {})
    relative = data.get("vae_from_run")
    if relative and os.path.isdir(os.path.join(run_dir, relative)):
        return os.path.normpath(os.path.join(os.path.abspath(run_dir), relative))
    return data.get("vae")


def with_vae(config: dict, run_dir: str, given: str | None = None) -> dict:
    """`config` whose data record names the VAE `run_vae` picks (a copy; config.json is not changed)."""
    if config.get("data", {}).get("kind") != "latent":
        return config
    return {**config, "data": {**config["data"], "vae": run_vae(config, run_dir, given)}}
class NoFollowFileHandler(logging.FileHandler):
    """A log file opened without following a symbolic link (see atomic.refuse_links)."""

    def _open(self):
        return open(self.baseFilename, self.mode, encoding=self.encoding, errors=self.errors,
                    opener=nofollow_opener)


def setup_logging(run_dir: str | None, rank: int) -> logging.Logger:
    """The "train" logger: stdout and RUN/log.txt on rank 0, silent elsewhere."""
    logger = logging.getLogger("train")
    logger.handlers.clear()
    logger.propagate = False
    if rank != 0:
        logger.addHandler(logging.NullHandler())
        return logger
    fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    handlers = [logging.StreamHandler(sys.stdout)]
    if run_dir:
        handlers.append(NoFollowFileHandler(os.path.join(run_dir, "log.txt")))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    logger.setLevel(logging.INFO)
    return logger


def saves_between(start: int, end: int, every: int) -> int:
    """How many of the steps start+1 .. end write a file that is written every `every` steps and at `end`."""
    return end // every - start // every + (1 if end % every else 0) if end > start else 0


def disk_plan(cfg: TrainConfig, n_params: int, start_step: int) -> tuple[int, str]:
    """About how many bytes the steps after `start_step` add to the run folder, and an account of them:
    fp16 EMA snapshots (one per tracked σ_rel) and fp32 checkpoints (weights, Adam's two moments, EMAs)."""
    n_snapshots = saves_between(start_step, cfg.num_steps, cfg.ema_snapshot_every) * len(cfg.ema_stds)
    n_checkpoints = saves_between(start_step, cfg.num_steps, cfg.ckpt_every)
    if cfg.keep_checkpoints:  # the newest is written before the oldest is removed
        n_checkpoints = min(n_checkpoints, cfg.keep_checkpoints + 1)
    snapshot_bytes = n_snapshots * n_params * 2
    checkpoint_bytes = n_checkpoints * n_params * 4 * (3 + len(cfg.ema_stds))
    account = (f"{n_snapshots} EMA snapshots ({snapshot_bytes / 1e9:.2f} GB) and {n_checkpoints} checkpoint(s) "
               f"({checkpoint_bytes / 1e9:.2f} GB)")
    return snapshot_bytes + checkpoint_bytes, account


class Run:
    """A run folder open for training. Every rank holds one (with the same path); only global rank 0
    writes, so on the other ranks the writing methods do nothing."""

    def __init__(self, path: str, rank: int):
        self.path, self.writer = path, rank == 0
        self.logger = setup_logging(path, rank)
        self.rate, self.logged_step = RateWindow(), 0  # for the ETA of the log lines
        self.trackers = None  # TensorBoard / W&B (logs.py), fed with every record appended
        self.unsynced: list[str] = []  # snapshots written since the last checkpoint, not yet synced to disk

    @contextlib.contextmanager
    def tracking(self, cfg: TrainConfig, resumed_step: int):
        """Within the block, the experiment trackers `cfg` asks for (--tensorboard, --wandb) receive what the
        run logs (rank 0 only); they are closed at its end, however it ends."""
        if self.writer:
            self.trackers = Trackers(cfg, self.path, resumed_step)
        try:
            yield
        finally:
            if self.trackers is not None:
                self.trackers.close()
                self.trackers = None

    @classmethod
    def create(cls, results_dir: str, model_name: str, rank: int, world_size: int, lock: RunLock) -> "Run":
        """A new run folder, locked by `lock` (on rank 0)."""
        path = None
        if rank == 0:
            path = create_run_dir(results_dir, model_name)
            lock.take(path)
            lock.name_holder()
        if world_size > 1:  # the other ranks learn rank 0's folder
            holder = [path]
            dist.broadcast_object_list(holder, src=0)
            path = holder[0]
        return cls(path, rank)

    @classmethod
    def reopen(cls, path: str, step: int, rank: int, lock: RunLock) -> "Run":
        """The run folder resumed at `step`, already locked by `lock` (on rank 0): the temporary files of
        writes a kill interrupted are removed, and the logs lose the records written after that checkpoint."""
        run = cls(path, rank)
        run.logged_step = step
        if run.writer:
            lock.name_holder()
            removed, freed = remove_stale_temporaries(path)
            if removed:
                run.log(f"removed {removed} temporary file(s) ({freed / 1e6:.1f} MB) of interrupted writes")
            for name in ("metrics.jsonl", "magnitudes.jsonl", "fid_during_training.jsonl"):
                truncate_jsonl(os.path.join(path, name), step)
        return run

    def log(self, message: str) -> None:
        self.logger.info(message)

    def warn(self, message: str) -> None:
        self.logger.warning(message)

    def write_config(self, config: dict) -> None:
        if self.writer:
            atomic_write_text(os.path.join(self.path, "config.json"), json.dumps(config, indent=2))

    def append(self, name: str, record: dict) -> None:
        """One record appended to the jsonl log `name` (metrics.jsonl, magnitudes.jsonl), and handed to the
        trackers (the same numbers)."""
        if self.writer:
            append_jsonl(os.path.join(self.path, name), record)
            if self.trackers is not None:
                self.trackers.record(name, record)

    def images(self, tag: str, images, step: int) -> None:
        """A grid of uint8 N×H×W×C images for the trackers (the run folder keeps no copy)."""
        if self.writer and self.trackers is not None:
            self.trackers.images(tag, images, step)

    def log_metrics(self, record: dict, num_steps: int) -> None:
        """A log line and a metrics.jsonl record of a training step. The ETA is the steps left over the
        rate of the last few log intervals of this process (so a resumed run's is its own)."""
        steps, self.logged_step = record["step"] - self.logged_step, record["step"]
        self.rate.add(steps, steps / record["steps_per_s"] if record["steps_per_s"] > 0 else 0.0)
        self.log(f"step {record['step']:7d}/{num_steps}  loss {record['loss']:.4f}  {format_rates(record)}  "
                 f"{record['steps_per_s']:.2f} steps/s  {record['img_per_s']:.0f} img/s  "
                 f"peak {record['peak_mem_gib']:.2f} GiB  eta {self.rate.eta(num_steps - record['step'])}")
        self.append("metrics.jsonl", record)

    def log_disk_plan(self, cfg: TrainConfig, n_params: int, start_step: int) -> None:
        """States what the run will write, and warns when the disk is short."""
        if not self.writer:
            return
        need, account = disk_plan(cfg, n_params, start_step)
        free = shutil.disk_usage(self.path).free
        self.log(f"disk: about {need / 1e9:.1f} GB to write ({account}); {free / 1e9:.1f} GB free")
        if need > free:
            self.warn(f"warning: the run needs more than the {free / 1e9:.1f} GB free on the disk of {self.path}; "
                      f"raise --ema-snapshot-every or --ckpt-every, set --keep-checkpoints, or free some space")

    def save_snapshots(self, ema, step: int) -> None:
        """The EMA snapshots of `step`, atomically but not synced one by one (the fsync of an XS snapshot,
        15 MB, cost half its write on this project's CPU machine: ~6 % of the step of a run that snapshots
        every step); the next checkpoint syncs them first. Whatever a resume starts from is then on disk,
        and a resume rewrites the snapshots after its checkpoint."""
        if self.writer:
            self.unsynced += ema.save_snapshots(os.path.join(self.path, "ema"), step, durable=False)

    def save_checkpoint(self, state: dict, keep: int = 0) -> None:
        """checkpoints/NNNNNNN.pt of state["step"] (after syncing the snapshots written since the last one),
        the loss plot, then (keep > 0) only the newest `keep`."""
        if not self.writer:
            return
        sync_files(self.unsynced)
        self.unsynced = []
        path = os.path.join(self.path, "checkpoints", f"{state['step']:07d}.pt")
        atomic_torch_save(state, path)
        self.plot("loss")
        self.log(f"saved checkpoint {path}")
        if keep:
            for _, old in list_checkpoints(self.path)[:-keep]:
                os.remove(old)

    def last_checkpoint(self) -> str:
        last = list_checkpoints(self.path)
        return f"the last good checkpoint is {last[-1][1]}" if last else "no checkpoint was written"

    def plot(self, what: str) -> None:
        """loss.png, magnitudes.png or fid_during_training.png of the run; a picture never stops training."""
        if not self.writer:
            return
        try:
            import plots  # (here: matplotlib loads only in the process that draws, not in every reader of runs)
            if what == "loss":
                plots.plot_loss(self.path)
            elif what == "fid":
                plots.plot_fid_curves([self.path], os.path.join(self.path, "fid_during_training.png"))
            else:
                plots.plot_magnitudes([self.path], os.path.join(self.path, "magnitudes.png"))
        except Exception as e:  # noqa: BLE001
            self.log(f"({what} plot skipped: {e})")

    @contextlib.contextmanager
    def disk_full_is_an_error(self, step):
        """Within the block a full disk becomes one RunError naming the step (`step()`), the file, and how
        to go on: every file of the run folder is written atomically or appended to, so what is there is
        whole and the run resumes from its last checkpoint."""
        try:
            yield
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            in_run = bool(e.filename) and os.path.abspath(e.filename).startswith(os.path.abspath(self.path) + os.sep)
            where = f" writing {os.path.relpath(e.filename, self.path) if in_run else e.filename}" if e.filename else ""
            advice = " (or set --keep-checkpoints / a larger --ema-snapshot-every)" if in_run else ""
            raise RunError(f"disk full at step {step()}{where} ({e.strerror}); the run folder is intact and "
                           f"{self.last_checkpoint()}; free some space{advice}, then --resume {self.path}") from e
# One writer per run folder, and what a killed writer left behind.

LOCK_FILE = ".lock"
# train.py's own files at the top of the run folder (the other writers, sample.py and ema.py, write to
# sub-folders of their own).
TRAIN_FILES = ("config.json", "metrics.jsonl", "magnitudes.jsonl", "loss.png", "magnitudes.png", "wandb_id.txt")
# Everything train.py writes in a run folder (files, and folders it writes into): none may be a link.
TRAIN_WRITES = (LOCK_FILE, "log.txt", *TRAIN_FILES, "fid_during_training.jsonl", "fid_during_training.png",
                "checkpoints", "ema", "tensorboard", "wandb")


def refuse_linked_entries(run_dir: str, names=TRAIN_WRITES) -> None:
    """RunError (one line) where an entry of the run folder that a tool writes is a symbolic link."""
    try:
        refuse_links(run_dir, names)
    except LinkError as e:
        raise RunError(str(e)) from None


class RunLock:
    """The one writer of a run folder: an exclusive lock (flock) on RUN/.lock. The kernel releases it when
    the process ends in any way, kill -9 included, so it never stays stuck. A second writer gets a RunError
    naming the holder (the lock file holds its pid and host). `RunLock()` holds nothing until `take`."""

    def __init__(self, run_dir: str | None = None):
        self.fd = None
        if run_dir is not None:
            self.take(run_dir)

    def take(self, run_dir: str) -> None:
        import fcntl  # (POSIX only: here, so that readers of a run folder import runs on any system)
        fd = os.open(os.path.join(run_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunError(f"{run_dir} is in use by {holder}; a run folder has one writer: wait for that "
                           f"process to end (or stop it), then resume") from None
        self.fd = fd

    def name_holder(self) -> None:
        """Write this process (pid, host, since when) into the lock file, for the error a second writer gets."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"train.py (pid {os.getpid()} on {socket.gethostname()}, since "
                               f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def remove_stale_temporaries(run_dir: str) -> tuple[int, int]:
    """Remove the temporary files of interrupted writes (a kill -9 in the middle of a checkpoint leaves one,
    of its full size) from checkpoints/, ema/ and train.py's own files. Call it holding the run's lock: then
    no live process is writing them. Returns (files removed, bytes freed)."""
    found = []
    for sub in ("checkpoints", "ema"):
        folder = os.path.join(run_dir, sub)
        if os.path.isdir(folder):
            found += [os.path.join(folder, f) for f in os.listdir(folder) if TEMP_RE.match(f)]
    prefixes = tuple(temp_prefix(name) for name in TRAIN_FILES)
    found += [os.path.join(run_dir, f) for f in os.listdir(run_dir) if TEMP_RE.match(f) and f.startswith(prefixes)]
    freed = 0
    for path in found:
        with contextlib.suppress(FileNotFoundError):
            size = os.path.getsize(path)
            os.remove(path)
            freed += size
    return len(found), freed


def checkpoint_to_resume(run_dir: str, chosen: str | None = None) -> tuple[str, dict, list[str]]:
    """(path, contents) of the checkpoint a resume starts from: `chosen` (a file of the run's checkpoints/)
    or else the newest that loads; and the lines to log about the choice."""
    if chosen is None:
        path, ckpt, skipped = newest_intact_checkpoint(run_dir)
        return path, ckpt, [f"warning: skipped a checkpoint that does not load: {why}" for why in skipped]
    ckpt, newest = read_checkpoint(chosen), list_checkpoints(run_dir)[-1][0]
    if ckpt["step"] >= newest:
        return chosen, ckpt, []
    return chosen, ckpt, [f"note: resuming from step {ckpt['step']}, before the newest checkpoint ({newest}): the "
                          f"checkpoints and EMA snapshots after it are rewritten as training reaches their steps"]


def newest_intact_checkpoint(run_dir: str) -> tuple[str, dict, list[str]]:
    """(path, contents) of the newest checkpoint of the run that loads, and why each newer one was skipped
    (damaged, untrusted, incomplete: one line each). RunError if none loads."""
    skipped = []
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            return path, read_checkpoint(path), skipped
        except DamagedFileError as e:
            skipped.append(str(e))
    if not skipped:
        raise RunError(f"{run_dir} has no checkpoint to resume from (checkpoints/NNNNNNN.pt)")
    older = f" (and the {len(skipped) - 1} older one(s))" if len(skipped) > 1 else ""
    raise RunError(f"no checkpoint of {run_dir} loads: {skipped[0]}{older}")
