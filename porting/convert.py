"""File-to-file conversions (the `port-weights` subcommands) and the --check comparison of both models."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from darknet_arch import ARCHS, DARKNET53, DARKNET_LEAKY_SLOPE, DarknetConfig
from porting import atomic, files, hub, keymap
from porting.api import Loaded, LoadOptions, arch_name, load, load_options
from porting.darknet import write_darknet_weights
from porting.errors import PortingError
from porting.locations import Location, is_hub_id, locate
from porting.preprocessing import DARKNET, DARKNET_HELD, Preprocessing, contradictions
from porting.state import CanonicalStateDict
from porting.torch_flax import canonical_to_flax, canonical_to_torch

# torch2flax: SRC side, DST side; X2hub writes a Hub model repository folder (porting.hub.write_hub).
DIRECTIONS: dict[str, tuple[str, str]] = {
    **{f"{a}2{b}": (a, b) for a in files.SIDE_HELP for b in files.SIDE_HELP if a != b},
    **{f"{a}2{hub.HUB_SIDE}": (a, hub.HUB_SIDE) for a in files.SIDE_HELP},
}
CHECK_BATCH = 2


def direction_of(src: str | os.PathLike | Location, dst: str | os.PathLike, expected: str | None = None) -> str:
    """The direction ('torch2flax') SRC's location and DST's suffix give; PortingError if none or not `expected`."""
    src_side = (src if isinstance(src, Location) else locate(src)).side
    if expected is None:
        dst_side = files.FORMAT_SIDES[files.format_of(dst)]
        if src_side == dst_side:
            raise PortingError(f"SRC and DST are both {src_side} files; port-weights converts between frameworks")
        return f"{src_side}2{dst_side}"
    if expected not in DIRECTIONS:
        raise PortingError(f"unknown direction {expected!r}; expected one of {', '.join(DIRECTIONS)}")
    want_src, want_dst = DIRECTIONS[expected]
    if src_side != want_src:
        given = src.given if isinstance(src, Location) else os.fspath(src)
        raise PortingError(f"{expected}: SRC {given!r} is a {src_side} location; expected {files.SIDE_HELP[want_src]}")
    if want_dst != hub.HUB_SIDE:  # a Hub folder is any directory name
        files.check_side(dst, want_dst, f"{expected}: DST")
    return expected


def check_darknet_record(record: Preprocessing, dst: str) -> str:
    """Refuse weights trained on other input or with another slope than a Darknet file implies; else the note that
    names what the file cannot hold."""
    held = record.only(*DARKNET_HELD)
    problems = contradictions([("the weights record", held), ("a Darknet file implies", DARKNET)])
    if problems:
        raise PortingError(
            f"cannot write {dst!r}: a Darknet .weights file records no preprocessing, and reading it back implies RGB "
            f"in [0, 1] and slope {DARKNET_LEAKY_SLOPE}; these weights were trained otherwise, so the file would "
            "silently compute another function:\n  " + "\n  ".join(problems) + "\nwrite a .pt, .safetensors or "
            ".msgpack instead (they record it); nothing was written"
        )
    implied = f"RGB in [0, 1] and slope {DARKNET_LEAKY_SLOPE} are implied"
    lost = [k for k in record.known() if k not in DARKNET_HELD]
    if not lost:
        return f"Darknet files record no metadata: the head follows from the size; {implied}"
    return (f"{dst} cannot hold {', '.join(lost)} (a Darknet file records only tensors; {implied}): give them again "
            "(--class-names, --preprocessing) when converting it back")  # fmt: skip


def convert(
    src: str | os.PathLike, dst: str | os.PathLike, *, direction: str | None = None, force: bool = False, **options: Any
) -> Loaded:
    """Convert the weights SRC names (any location: porting.locations.ACCEPTED) to the file or directory DST.

    DST's format comes from its suffix (checked against `direction` if given); it is written atomically, never half,
    with the preprocessing record: SRC's, plus the leaky_slope / class_names / preprocessing `options` (LoadOptions
    fields), which must not contradict it. A head-less SRC with num_classes gets a fresh head; a head of another width
    is an error unless reset_mismatched_head=True. A Darknet DST is refused for weights trained on other input or
    with another slope than Darknet's. config None: SRC's recorded or inferred architecture. Returns what was written.
    """
    dst = os.fspath(dst)
    asked = load_options(**{"reset_mismatched_head": False, **options})  # a head is replaced only when asked
    if is_hub_id(src):  # its lookup may download: an existing DST is refused before that
        atomic.check_destination(dst, force)
    location = locate(src)
    dst_side = DIRECTIONS[direction_of(location, dst, direction)][1]
    atomic.check_destination(dst, force)
    target = os.path.abspath(dst)
    given = set() if is_hub_id(src) else {location.given}  # a Hub id names no local path; its cache folder does
    for src_path in given | {location.path}:  # a run folder and the step it names
        if os.path.commonpath([os.path.abspath(src_path), target]) == target:
            raise PortingError(f"SRC {src_path!r} is {'DST' if os.path.abspath(src_path) == target else 'inside DST'} "
                               f"{dst!r}: writing DST would replace it; choose another DST")  # fmt: skip
    loaded = load(location, asked)
    cfg = loaded.config
    meta = {"num_classes": loaded.num_classes, "source_format": loaded.source_format,
            "preprocessing": loaded.preprocessing.to_json()}  # fmt: skip
    if dst_side == hub.HUB_SIDE:
        architecture = arch_name(cfg)
        if architecture not in ARCHS:
            raise PortingError(f"cannot write {dst!r}: a Hub config.json names its architecture, and these weights "
                               f"are {architecture}; porting names {', '.join(ARCHS)}")  # fmt: skip
        hub.write_hub(dst, loaded.state, cfg, loaded.preprocessing, architecture=architecture,
                      source=location.describe(), metrics=loaded.metrics, force=force)  # fmt: skip
    elif dst_side == "torch":
        files.write_torch_file(dst, canonical_to_torch(loaded.state, cfg), meta, force)
    elif dst_side == "flax":
        files.write_flax_file(dst, loaded.variables, meta, force)
    else:
        note = check_darknet_record(loaded.preprocessing, dst)
        write_darknet_weights(dst, loaded.state, config=cfg, force=force)
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
    config: DarknetConfig | None = None,
    seed: int = 0,
    direction: str | None = None,
) -> dict[str, tuple[float, float]]:
    """After a conversion: torch_ref runs the torch-side file, Flax the Flax-side one (Darknet, a Hub folder:
    whichever is left)."""
    src_side, dst_side = DIRECTIONS[direction_of(src, dst, direction)]
    src_loaded = load(src, LoadOptions(config=config, source=source))
    config = src_loaded.config
    src_state, dst_state = src_loaded.state, load(dst, LoadOptions(config=config)).state
    torch_from_src = src_side == "torch" or dst_side == "flax"
    torch_state, flax_state = (src_state, dst_state) if torch_from_src else (dst_state, src_state)
    if (keymap.head_width(torch_state, config) is None) != (keymap.head_width(flax_state, config) is None):
        # A head added during the conversion exists on one side only: compare the backbones.
        backbone = keymap.expected_torch_shapes(config, None)
        torch_state = {k: v for k, v in torch_state.items() if k in backbone}
        flax_state = {k: v for k, v in flax_state.items() if k in backbone}
    return compare_models(torch_state, flax_state, config=config, leaky_slope=leaky_slope, seed=seed)
