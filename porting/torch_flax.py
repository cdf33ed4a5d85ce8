"""torch_ref / seed / timm state_dicts <-> Flax variables, through the canonical state dict.

All functions are strict like `load_state_dict(strict=True)`: every missing and unexpected key and every shape
mismatch (shapes compared after the documented transpose) is reported in one PortingError.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from darknet_arch import DARKNET53, DarknetConfig
from porting import keymap
from porting.errors import PortingError
from porting.state import (
    CanonicalStateDict,
    check_counter,
    check_keys_and_shapes,
    check_running_var,
    convert_all,
    shape_of,
)

Infer = Literal["infer"]
INFER: Infer = "infer"
TorchSource = Literal["auto", "torch_ref", "seed", "timm"]
SOURCES: tuple[str, ...] = ("auto", "torch_ref", "seed", "timm")

# Wrappers whose prefix is stripped when every key carries it: DataParallel/DDP and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# A key unambiguously in timm's naming (the stem's conv) and one in torch_ref's.
TIMM_MARKER = "stem.conv1.conv.weight"


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
    if is_timm and not is_ref:
        return "timm"
    if is_ref and not is_timm:
        return "torch_ref"
    found = "both" if is_timm else "neither"
    raise PortingError(
        f"cannot tell the naming of this state_dict: it has {found} timm keys (e.g. {TIMM_MARKER!r}) and "
        f"torch_ref/seed keys (e.g. {stem.torch_key(keymap.CONV_BN_RULES[0])!r}); pass source='timm' or 'torch_ref'"
    )


def _timm_rename_table(config: DarknetConfig, num_classes: int | None) -> dict[str, str]:
    table = {}
    for unit in keymap.units(config, num_classes):
        for rule in unit.rules:
            table[unit.timm_key(rule)] = unit.torch_key(rule)
        if unit.kind == "conv_bn":
            torch_counter, timm_counter = unit.bn_counter_keys()
            table[timm_counter] = torch_counter
    return table


def _head_classes(state_dict: Mapping[str, Any], weight_key: str, out_axis: int) -> int | None:
    shape = shape_of(state_dict.get(weight_key))
    return shape[out_axis] if shape is not None and len(shape) == 2 else None


def timm_to_torch_state_dict(state_dict: Mapping[str, Any], config: DarknetConfig = DARKNET53) -> dict[str, Any]:
    """Rename timm darknet53 keys (`stem.conv1.conv.weight`, `stages.2.blocks.7.conv2.bn.bias`, `head.fc.*`) to
    torch_ref's; values are kept as they are. Keys timm's darknet53 does not have raise PortingError."""
    table = _timm_rename_table(config, _head_classes(state_dict, "head.fc.weight", 0) or 1)
    unknown = [k for k in state_dict if k not in table]
    if unknown:
        shown = ", ".join(repr(k) for k in unknown[:20])
        raise PortingError(f"unexpected keys for timm darknet53 naming ({len(unknown)}): {shown}")
    return {table[k]: v for k, v in state_dict.items()}


def torch_to_timm_state_dict(state_dict: Mapping[str, Any], config: DarknetConfig = DARKNET53) -> dict[str, Any]:
    """The inverse of `timm_to_torch_state_dict`: torch_ref names to timm's darknet53 names."""
    inverse = {v: k for k, v in _timm_rename_table(config, _head_classes(state_dict, "fc.weight", 0) or 1).items()}
    unknown = [k for k in state_dict if k not in inverse]
    if unknown:
        shown = ", ".join(repr(k) for k in unknown[:20])
        raise PortingError(f"unexpected keys for torch_ref naming ({len(unknown)}): {shown}")
    return {inverse[k]: v for k, v in state_dict.items()}


def _resolve_num_classes(requested: int | Infer | None, inferred: int | None) -> int | None:
    if requested == INFER:
        return inferred
    if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int) or requested < 1):
        raise PortingError(f"num_classes must be a positive int, None or 'infer', got {requested!r}")
    return requested


def canonical_from_torch(
    state_dict: Mapping[str, Any],
    *,
    config: DarknetConfig = DARKNET53,
    num_classes: int | Infer | None = INFER,
    source: TorchSource = "auto",
) -> CanonicalStateDict:
    """Check a torch_ref/seed/timm state_dict strictly and return the canonical float32 state dict.

    num_classes 'infer' takes the head from `fc.weight` (no such key: backbone only).
    """
    if not isinstance(state_dict, Mapping):
        raise PortingError(f"expected a state_dict (a mapping of names to tensors), got {type(state_dict).__name__}")
    bad_keys = [k for k in state_dict if not isinstance(k, str)]
    if bad_keys:
        raise PortingError(f"state_dict keys must be strings, got {bad_keys[:5]!r}")
    if source not in SOURCES:
        raise PortingError(f"source must be one of {SOURCES}, got {source!r}")
    sd, _ = strip_wrapper_prefixes(state_dict)
    if source == "auto":
        source = detect_source(sd, config)
    if source == "timm":
        sd = timm_to_torch_state_dict(sd, config)
    head = config.head_name()
    classes = _resolve_num_classes(num_classes, _head_classes(sd, f"{head}.weight", 0))
    expected = keymap.expected_torch_shapes(config, classes)
    counters = [u.bn_counter_keys()[0] for u in keymap.conv_units(config)]
    check_keys_and_shapes(sd, expected, what="loading a torch_ref state_dict", optional=counters)
    for key in counters:
        if key in sd:
            check_counter(key, sd[key])
    canonical = convert_all(sd, expected)
    check_running_var(canonical)
    return canonical


