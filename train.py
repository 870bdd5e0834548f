"""Train a class-conditional DiT with magnitude-preserving switches (DESIGN §5-7).

One process:   python train.py --model DiT-XS/2 --use-all-mp --lr 1e-2 --num-steps 2000
Many (DDP):    torchrun --nproc_per_node=8 train.py --data-path LATENTS --model DiT-S/4 ...
Resume:        python train.py --resume results/000-DiT-XS-2

A run folder `RESULTS/NNN-DiT-XS-2/` holds config.json (everything needed to rebuild the model and the
data normalisation), log.txt, metrics.jsonl, magnitudes.jsonl, checkpoints/NNNNNNN.pt, ema/ snapshots
and PNGs of the loss and the magnitudes. Rank 0 writes it; every write is atomic (write, then rename).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Sampler

import data
from diffusion import create_diffusion
from atomic import atomic_torch_save, atomic_write_text
from ema import PowerEMA
from models import MODEL_NAMES, build_model
from mp_layers import MPConfig
from runs import RunError, list_checkpoints, load_run_config, read_jsonl

# Options that define what a run is; on --resume they come from the run and may not be changed.
RUN_DEFINING = ["model", "data_path", "image_size", "num_classes", "batch_size", "lr", "seed", "num_lin_warmup",
                "start_decay", "ema_stds", "precision", "grad_clip", *MPConfig.switch_names(), "use_all_mp"]
# Options that may be changed when resuming.
RESUMABLE = ["num_steps", "log_every", "ckpt_every", "keep_checkpoints", "ema_snapshot_every", "magnitude_every",
             "num_workers", "compile", "compile_mode", "device"]
COMPILE_MODES = ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


class TrainingError(Exception):
    """Bad input or a failed run: reported as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------------
