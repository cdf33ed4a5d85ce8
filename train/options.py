"""One TrainConfig for train.flax and train.torch: its field defaults are the defaults, its metadata the flags.

Each field carries its help text and two properties in its metadata: whether it may change on `--resume`
(`mutable`: it does not change what is trained; the data folder and the workdir may move, as a resume checks
the data's content, not its path) and whether it may differ between the processes of one run
(`per_host`). The argparse parser is generated from the fields, and presets (`get_config("demo")`, as
big_vision's configs do) change only the fields where they differ. No jax or torch here.

Over 300 lines: one field per flag, each with its help text; the rest is presets, validation and the parser.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from darknet_arch import ARCHS, REMAT_MODES, DarknetConfig
from porting.preprocessing import DEFAULT_IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD, MAX_IMAGE_SIZE, UNIT_MEAN, UNIT_STD

if TYPE_CHECKING:  # porting's readers are imported where weights are read: the flags alone need none of them
    from porting import Loaded
    from porting.preprocessing import Preprocessing

DEFAULT_WORKDIR_ROOT = "runs"
DEMO_DATA = "demo"
COMPILE_CACHE_DEFAULT, COMPILE_CACHE_OFF = "default", "none"
OPTIMIZERS = ("sgd", "adamw")
NO_DATA = "--data is required: a dataset folder, or 'demo' for the built-in demo data"
NO_LENGTH = "give the training length: --epochs or --steps"
PRECISIONS = ("auto", "fp32", "bf16")
# How the network's input is made from x * PIXEL_SCALE (porting.preprocessing): minus mean, over std. "unit" is
# plain [0, 1] (Darknet's weights).
INPUT_NORMS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "unit": (UNIT_MEAN, UNIT_STD),
}
DEFAULT_INPUT_NORM = "imagenet"


class ConfigError(ValueError):
    """A flag value that cannot work, with the flag named and the expected range."""


# What the trainers import beyond flax_darknet's jax/flax/numpy: pyproject's `train` extra.
TRAIN_EXTRA_MODULES = ("optax", "orbax", "grain", "PIL", "tensorboardX", "matplotlib")


def missing_train_extra() -> str | None:
    """None when the `train` extra is installed, else a message naming what is missing and the install command."""
    missing = [m for m in TRAIN_EXTRA_MODULES if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return f"missing packages {missing}: install the training extra with: pip install 'darknet53-jax[train]'"


def _field(
    default: Any,
    help: str,
    *,
    type: Any = None,
    choices: Sequence[str] | None = None,
    mutable: bool = False,
    per_host: bool = False,
    path: bool = False,
    from_weights: bool = False,
) -> Any:
    """A TrainConfig field: its default, its flag's help, its --resume / multi-host properties, whether a path.

    `from_weights`: when its flag is not given, a run resolves the field from its --init-from weights' record,
    so a --resume without the flag takes the saved run's value (the first run's resolution) instead.
    """
    meta = {"help": help, "type": type, "choices": choices, "mutable": mutable, "per_host": per_host, "path": path,
            "from_weights": from_weights}  # fmt: skip
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; saved as config.json in the workdir and in every checkpoint."""

    data: str | None = _field(
        None, "dataset folder (mask layout or one folder per class), or 'demo'", type=str, mutable=True, path=True
    )
    val_path: str | None = _field(
        None, "separate validation folder (default: split --val-fraction off --data)", type=str, mutable=True, path=True
    )
    val_fraction: float = _field(0.2, "fraction of --data held out for validation (grouped by person)")
    workdir: str | None = _field(
        None, "output folder (default: runs/<UTC timestamp>)", type=str, mutable=True, path=True
    )
    resume: bool = _field(False, "continue the run in --workdir from its latest checkpoint", mutable=True)
    overwrite: bool = _field(False, "delete an existing run in --workdir and start over", mutable=True)
    arch: str = _field("darknet53", "architecture ('tiny' is for smoke tests only)", choices=tuple(ARCHS))
    leaky_slope: float | None = _field(
        None, "LeakyReLU slope (default: 0.1, Darknet's, or the --init-from file's)", type=float, from_weights=True
    )
    epochs: int | None = _field(30, "training length in passes over the data (--steps overrides it)")
    steps: int | None = _field(None, "training length in optimizer steps (overrides --epochs)", type=int)
    batch_size: int = _field(64, "global batch size (all devices, all processes)")
    lr: float = _field(0.05, "peak learning rate for the global batch")
    optimizer: str = _field("sgd", "'sgd' (Nesterov momentum) or 'adamw'", choices=OPTIMIZERS)
    momentum: float = _field(0.9, "SGD momentum")
    weight_decay: float = _field(5e-4, "weight decay; not applied to BatchNorm parameters and biases")
    warmup_epochs: float = _field(2.0, "linear warm-up length in epochs, then cosine decay to 0")
    label_smoothing: float = _field(0.0, "label smoothing of the cross-entropy targets")
    grad_clip: float | None = _field(None, "clip gradients to this global norm (default: off)", type=float)
    freeze: str = _field(
        "none",
        "frozen leading units: none, stem, stage1..stage5 (that stage and all before it), backbone (all but"
        " the head); frozen parameters and their BatchNorm statistics never change and keep no optimizer state",
    )
    head_lr_mult: float = _field(1.0, "learning-rate multiplier of the classifier head (e.g. 10 when fine-tuning)")
    layer_decay: float | None = _field(
        None, "layer-wise learning-rate decay: unit k (stem 0 .. head) gets decay ** (head - k)", type=float
    )
    ema_decay: float | None = _field(
        None, "keep an EMA of the weights (e.g. 0.999), used for evaluation and the best checkpoint", type=float
    )
    image_size: int | None = _field(
        None, "square input side (default: 256; --data demo on a CPU: the demo's 32)", type=int
    )
    precision: str = _field("auto", "compute precision; auto: bf16 on GPU/TPU, fp32 on CPU", choices=PRECISIONS)
    input_norm: str | None = _field(
        None,
        "input normalisation after / 255: imagenet (mean/std) or unit ([0, 1], Darknet's) (default: the --init-from "
        "weights' record, else imagenet)",
        type=str,
        choices=tuple(INPUT_NORMS),
        from_weights=True,
    )
    remat: str = _field(
        "none",
        "rematerialise activations in the backward pass: none, per residual block, or per stage (less memory, "
        "more compute; the same parameters and gradients)",
        choices=REMAT_MODES,
        mutable=True,
    )
    augment: bool = _field(True, "random crop / flip / colour augmentation of training images")
    zero_init_residual: bool = _field(True, "start each residual block as the identity (zeroed last BN scale)")
    seed: int = _field(0, "seed of the split, the initialisation and the data order")
    num_workers: int = _field(0, "data-loading worker processes", mutable=True, per_host=True)
    cache_dir: str | None = _field(None, "decoded-image cache folder", type=str, mutable=True, per_host=True, path=True)
    init_from: str | None = _field(
        None, "weights to start from (.pt, .safetensors, .weights, .conv.74, Flax)", type=str, mutable=True, path=True
    )
    keep_checkpoints: int = _field(3, "how many latest checkpoints to keep (plus the best)", mutable=True)
    checkpoint_every: int | None = _field(
        None, "steps between checkpoints (default: every epoch)", type=int, mutable=True
    )
    max_nonfinite: int = _field(5, "stop after this many non-finite steps in a row", mutable=True)
    log_every: int = _field(10, "steps between progress lines", mutable=True)
    compile_cache: str = _field(
        COMPILE_CACHE_DEFAULT,
        f"JAX compilation cache folder ('{COMPILE_CACHE_DEFAULT}': ~/.cache/darknet53-jax/xla; "
        f"'{COMPILE_CACHE_OFF}': off)",
        mutable=True,
        per_host=True,
    )

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The (mean, std) the network's input is normalised with after / 255."""
        return INPUT_NORMS[self.input_norm or DEFAULT_INPUT_NORM]

    @property
    def model_config(self) -> DarknetConfig:
        """The architecture named by `arch`, with `leaky_slope` applied."""
        return ARCHS[self.arch].with_slope(self.leaky_slope)

    def total_steps(self, steps_per_epoch: int) -> int:
        """Training length in steps: --steps when given, else epochs x steps per epoch."""
        if self.steps is not None:
            return self.steps
        if self.epochs is None:
            raise ConfigError(NO_LENGTH)
        return self.epochs * steps_per_epoch

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls: type[C], d: dict[str, Any]) -> C:
        """Inverse of to_json; unknown keys are an error (a config from another version)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; expected a subset of {sorted(names)}")
        return cls(**d)


C = TypeVar("C", bound=TrainConfig)
RESOLVED = ("data", "workdir", "image_size")  # what `resolve` fills in (data: required by `validate`)


def _resolved(name: str) -> Any:
    """A RunConfig field `resolve` fills in: TrainConfig's own (help, properties), required instead of optional."""
    return dataclasses.field(kw_only=True, metadata=TrainConfig.__dataclass_fields__[name].metadata)


