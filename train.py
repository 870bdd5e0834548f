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
import math
import os
import signal
import sys

import torch
import torch.distributed as dist

import data
import data.hf
import limits
import logs
import runs
import training
from atomic import Interrupted as StartupInterrupted, signals_interrupt
from cli import Parser
from diffusion import create_diffusion
from eval import during_training
from models import MODEL_NAMES, MODEL_SIZES
from mp_layers import MPConfig
from runs import RunError, list_checkpoints, load_run_config
from training import COMPILE_MODES, TrainingError

# Options that define what a run is; on --resume they come from the run and may not be changed.
RUN_DEFINING = ["model", "data_path", "image_size", "random_flip", "split", "image_column", "label_column",
                "num_classes", "batch_size", "lr", "mp_lr", "seed",
                "num_lin_warmup", "start_decay", "ema_stds", "precision", "grad_clip", *MPConfig.option_names(),
                "use_all_mp"]
MP_OPTIONS = [*MPConfig.option_names(), "use_all_mp"]
DEFAULT_LR, DEFAULT_MP_LR = 1e-4, 1e-2
# Options that may be changed when resuming.
RESUMABLE = ["vae", "num_steps", "log_every", "ckpt_every", "keep_checkpoints", "ema_snapshot_every", "magnitude_every",
             "num_workers", "compile", "compile_mode", "device", "batch_gpu", "grad_checkpointing",
             "max_image_pixels", *during_training.RESUMABLE, *logs.RESUMABLE]


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


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__, epilog=EXIT_CODES)
    p.add_argument("--data-path", default="digits",
                   help="latent folder, ImageFolder, Hugging Face dataset (a save_to_disk folder, a hub name such as "
                        "benjamin-paine/imagenet-1k-128x128, or hf:NAME), or a built-in set: digits (default), mnist")
    p.add_argument("--image-size", type=int, default=None,
                   help="centre-crop size of images (an ImageFolder or Hugging Face dataset)")
    p.add_argument("--vae", default=None, metavar="NAME_OR_PATH",
                   help="train images in the latent space of this diffusers AutoencoderKL (hub name such as "
                        "stabilityai/sd-vae-ft-mse, or a local folder), encoding each batch as it is read; "
                        "default: images train in pixel space. With --resume: where the run's VAE is now (the "
                        "same VAE; the run's own record is used otherwise)")
    p.add_argument("--random-flip", action="store_true",
                   help="mirror each item with probability 1/2 (images before encoding; a latent folder needs the "
                        "mirrored posteriors of prepare_latents.py --random-flip)")
    data.hf.add_arguments(p)
    p.add_argument("--max-image-pixels", type=int, default=None, metavar="N",
                   help="refuse images whose header claims more pixels (default: PIL's 89,478,485)")
    p.add_argument("--results-dir", default="results", help="parent folder of the run folders (RESULTS/NNN-MODEL)")
    p.add_argument("--model", default="DiT-XS/2", choices=MODEL_NAMES, metavar="NAME",
                   help="one of " + ", ".join(MODEL_NAMES))
    p.add_argument("--num-classes", type=int, default=None, help="default: from the dataset")
    p.add_argument("--num-steps", type=int, default=400_000)
    p.add_argument("--batch-size", type=int, default=256, help="global batch size over all processes")
    p.add_argument("--batch-gpu", type=int, default=None, metavar="N",
                   help="micro-batch per process: each process runs its share of --batch-size N items at a time, "
                        "adding up the gradients (less memory, the same results; default: the whole share at once)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate of the plain parameters (default 1e-4, as in the paper). Given without "
                        "--mp-lr it is the one rate of every parameter, as in the paper's eight-switch code")
    p.add_argument("--mp-lr", type=float, default=None,
                   help="learning rate of the weight-normalised and force-normalised weights, their gains and "
                        "the MP tables (default 1e-2, as the paper's later code and EDM2; 1e-4 barely moves them)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=None,
                   help="data loader processes (default: 0 for a set held in memory: digits, MNIST, a latent "
                        "folder; else min(4, CPU cores))")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=50_000)
    p.add_argument("--keep-checkpoints", type=int, default=0, metavar="N",
                   help="keep only the newest N checkpoints (default 0: keep all); EMA snapshots are always kept")
    p.add_argument("--num-lin-warmup", type=int, default=None, help="linear warm-up steps (default steps//150)")
    p.add_argument("--start-decay", type=int, default=None, help="start of 1/sqrt decay (default steps//10)")
    p.add_argument("--ema-snapshot-every", type=int, default=None,
                   help="default: about one snapshot per 1,000 steps, at least 10 and at most 250 a run "
                        "(post-hoc EMA needs only a few dozen; the log states the bytes to write)")
    p.add_argument("--ema-stds", type=float, nargs="+", default=[0.05, 0.10], help="tracked EMA σ_rel values")
    p.add_argument("--magnitude-every", type=int, default=None,
                   help="record activation and weight magnitudes per block every N steps and at the last (default: "
                        "spaced from a record's measured cost to take about 1 %% of the training time, at most "
                        "~100 records; the log says the spacing)")
    MPConfig.add_arguments(p)
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="tf32",
                   help="fp32, TF32 matmuls (default; same as fp32 on a CPU), or bf16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each block's activations in the backward instead of keeping them (less memory, "
                        "about a third more compute; the same results)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                   help="with --compile: torch.compile's mode (default: default); reduce-overhead replays CUDA "
                        "graphs, which removes the kernel-launch cost that bounds small models (measured on one "
                        "GPU; see docs/train.md)")
    p.add_argument("--grad-clip", type=float, default=0.0, help="clip the gradient norm (0 = off)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR|CKPT",
                   help="continue a run from its newest checkpoint, or from the checkpoint file given "
                        "(RUN_DIR/checkpoints/NNNNNNN.pt)")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    during_training.add_arguments(p)
    logs.add_arguments(p)
    return p


def fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
    steps = args.num_steps
    if args.num_lin_warmup is None:
        args.num_lin_warmup = steps // 150
    if args.start_decay is None:
        args.start_decay = steps // 10
    if args.ema_snapshot_every is None:
        args.ema_snapshot_every = default_snapshot_spacing(steps)
    return resolve_learning_rates(args)


def default_snapshot_spacing(num_steps: int) -> int:
    """Steps between EMA snapshots by default: about one per 1,000 steps, but at least 10 and at most 250
    snapshots a run. Post-hoc reconstruction is accurate from ten or so (tests/test_ema.py), and each
    snapshot is the model in fp16 per tracked σ_rel, so the old steps//250 made short runs mostly snapshots
    (20,000 steps of DiT-XS/2: 7.8 GB, now 0.6 GB)."""
    snapshots = min(250, max(10, num_steps // 1000))
    return max(1, num_steps // snapshots)


def default_num_workers(dataset) -> int:
    """Loader processes by default: none for a set held in memory (a process would only copy its items),
    else one per core up to 4 (more than the cores only competes with training)."""
    return 0 if getattr(dataset, "in_memory", False) else min(4, os.cpu_count() or 1)


def resolve_learning_rates(args: argparse.Namespace) -> argparse.Namespace:
    """--lr alone: one rate for everything (the eight-switch code); otherwise MP parameters at --mp-lr
    (default 1e-2) and plain ones at --lr (default 1e-4). A run made before --mp-lr existed had one rate."""
    if args.mp_lr is None:
        args.mp_lr = DEFAULT_MP_LR if args.lr is None else args.lr
    if args.lr is None:
        args.lr = DEFAULT_LR
    return args


def check_args(args: argparse.Namespace, world_size: int) -> None:
    """Every option checked before anything is loaded or written."""
    positive = ["num_steps", "batch_size", "log_every", "ckpt_every", "ema_snapshot_every", "magnitude_every"]
    for name in positive + ["image_size", "num_classes"]:
        value = getattr(args, name)
        if value is not None and value <= 0:  # (image_size and num_classes may be left to the data)
            raise TrainingError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.num_workers is not None and args.num_workers < 0:
        raise TrainingError(f"--num-workers must be >= 0 (0 loads in this process), got {args.num_workers}")
    if not (math.isfinite(args.grad_clip) and args.grad_clip >= 0):
        raise TrainingError(f"--grad-clip must be a finite number >= 0 (0 = off), got {args.grad_clip}")
    if not 0 <= args.seed < 2 ** 63:
        raise TrainingError(f"--seed must be in 0 .. 2**63 - 1, got {args.seed}")
    if len(set(args.ema_stds)) != len(args.ema_stds):
        raise TrainingError(f"--ema-stds has a duplicate value: {args.ema_stds}")
    if not args.resume and os.path.exists(args.results_dir) and not os.path.isdir(args.results_dir):
        raise TrainingError(f"--results-dir {args.results_dir} is a file; pass a folder (created if missing)")
    if getattr(args, "compile_mode", None) and not args.compile:
        raise TrainingError(f"--compile-mode {args.compile_mode} needs --compile; add --compile")
    if args.keep_checkpoints < 0:
        raise TrainingError(f"--keep-checkpoints must be >= 0 (0 keeps all), got {args.keep_checkpoints}")
    if args.num_lin_warmup < 0 or args.start_decay < 0:
        raise TrainingError("--num-lin-warmup and --start-decay must be >= 0")
    for name in ("lr", "mp_lr"):
        if not (getattr(args, name) > 0 and math.isfinite(getattr(args, name))):
            raise TrainingError(f"--{name.replace('_', '-')} must be a positive number, got {getattr(args, name)}")
    if args.batch_size % world_size:
        raise TrainingError(f"--batch-size {args.batch_size} is not divisible by the {world_size} processes; "
                            f"use a multiple of {world_size}")
    local = args.batch_size // world_size
    if args.batch_gpu is not None and (args.batch_gpu <= 0 or local % args.batch_gpu):
        raise TrainingError(f"--batch-gpu {args.batch_gpu} does not divide the {local} items of each process "
                            f"(--batch-size {args.batch_size} over {world_size}); pass a divisor of {local}")
    for std in args.ema_stds:
        if not 0 < std < 0.2887:
            raise TrainingError(f"--ema-stds value {std} is outside (0, 0.2887)")
    check_sizes(args, local)
    during_training.check_arguments(args)
    logs.check_arguments(args, TrainingError)


def check_sizes(args: argparse.Namespace, local_batch: int, channels: int = 1, resolution: int | None = None) -> None:
    """Sizes that cannot fit in memory, refused before anything is allocated (lower bounds: a batch of
    `channels` x `resolution`² float32 inputs, one class-embedding table of the model's width)."""
    size = resolution or args.image_size or 1
    limits.check_fits(4 * channels * size * size * (args.batch_gpu or local_batch),
                      f"a batch of {args.batch_gpu or local_batch} inputs of {channels}x{size}x{size}",
                      "pass a smaller --batch-size (or --batch-gpu) or --image-size", TrainingError)
    if args.num_classes is not None:
        width = MODEL_SIZES[args.model.removeprefix("DiT-").split("/")[0]][1]
        limits.check_fits(4 * (args.num_classes + 1) * width, f"a class table of {args.num_classes} classes",
                          "pass the number of classes of the data as --num-classes (or leave it out)", TrainingError)


def given_options(argv) -> set[str]:
    """The options named on the command line, also when given their default value."""
    probe = build_parser()
    for action in probe._actions:  # (parser.set_defaults would put the SUPPRESS marker into the namespace)
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


def resolve_args(argv) -> tuple[argparse.Namespace, dict | None]:
    """Parse the command line; with --resume, take the run's own options and check for conflicts."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume is None:
        return fill_defaults(args), None
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
    if missing:
        raise TrainingError(f"{os.path.join(run_dir, 'config.json')} lacks the option(s) {', '.join(missing)} of "
                            f"the run; restore the file train.py wrote")
    config_path = os.path.join(run_dir, "config.json")
    try:
        runs.check_saved_args(saved, parser, config_path)
        if saved.get("vae"):  # the run's data record is reused (its latent statistics): it must be whole
            runs.check_model_config(config, config_path)
    except RunError as e:
        raise TrainingError(str(e)) from e
    explicit = given_options(argv)
    conflicts = [k for k in explicit & set(RUN_DEFINING) if saved.get(k) != getattr(args, k) and k not in MP_OPTIONS]
    if explicit & set(MP_OPTIONS) and MPConfig.from_args(args) != MPConfig.from_dict(config["mp"]):
        conflicts.append("MP switches")
    if conflicts:
        names = ", ".join(f"--{c.replace('_', '-')}" if c != "MP switches" else c for c in sorted(conflicts))
        raise TrainingError(f"--resume {run_dir}: {names} differ from the run's own "
                            f"(model {saved['model']}, {MPConfig.from_dict(config['mp']).describe()}); "
                            f"drop them to resume, or start a new run")
    resumed = argparse.Namespace(**saved)
    for k in RESUMABLE:
        if k in explicit:
            setattr(resumed, k, getattr(args, k))
    for k, v in vars(args).items():  # options added to train.py after the run was created
        if not hasattr(resumed, k):
            setattr(resumed, k, v)
    if "vae" not in explicit:  # the VAE where it is now: moved with the run folder, or as recorded
        resumed.vae = runs.run_vae(config, run_dir) if saved.get("vae") else None
    resumed.resume, resumed.resume_checkpoint = run_dir, checkpoint
    resumed.results_dir = os.path.dirname(os.path.abspath(run_dir))
    return resolve_learning_rates(resumed), config


def train(argv=None) -> str:
    """Setup, resume, loop. Returns the run folder; raises Interrupted when a signal stopped it (after saving)."""
    args, resumed_config = resolve_args(argv)
    rank, world_size, device = training.setup_distributed(args.device)
    check_args(args, world_size)
    # One writer per run folder: a resume takes the lock before it loads a checkpoint, a new run on creation.
    with runs.RunLock(args.resume if args.resume and rank == 0 else None) as lock:
        mp = MPConfig.from_args(args) if resumed_config is None else MPConfig.from_dict(resumed_config["mp"])
        autocast = training.configure_precision(args.precision, device)
        if device.type == "cpu":
            # On x86 CPUs, denormal numbers (Adam's second moments of the tiny early gradients of weight-
            # normalised layers) are 10-100x slower; flushing them to zero changes nothing measurable.
            torch.set_flush_denormal(True)
        data.set_max_image_pixels(getattr(args, "max_image_pixels", None))
        dataset = data.load_dataset(args.data_path, image_size=args.image_size, num_classes=args.num_classes,
                                    vae=args.vae, device=device, random_flip=args.random_flip, split=args.split,
                                    image_column=args.image_column, label_column=args.label_column,
                                    recorded=resumed_config["data"] if resumed_config else None)
        if args.num_workers is None:  # (recorded in config.json as chosen, so a resume keeps it)
            args.num_workers = default_num_workers(dataset)
        check_sizes(args, args.batch_size // world_size, dataset.channels, dataset.resolution)
        state = training.build_state(args, dataset, mp, device)
        fid_reference, reference_seconds = during_training.resolve_reference(args, dataset, rank, world_size)
        notes = []  # said once the run folder's log exists
        if args.resume:
            path, ckpt, said = runs.checkpoint_to_resume(args.resume, args.resume_checkpoint)
            notes += said
            training.resume_from(state, ckpt, path, args.model, device)
            del ckpt
        model = training.wrap_model(state.model, args, world_size, device, notes.append)
        diffusion = create_diffusion("")
        batches = iter(training.make_loader(dataset, args, rank, world_size, state.step, device))
        probe = training.make_probe(dataset, diffusion, device, dataset.num_classes) if rank == 0 else None

        # Everything is validated and built: now (and only now) create or reopen the run folder.
        if args.resume:
            run = runs.Run.reopen(args.resume, state.step, rank, lock)
            run.log(f"resuming {run.path} from step {state.step} ({path})")
            if state.step >= args.num_steps:
                run.log(f"the run is already at step {state.step} of --num-steps {args.num_steps}: nothing to "
                        f"train; to go on, give the new end: --resume {run.path} --num-steps "
                        f"{max(2 * args.num_steps, state.step + 1)}")
        else:
            run = runs.Run.create(args.results_dir, args.model, rank, world_size, lock)
            run.write_config(runs.record_vae(runs.new_config(args, mp, dataset, world_size,
                                                             training.learning_rates(state.opt, state.model)),
                                             run.path))
            run.log(f"run folder {run.path}")
        for note in notes:
            run.warn(note)
        n_params = sum(p.numel() for p in state.model.parameters())
        run.log(f"{args.model}: {n_params:,} parameters, {mp.describe()}; data {dataset!r}; "
                f"{world_size} process(es) on {device}, precision {args.precision}, "
                f"global batch {args.batch_size}, {training.describe_learning_rates(state.opt)}")
        run.log_disk_plan(args, n_params, state.step)
        if reference_seconds >= 1:
            run.log(f"FID reference {fid_reference}: {logs.format_duration(reference_seconds)} (counted in the "
                    f"evaluations' cost_fraction)")

        meter = training.LossMeter(state, world_size, device)
        fid = during_training.TrainingFID(args, fid_reference, runs.new_config(args, mp, dataset, world_size), rank,
                                          world_size, device, reference_seconds)
        magnitudes = training.MagnitudeRecorder(args.magnitude_every, state.step, args.num_steps, device, run.log)
        state.model.train()
        with (training.StopSignal(world_size, device) as stop, run.disk_full_is_an_error(lambda: state.step),
              run.tracking(args, state.step if args.resume else 0)):
            while state.step < args.num_steps:
                x, y = dataset.model_batch(next(batches), device)  # (an on-the-fly VAE set encodes here)
                t = training.step_timesteps(args, rank, state.step, x.shape[0], diffusion.num_timesteps, device)
                state.step += 1
                meter.add(training.training_step(model, state.model, diffusion, state.opt, state.sched, state.ema,
                                                 x, y, t, step=state.step, autocast=autocast,
                                                 compiled=args.compile, grad_clip=args.grad_clip,
                                                 micro_batch=args.batch_gpu))
                step, last = state.step, state.step == args.num_steps
                if step % args.log_every == 0 or last:
                    run.log_metrics(meter.record(args, run.last_checkpoint), args.num_steps)
                if run.writer and magnitudes.due(step):
                    run.append("magnitudes.jsonl", magnitudes.record(state.model, probe, step))
                if step % args.ema_snapshot_every == 0 or last:
                    meter.check_finite(run.last_checkpoint)
                    run.save_snapshots(state.ema, step)
                stopping = stop.requested(step)
                if step % args.ckpt_every == 0 or last or stopping:
                    meter.check_finite(run.last_checkpoint)
                    run.save_checkpoint({**state.state_dict(device), "args": vars(args)}, args.keep_checkpoints)
                if fid.due(step, last) and not stopping:
                    fid.evaluate(state, step, run, meter)
                if stopping:
                    break
        if stop.signal is not None:
            name = signal.Signals(stop.signal).name if isinstance(stop.signal, int) else "a signal to another rank"
            run.log(f"interrupted by {name} at step {state.step}; the checkpoint is saved: continue with "
                    f"--resume {run.path}")
            raise Interrupted(128 + (stop.signal if isinstance(stop.signal, int) else signal.SIGTERM))
        run.plot("magnitudes")
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