# Command line.


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", default="digits",
                   help="latent folder, ImageFolder, or a built-in set: digits (default), mnist")
    p.add_argument("--image-size", type=int, default=None, help="resolution of an ImageFolder (pixel space)")
    p.add_argument("--results-dir", default="results")
    p.add_argument("--model", default="DiT-XS/2", choices=MODEL_NAMES, metavar="NAME",
                   help="one of " + ", ".join(MODEL_NAMES))
    p.add_argument("--num-classes", type=int, default=None, help="default: from the dataset")
    p.add_argument("--num-steps", type=int, default=400_000)
    p.add_argument("--batch-size", type=int, default=256, help="global batch size over all processes")
    p.add_argument("--lr", type=float, default=1e-4,
                   help="base learning rate (1e-4 as in the paper; MP networks train better at 1e-2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=50_000)
    p.add_argument("--keep-checkpoints", type=int, default=0, metavar="N",
                   help="keep only the newest N checkpoints (default 0: keep all); EMA snapshots are always kept")
    p.add_argument("--num-lin-warmup", type=int, default=None, help="linear warm-up steps (default steps//150)")
    p.add_argument("--start-decay", type=int, default=None, help="start of 1/sqrt decay (default steps//10)")
    p.add_argument("--ema-snapshot-every", type=int, default=None, help="default steps//250")
    p.add_argument("--ema-stds", type=float, nargs="+", default=[0.05, 0.10], help="tracked EMA σ_rel values")
    p.add_argument("--magnitude-every", type=int, default=None,
                   help="record activation and weight magnitudes per block every N steps (default steps//100)")
    MPConfig.add_arguments(p)
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="tf32",
                   help="fp32, TF32 matmuls (default; same as fp32 on a CPU), or bf16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                   help="with --compile: torch.compile's mode (default: default); reduce-overhead replays CUDA "
                        "graphs, which removes the kernel-launch cost that bounds small models (measured on one "
                        "GPU; see README)")
    p.add_argument("--grad-clip", type=float, default=0.0, help="clip the gradient norm (0 = off)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    return p


def fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
    steps = args.num_steps
    if args.num_lin_warmup is None:
        args.num_lin_warmup = steps // 150
    if args.start_decay is None:
        args.start_decay = steps // 10
    if args.ema_snapshot_every is None:
        args.ema_snapshot_every = max(1, steps // 250)
    if args.magnitude_every is None:
        args.magnitude_every = max(1, steps // 100)
    return args


def check_args(args: argparse.Namespace, world_size: int) -> None:
    positive = ["num_steps", "batch_size", "log_every", "ckpt_every", "ema_snapshot_every", "magnitude_every"]
    for name in positive:
        if getattr(args, name) <= 0:
            raise TrainingError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if getattr(args, "compile_mode", None) and not args.compile:
        raise TrainingError(f"--compile-mode {args.compile_mode} needs --compile; add --compile")
    if args.keep_checkpoints < 0:
        raise TrainingError(f"--keep-checkpoints must be >= 0 (0 keeps all), got {args.keep_checkpoints}")
    if args.num_lin_warmup < 0 or args.start_decay < 0:
        raise TrainingError("--num-lin-warmup and --start-decay must be >= 0")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise TrainingError(f"--lr must be a positive number, got {args.lr}")
    if args.batch_size % world_size:
        raise TrainingError(f"--batch-size {args.batch_size} is not divisible by the {world_size} processes; "
                            f"use a multiple of {world_size}")
    for std in args.ema_stds:
        if not 0 < std < 0.2887:
            raise TrainingError(f"--ema-stds value {std} is outside (0, 0.2887)")


def lr_factor(step: int, warmup: int, decay_start: int) -> float:
    """Multiplier of the base lr at optimiser step `step` (0-based): linear warm-up, then 1/sqrt decay."""
    if step + 1 < warmup:
        return (step + 1) / warmup
    if decay_start > 0 and step >= decay_start:
        return 1 / math.sqrt(step / decay_start)
    return 1.0


# ----------------------------------------------------------------------------------------------------
# Distributed setup and determinism.


def setup_distributed(device_arg: str | None) -> tuple[int, int, torch.device]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg:
        device = torch.device(device_arg)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def mix_seed(*values: int) -> int:
    """A deterministic 63-bit seed from integers (splitmix64-style)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class StepBatchSampler(Sampler):
    """Yields this rank's share of the global batch of every step from `start_step` on, forever.

    The data are an endless stream of per-epoch permutations (seeded by seed and epoch); global batch s is
    positions [s·B, (s+1)·B) of that stream, so the batch of any step is known without replaying earlier
    ones, which makes resuming exact. Each item comes with its own seed for per-item randomness (the
    fresh posterior sample of a latent set), so results do not depend on the number of workers.
    """

    def __init__(self, num_items: int, global_batch: int, rank: int, world_size: int, seed: int, start_step: int):
        self.n, self.global_batch, self.seed, self.start_step = num_items, global_batch, seed, start_step
        self.local = global_batch // world_size
        self.offset = rank * self.local
        self._perm_epoch, self._perm = None, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 1))
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def __iter__(self):
        step = self.start_step
        while True:
            batch = []
            for pos in range(step * self.global_batch + self.offset, step * self.global_batch + self.offset + self.local):
                epoch, i = divmod(pos, self.n)
                batch.append((int(self._permutation(epoch)[i]), mix_seed(self.seed, pos, 2)))
            yield batch
            step += 1


class SeededItems(torch.utils.data.Dataset):
    """Wraps a dataset so that item (index, seed) is drawn with the global RNG seeded by `seed`."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        torch.manual_seed(seed)
        return self.dataset[index]


def make_loader(dataset, args, rank: int, world_size: int, start_step: int, device: torch.device) -> DataLoader:
    sampler = StepBatchSampler(len(dataset), args.batch_size, rank, world_size, args.seed, start_step)
    workers = args.num_workers
    return DataLoader(SeededItems(dataset), batch_sampler=sampler, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      prefetch_factor=4 if workers > 0 else None)


# ----------------------------------------------------------------------------------------------------
# Run folder.


def create_run_dir(results_dir: str, model_name: str) -> str:
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


def truncate_jsonl(path: str, last_step: int) -> None:
    """Drop records after `last_step` (written after the checkpoint we resume from), and a last line cut
    short by the interruption."""
    if os.path.isfile(path):
        kept = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def setup_logging(run_dir: str | None, rank: int) -> logging.Logger:
    logger = logging.getLogger("train")
    logger.handlers.clear()
    logger.propagate = False
    if rank != 0:
        logger.addHandler(logging.NullHandler())
        return logger
    fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    handlers = [logging.StreamHandler(sys.stdout)]
    if run_dir:
        handlers.append(logging.FileHandler(os.path.join(run_dir, "log.txt")))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    logger.setLevel(logging.INFO)
    return logger


# ----------------------------------------------------------------------------------------------------
# Magnitudes (the paper's central picture).


@torch.no_grad()
def measure_magnitudes(model, probe: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> dict:
    """RMS of the activations leaving each block on a fixed probe batch, and RMS of each block's weights."""
    x, t, y = probe
    outputs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outputs.append(o.float().square().mean().sqrt().item()))
             for b in model.blocks]
    was_training = model.training
    model.eval()
    try:
        model(x, t, y)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    weights = []
    for block in model.blocks:
        params = [p for n, p in block.named_parameters() if n.endswith("weight")]
        total = sum(p.float().square().sum() for p in params)
        weights.append(math.sqrt(float(total) / sum(p.numel() for p in params)))
    return {"act_rms": outputs, "weight_rms": weights}


def make_probe(dataset, diffusion, device, num_classes: int, size: int = 16):
    g = torch.Generator().manual_seed(1234)
    idx = torch.randperm(len(dataset), generator=g)[:size]
    torch.manual_seed(4321)
    items = [dataset[int(i)] for i in idx]  # one read per item (latent sets draw a fresh sample per read)
    x0 = torch.stack([item[0] for item in items])
    t = torch.linspace(0, 999, len(idx)).long()
    x = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    y = torch.stack([torch.as_tensor(item[1]) for item in items]).long().clamp(max=num_classes - 1)
    return x.to(device), t.to(device), y.to(device)


# ----------------------------------------------------------------------------------------------------
# Training.


def compile_model(model: torch.nn.Module, mode: str | None = "default") -> torch.nn.Module:
    """torch.compile for training. With a CUDA-graph mode (reduce-overhead, max-autotune) call
    torch.compiler.cudagraph_mark_step_begin() at the start of every step: the graphs' outputs are
    reused buffers, and the mark tells PyTorch that the previous step's are no longer needed."""
    return torch.compile(model, mode=None if mode in (None, "default") else mode)


def make_optimizer(model: torch.nn.Module, lr: float, warmup: int, decay_start: int, device: torch.device):
    """Adam (β = 0.9, 0.99, no weight decay; fused on CUDA) and its lr schedule (`lr_factor`)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=0,
                           fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, decay_start))
    return opt, sched


def training_step(train_model, raw_model, diffusion, opt, sched, ema, x, y, t, *, step: int, autocast,
                  compiled: bool, grad_clip: float = 0.0) -> torch.Tensor:
    """One optimiser step: hybrid loss, backward, (clip,) Adam, lr schedule, forced-WN projection, EMA update.
    `step` is the step count after this update (the EMA's t); returns the detached mean loss."""
    if compiled:
        torch.compiler.cudagraph_mark_step_begin()
    with autocast():
        loss = diffusion.training_losses(train_model, x, t, model_kwargs={"y": y})["loss"].mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
    opt.step()
    sched.step()
    raw_model.project_forced_weights_()  # forced weight normalisation, after every optimiser step
    ema.update(raw_model, step)
    return loss.detach()


def configure_precision(precision: str, device: torch.device):
    tf32 = precision in ("tf32", "bf16")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


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
    run_dir = args.resume
    if not os.path.isdir(run_dir):
        raise TrainingError(f"--resume folder not found: {run_dir}")
    try:
        config = load_run_config(run_dir)
    except RunError as e:
        raise TrainingError(str(e)) from e
    if not list_checkpoints(run_dir):
        raise TrainingError(f"{run_dir} has no checkpoint to resume from (checkpoints/NNNNNNN.pt); "
                            f"start a new run instead")
    saved = config["args"]
    explicit = given_options(argv)
    conflicts = [k for k in explicit & set(RUN_DEFINING) if saved.get(k) != getattr(args, k)
                 and not (k in MPConfig.switch_names() + ["use_all_mp"])]
    mp_given = MPConfig.from_args(args)
    if (explicit & set(MPConfig.switch_names() + ["use_all_mp"])) and mp_given.to_dict() != config["mp"]:
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
    resumed.resume = run_dir
    resumed.results_dir = os.path.dirname(os.path.abspath(run_dir))
    return resumed, config


def saves_between(start: int, end: int, every: int) -> int:
    """How many of the steps start+1 .. end write a file that is written every `every` steps and at `end`."""
    return end // every - start // every + (1 if end % every else 0) if end > start else 0


def disk_plan(args: argparse.Namespace, n_params: int, start_step: int) -> tuple[int, str]:
    """About how many bytes the steps after `start_step` add to the run folder, and an account of them:
    fp16 EMA snapshots (one per tracked σ_rel) and fp32 checkpoints (weights, Adam's two moments, EMAs)."""
    n_snapshots = saves_between(start_step, args.num_steps, args.ema_snapshot_every) * len(args.ema_stds)
    n_checkpoints = saves_between(start_step, args.num_steps, args.ckpt_every)
    if args.keep_checkpoints:  # the newest is written before the oldest is removed
        n_checkpoints = min(n_checkpoints, args.keep_checkpoints + 1)
    snapshot_bytes = n_snapshots * n_params * 2
    checkpoint_bytes = n_checkpoints * n_params * 4 * (3 + len(args.ema_stds))
    account = (f"{n_snapshots} EMA snapshots ({snapshot_bytes / 1e9:.2f} GB) and {n_checkpoints} checkpoint(s) "
               f"({checkpoint_bytes / 1e9:.2f} GB)")
    return snapshot_bytes + checkpoint_bytes, account


def train(argv=None) -> str:
    args, resumed_config = resolve_args(argv)
    rank, world_size, device = setup_distributed(args.device)
    check_args(args, world_size)
    mp = MPConfig.from_args(args) if resumed_config is None else MPConfig.from_dict(resumed_config["mp"])
    autocast = configure_precision(args.precision, device)
    if device.type == "cpu":
        # On x86 CPUs, denormal numbers (Adam's second moments of the tiny early gradients of weight-
        # normalised layers) are 10-100x slower; flushing them to zero changes nothing measurable.
        torch.set_flush_denormal(True)

    dataset = data.load_dataset(args.data_path, image_size=args.image_size, num_classes=args.num_classes)
    num_classes = dataset.num_classes
    torch.manual_seed(args.seed)  # the initial weights depend on --seed only (same on every rank)
    model = build_model(args.model, in_channels=dataset.channels, input_size=dataset.resolution,
                        num_classes=num_classes, mp=mp).to(device)
    ema = PowerEMA(model, stds=tuple(args.ema_stds))
    opt, sched = make_optimizer(model, args.lr, args.num_lin_warmup, args.start_decay, device)

    # Everything is validated: now (and only now) create or reopen the run folder.
    step = 0
    if args.resume:
        run_dir = args.resume
        ckpt_step, ckpt_path = list_checkpoints(run_dir)[-1]
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ckpt["args"]["model"] != args.model:
            raise TrainingError(f"checkpoint {ckpt_path} holds a {ckpt['args']['model']}, not {args.model}")
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise TrainingError(f"checkpoint {ckpt_path} does not fit the model: {str(e).splitlines()[0]}") from e
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["lr_scheduler"])
        step = int(ckpt["step"])
        rng = ckpt["rng"]
        torch.set_rng_state(rng["cpu"])
        if device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], device)
        del ckpt
    else:
        run_dir = None
        if rank == 0:
            run_dir = create_run_dir(args.results_dir, args.model)
        if world_size > 1:
            holder = [run_dir]
            dist.broadcast_object_list(holder, src=0)
            run_dir = holder[0]
    logger = setup_logging(run_dir, rank)
    if rank == 0:
        if args.resume:
            truncate_jsonl(os.path.join(run_dir, "metrics.jsonl"), step)
            truncate_jsonl(os.path.join(run_dir, "magnitudes.jsonl"), step)
            logger.info(f"resuming {run_dir} from step {step}")
        else:
            config = {"args": vars(args), "model": args.model, "mp": mp.to_dict(), "data": dataset.describe(),
                      "num_classes": num_classes, "in_channels": dataset.channels, "input_size": dataset.resolution,
                      "world_size": world_size, "torch": torch.__version__}
            atomic_write_text(os.path.join(run_dir, "config.json"), json.dumps(config, indent=2))
            logger.info(f"run folder {run_dir}")
        n_params = sum(p.numel() for p in model.parameters())
        logger.info(f"{args.model}: {n_params:,} parameters, {mp.describe()}; data {dataset!r}; "
                    f"{world_size} process(es) on {device}, precision {args.precision}, "
                    f"global batch {args.batch_size}, lr {args.lr:g}")
        need, account = disk_plan(args, n_params, step)
        free = shutil.disk_usage(run_dir).free
        logger.info(f"disk: about {need / 1e9:.1f} GB to write ({account}); {free / 1e9:.1f} GB free")
        if need > free:
            logger.warning(f"warning: the run needs more than the {free / 1e9:.1f} GB free on the disk of {run_dir}; "
                           f"raise --ema-snapshot-every or --ckpt-every, set --keep-checkpoints, or free some space")

    raw_model = model
    if world_size > 1:
        model.batch_weight_normalization = False  # per-layer WN, so DDP overlaps its all-reduce (models.py)
        if args.compile and args.compile_mode in ("reduce-overhead", "max-autotune") and rank == 0:
            logger.warning(f"--compile-mode {args.compile_mode} (CUDA graphs) under DDP is untested here; "
                           f"if it fails or is slow, use --compile alone")
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    train_model = compile_model(model, args.compile_mode) if args.compile else model
    diffusion = create_diffusion("")
    loader = make_loader(dataset, args, rank, world_size, step, device)
    probe = make_probe(dataset, diffusion, device, num_classes) if rank == 0 else None

    stop = {"signal": None}

    def request_stop(signum, frame):
        stop["signal"] = signum

    old_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}

    def save_checkpoint():
        if rank != 0:
            return
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        state = {"model": raw_model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                 "lr_scheduler": sched.state_dict(), "step": step, "rng": rng, "args": vars(args)}
        path = os.path.join(run_dir, "checkpoints", f"{step:07d}.pt")
        atomic_torch_save(state, path)
        plot_loss_safely(run_dir, logger)
        logger.info(f"saved checkpoint {path}")
        if args.keep_checkpoints:
            for _, old in list_checkpoints(run_dir)[:-args.keep_checkpoints]:
                os.remove(old)

    def last_checkpoint() -> str:
        last = list_checkpoints(run_dir)
        return f"the last good checkpoint is {last[-1][1]}" if last else "no checkpoint was written"

    checked = {"step": None}

    def check_finite(loss_sum: torch.Tensor):
        # The weights too: an update can overflow while the loss it came from was finite. Once per step
        # (logging, snapshots and checkpoints may fall on the same step).
        if checked["step"] == step:
            return
        checked["step"] = step
        weights_ok = torch.stack([torch.isfinite(p).all() for p in raw_model.parameters()]).all()
        if not (torch.isfinite(loss_sum).all() and weights_ok):
            raise TrainingError(f"non-finite loss or weights by step {step}; stopped without saving "
                                f"({last_checkpoint()}); "
                                f"lower --lr or try --grad-clip / --precision fp32")

    raw_model.train()
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    timer_start, timer_step = time.perf_counter(), step
    batches = iter(loader)
    try:
        while step < args.num_steps:
            x, y = next(batches)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            torch.manual_seed(mix_seed(args.seed, rank, step, 3))  # t, noise and label dropout of this step
            t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=device)
            step += 1
            loss_sum += training_step(train_model, raw_model, diffusion, opt, sched, ema, x, y, t, step=step,
                                      autocast=autocast, compiled=args.compile, grad_clip=args.grad_clip)
            loss_count += 1

            if step % args.log_every == 0 or step == args.num_steps:
                if world_size > 1:
                    dist.all_reduce(loss_sum)
                check_finite(loss_sum)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                elapsed = time.perf_counter() - timer_start
                steps_per_s = (step - timer_step) / elapsed
                record = {"step": step, "loss": loss_sum.item() / (loss_count * world_size),
                          # the lr this step used (the scheduler already holds the next step's)
                          "lr": args.lr * lr_factor(step - 1, args.num_lin_warmup, args.start_decay),
                          "steps_per_s": steps_per_s,
                          "img_per_s": steps_per_s * args.batch_size, "peak_mem_gib": peak_memory_gib(device)}
                if rank == 0:
                    logger.info(f"step {step:7d}/{args.num_steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                                f"{steps_per_s:.2f} steps/s  {record['img_per_s']:.0f} img/s  "
                                f"peak {record['peak_mem_gib']:.2f} GiB")
                    append_jsonl(os.path.join(run_dir, "metrics.jsonl"), record)
                loss_sum.zero_()
                loss_count = 0
                timer_start, timer_step = time.perf_counter(), step
            if rank == 0 and (step % args.magnitude_every == 0 or step == args.num_steps):
                append_jsonl(os.path.join(run_dir, "magnitudes.jsonl"),
                             {"step": step, **measure_magnitudes(raw_model, probe)})
            if step % args.ema_snapshot_every == 0 or step == args.num_steps:
                check_finite(loss_sum)
                if rank == 0:
                    ema.save_snapshots(os.path.join(run_dir, "ema"), step)
            stopping = stop_requested(stop, world_size, step, device)
            if step % args.ckpt_every == 0 or step == args.num_steps or stopping:
                check_finite(loss_sum)
                save_checkpoint()
            if stopping:
                logger.info(f"stopped by signal {stop['signal']} at step {step}; resume with --resume {run_dir}")
                break
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # Every file of the run folder is written atomically or appended to: what is there is whole.
        in_run = bool(e.filename) and os.path.abspath(e.filename).startswith(os.path.abspath(run_dir) + os.sep)
        where = f" writing {os.path.relpath(e.filename, run_dir) if in_run else e.filename}" if e.filename else ""
        advice = " (or set --keep-checkpoints / a larger --ema-snapshot-every)" if in_run else ""
        raise TrainingError(f"disk full at step {step}{where} ({e.strerror}); the run folder is intact and "
                            f"{last_checkpoint()}; free some space{advice}, then --resume {run_dir}") from e
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
    if rank == 0:
        plot_magnitudes_safely(run_dir, logger)
        logger.info(f"done: {run_dir}")
    if world_size > 1:
        dist.barrier()
    return run_dir


