"""torch_ref / seed / timm state_dicts <-> Flax variables, through the canonical state dict.

All functions are strict like `load_state_dict(strict=True)`: every missing and unexpected key and every shape
mismatch (shapes compared after the documented transpose) is reported in one PortingError. `num_classes` None
means "take the head from the tensors" (no head key: a backbone-only network).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from darknet_arch import DARKNET53, DarknetConfig
from porting import keymap
from porting.errors import LayoutMismatch, PortingError
from porting.state import (
    CanonicalStateDict,
    check_and_convert,
    check_counter,
    check_leaky_slope,
    check_num_classes,
    check_running_var,
    float32_slope,
    listing,
    shape_of,
    to_float32,
)

TorchSource = Literal["auto", "torch_ref", "seed", "timm"]
SOURCES: tuple[str, ...] = ("auto", "torch_ref", "seed", "timm")

# Wrappers whose prefix is stripped when every key carries it: DataParallel/DDP and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# A key unambiguously in timm's naming (the stem's conv).
TIMM_MARKER = "stem.conv1.conv.weight"


def check_source(source: str) -> str:
    """`source` if it is one of SOURCES, else PortingError."""
    if source not in SOURCES:
        raise PortingError(f"source must be one of {SOURCES}, got {source!r}")
    return source


def strip_wrapper_prefixes(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Drop a `module.` / `_orig_mod.` prefix carried by every key; returns the dict and what was stripped."""
    result, stripped = dict(state_dict), []
    for prefix in WRAPPER_PREFIXES:
        while result and all(isinstance(k, str) and k.startswith(prefix) for k in result):
            result = {k[len(prefix) :]: v for k, v in result.items()}
            stripped.append(prefix)
    return result, stripped


def detect_source(state_dict: Mapping[str, Any], config: DarknetConfig = DARKNET53) -> Literal["torch_ref", "timm"]:
    """'timm' or 'torch_ref' (= the seed's names) from the key names; PortingError when it cannot tell."""
    keys = {k for k in state_dict if isinstance(k, str)}
    stem = next(keymap.conv_units(config))
    is_timm = any(k.startswith(("stem.", "stages.", "head.")) for k in keys)
    is_ref = any(k.startswith(f"{stem.torch_prefix}.") or k.startswith(f"{config.blocks_name(0)}.") for k in keys)
    if is_timm != is_ref:
        return "timm" if is_timm else "torch_ref"
    found = "both" if is_timm else "neither"
    raise PortingError(
        f"cannot tell the naming of this state_dict: it has {found} timm keys (e.g. {TIMM_MARKER!r}) and "
        f"torch_ref/seed keys (e.g. {stem.torch_key(keymap.CONV_BN_RULES[0])!r}); pass source='timm' or 'torch_ref'"
    )


def _timm_to_torch_names(config: DarknetConfig) -> dict[str, str]:
    """timm key -> torch_ref key for every tensor and counter (the head's width does not change names)."""
    table = {}
    for unit in keymap.units(config, 1):
        table.update({unit.timm_key(rule): unit.torch_key(rule) for rule in unit.rules})
        if unit.kind == "conv_bn":
            torch_counter, timm_counter = unit.bn_counter_keys()
            table[timm_counter] = torch_counter
    return table


def _rename(state_dict: Mapping[str, Any], table: Mapping[str, str], naming: str) -> dict[str, Any]:
    unknown = [k for k in state_dict if k not in table]
    if unknown:
        raise PortingError(listing(f"unexpected keys for {naming} naming", unknown))
    return {table[k]: v for k, v in state_dict.items()}


def timm_to_torch_state_dict(state_dict: Mapping[str, Any], config: DarknetConfig = DARKNET53) -> dict[str, Any]:
    """Rename timm darknet53 keys (`stem.conv1.conv.weight`, `stages.2.blocks.7.conv2.bn.bias`, `head.fc.*`) to
    torch_ref's; values are kept as they are. Keys timm's darknet53 does not have raise PortingError."""
    return _rename(state_dict, _timm_to_torch_names(config), "timm darknet53")


def torch_to_timm_state_dict(state_dict: Mapping[str, Any], config: DarknetConfig = DARKNET53) -> dict[str, Any]:
    """The inverse of `timm_to_torch_state_dict`: torch_ref names to timm's darknet53 names."""
    return _rename(state_dict, {v: k for k, v in _timm_to_torch_names(config).items()}, "torch_ref")