@dataclasses.dataclass(frozen=True)
class RunConfig(TrainConfig):
    """The config a run trains with: `resolve` filled in what depends on the machine and the clock, once."""

    data: str = _resolved("data")
    workdir: str = _resolved("workdir")
    image_size: int = _resolved("image_size")

    def __post_init__(self) -> None:
        unset = [name for name in RESOLVED if getattr(self, name) is None]
        if unset:
            raise ConfigError(f"a run's config must have {', '.join(unset)} resolved (train.options.resolve)")


# Presets: the fields where a named setting differs from the defaults above.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # The README's main job: the full Darknet-53 to >= 90% validation accuracy in minutes on a 2-core CPU.
    # Its budget is in steps (not epochs) so it holds whatever size the generated demo has.
    # Label smoothing 0.1 (32-person demo, seed 0: 0.9286 without it). With 48 persons, seeds 0/1/2 reach val accuracy
    # 0.9877 / 0.9852 / 0.9901 on the 2-core CPU (2026-12-03); 150 or 200 steps (at 150 also a higher rate or a shorter
    # warm-up), and with 32 persons smoothing 0.2 or an EMA, did worse (bench/NOTES.md 6.3 rows 20-21, 28, 31; 6.4).
    DEMO_DATA: {"epochs": None, "steps": 256, "batch_size": 32, "warmup_epochs": 1.0, "label_smoothing": 0.1},
}