def stop_requested(stop: dict, world_size: int, step: int, device: torch.device) -> bool:
    """Whether a SIGTERM / Ctrl-C arrived; under DDP all ranks agree every 10 steps."""
    if world_size == 1:
        return stop["signal"] is not None
    if step % 10:
        return False
    flag = torch.tensor([stop["signal"] is not None], dtype=torch.float32, device=device)
    dist.all_reduce(flag)
    if flag.item() > 0 and stop["signal"] is None:
        stop["signal"] = "from another rank"
    return flag.item() > 0


def append_jsonl(path: str, record: dict) -> None:
    """One JSON record per line. After a line cut short (a crash or a full disk mid-append) it starts a new
    line, so that only the cut line is lost (runs.read_jsonl skips it)."""
    with open(path, "ab+") as f:
        if f.seek(0, os.SEEK_END):
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write((json.dumps(record) + "\n").encode())


def plot_loss_safely(run_dir: str, logger) -> None:
    try:
        import plots
        plots.plot_loss(run_dir)
    except Exception as e:  # noqa: BLE001 - a picture must never stop training
        logger.info(f"(loss plot skipped: {e})")


def plot_magnitudes_safely(run_dir: str, logger) -> None:
    try:
        import plots
        plots.plot_magnitudes([run_dir], os.path.join(run_dir, "magnitudes.png"))
    except Exception as e:  # noqa: BLE001
        logger.info(f"(magnitude plot skipped: {e})")


def main(argv=None) -> int:
    try:
        train(argv)
    except (TrainingError, data.DatasetError, ValueError, OSError) as e:  # OSError: unusable folders, full disks
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
