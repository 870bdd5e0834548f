"""bench.py's core: one configuration (model, switch set, precision, compile) alive, with train.py's step,
and its measurement (warm-up, timed training and forward steps, peak memory, graphs compiled while timed).

benchmarks/suites.py decides what runs and in which order, benchmarks/report.py writes the tables, and
bench.py is the command line; this module imports none of them.
"""
from __future__ import annotations

import dataclasses
import gc
import math
import platform
import statistics
import time
import traceback

import torch
import torch._dynamo

from diffusion import create_diffusion
from phema import PowerEMA
from fast_paths import apply_fast_paths, frozen_weights
from models import MODEL_NAMES, build_model
from mp_layers import MPConfig
from training import compile_model, configure_precision, make_optimizer, training_step

NUM_CLASSES = 1000
EMA_STDS = (0.05, 0.10)


# ----------------------------------------------------------------------------------------------------
# What to run.


@dataclasses.dataclass
class Spec:
    model: str
    size: int
    channels: int
    switches: str  # label: none, all, or switch names joined by '+'
    mp: MPConfig
    precision: str
    compile: bool

    @property
    def group(self):
        """Configurations timed together (interleaved rounds) and budgeted together: eager and compiled rows
        of one model and precision, so that their ratios come from the same minutes of a shared machine."""
        return (self.model, self.size, self.channels, self.precision)

    def describe(self) -> str:
        return (f"{self.model} {self.channels}×{self.size}×{self.size} [{self.switches}] {self.precision}"
                f"{' compile' if self.compile else ''}")


def parse_model(text: str) -> tuple[str, int, int]:
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[0] not in MODEL_NAMES:
        raise SystemExit(f"error: --models entry {text!r} is not NAME:SIZE[:CHANNELS] with NAME one of "
                         f"{', '.join(MODEL_NAMES)}")
    try:
        size = int(parts[1])
        channels = int(parts[2]) if len(parts) == 3 else 4
    except ValueError:
        raise SystemExit(f"error: --models entry {text!r}: SIZE and CHANNELS must be integers") from None
    patch = int(parts[0].split("/")[1])
    if size % patch:
        raise SystemExit(f"error: --models entry {text!r}: size {size} is not a multiple of the patch {patch}")
    return parts[0], size, channels


def parse_switches(items: list[str]) -> list[tuple[str, MPConfig]]:
    names = MPConfig.switch_names()
    out = []
    for item in items:
        if item == "none":
            out.append(("none", MPConfig()))
        elif item == "all":
            out.append(("all", MPConfig.all_on()))
        elif item == "each":
            out += [(n.removeprefix("use_"), MPConfig(**{n: True})) for n in names]
        else:
            chosen = []
            for part in item.split("+"):
                n = part.strip().lstrip("-").replace("-", "_")
                n = n if n.startswith("use_") else "use_" + n
                if n not in names:
                    raise SystemExit(f"error: unknown switch {part!r}; valid: none, all, each, "
                                     f"{', '.join(x.removeprefix('use_') for x in names)}")
                chosen.append(n)
            out.append(("+".join(c.removeprefix("use_") for c in chosen), MPConfig(**{n: True for n in chosen})))
    seen, unique = set(), []
    for label, mp in out:
        if label not in seen:
            seen.add(label)
            unique.append((label, mp))
    return unique


# ----------------------------------------------------------------------------------------------------
# One configuration, alive: model, optimiser, EMAs, and the train.py step.


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Bench:
    def __init__(self, spec: Spec, args, device: torch.device):
        self.spec, self.device, self.batch = spec, device, args.batch_size
        self.autocast = configure_precision(spec.precision, device)
        torch.manual_seed(args.seed)
        self.model = apply_fast_paths(build_model(spec.model, in_channels=spec.channels, input_size=spec.size,
                                                  num_classes=NUM_CLASSES, mp=spec.mp).to(device))
        self.model.train()
        self.ema = PowerEMA(self.model, stds=EMA_STDS)
        # The step of a run past its warm-up: the full rate from the first step. Under a warm-up's near-zero
        # rate the zero-initialised gains stay ~0, every weight-normalised gradient and its Adam moment stay
        # exactly 0, and on a CPU Adam's sqrt of exact zeros takes a slow path (~7x per element; +10 ms of
        # an XS/2 step): a state a real run leaves within its first steps.
        self.opt, self.sched = make_optimizer(self.model, args.lr, 0, 100_000, device)
        self.train_model = compile_model(self.model, args.compile_mode) if spec.compile else self.model
        self.diffusion = create_diffusion("")
        self.step = 0
        self.loss_sum = torch.zeros((), device=device)
        g = torch.Generator(device=device).manual_seed(args.seed + 1)
        shape = (self.batch, spec.channels, spec.size, spec.size)
        self.fwd_x = torch.randn(shape, device=device, generator=g)
        self.fwd_t = torch.randint(0, 1000, (self.batch,), device=device, generator=g)
        self.fwd_y = torch.randint(0, NUM_CLASSES, (self.batch,), device=device, generator=g)

    def train_steps(self, n: int) -> float:
        """n training steps exactly as train.py's loop; returns the synchronised wall time."""
        configure_precision(self.spec.precision, self.device)
        model, raw, device = self.train_model, self.model, self.device
        raw.train()
        shape = (self.batch, self.spec.channels, self.spec.size, self.spec.size)
        sync(device)
        start = time.perf_counter()
        for _ in range(n):
            x = torch.randn(shape, device=device)  # random latents and labels (no data loader)
            y = torch.randint(0, NUM_CLASSES, (self.batch,), device=device)
            t = torch.randint(0, self.diffusion.num_timesteps, (self.batch,), device=device)
            self.step += 1
            self.loss_sum += training_step(model, raw, self.diffusion, self.opt, self.sched, self.ema, x, y, t,
                                           step=self.step, autocast=self.autocast, compiled=self.spec.compile)
        sync(device)
        return time.perf_counter() - start

    @torch.no_grad()
    def forward_steps(self, n: int) -> float:
        """n forward passes in eval mode under no_grad (one sampling step each, CFG off)."""
        configure_precision(self.spec.precision, self.device)
        self.model.eval()
        sync(self.device)
        start = time.perf_counter()
        with frozen_weights(self.model):  # as sample.py: the weights normalised once for all steps
            for _ in range(n):
                if self.spec.compile:
                    torch.compiler.cudagraph_mark_step_begin()
                with self.autocast():
                    self.train_model(self.fwd_x, self.fwd_t, self.fwd_y)
        sync(self.device)
        elapsed = time.perf_counter() - start
        self.model.train()
        return elapsed

    def close(self):
        for name in ("train_model", "model", "ema", "opt", "sched", "fwd_x"):
            setattr(self, name, None)


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def resident_bytes(device) -> int:
    gc.collect()
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def gib(n):
    return None if n is None else n / 2**30


