"""Command-line flags -> a frozen, validated TrainConfig (shared by train.flax and train.torch; no jax/torch here)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from darknet_arch import ARCHS, DarknetConfig

# Full-size training input on real data and on accelerators; `--data demo` on a CPU uses train.data.DEMO_IMAGE_SIZE.
DEFAULT_IMAGE_SIZE = 256
DEFAULT_WORKDIR_ROOT = "runs"
# Inputs are normalised inside the step with ImageNet statistics (the torchvision/timm convention), on uint8 RGB.
NORMALIZATION = "imagenet_mean_std"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# Demo defaults: chosen so the full Darknet-53 reaches >= 90% validation accuracy in < 5 minutes on a 2-core CPU.
# The budget is in steps (not epochs) so it holds whatever size the generated demo has.
DEMO_DEFAULTS = {"epochs": 8, "batch_size": 32, "lr": 0.05, "warmup_epochs": 1.0}
DEMO_STEPS = 256
REAL_DEFAULTS = {"epochs": 30, "batch_size": 64, "lr": 0.05, "warmup_epochs": 2.0}


def default_image_size(data: str, accelerator: bool) -> int:
    """--image-size when not given: the demo's small size on a CPU; DEFAULT_IMAGE_SIZE on a GPU/TPU (demo included)."""
    from train.data.demo import DEMO_IMAGE_SIZE  # here, not at the top: train.data pulls in grain and PIL

    return DEMO_IMAGE_SIZE if data == "demo" and not accelerator else DEFAULT_IMAGE_SIZE


def fill_image_size(config: TrainConfig, accelerator: bool) -> TrainConfig:
    """`config` with image_size set to default_image_size when it was left unset (None)."""
    if config.image_size is not None:
        return config
    return dataclasses.replace(config, image_size=default_image_size(config.data, accelerator))


class ConfigError(ValueError):
    """A flag value that cannot work, with the flag named and the expected range."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; saved as config.json in the workdir and in every checkpoint."""

    data: str
    workdir: str
    val_path: str | None = None
    val_fraction: float = 0.2
    arch: str = "darknet53"
    leaky_slope: float | None = None  # None: the config's 0.1, or the --init-from file's slope
    epochs: int = 6
    steps: int | None = None  # total optimizer steps; None: epochs * steps_per_epoch
    batch_size: int = 32  # global batch (all devices, all processes)
    lr: float = 0.05  # peak learning rate for the global batch
    optimizer: str = "sgd"  # "sgd" (Nesterov momentum) or "adamw"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    grad_clip: float | None = None  # global-norm clip; None: off
    image_size: int | None = None  # None: default_image_size(data, on an accelerator)
    precision: str = "auto"  # "auto": bf16 on GPU/TPU, fp32 on CPU
    augment: bool = True
    zero_init_residual: bool = True  # residual blocks start as the identity (stable early SGD on the deep net)
    seed: int = 0
    num_workers: int = 0
    cache_dir: str | None = None
    init_from: str | None = None
    resume: bool = False
    overwrite: bool = False
    keep_checkpoints: int = 3
    checkpoint_every: int | None = None  # steps; None: at the end of every epoch
    max_nonfinite: int = 5  # stop after this many non-finite steps in a row
    log_every: int = 10
    compile_cache: str | None = "default"  # a folder, "default" (~/.cache/darknet53-jax/xla) or None to disable
    normalization: str = NORMALIZATION

    @property
    def model_config(self) -> DarknetConfig:
        """The architecture named by `arch`, with `leaky_slope` applied."""
        return ARCHS[self.arch].with_slope(self.leaky_slope)

    def total_steps(self, steps_per_epoch: int) -> int:
        """Training length in steps: --steps when given, else epochs x steps per epoch."""
        return self.steps or self.epochs * steps_per_epoch

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of to_json; unknown keys are an error (a config from another version)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; expected a subset of {sorted(names)}")
        return cls(**d)