def get_config(preset: str = "default", **overrides: Any) -> TrainConfig:
    """A preset's TrainConfig with `overrides` applied; a given --steps or --epochs clears the other."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    values = {**PRESETS[preset], **overrides}
    if overrides.get("steps") is not None and "epochs" not in overrides:
        values["epochs"] = None
    if overrides.get("epochs") is not None and "steps" not in overrides:
        values["steps"] = None
    return TrainConfig(**values)


def mutable_on_resume(name: str) -> bool:
    """Whether field `name` may differ between a run and its --resume."""
    return TrainConfig.__dataclass_fields__[name].metadata["mutable"]


def path_fields() -> tuple[str, ...]:
    """The fields that name files or folders (an --overwrite must not delete any of them)."""
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["path"])


def per_host_fields() -> frozenset[str]:
    """The fields that may differ between the processes of one run (they concern each host)."""
    return frozenset(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["per_host"])


def resolved_as_saved(config: RunConfig, saved: TrainConfig) -> RunConfig:
    """`config` with each field a run resolves from its weights, and this command leaves unset, as `saved` has it."""
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.metadata["from_weights"]]
    return dataclasses.replace(config, **{n: getattr(saved, n) for n in names if getattr(config, n) is None})


def load_init_weights(config: TrainConfig, model_config: DarknetConfig, num_classes: int) -> Loaded:
    """--init-from's weights for a `num_classes` run of `model_config` (a head of another width replaced, seeded by
    --seed), with --leaky-slope checked against what they record; ConfigError naming the flag otherwise."""
    import porting

    if not config.init_from:
        raise ConfigError("--init-from is not set: there are no weights to start from")
    try:
        return porting.load_flax_variables(config.init_from, num_classes=num_classes, leaky_slope=config.leaky_slope,
                                           seed=config.seed, config=model_config)  # fmt: skip
    except porting.PortingError as e:
        raise ConfigError(f"--init-from {config.init_from}: {e}") from e


def input_norm_for(config: RunConfig, record: Preprocessing) -> tuple[RunConfig, str]:
    """(config with input_norm resolved, a note): the --init-from weights' normalisation unless a flag forced one."""
    expected = next(
        (name for name, (mean, std) in INPUT_NORMS.items()
         if record.mean is not None and record.std is not None
         and np.allclose(record.mean, mean) and np.allclose(record.std, std)),
        None,
    )  # fmt: skip
    if config.input_norm is None:
        chosen = expected or DEFAULT_INPUT_NORM
        why = "the weights' record" if expected else f"the default (the weights record no known one: {record.mean})"
        return dataclasses.replace(config, input_norm=chosen), f"input normalisation {chosen}, from {why}"
    if expected is not None and expected != config.input_norm:
        forced = f"forced by --input-norm; the weights expect {expected}"
        return config, f"input normalisation {config.input_norm} ({forced})"
    return config, f"input normalisation {config.input_norm} (--input-norm)"


