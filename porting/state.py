"""Strict checks shared by every direction: keys, shapes (after the documented transpose), dtypes, finiteness.

The canonical form every reader produces and every writer takes is a "canonical state dict": torch_ref
(seed) key names -> C-contiguous float32 numpy arrays in torch layout, without num_batches_tracked.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from darknet_arch import DARKNET_LEAKY_SLOPE, SEED_LEAKY_SLOPE
from porting.errors import LayoutMismatch, PortingError

CanonicalStateDict = dict[str, np.ndarray]

# A float dtype numpy reports with kind "V" (ml_dtypes), not "f".
BFLOAT16 = "bfloat16"
# Keep long error messages readable: list this many keys per category, then a count.
MAX_LISTED = 40


def _describe_type(value: Any) -> str:
    dtype = getattr(value, "dtype", None)
    return f"{type(value).__name__} of dtype {dtype}" if dtype is not None else type(value).__name__


def to_float32(key: str, value: Any) -> np.ndarray:
    """`value` (torch tensor, numpy or jax array) as a float32 numpy array, or PortingError naming `key`."""
    if hasattr(value, "detach") and hasattr(value, "is_floating_point"):  # torch.Tensor, without importing torch
        if not value.is_floating_point():
            raise PortingError(f"{key}: expected a floating-point tensor, got dtype {value.dtype}")
        arr = value.detach().cpu().float().numpy()  # .float() of a float32 tensor is the tensor itself, no copy
    elif hasattr(value, "dtype") and hasattr(value, "shape"):
        arr = np.asarray(value)
        if arr.dtype.kind != "f" and arr.dtype.name != BFLOAT16:
            raise PortingError(f"{key}: expected a floating-point array, got dtype {arr.dtype}")
    else:
        raise PortingError(f"{key}: expected a tensor or array, got {_describe_type(value)}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.count_nonzero(np.isfinite(arr))
    if finite != arr.size:
        raise PortingError(f"{key}: contains {arr.size - finite} NaN or Inf value(s) of {arr.size}")
    return arr


def shape_of(value: Any) -> tuple[int, ...] | None:
    """The shape of an array-like value, None for anything else."""
    shape = getattr(value, "shape", None)
    try:
        return tuple(int(s) for s in shape) if shape is not None else None
    except TypeError:
        return None


def listing(title: str, keys: list[str]) -> str:
    """'title (N): 'a', 'b' ... and M more', at most MAX_LISTED keys shown."""
    shown = ", ".join(repr(k) for k in keys[:MAX_LISTED])
    more = f" ... and {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else ""
    return f"{title} ({len(keys)}): {shown}{more}"


def check_and_convert(
    found: Mapping[str, Any],
    expected: Mapping[str, tuple[int, ...]],
    *,
    what: str,
    optional: Iterable[str] = (),
    shape_note: Mapping[str, str] | None = None,
) -> CanonicalStateDict:
    """The `expected` keys of `found` as float32 numpy, after ONE PortingError listing every problem.

    Like load_state_dict(strict=True): all missing keys, all unexpected keys and every shape mismatch are reported
    together. `optional` keys may be present or absent (num_batches_tracked); `shape_note` explains a key's
    expected layout (e.g. "torch conv1.0.weight (32, 3, 3, 3) transposed (2, 3, 1, 0)").
    """
    optional = set(optional)
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected and k not in optional]
    problems = [listing("missing keys", missing)] if missing else []
    problems += [listing("unexpected keys", unexpected)] if unexpected else []
    for key, want in expected.items():
        got = shape_of(found[key]) if key in found else tuple(want)
        if got is None:
            problems.append(f"{key}: expected a tensor or array of shape {want}, got {_describe_type(found[key])}")
        elif got != tuple(want):
            note = f" ({shape_note[key]})" if shape_note and key in shape_note else ""
            problems.append(f"size mismatch for {key}: expected shape {tuple(want)}{note}, got {got}")
    if problems:
        raise LayoutMismatch(f"error(s) in {what}:\n  " + "\n  ".join(problems))
    return {k: to_float32(k, found[k]) for k in expected}


def check_leaky_slope(value: Any, what: str = "leaky_slope") -> float | None:
    """A LeakyReLU slope: a finite number, or None for "not given"; PortingError otherwise (NaN, Inf, text)."""
    finite = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if value is not None and not finite:
        raise PortingError(
            f"{what} must be a finite number such as {DARKNET_LEAKY_SLOPE} (Darknet) or {SEED_LEAKY_SLOPE} (the seed), "
            f"got {value!r}"
        )
    return None if value is None else float(value)


def float32_slope(slope: float) -> float:
    """The slope a float32 tensor holds, as its shortest decimal (0.1, not 0.10000000149): what the models compute
    with (their activations are float32), so the slope a record states for weights stored as float32."""
    return float(np.format_float_positional(np.float32(slope), unique=True))


def check_num_classes(value: Any, what: str = "num_classes") -> int | None:
    """A head width: a positive int, or None for "not given" (take it from the file); PortingError otherwise."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise PortingError(f"{what} must be a positive int (or None: the file's own head), got {value!r}")
    return value


def check_counter(key: str, value: Any) -> None:
    """A num_batches_tracked entry must be an integer scalar (it is dropped, Flax and Darknet have none)."""
    shape = shape_of(value)
    if shape not in ((), (1,)) or "int" not in str(getattr(value, "dtype", "")):
        raise PortingError(f"{key}: expected an integer scalar counter, got {_describe_type(value)} of shape {shape}")


def check_running_var(state: CanonicalStateDict) -> None:
    """A negative running variance makes sqrt(var + eps) NaN: refuse it, naming the key."""
    for key, arr in state.items():
        if key.endswith("running_var") and arr.size and float(arr.min()) < 0:
            raise PortingError(f"{key}: running variance has negative values (min {float(arr.min())})")


def weights_sha256(variables: dict[str, Any]) -> str:
    """SHA-256 over every array in path order: path, dtype, shape and little-endian C-order bytes of each.

    Recorded with the weights wherever they are written (export sidecars, training checkpoints) and checked when
    a checkpoint is read: a byte flipped on disk becomes an error, never other weights.
    """
    from flax import traverse_util

    digest = hashlib.sha256()
    for key, value in sorted(traverse_util.flatten_dict(variables, sep="/").items()):
        a = np.ascontiguousarray(value)
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        digest.update(f"{key}|{a.dtype.str}|{a.shape}\n".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()
