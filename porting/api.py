"""Read the weights any location names (porting.locations) into the canonical form, with their preprocessing record
and the head, slope and class names the caller asks for.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from darknet_arch import ARCHS, DARKNET_LEAKY_SLOPE, SEED_LEAKY_SLOPE, DarknetConfig
from porting import files, hub, keymap, runs
from porting.darknet import read_darknet_weights
from porting.errors import LayoutMismatch, PortingError
from porting.locations import Location, locate
from porting.preprocessing import DARKNET, Preprocessing, combine, contradictions
from porting.state import CanonicalStateDict, check_leaky_slope, check_num_classes
from porting.torch_flax import (
    TorchSource,
    canonical_from_torch,
    canonical_to_flax,
    check_source,
    checked_flax,
    detect_source,
    split_prelu_slope,
    strip_wrapper_prefixes,
)

# What a format implies when its file records nothing: Darknet's [0, 1] input and slope 0.1; timm's darknet53 and
# the seed use nn.LeakyReLU's 0.01.
IMPLIED: dict[str, Preprocessing] = {
    "darknet": DARKNET,
    "timm": Preprocessing(leaky_slope=SEED_LEAKY_SLOPE),
    "seed": Preprocessing(leaky_slope=SEED_LEAKY_SLOPE),
}
TRAIN_FLAX = "train_flax"  # source_format of a train.flax checkpoint step


@dataclasses.dataclass(frozen=True)
class Loaded:
    """Weights in canonical form, with what their location says about them."""

    state: CanonicalStateDict
    num_classes: int | None  # of the head; None when there is none
    preprocessing: Preprocessing  # recorded, implied by the format, or given; its fields are None where unknown
    source_format: str  # torch_ref, seed, timm, flax_msgpack, orbax, train_flax or darknet
    notes: tuple[str, ...]
    config: DarknetConfig  # the architecture, with the record's slope when it has one
    location: Location  # where they were read
    run_config: dict[str, Any] | None = None  # the training run's TrainConfig (JSON) when the weights are a run's
    # The same weights as read, when they came in Flax layout: Flax to Flax never goes through torch's layout.
    flax_variables: dict[str, Any] | None = None
    metrics: dict[str, float] | None = None  # the validation metrics a training run recorded at this step

    @property
    def leaky_slope(self) -> float | None:
        return self.preprocessing.leaky_slope

    @functools.cached_property
    def variables(self) -> dict[str, Any]:
        """The weights as Flax variables {"params", "batch_stats"} (float32 numpy, Flax layout)."""
        if self.flax_variables is not None:
            return self.flax_variables
        return canonical_to_flax(self.state, self.config)


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """What a caller states about the weights it reads; each statement is checked against what they record."""

    config: DarknetConfig | None = None  # None: the recorded architecture, else the known one the tensors fit
    source: str = "auto"  # the naming of a PyTorch file (porting.torch_flax.SOURCES)
    num_classes: int | None = None  # None keeps the file's head (or none)
    leaky_slope: float | None = None
    class_names: Sequence[str] | None = None
    preprocessing: Preprocessing | Mapping[str, Any] | None = None  # record fields
    seed: int = 0  # of a freshly initialised head
    reset_mismatched_head: bool = True  # a head of another width than num_classes: replace it (else an error)


def arch_name(config: DarknetConfig) -> str:
    """The ARCHS name of `config`'s architecture (its slope aside), or 'a custom architecture'."""
    plain = config.with_slope(DARKNET_LEAKY_SLOPE)
    return next((n for n, c in ARCHS.items() if c.with_slope(DARKNET_LEAKY_SLOPE) == plain), "a custom architecture")


def _candidates(config: DarknetConfig | None, meta: Mapping[str, Any], where: str) -> list[DarknetConfig]:
    """The architectures to try: the one the weights record, else the caller's, else every known one."""
    if meta.get("model_config") is None:
        return [config] if config is not None else list(ARCHS.values())
    recorded = DarknetConfig.from_dict(meta["model_config"])
    if config is not None and config.with_slope(DARKNET_LEAKY_SLOPE) != recorded.with_slope(DARKNET_LEAKY_SLOPE):
        raise PortingError(
            f"{where} records a {arch_name(recorded)} network, not the {arch_name(config)} asked for (config= / "
            "--arch): ask for the recorded architecture, or leave it out where the tool takes it from the weights"
        )
    return [recorded]


def _first_fit(candidates: list[DarknetConfig], convert: Callable[[DarknetConfig], Any]) -> tuple[DarknetConfig, Any]:
    """(config, convert(config)) for the first candidate whose shapes fit. If none converts: the error of the one
    whose keys and shapes fit (its values are bad: NaN, a wrong dtype), else the first one's."""
    errors = []
    for config in candidates:
        try:
            return config, convert(config)
        except PortingError as exc:
            errors.append(exc)
    fitting = [e for e in errors if not isinstance(e, LayoutMismatch)]
    if len(candidates) == 1 or fitting:
        raise (fitting or errors)[0]
    raise PortingError(f"{errors[0]}\n  (the error for {arch_name(candidates[0])}; the weights fit none of "
                       f"{', '.join(ARCHS)}: pass config= / --arch for another architecture)")  # fmt: skip