def resolve_from_weights(config: RunConfig, loaded: Loaded) -> tuple[RunConfig, list[str]]:
    """(config with the fields it takes from its --init-from weights, the notes): the slope they were trained with
    (recorded, so --resume rebuilds the same net) and their input normalisation, where no flag set them."""
    if config.leaky_slope is None and loaded.leaky_slope is not None:
        config = dataclasses.replace(config, leaky_slope=float(loaded.leaky_slope))
    config, note = input_norm_for(config, loaded.preprocessing)
    return config, [*loaded.notes, note]


def config_differences(saved: TrainConfig, new: TrainConfig) -> list[str]:
    """Fields (outside the --resume-mutable ones) whose values differ, as 'name: saved -> new' lines."""
    return [
        f"{f.name}: {getattr(saved, f.name)!r} -> {getattr(new, f.name)!r}"
        for f in dataclasses.fields(TrainConfig)
        if not f.metadata["mutable"] and getattr(saved, f.name) != getattr(new, f.name)
    ]


def default_image_size(data: str | None, accelerator: bool) -> int:
    """--image-size when not given: the demo's small size on a CPU; DEFAULT_IMAGE_SIZE on a GPU/TPU (demo included)."""
    from train.data.demo import DEMO_IMAGE_SIZE  # here, not at the top: train.data pulls in grain and PIL

    return DEMO_IMAGE_SIZE if data == DEMO_DATA and not accelerator else DEFAULT_IMAGE_SIZE


def resolve(config: TrainConfig, accelerator: bool) -> RunConfig:
    """The run's config with every default that depends on the machine or the clock filled in (done once)."""
    if not config.data:
        raise ConfigError(NO_DATA)
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(TrainConfig)}
    if config.image_size is None:
        values["image_size"] = default_image_size(config.data, accelerator)
    if config.workdir is None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        values["workdir"] = os.path.join(DEFAULT_WORKDIR_ROOT, stamp)  # a fresh folder per run
    return RunConfig(**values)


