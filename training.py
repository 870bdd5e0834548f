"""The training library: the step, the optimiser and its schedule, precision and compile, the step-indexed
batch sampler, DDP setup, the EMA calls, and the magnitude measurement. `train.py` is its command line;
`runs.py` owns the run folder; `bench.py` times this same step.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Sampler

import runs
from atomic import CatchSignals
from config import TrainConfig
from phema import PowerEMA
from fast_paths import apply_fast_paths
from models import DiT, build_model
from mp_layers import MPEmbedding, MPLinear




class TrainingError(Exception):
    """Bad input or a failed run: reported as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------------
# Optimiser, schedule, precision, compile.


def lr_factor(step: int, warmup: int, decay_start: int) -> float:
    """Multiplier of the base lr at optimiser step `step` (0-based): linear warm-up, then 1/sqrt decay."""
    if step + 1 < warmup:
        return (step + 1) / warmup
    if decay_start > 0 and step >= decay_start:
        return 1 / math.sqrt(step / decay_start)
    return 1.0


def mp_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that train at the MP rate: the weights of (forced) weight-normalised layers and
    tables, and their gains. Their entries have unit variance and only their direction matters, so the
    same rate moves them 10-100x less than plain weights."""
    ids = set()
    for m in model.modules():
        if isinstance(m, (MPLinear, MPEmbedding)) and (m.weight_norm or m.forced_weight_norm):
            ids.update(id(p) for p in m.parameters(recurse=False))
    return [p for p in model.parameters() if id(p) in ids]


def make_optimizer(model: torch.nn.Module, lr: float, warmup: int, decay_start: int, device: torch.device,
                   mp_lr: float | None = None):
    """Adam (β = 0.9, 0.99, no weight decay; fused on CUDA) and its lr schedule (`lr_factor`, on every group).

    Two groups, "mp" (`mp_parameters`, at `mp_lr`) and "plain" (the rest, at `lr`), when the rates differ
    and both kinds exist; otherwise one group "all" (so checkpoints of single-rate runs keep loading)."""
    mp_ids = {id(p) for p in mp_parameters(model)}
    kinds = [("mp", [p for p in model.parameters() if id(p) in mp_ids], lr if mp_lr is None else mp_lr),
             ("plain", [p for p in model.parameters() if id(p) not in mp_ids], lr)]
    groups = [{"name": name, "params": params, "lr": rate} for name, params, rate in kinds if params]
    if len(groups) == 2 and groups[0]["lr"] == groups[1]["lr"]:
        groups = [{"name": "all", "params": list(model.parameters()), "lr": lr}]
    opt = torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-8, weight_decay=0, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, decay_start))
    return opt, sched


def describe_learning_rates(opt: torch.optim.Optimizer) -> str:
    """e.g. "lr 0.01 for the 7,608,832 MP parameters, 0.0001 for the 256 plain ones" (base rates)."""
    parts = [f"{g['initial_lr']:g} for the {sum(p.numel() for p in g['params']):,} "
             + {"mp": "MP parameters", "plain": "plain ones", "all": "parameters"}[g["name"]]
             for g in opt.param_groups]
    return "lr " + ", ".join(parts)


def learning_rates(opt: torch.optim.Optimizer, model: torch.nn.Module, factor: float = 1.0) -> dict[str, float]:
    """The base rate (times `factor`, the schedule's) of each kind of parameter the model has: "lr" for the
    plain ones, "mp_lr" for the MP ones (`mp_parameters`), a key only where that kind has parameters. So a
    run whose parameters are all MP ones (--use-all-mp) reports its MP rate, never the unused plain one."""
    mp_ids = {id(p) for p in mp_parameters(model)}
    rates = {}
    for g in opt.param_groups:
        kinds = {"mp": ["mp_lr"], "plain": ["lr"]}.get(g["name"]) or (
            (["lr"] if any(id(p) not in mp_ids for p in g["params"]) else [])
            + (["mp_lr"] if any(id(p) in mp_ids for p in g["params"]) else []))
        for key in kinds:
            rates[key] = g["initial_lr"] * factor
    return {k: rates[k] for k in ("lr", "mp_lr") if k in rates}


def configure_precision(precision: str, device: torch.device):
    """Sets TF32 for fp32 / tf32 / bf16 and returns the context manager a forward runs under."""
    tf32 = precision in ("tf32", "bf16")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def compile_model(model: torch.nn.Module, mode: str | None = "default") -> torch.nn.Module:
    """torch.compile for training. With a CUDA-graph mode (reduce-overhead, max-autotune) call
    torch.compiler.cudagraph_mark_step_begin() at the start of every step: the graphs' outputs are
    reused buffers, and the mark tells PyTorch that the previous step's are no longer needed."""
    return torch.compile(model, mode=None if mode in (None, "default") else mode)


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or on a CPU the process's peak resident size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ----------------------------------------------------------------------------------------------------
# The state of a run and one step.


@dataclass
class TrainState:
    """Everything a checkpoint holds: the raw model (not wrapped by DDP or compile), its EMAs, Adam, the
    schedule, and the number of optimiser steps taken."""
    model: DiT
    ema: PowerEMA
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    step: int = 0

    def state_dict(self, device: torch.device) -> dict:
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
                "lr_scheduler": self.sched.state_dict(), "step": self.step, "rng": rng}

    def load_state_dict(self, ckpt: dict, device: torch.device) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.opt.load_state_dict(ckpt["opt"])
        self.sched.load_state_dict(ckpt["lr_scheduler"])
        self.step = int(ckpt["step"])
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)

    def weights_finite(self) -> bool:
        return bool(torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all())