def _read(location: Location, config: DarknetConfig | None, source: str) -> Loaded:
    """The weights as they are: tensors, head, architecture, the record they carry or their format implies."""
    where, fmt = location.path, location.format
    if check_source(source) != "auto" and location.side != "torch":
        raise PortingError(f"source={source!r} names a PyTorch naming; {location.given!r} is a {fmt} location")
    notes: list[str] = list(location.notes)
    prelu = None
    if fmt == "darknet":
        cfg, weights = _first_fit(_candidates(config, {}, where), lambda c: read_darknet_weights(where, config=c))
        return Loaded(weights.state, weights.num_classes, DARKNET, "darknet", tuple(notes), cfg, location, None)
    if location.kind == "train_step" or fmt in ("msgpack", "orbax"):
        if location.kind == "train_step":
            variables, meta = runs.read_train_step(where)
            kind = TRAIN_FLAX
        else:
            variables, meta, more = files.read_flax_file(where)
            notes += more
            kind = "flax_msgpack" if fmt == "msgpack" else "orbax"
        cfg, (checked, state) = _first_fit(_candidates(config, meta, where),
                                           lambda c: checked_flax(variables, config=c))  # fmt: skip
    else:
        checked = None
        weights_file = hub.hub_weights(where) if location.kind == "hub_dir" else where
        if weights_file is None:  # locate() found them; they went away since
            raise PortingError(f"{where}: holds no {' or '.join(hub.HUB_WEIGHTS)}")
        raw, meta = files.read_torch_file(weights_file)
        if location.kind == "hub_dir":
            recorded = hub.hub_meta(where)
            record = combine([(f"{where} weights", _record(meta)), (f"{where} config", _record(recorded))], where)
            meta = {**meta, **recorded, "preprocessing": record.to_json()}
        unwrapped, stripped = strip_wrapper_prefixes(raw)
        notes += [f"stripped the {p!r} prefix from every key" for p in stripped]
        kind = source
        if source == "auto":
            naming = _first_fit(_candidates(config, meta, where), lambda c: detect_source(unwrapped, c))[1]
            kind = "seed" if meta.get("source_format") == "seed" and naming == "torch_ref" else naming
        names: TorchSource = "timm" if kind == "timm" else "torch_ref"

        def read(c: DarknetConfig) -> tuple[CanonicalStateDict, float | None]:
            rest, slope = split_prelu_slope(unwrapped, c) if names == "timm" else (unwrapped, None)
            return canonical_from_torch(rest, config=c, source=names), slope

        cfg, (state, prelu) = _first_fit(_candidates(config, meta, where), read)
        if location.kind == "hub_dir" and (meta.get("act_layer") == hub.TIMM_PRELU) != (prelu is not None):
            raise PortingError(
                f"{where}: config.json's act_layer is {meta.get('act_layer')!r} but the weights "
                f"{'hold' if prelu is not None else 'lack'} PReLU slopes; timm would refuse to load them"
            )
        if prelu is not None:
            notes.append(f"LeakyReLU slope {prelu} from the weights' timm PReLU slopes")
    head = keymap.head_width(state, cfg)
    if meta.get("num_classes") is not None and meta["num_classes"] != head:
        raise PortingError(f"{where} records {meta['num_classes']} classes, but its head has {head}")
    implied = IMPLIED.get(kind, Preprocessing()) if prelu is None else Preprocessing(leaky_slope=prelu)
    record = combine([(f"{where} records", _record(meta)), (f"the {kind} format implies", implied)], where)
    run, val = meta.get("run_config"), meta.get("val")
    return Loaded(state, head, record, kind, tuple(notes), cfg, location, dict(run) if run else None, checked,
                  dict(val) if val else None)  # fmt: skip


def _record(meta: Mapping[str, Any]) -> Preprocessing:
    return Preprocessing.from_json(meta.get("preprocessing"), "metadata", strict=False)[0]


def fresh_head(config: DarknetConfig, num_classes: int, seed: int) -> CanonicalStateDict:
    """A freshly initialised classifier in canonical form, reproducible from `seed` in every framework.

    torch.nn.Linear's distribution, U(-1/sqrt(in), 1/sqrt(in)) for weight and bias, drawn with numpy.
    """
    rng, bound = np.random.default_rng(seed), 1.0 / np.sqrt(config.width)
    unit = keymap.head_unit(config, num_classes)
    return {unit.torch_key(r): rng.uniform(-bound, bound, unit.torch_shape(r)).astype(np.float32)
            for r in keymap.DENSE_RULES}  # fmt: skip