# Fields that may differ between a run and its --resume without changing what is being trained
# (epochs/steps are not among them: they shape the learning-rate schedule).
RESUME_MUTABLE = frozenset(
    {
        "resume",
        "overwrite",
        "num_workers",
        "cache_dir",
        "log_every",
        "compile_cache",
        "checkpoint_every",
        "keep_checkpoints",
        "max_nonfinite",
        "init_from",
    }
)


def config_differences(saved: TrainConfig, new: TrainConfig) -> list[str]:
    """Fields (outside RESUME_MUTABLE) whose values differ, as 'name: saved -> new' lines."""
    out = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in RESUME_MUTABLE:
            continue
        a, b = getattr(saved, f.name), getattr(new, f.name)
        if a != b:
            out.append(f"{f.name}: {a!r} -> {b!r}")
    return out


def validate(config: TrainConfig) -> None:
    """Raise ConfigError naming the first flag that cannot work."""

    def positive(name: str, value: float | None, allow_none: bool = False) -> None:
        if value is None and allow_none:
            return
        if value is None or not value > 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value}")

    positive("epochs", config.epochs)
    positive("steps", config.steps, allow_none=True)
    positive("batch_size", config.batch_size)
    positive("lr", config.lr)
    positive("image_size", config.image_size, allow_none=True)
    positive("keep_checkpoints", config.keep_checkpoints)
    positive("checkpoint_every", config.checkpoint_every, allow_none=True)
    positive("max_nonfinite", config.max_nonfinite)
    positive("log_every", config.log_every)
    positive("grad_clip", config.grad_clip, allow_none=True)
    if config.weight_decay < 0:
        raise ConfigError(f"--weight-decay must be >= 0, got {config.weight_decay}")
    if config.warmup_epochs < 0:
        raise ConfigError(f"--warmup-epochs must be >= 0, got {config.warmup_epochs}")
    if not 0 <= config.momentum < 1:
        raise ConfigError(f"--momentum must be in [0, 1), got {config.momentum}")
    if not 0 <= config.label_smoothing < 1:
        raise ConfigError(f"--label-smoothing must be in [0, 1), got {config.label_smoothing}")
    if not 0 < config.val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in (0, 1), got {config.val_fraction}")
    if config.num_workers < 0:
        raise ConfigError(f"--num-workers must be >= 0, got {config.num_workers}")
    if config.optimizer not in ("sgd", "adamw"):
        raise ConfigError(f"--optimizer must be 'sgd' or 'adamw', got {config.optimizer!r}")
    if config.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"--precision must be 'auto', 'fp32' or 'bf16', got {config.precision!r}")
    if config.arch not in ARCHS:
        raise ConfigError(f"--arch must be one of {sorted(ARCHS)}, got {config.arch!r}")
    stride = ARCHS[config.arch].total_stride
    if config.image_size is not None and config.image_size % stride:
        raise ConfigError(
            f"--image-size must be a multiple of {stride} (the network's stride), got {config.image_size}"
        )
    if config.resume and config.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pass one")
    if config.init_from is not None and config.init_from != "" and not Path(config.init_from).exists():
        raise ConfigError(f"--init-from {config.init_from!r} does not exist")