def validate(config: TrainConfig) -> None:
    """Raise ConfigError naming the first flag that cannot work."""

    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    def check(name: str, ok: bool, expected: str) -> None:
        value = getattr(config, name)
        if not ok:
            raise ConfigError(f"{flag(name)} must be {expected}, got {value!r}")

    if not config.data:
        raise ConfigError(NO_DATA)
    for name in ("batch_size", "lr", "keep_checkpoints", "max_nonfinite", "log_every"):
        value = getattr(config, name)
        check(name, isinstance(value, (int, float)) and math.isfinite(value) and value > 0, "> 0")
    for name in ("epochs", "steps", "image_size", "checkpoint_every", "grad_clip", "leaky_slope"):
        value = getattr(config, name)
        check(name, value is None or (math.isfinite(value) and value > 0), "> 0 (or left unset)")
    if config.epochs is None and config.steps is None:
        raise ConfigError(NO_LENGTH)
    check("weight_decay", math.isfinite(config.weight_decay) and config.weight_decay >= 0, ">= 0")
    check("head_lr_mult", math.isfinite(config.head_lr_mult) and config.head_lr_mult > 0, "> 0")
    check("layer_decay", config.layer_decay is None or 0 < config.layer_decay <= 1, "in (0, 1] (or left unset)")
    check("ema_decay", config.ema_decay is None or 0 < config.ema_decay < 1, "in (0, 1) (or left unset)")
    check("warmup_epochs", math.isfinite(config.warmup_epochs) and config.warmup_epochs >= 0, ">= 0")
    check("momentum", 0 <= config.momentum < 1, "in [0, 1)")
    check("label_smoothing", 0 <= config.label_smoothing < 1, "in [0, 1)")
    check("val_fraction", 0 < config.val_fraction < 1, "in (0, 1)")
    check("num_workers", config.num_workers >= 0, ">= 0")
    for f in dataclasses.fields(TrainConfig):
        if f.metadata["choices"] is not None:
            choices = f.metadata["choices"]
            value = getattr(config, f.name)
            check(
                f.name,
                value in choices or (value is None and f.default is None),
                "one of " + ", ".join(map(repr, choices)),
            )
    from train.finetune import frozen_units  # the unit names come from the architecture

    try:
        frozen_units(ARCHS[config.arch], config.freeze)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    stride = ARCHS[config.arch].total_stride
    if config.image_size is not None and (config.image_size % stride or not 0 < config.image_size <= MAX_IMAGE_SIZE):
        raise ConfigError(
            f"--image-size must be a multiple of {stride} (the network's stride) in {stride}..{MAX_IMAGE_SIZE}, got "
            f"{config.image_size}"
        )
    if config.resume and config.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pass one")


def _add_flag(parser: argparse.ArgumentParser, f: dataclasses.Field) -> None:
    meta, dashed = f.metadata, f.name.replace("_", "-")
    demo = PRESETS[DEMO_DATA].get(f.name, f.default)
    shown = [f"default: {f.default}"] if f.default is not None else []
    shown += [f"--data demo: {demo}"] if demo != f.default else []
    help_text = meta["help"] + (f" ({'; '.join(shown)})" if shown else "")
    # Every flag parses to None when not given, so the preset's value is used and a given flag always wins.
    if f.default is True:
        parser.add_argument(f"--no-{dashed}", dest=f.name, action="store_false", default=None, help=help_text)
    elif f.default is False:
        parser.add_argument(f"--{dashed}", dest=f.name, action="store_true", default=None, help=meta["help"])
    else:
        kind = meta["type"] or type(f.default)  # fields whose default is None name their type
        parser.add_argument(
            f"--{dashed}", dest=f.name, type=kind, default=None, choices=meta["choices"], help=help_text
        )


def build_parser(prog: str) -> argparse.ArgumentParser:
    """The flags of train.flax and train.torch, one per TrainConfig field."""
    parser = argparse.ArgumentParser(prog=prog, description="Train Darknet-53 on an image-classification folder.")
    for f in dataclasses.fields(TrainConfig):
        _add_flag(parser, f)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The parsed flags over the preset their --data picks (not yet resolved or validated)."""
    given = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name) is not None
    }
    return get_config(DEMO_DATA if given.get("data") == DEMO_DATA else "default", **given)


def dumps(config: TrainConfig) -> str:
    """Pretty JSON of the resolved config (printed at start and saved as config.json)."""
    return json.dumps(config.to_json(), indent=2, sort_keys=True)
