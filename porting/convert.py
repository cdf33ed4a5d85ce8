"""File-to-file conversions (the `port-weights` subcommands) and the --check comparison of both models."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable

import numpy as np

from darknet_arch import DARKNET53, DARKNET_LEAKY_SLOPE, DarknetConfig
from porting import atomic, files, keymap
from porting.api import Loaded, load_canonical
from porting.darknet import write_darknet_weights
from porting.errors import PortingError
from porting.state import CanonicalStateDict
from porting.torch_flax import canonical_to_flax, canonical_to_torch

DIRECTIONS: dict[str, tuple[str, str]] = {
    f"{a}2{b}": (a, b) for a in files.SIDE_HELP for b in files.SIDE_HELP if a != b
}  # torch2flax: SRC side, DST side
CHECK_BATCH = 2


def direction_of(src: str | os.PathLike, dst: str | os.PathLike, expected: str | None = None) -> str:
    """The direction ('torch2flax') the paths' suffixes give; PortingError if it is none or not `expected`."""
    if expected is None:
        sides = [files.FORMAT_SIDES[files.format_of(p)] for p in (src, dst)]
        if sides[0] == sides[1]:
            raise PortingError(f"SRC and DST are both {sides[0]} files; port-weights converts between frameworks")
        return "2".join(sides)
    if expected not in DIRECTIONS:
        raise PortingError(f"unknown direction {expected!r}; expected one of {', '.join(DIRECTIONS)}")
    for role, path, side in zip(("SRC", "DST"), (src, dst), DIRECTIONS[expected], strict=True):
        files.check_side(path, side, f"{expected}: {role}")
    return expected


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    direction: str | None = None,
    num_classes: int | None = None,
    leaky_slope: float | None = None,
    source: str = "auto",
    seed: int = 0,
    force: bool = False,
    reset_head: bool = False,
    config: DarknetConfig = DARKNET53,
) -> Loaded:
    """Convert SRC to DST, the formats taken from their suffixes (and checked against `direction` if given).

    DST is written atomically, never half. A head-less SRC with num_classes gets a fresh head; a head of another
    width is an error unless reset_head. Returns what was written.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    dst_side = DIRECTIONS[direction_of(src, dst, direction)][1]
    atomic.check_destination(dst, force)
    if os.path.abspath(src) == os.path.abspath(dst):
        raise PortingError(f"SRC and DST are the same path {src!r}")
    loaded = load_canonical(src, config=config, source=source, num_classes=num_classes, leaky_slope=leaky_slope,
                            seed=seed, reset_mismatched_head=reset_head)  # fmt: skip
    meta = {"num_classes": loaded.num_classes, "leaky_slope": loaded.leaky_slope, "source_format": loaded.source_format}
    if dst_side == "torch":
        files.write_torch_file(dst, canonical_to_torch(loaded.state, config), meta, force)
    elif dst_side == "flax":
        files.write_flax_file(dst, canonical_to_flax(loaded.state, config), meta, force)
    else:
        write_darknet_weights(dst, loaded.state, config=config, force=force)
        note = f"Darknet files record no metadata: the head follows from the size, the slope is {DARKNET_LEAKY_SLOPE}"
        loaded = dataclasses.replace(loaded, notes=(*loaded.notes, note))
    return loaded


@functools.lru_cache(maxsize=4)
def _flax_forward(config: DarknetConfig, num_classes: int | None, leaky_slope: float | None) -> Callable:
    """One jitted function giving (logits, feature maps), compiled once per architecture."""
    import jax

    import flax_darknet

    model = flax_darknet.Darknet53(num_classes, leaky_slope, config)
    return jax.jit(lambda v, x: (model.apply(v, x), model.apply(v, x, return_features=True)))


def compare_models(
    torch_state: CanonicalStateDict,
    flax_state: CanonicalStateDict,
    *,
    config: DarknetConfig = DARKNET53,
    leaky_slope: float | None = None,
    image_size: int | None = None,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Run torch_ref (on `torch_state`) and Flax (on `flax_state`) on one random batch in eval mode.

    Returns {"logits" (or "pooled"), "stride8", ...: (max |torch - flax|, max |torch|)}.
    """
    import torch

    import torch_ref

    num_classes = keymap.head_width(torch_state, config)
    size = image_size or 2 * config.total_stride
    x = np.random.default_rng(seed).standard_normal((CHECK_BATCH, config.in_channels, size, size), np.float32)
    tmodel = torch_ref.Darknet53(num_classes, leaky_slope, config).eval()
    tmodel.load_state_dict(canonical_to_torch(torch_state, config), strict=True)
    with torch.no_grad():
        tx = torch.from_numpy(x)
        t_out = {"logits" if num_classes else "pooled": tmodel(tx).numpy()}
        t_out.update({k: v.permute(0, 2, 3, 1).numpy() for k, v in tmodel.forward_features(tx).items()})
    variables = canonical_to_flax(flax_state, config)
    logits, feats = _flax_forward(config, num_classes, leaky_slope)(variables, x.transpose(0, 2, 3, 1))
    f_out = {"logits" if num_classes else "pooled": np.asarray(logits), **{k: np.asarray(v) for k, v in feats.items()}}
    return {k: (float(np.max(np.abs(t_out[k] - f_out[k]))), float(np.max(np.abs(t_out[k])))) for k in t_out}


def check_conversion(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    leaky_slope: float | None = None,
    source: str = "auto",
    config: DarknetConfig = DARKNET53,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """After a conversion: torch_ref runs the torch-side file, Flax the Flax-side one (Darknet: whichever is left)."""
    src_side, dst_side = DIRECTIONS[direction_of(src, dst)]
    src_state = load_canonical(src, config=config, source=source).state
    dst_state = load_canonical(dst, config=config).state
    torch_from_src = src_side == "torch" or dst_side == "flax"
    torch_state, flax_state = (src_state, dst_state) if torch_from_src else (dst_state, src_state)
    if (keymap.head_width(torch_state, config) is None) != (keymap.head_width(flax_state, config) is None):
        # A head added during the conversion exists on one side only: compare the backbones.
        backbone = keymap.expected_torch_shapes(config, None)
        torch_state = {k: v for k, v in torch_state.items() if k in backbone}
        flax_state = {k: v for k, v in flax_state.items() if k in backbone}
    return compare_models(torch_state, flax_state, config=config, leaky_slope=leaky_slope, seed=seed)
