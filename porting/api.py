"""Read any supported weights file into the canonical form, and the high-level entry points built on it."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from darknet_arch import DARKNET53, DARKNET_LEAKY_SLOPE, SEED_LEAKY_SLOPE, DarknetConfig
from porting import files
from porting.darknet import DarknetHeader, read_darknet_weights
from porting.errors import PortingError
from porting.state import CanonicalStateDict
from porting.torch_flax import (
    SOURCES,
    canonical_from_flax,
    canonical_from_torch,
    canonical_to_flax,
    detect_source,
    strip_wrapper_prefixes,
)

# Slopes a format implies when the file records none: Darknet's 0.1; timm's darknet53 and the seed use 0.01.
IMPLIED_SLOPES = {"darknet": DARKNET_LEAKY_SLOPE, "timm": SEED_LEAKY_SLOPE, "seed": SEED_LEAKY_SLOPE}


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A weights file in canonical form, with what the file says about itself."""

    state: CanonicalStateDict
    num_classes: int | None  # of the file's head; None when it has none
    leaky_slope: float | None  # recorded in metadata or implied by the format
    source_format: str  # torch_ref, seed, timm, flax_msgpack, orbax or darknet
    notes: tuple[str, ...] = ()
    darknet_header: DarknetHeader | None = None


@dataclasses.dataclass(frozen=True)
class PortResult:
    """Flax variables read from a weights file, plus what the user must know about them."""

    variables: dict[str, Any]
    num_classes: int | None
    leaky_slope: float | None
    source_format: str
    notes: tuple[str, ...]


def _head_of(state: CanonicalStateDict, config: DarknetConfig) -> int | None:
    weight = state.get(f"{config.head_name()}.weight")
    return None if weight is None else int(weight.shape[0])


def load_canonical(path: str | os.PathLike, *, config: DarknetConfig = DARKNET53, source: str = "auto") -> Loaded:
    """Read any supported file (format chosen by path) into the canonical torch_ref-named float32 state dict."""
    if source not in SOURCES:
        raise PortingError(f"source must be one of {SOURCES}, got {source!r}")
    where = os.fspath(path)
    fmt = files.format_of(where)
    if fmt not in ("torch", "safetensors") and source != "auto":
        raise PortingError(f"source={source!r} names a PyTorch naming; {where!r} is a {fmt} file")
    if fmt == "darknet":
        if not os.path.isfile(where):
            raise PortingError(f"{where!r} does not exist or is not a file")
        weights = read_darknet_weights(where, config=config)
        return Loaded(weights.state, weights.num_classes, DARKNET_LEAKY_SLOPE, "darknet", (), weights.header)
    if fmt in ("msgpack", "orbax"):
        variables, meta, notes = files.read_flax_file(where)
        state = canonical_from_flax(variables, config=config)
        kind = "flax_msgpack" if fmt == "msgpack" else "orbax"
        return Loaded(state, _head_of(state, config), meta.get("leaky_slope"), kind, tuple(notes))
    raw, meta = files.read_torch_file(where)
    if not hasattr(raw, "items"):
        raise PortingError(f"{where}: expected a state_dict, got {type(raw).__name__}")
    unwrapped, stripped = strip_wrapper_prefixes(raw)
    notes = [f"stripped the {p!r} prefix from every key" for p in stripped]
    if source == "auto":
        recorded = meta.get("source_format")
        naming = detect_source(unwrapped, config)
        kind = recorded if recorded == "seed" and naming == "torch_ref" else naming
    else:
        kind = source
    state = canonical_from_torch(unwrapped, config=config, source="timm" if kind == "timm" else "torch_ref")
    slope = meta.get("leaky_slope", IMPLIED_SLOPES.get(kind))
    return Loaded(state, _head_of(state, config), slope, kind, tuple(notes))


