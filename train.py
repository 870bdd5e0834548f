"""Train a class-conditional DiT with magnitude-preserving switches: the command line.

One process:   python train.py --model DiT-XS/2 --use-all-mp --num-steps 2000
Many (DDP):    torchrun --nproc_per_node=8 train.py --data-path LATENTS --model DiT-S/4 ...
Resume:        python train.py --resume results/000-DiT-XS-2

A run folder `RESULTS/NNN-DiT-XS-2/` holds config.json (everything needed to rebuild the model and the
data normalisation), log.txt, metrics.jsonl, magnitudes.jsonl, checkpoints/NNNNNNN.pt, ema/ snapshots
and PNGs of the loss and the magnitudes. Rank 0 writes it; every write is atomic (write, then rename).
The training itself is training.py's; the run folder is runs.py's.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys

import torch
import torch.distributed as dist

import data
import limits
import logs
import runs
import training
from atomic import Interrupted as StartupInterrupted, signals_interrupt
from cli import Parser
from config import MP_KEYS, NOT_OPTIONS, ConfigError, TrainConfig
from diffusion import create_diffusion
from eval import during_training
from models import MODEL_SIZES
from mp_layers import MPConfig
from runs import RunError, list_checkpoints, load_run_config
from training import TrainingError


# ----------------------------------------------------------------------------------------------------
# Command line.


EXIT_CODES = """exit status:
  0        the run reached --num-steps
  2        bad input, or the run failed (one "error:" line says why and what to do)
  130, 143 interrupted by Ctrl-C (SIGINT) or SIGTERM: a checkpoint of the last step was saved first
           (unless it came during start-up); continue with --resume RUN_DIR
"""


class Interrupted(Exception):
    """A signal stopped the run after it saved a checkpoint; `code` is the exit status (128 + the signal)."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


@dataclasses.dataclass(frozen=True)
class Resume:
    """The run a --resume continues: its folder, the checkpoint file given (None: the newest), its
    config.json, and what to tell its log about the options it was read with."""
    run_dir: str
    checkpoint: str | None
    config: dict
    notes: list


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__, epilog=EXIT_CODES)
    p.add_argument("--config", default=None, metavar="FILE",
                   help="read the options from this JSON file (YAML for .yaml/.yml): {\"option\": value, ...} "
                        "with the flags' names (num_steps), or a run's config.json; flags given too override it")
    p.add_argument("--resume", default=None, metavar="RUN_DIR|CKPT",
                   help="continue a run from its newest checkpoint, or from the checkpoint file given "
                        "(RUN_DIR/checkpoints/NNNNNNN.pt)")
    TrainConfig.add_arguments(p)
    return p


def default_num_workers(dataset) -> int:
    """Loader processes by default: none for a set held in memory (a process would only copy its items),
    else one per core up to 4 (more than the cores only competes with training)."""
    return 0 if getattr(dataset, "in_memory", False) else min(4, os.cpu_count() or 1)


def check_machine(cfg: TrainConfig, world_size: int) -> None:
    """The checks that depend on the processes and the machine (those between options are TrainConfig's)."""
    if cfg.batch_size % world_size:
        raise TrainingError(f"--batch-size {cfg.batch_size} is not divisible by the {world_size} processes; "
                            f"use a multiple of {world_size}")
    local = cfg.batch_size // world_size
    if cfg.batch_gpu is not None and (cfg.batch_gpu <= 0 or local % cfg.batch_gpu):
        raise TrainingError(f"--batch-gpu {cfg.batch_gpu} does not divide the {local} items of each process "
                            f"(--batch-size {cfg.batch_size} over {world_size}); pass a divisor of {local}")
    check_sizes(cfg, local)
    logs.check_trackers(cfg, TrainingError)


def check_sizes(cfg: TrainConfig, local_batch: int, channels: int = 1, resolution: int | None = None) -> None:
    """Sizes that cannot fit in memory, refused before anything is allocated (lower bounds: a batch of
    `channels` x `resolution`² float32 inputs, one class-embedding table of the model's width)."""
    size = resolution or cfg.image_size or 1
    limits.check_fits(4 * channels * size * size * (cfg.batch_gpu or local_batch),
                      f"a batch of {cfg.batch_gpu or local_batch} inputs of {channels}x{size}x{size}",
                      "pass a smaller --batch-size (or --batch-gpu) or --image-size", TrainingError)
    if cfg.num_classes is not None:
        width = MODEL_SIZES[cfg.model.removeprefix("DiT-").split("/")[0]][1]
        limits.check_fits(4 * (cfg.num_classes + 1) * width, f"a class table of {cfg.num_classes} classes",
                          "pass the number of classes of the data as --num-classes (or leave it out)", TrainingError)