def default_workdir() -> str:
    """runs/<UTC timestamp>: a fresh folder per run, so a fresh clone never overwrites anything."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return os.path.join(DEFAULT_WORKDIR_ROOT, stamp)


def build_parser(prog: str) -> argparse.ArgumentParser:
    """The flags shared by train.flax and train.torch."""
    p = argparse.ArgumentParser(prog=prog, description="Train Darknet-53 on an image-classification folder.")
    a = p.add_argument
    a("--data", required=True, help="dataset folder (mask layout or one folder per class), or 'demo'")
    a("--val-path", default=None, help="separate validation folder (default: split --val-fraction off --data)")
    a("--val-fraction", type=float, default=0.2)
    a("--workdir", default=None, help="output folder (default: runs/<UTC timestamp>)")
    a("--resume", action="store_true", help="continue the run in --workdir from its latest checkpoint")
    a("--overwrite", action="store_true", help="delete an existing --workdir and start over")
    a("--arch", default="darknet53", choices=sorted(ARCHS), help="'tiny' is for smoke tests only")
    a("--leaky-slope", type=float, default=None, help="default: 0.1 (Darknet), or the --init-from file's")
    a("--epochs", type=int, default=None, help="default: 30 (for --data demo: 256 steps)")
    a("--steps", type=int, default=None, help="total optimizer steps (overrides --epochs)")
    a("--batch-size", type=int, default=None, help="global batch size (default: 32 demo, 64 otherwise)")
    a("--lr", type=float, default=None, help="peak learning rate (default 0.05 for SGD)")
    a("--optimizer", default="sgd", choices=("sgd", "adamw"))
    a("--momentum", type=float, default=0.9)
    a("--weight-decay", type=float, default=5e-4, help="not applied to BatchNorm parameters and biases")
    a("--warmup-epochs", type=float, default=None)
    a("--label-smoothing", type=float, default=0.0)
    a("--grad-clip", type=float, default=None, help="clip gradients to this global norm")
    a("--image-size", type=int, default=None, help="default: 256 (--data demo on a CPU: the demo's 32)")
    a("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="auto: bf16 on GPU, fp32 on CPU")
    a("--no-augment", dest="augment", action="store_false")
    a(
        "--no-zero-init-residual",
        dest="zero_init_residual",
        action="store_false",
        help="keep the random scale of each residual block's last BatchNorm",
    )
    a("--seed", type=int, default=0)
    a("--num-workers", type=int, default=0, help="data-loading worker processes")
    a("--cache-dir", default=None, help="decoded-image cache folder for the data pipeline")
    a("--init-from", default=None, help="weights file to start from (.pt, .safetensors, .weights, .conv.74, Flax)")
    a("--keep-checkpoints", type=int, default=3, help="how many latest checkpoints to keep (plus the best)")
    a("--checkpoint-every", type=int, default=None, help="steps between checkpoints (default: every epoch)")
    a("--max-nonfinite", type=int, default=5, help="stop after this many non-finite steps in a row")
    a("--log-every", type=int, default=10)
    a("--compile-cache", default="default", help="JAX compilation cache folder, or 'none' to disable")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Resolve the defaults that depend on the dataset and build the config (not yet validated)."""
    defaults = DEMO_DEFAULTS if args.data == "demo" else REAL_DEFAULTS

    def pick(name: str) -> Any:
        value = getattr(args, name)
        return defaults[name] if value is None else value

    cache = None if str(args.compile_cache).lower() == "none" else args.compile_cache
    return TrainConfig(
        data=args.data,
        val_path=args.val_path,
        val_fraction=args.val_fraction,
        workdir=args.workdir or default_workdir(),
        resume=args.resume,
        overwrite=args.overwrite,
        arch=args.arch,
        leaky_slope=args.leaky_slope,
        epochs=pick("epochs"),
        steps=DEMO_STEPS if args.data == "demo" and args.steps is None and args.epochs is None else args.steps,
        batch_size=pick("batch_size"),
        lr=pick("lr"),
        optimizer=args.optimizer,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        warmup_epochs=pick("warmup_epochs"),
        label_smoothing=args.label_smoothing,
        grad_clip=args.grad_clip,
        image_size=args.image_size,
        precision=args.precision,
        augment=args.augment,
        zero_init_residual=args.zero_init_residual,
        seed=args.seed,
        num_workers=args.num_workers,
        cache_dir=args.cache_dir,
        init_from=args.init_from,
        keep_checkpoints=args.keep_checkpoints,
        checkpoint_every=args.checkpoint_every,
        max_nonfinite=args.max_nonfinite,
        log_every=args.log_every,
        compile_cache=cache,
    )


def parse_config(argv: Sequence[str] | None, prog: str) -> TrainConfig:
    """argv -> validated TrainConfig; raises ConfigError."""
    config = config_from_args(build_parser(prog).parse_args(argv))
    validate(config)
    return config


def dumps(config: TrainConfig) -> str:
    """Pretty JSON of the resolved config (printed at start and saved as config.json)."""
    return json.dumps(config.to_json(), indent=2, sort_keys=True)