def given_preprocessing(
    preprocessing: Preprocessing | Mapping[str, Any] | None = None,
    leaky_slope: float | None = None,
    class_names: Sequence[str] | None = None,
) -> list[tuple[str, Preprocessing]]:
    """The caller's own statements about the weights, each named as its option, for `combine`."""
    if isinstance(preprocessing, Mapping):
        preprocessing = Preprocessing.from_json(preprocessing, "preprocessing (--preprocessing)")[0]
    given = [("preprocessing (--preprocessing)", preprocessing or Preprocessing()),
             ("leaky_slope (--leaky-slope)", Preprocessing(leaky_slope=leaky_slope))]  # fmt: skip
    if class_names is not None:
        if isinstance(class_names, str) or not isinstance(class_names, Sequence):
            raise PortingError(f"class_names (--class-names) must be a list of names, got {class_names!r}")
        names = Preprocessing(class_names=tuple(class_names))  # validates them
        given.append(("class_names (--class-names)", names))
    return given


def load(path: str | os.PathLike | Location, options: LoadOptions = LoadOptions()) -> Loaded:
    """The weights any location names (porting.locations.ACCEPTED) in canonical form, with their record.

    options.config None: the architecture the location records, else the known one (darknet_arch.ARCHS) the tensors
    fit. num_classes None keeps the file's head (or none); a head-less file gets a fresh head (see fresh_head), and a
    head of another width is replaced by one (its class names dropped, with a note) unless reset_mismatched_head is
    False. leaky_slope, class_names and preprocessing (record fields) add to what the weights record or their format
    implies; one that contradicts it is a PortingError, as are class names whose count differs from the head.
    """
    config, seed = options.config, options.seed
    num_classes = check_num_classes(options.num_classes, "num_classes (--num-classes)")
    leaky_slope = check_leaky_slope(options.leaky_slope, "leaky_slope (--leaky-slope)")
    given = given_preprocessing(options.preprocessing, leaky_slope, options.class_names)
    location = path if isinstance(path, Location) else locate(path)
    loaded = _read(location, config, options.source)
    label, cfg = location.given, loaded.config
    state, classes, notes, head = dict(loaded.state), loaded.num_classes, list(loaded.notes), cfg.head_name()
    record = loaded.preprocessing
    if num_classes is not None and num_classes != classes:
        if classes is not None and not options.reset_mismatched_head:
            raise PortingError(
                f"size mismatch for {head}.weight: {label}'s head has {classes} classes, {num_classes} were requested "
                f"(expected shape ({num_classes}, {cfg.width}), got ({classes}, {cfg.width})); pass "
                f"--reset-head (reset_mismatched_head=True) to replace it with a freshly initialised head"
            )
        state.update(fresh_head(cfg, num_classes, seed))
        if classes is None:
            notes.append(f"{label} has no classifier head; {head} freshly initialised ({num_classes} classes, "
                         f"seed {seed})")  # fmt: skip
        else:
            notes.append(f"{label}'s {classes}-class head was replaced by a freshly initialised {num_classes}-class "
                         f"{head} (seed {seed})")  # fmt: skip
        if record.class_names is not None:
            notes.append(f"{label}'s {len(record.class_names)} class names belonged to the replaced head: dropped")
            record = record.without("class_names")
        classes = num_classes
    if classes is None:
        notes.append(
            f"{label} has no classifier head: build the model with num_classes=None, or pass num_classes to "
            "initialise one"
        )
    for name, statement in given:  # a wrong count is the clearer message for names that also differ
        statement.check_against(classes, cfg.in_channels, name)
    problems = contradictions([(f"{label} records or implies", record), *given])
    if problems:
        raise PortingError(
            f"{label}: the preprocessing given contradicts what the weights record or their format implies (they "
            "were trained that way; drop the option):\n  " + "\n  ".join(problems)
        )
    record = combine([(label, record), *given], label)
    record.check_against(classes, cfg.in_channels, label)
    if record.leaky_slope is None:
        notes.append(f"{label} records no leaky slope and its format implies none: pass the one it was trained with "
                     "(leaky_slope / --leaky-slope) to have it recorded")  # fmt: skip
    kept = classes == loaded.num_classes  # else a replaced head: convert the state; its metrics were the old head's
    same, metrics = (loaded.flax_variables, loaded.metrics) if kept else (None, None)
    return Loaded(state, classes, record, loaded.source_format, tuple(notes), cfg.with_slope(record.leaky_slope),
                  location, loaded.run_config, same, metrics)  # fmt: skip


def load_options(**options: Any) -> LoadOptions:
    """LoadOptions from keyword arguments; a TypeError naming the valid ones for any other (before any file is read)."""
    fields = [f.name for f in dataclasses.fields(LoadOptions)]
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise TypeError(f"unexpected option(s) {', '.join(unknown)}; the weights readers take {', '.join(fields)}")
    return LoadOptions(**options)


def load_flax_variables(path: str | os.PathLike | Location, **options: Any) -> Loaded:
    """The weights of ANY location (a run, a step, orbax, a Hub directory, a file), `.variables` in Flax layout;
    `options` are LoadOptions' fields (see `load`)."""
    return load(path, load_options(**options))
