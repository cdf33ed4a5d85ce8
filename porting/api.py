"""Read any supported weights file into the canonical form, with the head and slope the caller asks for."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from darknet_arch import DARKNET53, DARKNET_LEAKY_SLOPE, SEED_LEAKY_SLOPE, DarknetConfig
from porting import files, keymap
from porting.darknet import read_darknet_weights
from porting.errors import PortingError
from porting.state import CanonicalStateDict, check_leaky_slope, check_num_classes
from porting.torch_flax import (
    canonical_from_flax,
    canonical_from_torch,
    canonical_to_flax,
    check_source,
    detect_source,
    strip_wrapper_prefixes,
)

# Slopes a format implies when the file records none: Darknet's 0.1; timm's darknet53 and the seed use 0.01.
IMPLIED_SLOPES = {"darknet": DARKNET_LEAKY_SLOPE, "timm": SEED_LEAKY_SLOPE, "seed": SEED_LEAKY_SLOPE}


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A weights file in canonical form, with what the file says about itself."""

    state: CanonicalStateDict
    num_classes: int | None  # of the head; None when there is none
    leaky_slope: float | None  # requested, recorded in metadata or implied by the format
    source_format: str  # torch_ref, seed, timm, flax_msgpack, orbax or darknet
    notes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class PortResult:
    """Flax variables read from a weights file, plus what the user must know about them."""

    variables: dict[str, Any]
    num_classes: int | None
    leaky_slope: float | None
    source_format: str
    notes: tuple[str, ...]


def _read(where: str, config: DarknetConfig, source: str) -> Loaded:
    """The file as it is: its tensors, head, recorded or implied slope, and format."""
    fmt = files.format_of(where)
    if check_source(source) != "auto" and fmt not in ("torch", "safetensors"):
        raise PortingError(f"source={source!r} names a PyTorch naming; {where!r} is a {fmt} file")
    if fmt == "darknet":
        weights = read_darknet_weights(where, config=config)
        return Loaded(weights.state, weights.num_classes, DARKNET_LEAKY_SLOPE, "darknet")
    if fmt in ("msgpack", "orbax"):
        variables, meta, notes = files.read_flax_file(where)
        state = canonical_from_flax(variables, config=config)
        kind = "flax_msgpack" if fmt == "msgpack" else "orbax"
        return Loaded(state, keymap.head_width(state, config), meta.get("leaky_slope"), kind, tuple(notes))
    raw, meta = files.read_torch_file(where)
    unwrapped, stripped = strip_wrapper_prefixes(raw)
    notes = tuple(f"stripped the {p!r} prefix from every key" for p in stripped)
    kind = source
    if source == "auto":
        naming = detect_source(unwrapped, config)
        kind = "seed" if meta.get("source_format") == "seed" and naming == "torch_ref" else naming
    state = canonical_from_torch(unwrapped, config=config, source="timm" if kind == "timm" else "torch_ref")
    slope = meta.get("leaky_slope", IMPLIED_SLOPES.get(kind))
    return Loaded(state, keymap.head_width(state, config), slope, kind, notes)


def fresh_head(config: DarknetConfig, num_classes: int, seed: int) -> CanonicalStateDict:
    """A freshly initialised classifier in canonical form, reproducible from `seed` in every framework.

    torch.nn.Linear's distribution, U(-1/sqrt(in), 1/sqrt(in)) for weight and bias, drawn with numpy.
    """
    rng, bound = np.random.default_rng(seed), 1.0 / np.sqrt(config.width)
    unit = keymap.head_unit(config, num_classes)
    return {unit.torch_key(r): rng.uniform(-bound, bound, unit.torch_shape(r)).astype(np.float32)
            for r in keymap.DENSE_RULES}  # fmt: skip


def load_canonical(
    path: str | os.PathLike,
    *,
    config: DarknetConfig = DARKNET53,
    source: str = "auto",
    num_classes: int | None = None,
    leaky_slope: float | None = None,
    seed: int = 0,
    reset_mismatched_head: bool = True,
) -> Loaded:
    """Any supported file (format chosen by path) as a canonical state dict with the requested head and slope.

    num_classes None keeps the file's head (or none); a head-less file gets a fresh head (see fresh_head), and a
    head of another width is replaced by one (with a note) unless reset_mismatched_head=False.
    leaky_slope None keeps what the file records or implies.
    """
    num_classes = check_num_classes(num_classes, "num_classes (--num-classes)")
    leaky_slope = check_leaky_slope(leaky_slope, "leaky_slope (--leaky-slope)")
    where = os.fspath(path)
    loaded = _read(where, config, source)
    label = os.path.basename(os.path.normpath(where))
    state, classes, notes, head = dict(loaded.state), loaded.num_classes, list(loaded.notes), config.head_name()
    if num_classes is not None and num_classes != classes:
        if classes is not None and not reset_mismatched_head:
            raise PortingError(
                f"size mismatch for {head}.weight: {label}'s head has {classes} classes, {num_classes} were requested "
                f"(expected shape ({num_classes}, {config.width}), got ({classes}, {config.width})); pass "
                f"--reset-head (reset_mismatched_head=True) to replace it with a freshly initialised head"
            )
        state.update(fresh_head(config, num_classes, seed))
        if classes is None:
            notes.append(f"{label} has no classifier head; {head} freshly initialised ({num_classes} classes, "
                         f"seed {seed})")  # fmt: skip
        else:
            notes.append(f"{label}'s {classes}-class head was replaced by a freshly initialised {num_classes}-class "
                         f"{head} (seed {seed})")  # fmt: skip
        classes = num_classes
    if classes is None:
        notes.append(
            f"{label} has no classifier head: build the model with num_classes=None, or pass num_classes to "
            "initialise one"
        )
    slope = loaded.leaky_slope
    if leaky_slope is not None:
        if slope is not None and leaky_slope != slope:
            notes.append(f"leaky_slope {leaky_slope} requested although the file records/implies {slope}")
        slope = leaky_slope
    return Loaded(state, classes, slope, loaded.source_format, tuple(notes))


def load_flax_variables(
    path: str | os.PathLike,
    *,
    num_classes: int | None = None,
    leaky_slope: float | None = None,
    source: str = "auto",
    seed: int = 0,
    config: DarknetConfig = DARKNET53,
    reset_mismatched_head: bool = True,
) -> PortResult:
    """Flax variables from ANY supported file (torch, safetensors, msgpack, orbax, Darknet); see load_canonical."""
    loaded = load_canonical(path, config=config, source=source, num_classes=num_classes, leaky_slope=leaky_slope,
                            seed=seed, reset_mismatched_head=reset_mismatched_head)  # fmt: skip
    variables = canonical_to_flax(loaded.state, config)
    return PortResult(variables, loaded.num_classes, loaded.leaky_slope, loaded.source_format, loaded.notes)
