"""train.py's options as one object: `TrainConfig`, a frozen dataclass with a field per option.

A field carries its --help text and whether a resumed run may change it (`resumable`: options about how
the run goes on, such as its length, logging or workers; the others define what it trains). The fields
make the flags (`add_arguments`), the "args" that config.json and every checkpoint record (`to_dict`: one
key per flag, the MP switches flat as their flags) and the run read back (`from_dict`, which takes the
"args" of any train.py version). The checks between options are in `__post_init__`, so no TrainConfig
holds a contradiction; what depends on the machine (processes, memory, installed packages) train.py checks.
The magnitude-preservation switches are `MPConfig`'s, nested as `mp`; their flags are MPConfig's own.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math

import data.hf
from cli import ref_images_argument
from diffusion.sampling import SAMPLERS
from models import MODEL_NAMES
from mp_layers import MPConfig, parse_modulation

DEFAULT_LR, DEFAULT_MP_LR = 1e-4, 1e-2
PRECISIONS = ["fp32", "tf32", "bf16"]
COMPILE_MODES = ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
FID = "FID during training (off unless --eval-every is given)"
TRACKERS = "experiment trackers (the jsonl logs are written either way)"
MP_KEYS = [*MPConfig.option_names(), "use_all_mp"]  # the "args" keys of the MP switches
# Keys of a run's "args" that are no options: which run it continued (checkpoints record it) and from
# which file the options came.
NOT_OPTIONS = ["resume", "resume_checkpoint", "config"]


class ConfigError(ValueError):
    """Options that cannot train together, or a value of the wrong kind: one line naming the fix (exit 2)."""


def option(default, help=None, *, resumable=False, group=None, **flag):
    """A field: its default, its --help, whether a resume may change it, its argument group, and the
    flag's other argparse arguments (its type comes from the field's annotation)."""
    return dataclasses.field(default=default, metadata={"help": help, "resumable": resumable, "group": group,
                                                        "flag": flag})


def default_snapshot_spacing(num_steps: int) -> int:
    """Steps between EMA snapshots by default: about one per 1,000 steps, but at least 10 and at most 250
    snapshots a run. Post-hoc reconstruction is accurate from ten or so (tests/test_ema.py), and each
    snapshot is the model in fp16 per tracked σ_rel, so the old steps//250 made short runs mostly snapshots
    (20,000 steps of DiT-XS/2: 7.8 GB, now 0.6 GB)."""
    snapshots = min(250, max(10, num_steps // 1000))
    return max(1, num_steps // snapshots)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """train.py's options: a field per flag (the flag's name with underscores), in --help's order; the
    MP switches are `mp`. Fields marked `resumable` may be given anew on --resume; the others are the run's."""

    data_path: str = option("digits", "latent folder, ImageFolder, Hugging Face dataset (a save_to_disk folder, a hub "
                            "name such as benjamin-paine/imagenet-1k-128x128, or hf:NAME), or a built-in set: digits "
                            "(default), mnist")
    image_size: int | None = option(None, "centre-crop size of images (an ImageFolder or Hugging Face dataset)")
    vae: str | None = option(None, "train images in the latent space of this diffusers AutoencoderKL (hub name such "
                             "as stabilityai/sd-vae-ft-mse, or a local folder), encoding each batch as it is read; "
                             "default: images train in pixel space. With --resume: where the run's VAE is now (the "
                             "same VAE; the run's own record is used otherwise)", resumable=True,
                             metavar="NAME_OR_PATH")
    random_flip: bool = option(False, "mirror each item with probability 1/2 (images before encoding; a latent folder "
                               "needs the mirrored posteriors of prepare_latents.py --random-flip)")
    split: str = option(*data.hf.OPTIONS["split"])
    image_column: str = option(*data.hf.OPTIONS["image_column"])
    label_column: str = option(*data.hf.OPTIONS["label_column"])
    max_image_pixels: int | None = option(None, "refuse images whose header claims more pixels (default: PIL's "
                                          "89,478,485)", resumable=True, metavar="N")
    # (on --resume, the folder the run lies in)
    results_dir: str = option("results", "parent folder of the run folders (RESULTS/NNN-MODEL)", resumable=True)
    model: str = option("DiT-XS/2", "one of " + ", ".join(MODEL_NAMES), choices=MODEL_NAMES, metavar="NAME")
    num_classes: int | None = option(None, "default: from the dataset")
    num_steps: int = option(400_000, resumable=True)
    batch_size: int = option(256, "global batch size over all processes")
    batch_gpu: int | None = option(None, "micro-batch per process: each process runs its share of --batch-size N "
                                   "items at a time, adding up the gradients (less memory, the same results; "
                                   "default: the whole share at once)", resumable=True, metavar="N")
    lr: float | None = option(None, "learning rate of the plain parameters (default 1e-4, as in the paper). Given "
                              "without --mp-lr it is the one rate of every parameter, as in the paper's eight-switch "
                              "code")
    mp_lr: float | None = option(None, "learning rate of the weight-normalised and force-normalised weights, their "
                                 "gains and the MP tables (default 1e-2, as the paper's later code and EDM2; 1e-4 "
                                 "barely moves them)")
    seed: int = option(0)
    num_workers: int | None = option(None, "data loader processes (default: 0 for a set held in memory: digits, "
                                     "MNIST, a latent folder; else min(4, CPU cores))", resumable=True)
    log_every: int = option(100, resumable=True)
    ckpt_every: int = option(50_000, resumable=True)
    keep_checkpoints: int = option(0, "keep only the newest N checkpoints (default 0: keep all); EMA snapshots are "
                                   "always kept", resumable=True, metavar="N")
    num_lin_warmup: int | None = option(None, "linear warm-up steps (default steps//150)")
    start_decay: int | None = option(None, "start of 1/sqrt decay (default steps//10)")
    ema_snapshot_every: int | None = option(None, "default: about one snapshot per 1,000 steps, at least 10 and at "
                                            "most 250 a run (post-hoc EMA needs only a few dozen; the log states "
                                            "the bytes to write)", resumable=True)
    ema_stds: tuple[float, ...] = option((0.05, 0.10), "tracked EMA σ_rel values", nargs="+")
    magnitude_every: int | None = option(None, "record activation and weight magnitudes per block every N steps and "
                                         "at the last (default: spaced from a record's measured cost to take about "
                                         "1 %% of the training time, at most ~100 records; the log says the "
                                         "spacing)", resumable=True)
    mp: MPConfig = dataclasses.field(default_factory=MPConfig, metadata={"resumable": False})
    precision: str = option("tf32", "fp32, TF32 matmuls (default; same as fp32 on a CPU), or bf16 autocast",
                            choices=PRECISIONS)
    compile: bool = option(False, "torch.compile the model", resumable=True)
    grad_checkpointing: bool = option(False, "recompute each block's activations in the backward instead of keeping "
                                      "them (less memory, about a third more compute; the same results)",
                                      resumable=True)
    compile_mode: str | None = option(None, "with --compile: torch.compile's mode (default: default); "
                                      "reduce-overhead replays CUDA graphs, which removes the kernel-launch cost "
                                      "that bounds small models (measured on one GPU; see docs/train.md)",
                                      resumable=True, choices=COMPILE_MODES)
    grad_clip: float = option(0.0, "clip the gradient norm (0 = off)")
    device: str | None = option(None, "default: cuda:LOCAL_RANK if available, else cpu", resumable=True)
    # FID during training (eval/during_training.py) and the trackers (logs.py): they never change the weights.
    eval_every: int = option(0, "FID of the tracked EMA every N steps and at the last (default 0: off)",
                             resumable=True, group=FID, metavar="N")
    eval_samples: int = option(1000, "images per evaluation", resumable=True, group=FID)
    eval_sampler: str = option("dpm-solver++", resumable=True, group=FID, choices=SAMPLERS)
    eval_sampling_steps: int = option(20, resumable=True, group=FID)
    eval_cfg_scale: float = option(1.5, resumable=True, group=FID)
    eval_ema_std: float | None = option(None, "which tracked EMA (one of --ema-stds; default the first)",
                                        resumable=True, group=FID)
    eval_seed: int = option(42, "sampling seed (the same at every evaluation)", resumable=True, group=FID)
    eval_batch_size: int = option(250, "images per sampling forward and process", resumable=True, group=FID)
    eval_precision: str = option("fp32", "the sampling forwards' precision (as sample.py --precision; bf16 "
                                 "autocast: a few times faster on a GPU, other samples than fp32's)",
                                 resumable=True, group=FID, choices=PRECISIONS)
    eval_ref: str = option("auto", 'reference statistics or images (as eval/sample_fid.py --ref); "auto": the '
                           "built-in dataset's, computed once into RESULTS/refs/", resumable=True, group=FID)
    eval_ref_images: int | str | None = option(None, "with --eval-ref auto: the reference over N evenly spaced "
                                               "images of the dataset (default: all on a GPU, 300 on a CPU, a few "
                                               "minutes; the log announces the count and the time)",
                                               resumable=True, group=FID, type=ref_images_argument, metavar="N|all")
    eval_max_fraction: float = option(0.25, "warn when the evaluations have taken more than this fraction of the "
                                      "training time", resumable=True, group=FID)
    inception_weights: str | None = option(None, "TorchScript FID Inception (default: the bundled one)",
                                           resumable=True, group=FID)
    tensorboard: bool = option(False, "also write TensorBoard event files to RUN/tensorboard/ (tensorboard --logdir "
                               "RESULTS)", resumable=True, group=TRACKERS)
    wandb: bool = option(False, "also log to Weights & Biases (needs pip install wandb; WANDB_MODE=offline works "
                         "without an account)", resumable=True, group=TRACKERS)
    wandb_project: str = option("map-dit", "W&B project (default map-dit)", resumable=True, group=TRACKERS)
    wandb_name: str | None = option(None, "W&B run name (default: the run folder's name)", resumable=True,
                                    group=TRACKERS)

    def __post_init__(self):
        def fill(name, value):
            object.__setattr__(self, name, value)
        fill("ema_stds", tuple(self.ema_stds))  # (a list from the command line or JSON)
        # Defaults that follow other options; a run's saved config has them filled, so a resume with a
        # new --num-steps keeps the schedule and the snapshot spacing the run started with.
        if self.num_lin_warmup is None:
            fill("num_lin_warmup", self.num_steps // 150)
        if self.start_decay is None:
            fill("start_decay", self.num_steps // 10)
        if self.ema_snapshot_every is None:
            fill("ema_snapshot_every", default_snapshot_spacing(self.num_steps))
        # --lr alone: one rate for everything (the eight-switch code); otherwise MP parameters at --mp-lr and
        # plain ones at --lr. A run made before --mp-lr existed had one rate, and its config has no mp_lr.
        if self.mp_lr is None:
            fill("mp_lr", DEFAULT_MP_LR if self.lr is None else self.lr)
        if self.lr is None:
            fill("lr", DEFAULT_LR)
        if self.eval_every and self.eval_ema_std is None:
            fill("eval_ema_std", self.ema_stds[0])
        self._check()

    def _check(self) -> None:
        """Every check between options, before anything is loaded or written."""
        positive = ["num_steps", "batch_size", "log_every", "ckpt_every", "ema_snapshot_every", "magnitude_every"]
        for name in positive + ["image_size", "num_classes"]:
            value = getattr(self, name)
            if value is not None and value <= 0:  # (image_size and num_classes may be left to the data)
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError(f"--num-workers must be >= 0 (0 loads in this process), got {self.num_workers}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ConfigError(f"--grad-clip must be a finite number >= 0 (0 = off), got {self.grad_clip}")
        if not 0 <= self.seed < 2 ** 63:
            raise ConfigError(f"--seed must be in 0 .. 2**63 - 1, got {self.seed}")
        if len(set(self.ema_stds)) != len(self.ema_stds):
            raise ConfigError(f"--ema-stds has a duplicate value: {list(self.ema_stds)}")
        if self.compile_mode and not self.compile:
            raise ConfigError(f"--compile-mode {self.compile_mode} needs --compile; add --compile")
        if self.keep_checkpoints < 0:
            raise ConfigError(f"--keep-checkpoints must be >= 0 (0 keeps all), got {self.keep_checkpoints}")
        if self.num_lin_warmup < 0 or self.start_decay < 0:
            raise ConfigError("--num-lin-warmup and --start-decay must be >= 0")
        for name in ("lr", "mp_lr"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive number, got {getattr(self, name)}")
        for std in self.ema_stds:
            if not 0 < std < 0.2887:
                raise ConfigError(f"--ema-stds value {std} is outside (0, 0.2887)")
        self._check_fid()

    def _check_fid(self) -> None:
        if self.eval_every < 0:
            raise ConfigError(f"--eval-every must be >= 0 (0 = off), got {self.eval_every}")
        if not self.eval_every:
            return
        if not any(abs(self.eval_ema_std - s) < 1e-9 for s in self.ema_stds):
            raise ConfigError(f"--eval-ema-std {self.eval_ema_std:g} is not a tracked EMA (--ema-stds "
                              f"{' '.join(f'{s:g}' for s in self.ema_stds)}); pick one of them")
        if self.eval_samples < 2:
            raise ConfigError(f"--eval-samples must be at least 2, got {self.eval_samples}")
        if not 1 <= self.eval_sampling_steps <= 1000:
            raise ConfigError(f"--eval-sampling-steps must be in 1..1000, got {self.eval_sampling_steps}")
        if self.eval_batch_size < 1:
            raise ConfigError(f"--eval-batch-size must be >= 1, got {self.eval_batch_size}")
        if self.eval_ref == "none":
            raise ConfigError("--eval-ref none: FID during training needs a reference; pass one or use auto")

    # ------------------------------------------------------------------------------------------------
    # The flags, and the dict of config.json's "args".

    @classmethod
    def options(cls) -> list[dataclasses.Field]:
        """The fields that are flags of their own (all but the nested MP switches)."""
        return [f for f in dataclasses.fields(cls) if f.name != "mp"]

    @classmethod
    def resumable(cls, name: str) -> bool:
        """Whether a resume may change the option `name` (an MP switch may not)."""
        return any(f.name == name and f.metadata["resumable"] for f in dataclasses.fields(cls))

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """A flag per field, in the fields' order, in their argument groups; the MP switches by MPConfig."""
        groups = {None: parser}
        for f in dataclasses.fields(cls):
            if f.name == "mp":
                MPConfig.add_arguments(parser)
                continue
            meta = f.metadata
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_argument_group(meta["group"])
            kind = f.type.split(" | ")[0]
            flag = ({"action": "store_true"} if kind == "bool" else
                    {"type": {"int": int, "float": float, "tuple[float, ...]": float}.get(kind)})
            groups[meta["group"]].add_argument("--" + f.name.replace("_", "-"), default=f.default,
                                               help=meta["help"], **{**flag, **meta["flag"]})

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> TrainConfig:
        """From the namespace of a parser `add_arguments` made."""
        return cls.from_dict(vars(ns))

    def to_dict(self) -> dict:
        """config.json's "args": a key per flag (the MP switches flat), JSON's types."""
        return {**{f.name: getattr(self, f.name) for f in self.options()}, "ema_stds": list(self.ema_stds),
                **self.mp.to_dict()}

    @classmethod
    def unknown_keys(cls, d: dict) -> list[str]:
        """The keys of `d` that name no option (options that a later train.py dropped, or misspelt ones)."""
        known = {f.name for f in cls.options()} | set(MP_KEYS) | set(NOT_OPTIONS)
        return [k for k in d if k not in known]

    @classmethod
    def from_dict(cls, d: dict, *, where: str = "option ", fix: str = "see python train.py --help") -> TrainConfig:
        """From `to_dict`'s output, or the "args" of a run made by any earlier train.py: a missing option takes
        its default (the run predates it), a key of no option is ignored (`unknown_keys` names them: the run
        had an option since dropped, which therefore no longer acts). A value of the wrong kind is a
        ConfigError "{where}NAME is VALUE, where KIND belongs; {fix}"."""
        cls.check_types(d, where=where, fix=fix)
        switches = {name: bool(d.get(name)) or (bool(d.get("use_all_mp")) and name in MPConfig.all_mp_names())
                    for name in MPConfig.switch_names()}
        mp = MPConfig(**switches, modulation=d.get("modulation", "adaln"))
        return cls(**{f.name: d[f.name] for f in cls.options() if f.name in d}, mp=mp)

    @classmethod
    def check_types(cls, d: dict, *, where: str = "option ", fix: str = "see python train.py --help") -> None:
        """ConfigError "{where}NAME is VALUE, where KIND belongs; {fix}" for the first value of `d` that its
        option cannot take (JSON's kinds: a string where a number belongs, a number where a list does)."""
        for name, value in d.items():
            want = cls._misfit(name, value)
            if want:
                raise ConfigError(f"{where}{name} is {json.dumps(value)[:60]}, where {want} belongs; {fix}")

    @classmethod
    def _misfit(cls, name: str, value) -> str | None:
        """None where `value` fits the option `name` (or `name` is no option), else what belongs there."""
        if name in MPConfig.switch_names() or name == "use_all_mp":
            return None if isinstance(value, bool) else "true or false"
        if name == "modulation":
            try:
                parse_modulation(value if isinstance(value, str) else "")
                return None
            except ValueError:
                return "adaln or parts such as scale+rotation+gate"
        field = next((f for f in cls.options() if f.name == name), None)
        if field is None or (value is None and "None" in field.type):
            return None
        kinds = [k for k in field.type.split(" | ") if k != "None"]
        if not any(KINDS[k][1](value) for k in kinds):
            return " or ".join(KINDS[k][0] for k in kinds)
        flag = field.metadata["flag"]
        if "choices" in flag and value not in flag["choices"]:
            return "one of " + ", ".join(flag["choices"])
        if "type" in flag:  # a flag parsed by a function (--eval-ref-images: a count or "all")
            try:
                flag["type"](str(value))
            except argparse.ArgumentTypeError as e:
                return f"what --{name.replace('_', '-')} takes ({e})"
        return None


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# The kinds of the fields' annotations: what the message calls them, and the test of a JSON value.
KINDS = {"int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
         "float": ("a number", _number),
         "str": ("a string", lambda v: isinstance(v, str)),
         "bool": ("true or false", lambda v: isinstance(v, bool)),
         "tuple[float, ...]": ("a list of numbers", lambda v: isinstance(v, (list, tuple)) and len(v) > 0
                               and all(map(_number, v)))}