def split_prelu_slope(
    state_dict: Mapping[str, Any], config: DarknetConfig = DARKNET53
) -> tuple[dict[str, Any], float | None]:
    """(the timm state_dict without its PReLU slopes, the one slope they hold), or (it, None) when it has none.

    A timm darknet53 built with act_layer="prelu" computes LeakyReLU with the slope each unit holds; Darknet-53 has
    one slope, so every unit must hold it, one element each, the same value.
    """
    keys = [unit.timm_act_key() for unit in keymap.conv_units(config)]
    found = [k for k in state_dict if k.endswith(f".{keymap.TIMM_ACT_WEIGHT}")]
    if not found:
        return dict(state_dict), None
    missing, unexpected = sorted(set(keys) - set(found)), sorted(set(found) - set(keys))
    if missing or unexpected:
        raise LayoutMismatch(
            f"timm PReLU slopes ({keymap.TIMM_ACT_WEIGHT}) must be in every conv unit or none: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    slopes = {}
    for key in keys:
        shape = shape_of(state_dict[key])
        if shape != (1,):  # what timm's nn.PReLU(num_parameters=1) holds and loads
            raise PortingError(f"{key} has shape {shape}; timm's one-slope PReLU holds shape (1,)")
        slopes[key] = float32_slope(float(to_float32(key, state_dict[key])[0]))
    if len(set(slopes.values())) != 1:
        first, other = keys[0], next(k for k in keys if slopes[k] != slopes[keys[0]])
        raise PortingError(
            f"timm PReLU slopes differ ({first}={slopes[first]}, {other}={slopes[other]}): a learned PReLU is not "
            "Darknet-53's one LeakyReLU slope"
        )
    slope = check_leaky_slope(slopes[keys[0]], f"{keys[0]} (the PReLU slope)")
    return {k: v for k, v in state_dict.items() if k not in slopes}, slope


def canonical_from_torch(
    state_dict: Mapping[str, Any],
    *,
    config: DarknetConfig = DARKNET53,
    num_classes: int | None = None,
    source: TorchSource = "auto",
) -> CanonicalStateDict:
    """Check a torch_ref/seed/timm state_dict strictly and return the canonical float32 state dict."""
    if not isinstance(state_dict, Mapping):
        raise PortingError(f"expected a state_dict (a mapping of names to tensors), got {type(state_dict).__name__}")
    bad_keys = [k for k in state_dict if not isinstance(k, str)]
    if bad_keys:
        raise PortingError(f"state_dict keys must be strings, got {bad_keys[:5]!r}")
    sd, _ = strip_wrapper_prefixes(state_dict)
    source = detect_source(sd, config) if check_source(source) == "auto" else source
    if source == "timm":
        sd = timm_to_torch_state_dict(sd, config)
    classes = keymap.head_width(sd, config) if num_classes is None else check_num_classes(num_classes)
    counters = [u.bn_counter_keys()[0] for u in keymap.conv_units(config)]
    canonical = check_and_convert(sd, keymap.expected_torch_shapes(config, classes),
                                  what="loading a torch_ref state_dict", optional=counters)  # fmt: skip
    for key in counters:
        if key in sd:
            check_counter(key, sd[key])
    check_running_var(canonical)
    return canonical


def canonical_to_flax(canonical: CanonicalStateDict, config: DarknetConfig = DARKNET53) -> dict[str, dict]:
    """Canonical state dict -> Flax variables {"params", "batch_stats"} (nested dicts of float32 numpy)."""
    variables: dict[str, dict] = {keymap.PARAMS: {}, keymap.BATCH_STATS: {}}
    for unit in keymap.units(config, keymap.head_width(canonical, config)):
        for rule in unit.rules:
            arr = canonical[unit.torch_key(rule)]
            if rule.transpose is not None:
                arr = np.ascontiguousarray(arr.transpose(rule.transpose))
            _set(variables, unit.flax_key(rule), arr)
    return variables


def flatten_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Nested mapping (dict or FrozenDict) -> {'params/conv1/conv/kernel': leaf}."""
    if not isinstance(variables, Mapping):
        raise PortingError(f"expected Flax variables (a mapping), got {type(variables).__name__}")
    flat: dict[str, Any] = {}
    for key, value in variables.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}/{k}": v for k, v in flatten_variables(value).items()})
        else:
            flat[str(key)] = value
    return flat


def canonical_from_flax(
    variables: Mapping[str, Any], *, config: DarknetConfig = DARKNET53, num_classes: int | None = None
) -> CanonicalStateDict:
    """Check Flax variables {"params", "batch_stats"} strictly and return the canonical state dict."""
    return checked_flax(variables, config=config, num_classes=num_classes)[1]


def checked_flax(
    variables: Mapping[str, Any], *, config: DarknetConfig = DARKNET53, num_classes: int | None = None
) -> tuple[dict[str, Any], CanonicalStateDict]:
    """Flax variables checked strictly, as (float32 numpy variables in Flax layout, the canonical state dict)."""
    flat = flatten_variables(variables)
    classes = keymap.head_width(flat, config, flax=True) if num_classes is None else check_num_classes(num_classes)
    shapes, notes, where = {}, {}, {}
    for unit in keymap.units(config, classes):
        for rule in unit.rules:
            path, torch_shape = "/".join(unit.flax_key(rule)), unit.torch_shape(rule)
            shapes[path] = torch_shape if rule.transpose is None else tuple(torch_shape[i] for i in rule.transpose)
            if rule.transpose is not None:
                notes[path] = f"torch {unit.torch_key(rule)} {torch_shape} transposed {rule.transpose}"
            where[path] = (unit, rule)
    converted = check_and_convert(flat, shapes, what="loading Flax variables", shape_note=notes)
    canonical: CanonicalStateDict = {}
    checked: dict[str, Any] = {keymap.PARAMS: {}, keymap.BATCH_STATS: {}}
    for path, arr in converted.items():  # in torch_ref's key order, whatever order the Flax dict had
        unit, rule = where[path]
        _set(checked, path.split("/"), arr)
        if rule.transpose is not None:
            arr = np.ascontiguousarray(arr.transpose(np.argsort(rule.transpose)))
        canonical[unit.torch_key(rule)] = arr
    check_running_var(canonical)
    return checked, canonical


def _set(tree: dict[str, Any], path: Sequence[str], value: Any) -> None:
    """tree[path[0]][path[1]]...[path[-1]] = value, making the inner dicts."""
    *parents, leaf = path
    for name in parents:
        tree = tree.setdefault(name, {})
    tree[leaf] = value


def canonical_to_torch(
    canonical: CanonicalStateDict, config: DarknetConfig = DARKNET53, num_batches_tracked: int = 0
) -> dict[str, Any]:
    """Canonical state dict -> torch_ref state_dict of torch tensors, with num_batches_tracked counters."""
    import torch  # lazily: the Flax-only directions never need it

    out: dict[str, Any] = {}
    for unit in keymap.units(config, keymap.head_width(canonical, config)):
        for rule in unit.rules:
            out[unit.torch_key(rule)] = torch.from_numpy(np.array(canonical[unit.torch_key(rule)], np.float32))
        if unit.kind == "conv_bn":
            out[unit.bn_counter_keys()[0]] = torch.tensor(num_batches_tracked, dtype=torch.long)
    return out


def torch_state_dict_to_flax(
    state_dict: Mapping[str, Any],
    *,
    config: DarknetConfig = DARKNET53,
    num_classes: int | None = None,
    source: TorchSource = "auto",
) -> dict[str, dict]:
    """A torch_ref/seed/timm state_dict -> Flax variables {"params", "batch_stats"} of float32 numpy arrays."""
    return canonical_to_flax(canonical_from_torch(state_dict, config=config, num_classes=num_classes, source=source),
                             config)  # fmt: skip


def flax_to_torch_state_dict(
    variables: Mapping[str, Any],
    *,
    config: DarknetConfig = DARKNET53,
    num_classes: int | None = None,
    num_batches_tracked: int = 0,
) -> dict[str, Any]:
    """Flax variables -> a torch_ref state_dict (torch tensors) that `load_state_dict(strict=True)` accepts."""
    canonical = canonical_from_flax(variables, config=config, num_classes=num_classes)
    return canonical_to_torch(canonical, config, num_batches_tracked)