def given_options(argv) -> set[str]:
    """The options named on the command line, also when given their default value."""
    probe = build_parser()
    for action in probe._actions:  # (parser.set_defaults would put the SUPPRESS marker into the namespace)
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


def read_config_file(path: str) -> dict:
    """The options of a --config file, checked: {option: value} as the flags name them, or a run's
    config.json (its "args"). ConfigError (one line) when it is missing, unreadable or names no option."""
    fix = "pass a JSON file of {\"option\": value} (see python train.py --help), or a run's config.json"
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith((".yaml", ".yml")):  # (PyYAML comes with the datasets package)
                import yaml
                options = yaml.safe_load(f)
            else:
                options = json.load(f)
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror or e}); {fix}") from None
    except Exception as e:  # (JSON's and YAML's parse errors, a file that is no text)
        raise ConfigError(f"--config {path} is not valid {'YAML' if path.endswith(('.yaml', '.yml')) else 'JSON'} "
                          f"({str(e).splitlines()[0][:120]}); {fix}") from None
    if isinstance(options, dict) and isinstance(options.get("args"), dict):
        options = options["args"]  # a run's config.json
    if not isinstance(options, dict):
        raise ConfigError(f"--config {path} holds a {type(options).__name__}, not {{\"option\": value}}; {fix}")
    unknown = TrainConfig.unknown_keys(options) + [k for k in NOT_OPTIONS if options.get(k) is not None]
    if unknown:
        raise ConfigError(f"--config {path}: {unknown[0]!r} is no option of train.py (see python train.py --help); "
                          f"correct or remove it")
    TrainConfig.check_types(options, where=f"--config {path}: option ", fix="correct the file")
    return {k: v for k, v in options.items() if k not in NOT_OPTIONS}