def fresh_head(config: DarknetConfig, num_classes: int, seed: int, framework: str = "flax") -> CanonicalStateDict:
    """A freshly initialised classifier in canonical form: Flax Dense's init (or torch Linear's) with `seed`."""
    head = config.head_name()
    if framework == "torch":
        import torch

        generator = torch.Generator().manual_seed(seed)
        # torch.nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias.
        bound = 1.0 / np.sqrt(config.width)
        weight = (torch.rand(num_classes, config.width, generator=generator) * 2 - 1) * bound
        bias = (torch.rand(num_classes, generator=generator) * 2 - 1) * bound
        return {f"{head}.weight": weight.numpy(), f"{head}.bias": bias.numpy()}
    import flax.linen as nn
    import jax

    params = nn.Dense(num_classes).init(jax.random.PRNGKey(seed), np.zeros((1, config.width), np.float32))["params"]
    return {
        f"{head}.weight": np.ascontiguousarray(np.asarray(params["kernel"], np.float32).T),
        f"{head}.bias": np.asarray(params["bias"], np.float32),
    }


def adapt_head(
    loaded: Loaded,
    num_classes: int | None,
    *,
    config: DarknetConfig,
    seed: int,
    reset_mismatched_head: bool,
    framework: str = "flax",
    label: str = "the file",
) -> tuple[CanonicalStateDict, int | None, list[str]]:
    """Give the state the requested head: keep the file's, add a fresh one, or (if allowed) replace it."""
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):  # fmt: skip
        raise PortingError(f"num_classes must be a positive int or None, got {num_classes!r}")
    state, notes = dict(loaded.state), []
    have = loaded.num_classes
    if num_classes is None or num_classes == have:
        return state, have, notes
    head = config.head_name()
    if have is None:
        state.update(fresh_head(config, num_classes, seed, framework))
        notes.append(f"{label} has no classifier head; {head} freshly initialised ({num_classes} classes, seed {seed})")
        return state, num_classes, notes
    if not reset_mismatched_head:
        raise PortingError(
            f"size mismatch for {head}.weight: {label}'s head has {have} classes, {num_classes} were requested "
            f"(expected shape ({num_classes}, {config.width}), got ({have}, {config.width})); pass "
            f"--reset-head (reset_mismatched_head=True) to replace it with a freshly initialised head"
        )
    state.update(fresh_head(config, num_classes, seed, framework))
    notes.append(
        f"{label}'s {have}-class head was replaced by a freshly initialised {num_classes}-class {head} (seed {seed})"
    )
    return state, num_classes, notes


def resolve_slope(file_slope: float | None, requested: float | None, notes: list[str]) -> float | None:
    """The user's slope wins; say so when it contradicts what the file records or implies."""
    if requested is None:
        return file_slope
    if file_slope is not None and float(requested) != float(file_slope):
        notes.append(f"leaky_slope {requested} requested although the file records/implies {file_slope}")
    return float(requested)


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
    """Flax variables from ANY supported file (torch, safetensors, msgpack, orbax, Darknet).

    num_classes None keeps the file's head (or none); a head-less file with num_classes gets a fresh head, and
    a head of another width is replaced by a fresh one (a note says so) unless reset_mismatched_head=False.
    """
    loaded = load_canonical(path, config=config, source=source)
    state, classes, notes = adapt_head(
        loaded,
        num_classes,
        config=config,
        seed=seed,
        reset_mismatched_head=reset_mismatched_head,
        label=os.path.basename(os.path.normpath(os.fspath(path))),
    )
    notes = list(loaded.notes) + notes
    slope = resolve_slope(loaded.leaky_slope, leaky_slope, notes)
    if loaded.num_classes is None and classes is None:
        notes.append(
            f"{os.path.basename(os.path.normpath(os.fspath(path)))} has no classifier head: build the model "
            "with num_classes=None, or pass num_classes to initialise one"
        )
    return PortResult(canonical_to_flax(state, config), classes, slope, loaded.source_format, tuple(notes))