def free_memory(device, reset_dynamo: bool):
    gc.collect()
    if reset_dynamo:
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def graph_breaks() -> int:
    try:
        from torch._dynamo.utils import counters
        return int(sum(counters["graph_break"].values()))
    except Exception:  # noqa: BLE001
        return 0


def compilations() -> int:
    """Graphs torch.compile has compiled in this process so far (each recompilation counts)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def n_timed(steps: int, min_time: float, last_step_s: float) -> int:
    if min_time <= 0 or last_step_s <= 0:
        return steps
    return int(min(max(steps, math.ceil(min_time / last_step_s)), 20 * steps))


# ----------------------------------------------------------------------------------------------------
# Measuring one configuration.


def base_row(spec: Spec, args, device) -> dict:
    return {"model": spec.model, "latent": f"{spec.channels}x{spec.size}x{spec.size}", "size": spec.size,
            "channels": spec.channels, "switches": spec.switches, "mp": spec.mp.enabled(),
            "precision": spec.precision, "compile": spec.compile,
            "compile_mode": args.compile_mode if spec.compile else None, "batch_size": args.batch_size,
            "device": str(device)}


def warm_up(b: Bench, args, row: dict) -> None:
    """Warm-up steps; the first training and forward calls are timed alone (they include compilation)."""
    t0 = time.perf_counter()
    row["first_train_step_s"] = b.train_steps(1)
    last = b.train_steps(1) if args.warmup > 1 else row["first_train_step_s"]
    if args.warmup > 2:
        b.train_steps(args.warmup - 2)
    row["train_steps_timed"] = n_timed(args.steps, args.min_time, last)
    row["first_fwd_s"] = b.forward_steps(1)
    last = b.forward_steps(1) if args.warmup > 1 else row["first_fwd_s"]
    if args.warmup > 2:
        b.forward_steps(args.warmup - 2)
    row["fwd_steps_timed"] = n_timed(args.steps, args.min_time, last)
    row["warmup_s"] = time.perf_counter() - t0


def finish_row(row: dict, b: Bench, train_times: list[float], fwd_times: list[float]) -> None:
    n_train, n_fwd, batch = row["train_steps_timed"], row["fwd_steps_timed"], row["batch_size"]
    step = statistics.median(train_times) / n_train
    fwd = statistics.median(fwd_times) / n_fwd
    row.update(train_step_ms=1e3 * step, train_img_s=batch / step, fwd_ms=1e3 * fwd, fwd_img_s=batch / fwd,
               train_step_ms_rounds=[1e3 * t / n_train for t in train_times],
               fwd_ms_rounds=[1e3 * t / n_fwd for t in fwd_times])
    loss = float(b.loss_sum) / max(b.step, 1)
    row["mean_loss"] = loss
    if not math.isfinite(loss):
        row.setdefault("notes", []).append("non-finite loss")


def error_text(e: BaseException) -> str:
    kind = "OOM" if isinstance(e, torch.OutOfMemoryError) else type(e).__name__
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{kind}: {first[:300]}"


def measure(spec: Spec, args, device) -> dict:
    """Build, warm up, time training then forward, free: exact peak memory of this configuration."""
    row = base_row(spec, args, device)
    start = time.perf_counter()
    breaks_before = graph_breaks()
    b = None
    try:
        free_memory(device, reset_dynamo=spec.compile)
        peak_reset(device)
        b = Bench(spec, args, device)
        warm_up(b, args, row)
        compiled_before = compilations()
        peak_reset(device)
        train_t = b.train_steps(row["train_steps_timed"])
        row["train_peak_gib"] = gib(peak_bytes(device))
        b.opt.zero_grad(set_to_none=True)
        peak_reset(device)
        fwd_t = b.forward_steps(row["fwd_steps_timed"])
        row["fwd_peak_gib"] = gib(peak_bytes(device))
        finish_row(row, b, [train_t], [fwd_t])
        row["compiled_while_timed"] = compilations() - compiled_before
    except Exception as e:  # noqa: BLE001 - one failed row must not stop the benchmark
        row["error"] = error_text(e)
        row["traceback"] = traceback.format_exc(limit=6)
    finally:
        if b is not None:
            b.close()
        del b
        if spec.compile:
            row["graph_breaks"] = graph_breaks() - breaks_before
        free_memory(device, reset_dynamo=spec.compile)
    row["row_s"] = time.perf_counter() - start
    return row


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