def canonical_to_flax(canonical: CanonicalStateDict, config: DarknetConfig = DARKNET53) -> dict[str, dict]:
    """Canonical state dict -> Flax variables {"params", "batch_stats"} (nested dicts of float32 numpy)."""
    head_classes = _head_classes(canonical, f"{config.head_name()}.weight", 0)
    variables: dict[str, dict] = {keymap.PARAMS: {}, keymap.BATCH_STATS: {}}
    for unit in keymap.units(config, head_classes):
        for rule in unit.rules:
            arr = canonical[unit.torch_key(rule)]
            if rule.transpose is not None:
                arr = np.ascontiguousarray(arr.transpose(rule.transpose))
            node = variables
            *parents, leaf = unit.flax_key(rule)
            for name in parents:
                node = node.setdefault(name, {})
            node[leaf] = arr
    return variables


def flatten_variables(variables: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
    """Nested mapping (dict or FrozenDict) -> {path tuple: leaf}."""
    flat: dict[tuple[str, ...], Any] = {}

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, (*path, str(k)))
        else:
            flat[path] = node

    if not isinstance(variables, Mapping):
        raise PortingError(f"expected Flax variables (a mapping), got {type(variables).__name__}")
    walk(variables, ())
    return flat


def flax_expected(config: DarknetConfig, num_classes: int | None) -> tuple[dict[str, tuple], dict[str, str], dict]:
    """Expected Flax paths ('params/conv1/conv/kernel') with shapes, layout notes, and path -> (unit, rule)."""
    shapes, notes, where = {}, {}, {}
    for unit in keymap.units(config, num_classes):
        for rule in unit.rules:
            path = "/".join(unit.flax_key(rule))
            torch_shape = unit.torch_shape(rule)
            if rule.transpose is None:
                shapes[path] = torch_shape
            else:
                shapes[path] = tuple(torch_shape[i] for i in rule.transpose)
                notes[path] = f"torch {unit.torch_key(rule)} {torch_shape} transposed {rule.transpose}"
            where[path] = (unit, rule)
    return shapes, notes, where


def canonical_from_flax(
    variables: Mapping[str, Any], *, config: DarknetConfig = DARKNET53, num_classes: int | Infer | None = INFER
) -> CanonicalStateDict:
    """Check Flax variables {"params", "batch_stats"} strictly and return the canonical state dict."""
    flat = {"/".join(k): v for k, v in flatten_variables(variables).items()}
    head_kernel = f"{keymap.PARAMS}/{config.head_name()}/kernel"
    classes = _resolve_num_classes(num_classes, _head_classes(flat, head_kernel, 1))
    shapes, notes, where = flax_expected(config, classes)
    check_keys_and_shapes(flat, shapes, what="loading Flax variables", shape_note=notes)
    converted = convert_all(flat, shapes)
    canonical = {}
    for path, arr in converted.items():
        unit, rule = where[path]
        if rule.transpose is not None:
            arr = np.ascontiguousarray(arr.transpose(np.argsort(rule.transpose)))
        canonical[unit.torch_key(rule)] = arr
    # Keep torch_ref's key order whatever order the Flax dict had.
    canonical = {k: canonical[k] for k in keymap.expected_torch_shapes(config, classes)}
    check_running_var(canonical)
    return canonical


def canonical_to_torch(
    canonical: CanonicalStateDict, config: DarknetConfig = DARKNET53, num_batches_tracked: int = 0
) -> dict[str, Any]:
    """Canonical state dict -> torch_ref state_dict of torch tensors, with num_batches_tracked counters."""
    import torch  # lazily: the Flax-only directions never need it

    head_classes = _head_classes(canonical, f"{config.head_name()}.weight", 0)
    out: dict[str, Any] = {}
    for unit in keymap.units(config, head_classes):
        for rule in unit.rules:
            out[unit.torch_key(rule)] = torch.from_numpy(np.array(canonical[unit.torch_key(rule)], np.float32))
        if unit.kind == "conv_bn":
            out[unit.bn_counter_keys()[0]] = torch.tensor(num_batches_tracked, dtype=torch.long)
    return out


def torch_state_dict_to_flax(
    state_dict: Mapping[str, Any],
    *,
    config: DarknetConfig = DARKNET53,
    num_classes: int | Infer | None = INFER,
    source: TorchSource = "auto",
) -> dict[str, dict]:
    """A torch_ref/seed/timm state_dict -> Flax variables {"params", "batch_stats"} of float32 numpy arrays."""
    return canonical_to_flax(canonical_from_torch(state_dict, config=config, num_classes=num_classes, source=source),
                             config)  # fmt: skip


def flax_to_torch_state_dict(
    variables: Mapping[str, Any],
    *,
    config: DarknetConfig = DARKNET53,
    num_classes: int | Infer | None = INFER,
    num_batches_tracked: int = 0,
) -> dict[str, Any]:
    """Flax variables -> a torch_ref state_dict (torch tensors) that `load_state_dict(strict=True)` accepts."""
    canonical = canonical_from_flax(variables, config=config, num_classes=num_classes)
    return canonical_to_torch(canonical, config, num_batches_tracked)