def resolve_args(argv) -> tuple[TrainConfig, Resume | None]:
    """The options: a --config file's, overridden by the flags given; with --resume, the run's own with the
    changes a resume may make (TrainConfig's resumable fields), any other change refused."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = given_options(argv)
    if args.config is not None:
        from_file = read_config_file(args.config)
        parser.set_defaults(**from_file)  # the flags given still win
        args, given = parser.parse_args(argv), given | set(from_file)
    if args.resume is not None:
        return resume_config(args, given)
    if os.path.exists(args.results_dir) and not os.path.isdir(args.results_dir):
        raise TrainingError(f"--results-dir {args.results_dir} is a file; pass a folder (created if missing)")
    return TrainConfig.from_args(args), None


def resume_config(args: argparse.Namespace, given: set[str]) -> tuple[TrainConfig, Resume]:
    """The options of the run --resume names: its own, with the options `given` that a resume may change
    (TrainConfig's resumable fields); another given with a value other than the run's is an error."""
    run_dir, checkpoint = args.resume, None
    if os.path.isfile(run_dir):  # a checkpoint file, as DiT users pass them: that checkpoint, not the newest
        checkpoint = os.path.abspath(run_dir)
        if (os.path.basename(os.path.dirname(checkpoint)) != "checkpoints"
                or not runs.CHECKPOINT_RE.match(os.path.basename(checkpoint))):
            raise TrainingError(f"--resume {args.resume}: a checkpoint to resume from is a run's "
                                f"checkpoints/NNNNNNN.pt; pass that file, or the run folder")
        run_dir = os.path.dirname(os.path.dirname(checkpoint))
    if not os.path.isdir(run_dir):
        raise TrainingError(f"--resume folder not found: {run_dir}")
    try:
        config = load_run_config(run_dir)
        runs.refuse_linked_entries(run_dir)  # before the lock, the log or a checkpoint is opened for writing
    except RunError as e:
        raise TrainingError(str(e)) from e
    if not list_checkpoints(run_dir):
        raise TrainingError(f"{run_dir} has no checkpoint to resume from (checkpoints/NNNNNNN.pt); "
                            f"start a new run instead")
    saved = config["args"]
    missing = [k for k in ("model", "data_path", "batch_size", "lr", "seed", "num_steps") if k not in saved]
    config_path = os.path.join(run_dir, "config.json")
    if missing:
        raise TrainingError(f"{config_path} lacks the option(s) {', '.join(missing)} of the run; restore the file "
                            f"train.py wrote")
    try:
        run_cfg = TrainConfig.from_dict(saved, where=f"{config_path}: field args.",
                                        fix="restore the file train.py wrote")
        run_cfg = dataclasses.replace(run_cfg, mp=MPConfig.from_dict(config["mp"]))
        if saved.get("vae"):  # the run's data record is reused (its latent statistics): it must be whole
            runs.check_model_config(config, config_path)
    except RunError as e:
        raise TrainingError(str(e)) from e
    asked, fields = vars(args), {f.name for f in TrainConfig.options()}
    as_field = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731  (--ema-stds: a list)
    conflicts = [f"--{k.replace('_', '-')}" for k in sorted(given & fields)
                 if not TrainConfig.resumable(k) and as_field(asked[k]) != getattr(run_cfg, k)]
    if given & set(MP_KEYS) and MPConfig.from_args(args) != run_cfg.mp:
        conflicts.append("MP switches")
    if conflicts:
        raise TrainingError(f"--resume {run_dir}: {', '.join(conflicts)} differ from the run's own "
                            f"(model {run_cfg.model}, {run_cfg.mp.describe()}); drop them to resume, or start a "
                            f"new run")
    changes = {k: asked[k] for k in given & fields if TrainConfig.resumable(k)}
    if "vae" not in given:  # the VAE where it is now: moved with the run folder, or as recorded
        changes["vae"] = runs.run_vae(config, run_dir) if saved.get("vae") else None
    changes["results_dir"] = os.path.dirname(os.path.abspath(run_dir))
    notes = [f"config.json's option {k} is no option of this train.py: ignored"
             for k in TrainConfig.unknown_keys(saved)]
    return dataclasses.replace(run_cfg, **changes), Resume(run_dir, checkpoint, config, notes)


def train(argv=None) -> str:
    """Setup, resume, loop. Returns the run folder; raises Interrupted when a signal stopped it (after saving)."""
    cfg, resume = resolve_args(argv)
    rank, world_size, device = training.setup_distributed(cfg.device)
    check_machine(cfg, world_size)
    # One writer per run folder: a resume takes the lock before it loads a checkpoint, a new run on creation.
    with runs.RunLock(resume.run_dir if resume and rank == 0 else None) as lock:
        autocast = training.configure_precision(cfg.precision, device)
        if device.type == "cpu":
            # On x86 CPUs, denormal numbers (Adam's second moments of the tiny early gradients of weight-
            # normalised layers) are 10-100x slower; flushing them to zero changes nothing measurable.
            torch.set_flush_denormal(True)
        data.set_max_image_pixels(cfg.max_image_pixels)
        dataset = data.load_dataset(cfg.data_path, image_size=cfg.image_size, num_classes=cfg.num_classes,
                                    vae=cfg.vae, device=device, random_flip=cfg.random_flip, split=cfg.split,
                                    image_column=cfg.image_column, label_column=cfg.label_column,
                                    recorded=resume.config["data"] if resume else None)
        if cfg.num_workers is None:  # (recorded in config.json as chosen, so a resume keeps it)
            cfg = dataclasses.replace(cfg, num_workers=default_num_workers(dataset))
        check_sizes(cfg, cfg.batch_size // world_size, dataset.channels, dataset.resolution)
        state = training.build_state(cfg, dataset, device)
        fid_reference, reference_seconds = during_training.resolve_reference(cfg, dataset, rank, world_size)
        notes = list(resume.notes) if resume else []  # said once the run folder's log exists
        if resume:
            path, ckpt, said = runs.checkpoint_to_resume(resume.run_dir, resume.checkpoint)
            notes += said
            training.resume_from(state, ckpt, path, cfg.model, device)
            del ckpt
        model = training.wrap_model(state.model, cfg, world_size, device, notes.append)
        diffusion = create_diffusion("")
        batches = iter(training.make_loader(dataset, cfg, rank, world_size, state.step, device))
        probe = training.make_probe(dataset, diffusion, device, dataset.num_classes) if rank == 0 else None

        # Everything is validated and built: now (and only now) create or reopen the run folder.
        if resume:
            run = runs.Run.reopen(resume.run_dir, state.step, rank, lock)
            run.log(f"resuming {run.path} from step {state.step} ({path})")
            if state.step >= cfg.num_steps:
                run.log(f"the run is already at step {state.step} of --num-steps {cfg.num_steps}: nothing to "
                        f"train; to go on, give the new end: --resume {run.path} --num-steps "
                        f"{max(2 * cfg.num_steps, state.step + 1)}")
        else:
            run = runs.Run.create(cfg.results_dir, cfg.model, rank, world_size, lock)
            run.write_config(runs.record_vae(runs.new_config(cfg, dataset, world_size,
                                                             training.learning_rates(state.opt, state.model)),
                                             run.path))
            run.log(f"run folder {run.path}")
        for note in notes:
            run.warn(note)
        n_params = sum(p.numel() for p in state.model.parameters())
        run.log(f"{cfg.model}: {n_params:,} parameters, {cfg.mp.describe()}; data {dataset!r}; "
                f"{world_size} process(es) on {device}, precision {cfg.precision}, "
                f"global batch {cfg.batch_size}, {training.describe_learning_rates(state.opt)}")
        run.log_disk_plan(cfg, n_params, state.step)
        if reference_seconds >= 1:
            run.log(f"FID reference {fid_reference}: {logs.format_duration(reference_seconds)} (counted in the "
                    f"evaluations' cost_fraction)")

        meter = training.LossMeter(state, world_size, device)
        fid = during_training.TrainingFID(cfg, fid_reference, runs.new_config(cfg, dataset, world_size), rank,
                                          world_size, device, reference_seconds)
        magnitudes = training.MagnitudeRecorder(cfg.magnitude_every, state.step, cfg.num_steps, device, run.log)
        state.model.train()
        with (training.StopSignal(world_size, device) as stop, run.disk_full_is_an_error(lambda: state.step),
              run.tracking(cfg, state.step if resume else 0)):
            while state.step < cfg.num_steps:
                x, y = dataset.model_batch(next(batches), device)  # (an on-the-fly VAE set encodes here)
                t = training.step_timesteps(cfg.seed, rank, state.step, x.shape[0], diffusion.num_timesteps, device)
                state.step += 1
                meter.add(training.training_step(model, state.model, diffusion, state.opt, state.sched, state.ema,
                                                 x, y, t, step=state.step, autocast=autocast,
                                                 compiled=cfg.compile, grad_clip=cfg.grad_clip,
                                                 micro_batch=cfg.batch_gpu))
                step, last = state.step, state.step == cfg.num_steps
                if step % cfg.log_every == 0 or last:
                    run.log_metrics(meter.record(cfg, run.last_checkpoint), cfg.num_steps)
                if run.writer and magnitudes.due(step):
                    run.append("magnitudes.jsonl", magnitudes.record(state.model, probe, step))
                if step % cfg.ema_snapshot_every == 0 or last:
                    meter.check_finite(run.last_checkpoint)
                    run.save_snapshots(state.ema, step)
                stopping = stop.requested(step)
                if step % cfg.ckpt_every == 0 or last or stopping:
                    meter.check_finite(run.last_checkpoint)
                    run.save_checkpoint({**state.state_dict(device), "args": cfg.to_dict()}, cfg.keep_checkpoints)
                if fid.due(step, last) and (last or not stopping):  # (the last one, the run's result, even
                    fid.evaluate(state, step, run, meter)              # when stopping: its checkpoint is saved)
                if stopping:
                    break

        def then(step):  # what the log says to do once the loop has saved the checkpoint of `step`
            return "the run is complete" if step >= cfg.num_steps else f"continue with --resume {run.path}"

        try:  # the loop saved its last checkpoint: a signal from here on only cuts the ending short
            if stop.signal is not None:
                name = signal.Signals(stop.signal).name if isinstance(stop.signal, int) else "a signal to another rank"
                run.log(f"interrupted by {name} at step {state.step}; the checkpoint is saved: {then(state.step)}")
                raise Interrupted(128 + (stop.signal if isinstance(stop.signal, int) else signal.SIGTERM))
            run.plot("magnitudes")
        except StartupInterrupted as e:
            run.log(f"interrupted ({e.name}) after the checkpoint of step {state.step} was saved: {then(state.step)} "
                    f"(python plots.py {run.path} draws magnitudes.png)")
            raise Interrupted(e.code) from None
        run.log(f"done: {run.path}")
    if world_size > 1:
        dist.barrier()
    return run.path


def main(argv=None) -> int:
    try:
        with signals_interrupt():  # (during training, StopSignal takes both signals: it saves, then stops)
            train(argv)
    except Interrupted as e:
        return e.code
    except StartupInterrupted as e:  # a signal before training began
        print(f"error: interrupted ({e.name}) during start-up; nothing was trained", file=sys.stderr)
        return e.code
    except (TrainingError, data.DatasetError, ValueError, OSError) as e:  # OSError: unusable folders, full disks
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before training began (once it has, Ctrl-C stops it cleanly)
        print("error: interrupted (Ctrl-C) during start-up; nothing was trained", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