def build_state(cfg: TrainConfig, dataset, device: torch.device) -> TrainState:
    """The model (initial weights from --seed only, the same on every rank), its EMAs and Adam."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, in_channels=dataset.channels, input_size=dataset.resolution,
                        num_classes=dataset.num_classes, mp=cfg.mp).to(device)
    ema = PowerEMA(model, stds=cfg.ema_stds)
    opt, sched = make_optimizer(model, cfg.lr, cfg.num_lin_warmup, cfg.start_decay, device, mp_lr=cfg.mp_lr)
    return TrainState(model, ema, opt, sched)


def training_step(train_model, raw_model, diffusion, opt, sched, ema, x, y, t, *, step: int, autocast,
                  compiled: bool, grad_clip: float = 0.0, micro_batch: int | None = None) -> torch.Tensor:
    """One optimiser step: hybrid loss, backward, (clip,) Adam, lr schedule, forced-WN projection, EMA update.
    `step` is the step count after this update (the EMA's t); returns the detached mean loss.

    With `micro_batch` (EDM2's --batch-gpu) the batch goes through forward and backward in slices of that
    many items, whose gradients add up to the whole batch's: each slice's mean loss counts by its share
    of the batch, and the noise and label dropout are drawn for the whole batch first, as one pass draws
    them, so every item sees what it would in one pass. Under DDP only the last slice all-reduces."""
    if compiled:
        torch.compiler.cudagraph_mark_step_begin()
    noise = torch.randn_like(x)  # the draws of one pass, in its order: the noise, then the label dropout
    drop = torch.rand(y.shape, device=y.device) < raw_model.class_dropout if raw_model.class_dropout > 0 else None
    opt.zero_grad(set_to_none=True)
    size = micro_batch or len(x)
    total = torch.zeros((), device=x.device)
    for start in range(0, len(x), size):
        part = slice(start, start + size)
        kwargs = {"y": y[part]} if drop is None else {"y": y[part], "drop": drop[part]}
        with contextlib.nullcontext() if start + size >= len(x) else no_sync(train_model):
            with autocast():
                losses = diffusion.training_losses(train_model, x[part], t[part], model_kwargs=kwargs,
                                                   noise=noise[part])["loss"]
                loss = losses.mean() * (len(losses) / len(x))  # (x 1.0, exactly, without micro-batches)
            loss.backward()
        total += loss.detach()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
    opt.step()
    sched.step()
    raw_model.project_forced_weights_()  # forced weight normalisation, after every optimiser step
    ema.update(raw_model, step)
    return total


def no_sync(model: torch.nn.Module):
    """DDP's no_sync (backward without the all-reduce) of `model`, or of the DDP module a compiled `model`
    wraps; a null context for a model on one process."""
    inner = getattr(model, "_orig_mod", model)
    return inner.no_sync() if isinstance(inner, DDP) else contextlib.nullcontext()


class LossMeter:
    """The loss summed on this rank since the last log record and the rate since then; and the check that
    the loss and the weights are finite before anything is saved."""

    def __init__(self, state: TrainState, world_size: int, device: torch.device):
        self.state, self.world_size, self.device = state, world_size, device
        self.sum, self.count = torch.zeros((), device=device), 0
        self.timer, self.timer_step = time.perf_counter(), state.step
        self.checked_step = None
        self.rates = learning_rates(state.opt, state.model)  # the base rates of the kinds that have parameters

    def add(self, loss: torch.Tensor) -> None:
        self.sum += loss
        self.count += 1

    def check_finite(self, last_checkpoint) -> None:
        """Raises unless the loss and the weights are finite. The weights too: an update can overflow while
        the loss it came from was finite. Once per step (logging, snapshots and checkpoints may fall on the
        same step); `last_checkpoint()` says what the error leaves."""
        if self.checked_step == self.state.step:
            return
        self.checked_step = self.state.step
        if not (bool(torch.isfinite(self.sum).all()) and self.state.weights_finite()):
            raise TrainingError(f"non-finite loss or weights by step {self.state.step}; stopped without saving "
                                f"({last_checkpoint()}); lower --lr or try --grad-clip / --precision fp32")

    def record(self, cfg: TrainConfig, last_checkpoint) -> dict:
        """The metrics record of this step (the mean loss over all ranks since the last one); starts the next."""
        if self.world_size > 1:
            dist.all_reduce(self.sum)
        self.check_finite(last_checkpoint)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        step = self.state.step
        steps_per_s = (step - self.timer_step) / (time.perf_counter() - self.timer)
        record = {"step": step, "loss": self.sum.item() / (self.count * self.world_size),
                  # the rates this step used (the scheduler already holds the next step's): "lr" of the plain
                  # parameters and "mp_lr" of the MP ones, each only where the model has such parameters
                  **{k: v * lr_factor(step - 1, cfg.num_lin_warmup, cfg.start_decay) for k, v in self.rates.items()},
                  "steps_per_s": steps_per_s, "img_per_s": steps_per_s * cfg.batch_size,
                  "peak_mem_gib": peak_memory_gib(self.device)}
        self.sum.zero_()
        self.count = 0
        self.timer, self.timer_step = time.perf_counter(), step
        return record


def resume_from(state: TrainState, ckpt: dict, path: str, model_name: str, device: torch.device) -> None:
    """Continue from checkpoint `ckpt` (read from `path`): weights, EMAs, Adam, schedule, step and RNG."""
    if ckpt["args"].get("model") != model_name:
        raise TrainingError(f"checkpoint {path} holds a {ckpt['args'].get('model')}, not {model_name}")
    runs.load_weights(state.model, ckpt["model"], f"checkpoint {path}")  # a mismatch: one line of what differs
    check_checkpoint_state(state, ckpt, path)
    state.load_state_dict(ckpt, device)


def check_checkpoint_state(state: TrainState, ckpt: dict, path: str) -> None:
    """TrainingError (one line naming the file) where the checkpoint's EMAs, Adam moments or RNG state do not
    fit this run: loading them would fail with a traceback, or broadcast a tensor of another shape silently."""
    def bad(what):
        return TrainingError(f"checkpoint {path} {what}; it is damaged or from another run: delete it, or "
                             f"restore it from a copy")

    shapes = {n: p.shape for n, p in state.model.named_parameters()}
    emas = ckpt["ema"]
    for std, ema in emas.items():
        if not isinstance(ema, dict):
            raise bad(f"holds an EMA (σ_rel {std}) that is not a state dict")
        for name, t in ema.items():
            if name in shapes and (not isinstance(t, torch.Tensor) or t.shape != shapes[name]):
                raise bad(f"holds an EMA (σ_rel {std}) of {name} of shape {_shape(t)}, where the model's is "
                          f"{tuple(shapes[name])}")
    live = [p for g in state.opt.param_groups for p in g["params"]]
    saved_groups = ckpt["opt"].get("param_groups")
    saved_state = ckpt["opt"].get("state")
    if not (isinstance(saved_groups, list) and isinstance(saved_state, dict)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in saved_groups)):
        raise bad("holds no Adam state (opt.param_groups, opt.state)")
    saved = [i for g in saved_groups for i in g["params"]]
    if len(saved) != len(live):
        raise bad(f"holds Adam state of {len(saved)} parameters, where the model has {len(live)}")
    for i, p in zip(saved, live):
        for key, t in (saved_state.get(i) or {}).items():
            if key in ("exp_avg", "exp_avg_sq") and (not isinstance(t, torch.Tensor) or t.shape != p.shape):
                raise bad(f"holds Adam's {key} of shape {_shape(t)} for a parameter of shape {tuple(p.shape)}")
    rng = ckpt["rng"].get("cpu")
    if not (isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8 and rng.shape == torch.get_rng_state().shape):
        raise bad("holds no usable random-number state (rng.cpu)")


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


# ----------------------------------------------------------------------------------------------------
# Processes.


def setup_distributed(device_arg: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; joins the process group when there are many."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg:
        device = parse_device(device_arg)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def parse_device(text: str | None, error: type[Exception] = TrainingError) -> torch.device:
    """--device as a torch.device: None or "auto" picks CUDA when there is one; otherwise cpu, cuda or cuda:N
    of a GPU that is there. Anything else raises `error` with one line naming the fix."""
    if text is None or text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise error(f"--device {text}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise error(f"--device {text}: this machine has no usable CUDA GPU; use --device cpu")
        if device.index is not None and device.index >= count:
            raise error(f"--device {text}: this machine has {count} GPU(s), cuda:0 .. cuda:{count - 1}")
    elif device.type != "cpu":
        raise error(f"--device {text}: not supported here; use cpu, cuda or cuda:N")
    return device


def wrap_model(model: DiT, cfg: TrainConfig, world_size: int, device: torch.device, warn=print) -> torch.nn.Module:
    """The module the step calls: the fast paths (in place), gradient checkpointing, DDP over the ranks, then
    torch.compile, as asked."""
    # Under DDP, and when blocks are recomputed, each layer normalises its own weight (fast_paths.py): a
    # recomputed block must take the path of its forward, and the weights batched for a forward are gone then.
    apply_fast_paths(model, ddp=world_size > 1 or cfg.grad_checkpointing)
    if cfg.grad_checkpointing:
        checkpoint_blocks(model)
    if world_size > 1:
        if cfg.compile and cfg.compile_mode in ("reduce-overhead", "max-autotune"):
            warn(f"--compile-mode {cfg.compile_mode} (CUDA graphs) under DDP is untested here; "
                 f"if it fails or is slow, use --compile alone")
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return compile_model(model, cfg.compile_mode) if cfg.compile else model


def checkpoint_blocks(model: DiT) -> None:
    """Gradient checkpointing per block: a block keeps only its inputs for the backward, which recomputes
    its activations (less memory for about one more forward of compute). The state dict is unchanged."""
    for block in model.blocks:
        block.forward = _checkpointed(block.forward)


def _checkpointed(forward):
    def run(*args):
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False)
    return run


class StopSignal(CatchSignals):
    """Within the block, SIGTERM and Ctrl-C ask training to stop at the end of a step (it then saves a
    checkpoint) instead of killing it."""

    def __init__(self, world_size: int, device: torch.device):
        self.world_size, self.device, self.signal = world_size, device, None

    def caught(self, signum: int) -> None:
        self.signal = signum

    def requested(self, step: int) -> bool:
        """Whether a signal arrived; under DDP all ranks agree every 10 steps."""
        if self.world_size == 1:
            return self.signal is not None
        if step % 10:
            return False
        flag = torch.tensor([self.signal is not None], dtype=torch.float32, device=self.device)
        dist.all_reduce(flag)
        if flag.item() > 0 and self.signal is None:
            self.signal = "from another rank"
        return flag.item() > 0


# ----------------------------------------------------------------------------------------------------
# The step-indexed batch sampler.


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
    """Wraps a dataset so that item (index, seed) is drawn with the global RNG seeded by `seed` (its posterior
    sample, its flip): what a loader worker reads of it, `loader_item`, which `dataset.model_batch` turns
    into the model's batch (the item itself, or the image an on-the-fly VAE set encodes in that call)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        torch.manual_seed(seed)
        return self.dataset.loader_item(index)


def make_loader(dataset, cfg: TrainConfig, rank: int, world_size: int, start_step: int,
                device: torch.device) -> DataLoader:
    sampler = StepBatchSampler(len(dataset), cfg.batch_size, rank, world_size, cfg.seed, start_step)
    workers = cfg.num_workers
    return DataLoader(SeededItems(dataset), batch_sampler=sampler, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      prefetch_factor=4 if workers > 0 else None)


def step_timesteps(seed: int, rank: int, step: int, batch: int, num_timesteps: int, device) -> torch.Tensor:
    """The timesteps of step `step` (0-based), and the global RNG seeded for its noise and label dropout:
    both depend on (seed, rank, step) only, so a resumed run draws what the uninterrupted one drew."""
    torch.manual_seed(mix_seed(seed, rank, step, 3))
    return torch.randint(0, num_timesteps, (batch,), device=device)


# ----------------------------------------------------------------------------------------------------
# Magnitudes (the paper's central picture).


@torch.no_grad()
def measure_magnitudes(model, probe: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> dict:
    """RMS of the activations leaving each block on a fixed probe batch, and RMS of each block's weights
    (one device-to-host copy for all of them: one synchronisation per record, not one per block)."""
    x, t, y = probe
    outputs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outputs.append(o.float().square().mean().sqrt()))
             for b in model.blocks]
    was_training = model.training
    model.eval()
    try:
        model(x, t, y)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    sums, counts = [], []
    for block in model.blocks:
        params = [p for n, p in block.named_parameters() if n.endswith("weight")]
        sums.append(sum(p.float().square().sum() for p in params))
        counts.append(sum(p.numel() for p in params))
    act, weight_sums = torch.stack(outputs).tolist(), torch.stack(sums).tolist()
    return {"act_rms": act, "weight_rms": [math.sqrt(s / n) for s, n in zip(weight_sums, counts)]}


class MagnitudeRecorder:
    """When to record the magnitudes (`measure_magnitudes` on the probe batch), and the records.

    With a fixed `every`: every `every` steps and at the last step. By default (`every` None) the spacing
    comes from what a record costs on this machine, so that the records take about `budget` (1 %) of the
    training time at any model, batch and device: the first record, 10 steps after the start, is timed
    against the mean step before it (the first two steps, which carry warm-up and compilation, left
    out), and from then on every = max(steps // 100, ceil(record time / (budget · step time))): at most
    ~100 records a run, fewer where a record costs more than 1 % of a step. The last step is always
    recorded (the run's final magnitudes); with it and the timed record, a record costing r steps adds
    at most budget + 2r / steps of the training time.
    """
    TIMED_AT, CLOCK_FROM = 10, 2  # steps after the start

    def __init__(self, every: int | None, start_step: int, num_steps: int, device: torch.device,
                 log=print, budget: float = 0.01):
        self.every, self.start, self.num_steps, self.device = every, start_step, num_steps, device
        self.log, self.budget, self.clock = log, budget, None

    def due(self, step: int) -> bool:
        """Whether step `step` (just taken) records; called after every step (it also starts the clock)."""
        if step == self.num_steps:
            return True
        if self.every is not None:
            return step % self.every == 0
        if step == self.start + self.CLOCK_FROM:
            self.clock = self._now()
        return step == self.start + self.TIMED_AT

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def record(self, model, probe, step: int) -> dict:
        """The magnitudes of step `step`; the timed record also fixes the default spacing, and logs it."""
        if self.every is not None or self.clock is None:
            return {"step": step, **measure_magnitudes(model, probe)}
        began = self._now()
        record = {"step": step, **measure_magnitudes(model, probe)}
        record_s = self._now() - began
        step_s = (began - self.clock) / (step - self.start - self.CLOCK_FROM)
        self.every = magnitude_spacing(record_s, step_s, self.num_steps, self.budget)
        self.log(f"magnitudes: a record takes {record_s * 1e3:.1f} ms, {record_s / step_s:.2f} training steps; "
                 f"recording every {self.every} steps ({100 * record_s / step_s / self.every:.2f} % of the "
                 f"training time) and at the last; --magnitude-every N sets the spacing")
        return record


def magnitude_spacing(record_s: float, step_s: float, num_steps: int, budget: float = 0.01) -> int:
    """The default spacing of magnitude records: at most ~100 a run, and records that take at most `budget`
    of the time of the steps between them."""
    return max(1, num_steps // 100, math.ceil(record_s / (budget * step_s)))


def make_probe(dataset, diffusion, device, num_classes: int, size: int = 16):
    """A fixed batch of noised training items at timesteps spread over [0, 999]."""
    g = torch.Generator().manual_seed(1234)
    idx = torch.randperm(len(dataset), generator=g)[:size]
    torch.manual_seed(4321)
    items = [dataset[int(i)] for i in idx]  # one read per item (latent sets draw a fresh sample per read)
    x0 = torch.stack([item[0] for item in items])
    t = torch.linspace(0, 999, len(idx)).long()
    x = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    y = torch.stack([torch.as_tensor(item[1]) for item in items]).long().clamp(max=num_classes - 1)
    return x.to(device), t.to(device), y.to(device)
