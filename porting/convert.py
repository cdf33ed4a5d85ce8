"""File-to-file conversions (the `port-weights` subcommands) and the --check comparison of both models."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable

import numpy as np

from darknet_arch import DARKNET53, DarknetConfig
from porting import files
from porting.api import adapt_head, load_canonical, resolve_slope
from porting.darknet import write_darknet_weights
from porting.errors import PortingError
from porting.state import CanonicalStateDict
from porting.torch_flax import canonical_to_flax, canonical_to_torch

# Which container formats each side reads and writes.
SIDE_FORMATS = {"torch": ("torch", "safetensors"), "flax": ("msgpack", "orbax"), "darknet": ("darknet",)}
DIRECTIONS: dict[str, tuple[str, str]] = {
    "torch2flax": ("torch", "flax"),
    "flax2torch": ("flax", "torch"),
    "darknet2flax": ("darknet", "flax"),
    "darknet2torch": ("darknet", "torch"),
    "flax2darknet": ("flax", "darknet"),
    "torch2darknet": ("torch", "darknet"),
}
SIDE_HELP = {
    "torch": ".pt, .pth or .safetensors",
    "flax": ".msgpack or an orbax directory",
    "darknet": ".weights or .conv.NN",
}
CHECK_BATCH = 2


@dataclasses.dataclass(frozen=True)
class ConvertResult:
    """What a conversion wrote and what the user must know."""

    dst: str
    num_classes: int | None
    leaky_slope: float | None
    source_format: str
    notes: tuple[str, ...]


def _side_of(path: str, side: str, role: str, direction: str) -> str:
    fmt = files.format_of(path)
    if fmt not in SIDE_FORMATS[side]:
        raise PortingError(f"{direction}: {role} {path!r} is a {fmt} path; expected {SIDE_HELP[side]}")
    return fmt


def convert(
    direction: str,
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    num_classes: int | None = None,
    leaky_slope: float | None = None,
    source: str = "auto",
    seed: int = 0,
    force: bool = False,
    reset_head: bool = False,
    config: DarknetConfig = DARKNET53,
) -> ConvertResult:
    """Convert SRC to DST in `direction` (e.g. 'torch2flax'); DST is written atomically, never half."""
    if direction not in DIRECTIONS:
        raise PortingError(f"unknown direction {direction!r}; expected one of {', '.join(DIRECTIONS)}")
    src, dst = os.fspath(src), os.fspath(dst)
    src_side, dst_side = DIRECTIONS[direction]
    _side_of(src, src_side, "SRC", direction)
    _side_of(dst, dst_side, "DST", direction)
    files.check_destination(dst, force)
    if os.path.abspath(src) == os.path.abspath(dst):
        raise PortingError(f"SRC and DST are the same path {src!r}")
    loaded = load_canonical(src, config=config, source=source)
    state, classes, notes = adapt_head(
        loaded,
        num_classes,
        config=config,
        seed=seed,
        reset_mismatched_head=reset_head,
        framework="torch" if dst_side == "torch" else "flax",
        label=os.path.basename(os.path.normpath(src)),
    )
    notes = list(loaded.notes) + notes
    slope = resolve_slope(loaded.leaky_slope, leaky_slope, notes)
    meta = {"num_classes": classes, "leaky_slope": slope, "source_format": loaded.source_format}
    if dst_side == "torch":
        files.write_torch_file(dst, canonical_to_torch(state, config), meta, force)
    elif dst_side == "flax":
        files.write_flax_file(dst, canonical_to_flax(state, config), meta, force)
    else:
        write_darknet_weights(dst, state, config=config, force=force)
        notes.append("Darknet files record no metadata: the head width follows from the size, the slope is 0.1")
    return ConvertResult(dst, classes, slope, loaded.source_format, tuple(notes))


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

    num_classes = None
    if f"{config.head_name()}.weight" in torch_state:
        num_classes = int(torch_state[f"{config.head_name()}.weight"].shape[0])
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
    direction: str,
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    leaky_slope: float | None = None,
    source: str = "auto",
    config: DarknetConfig = DARKNET53,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """After a conversion: torch_ref runs the torch-side file, Flax the Flax-side one (Darknet: whichever is left)."""
    src_side, dst_side = DIRECTIONS[direction]
    src_state = load_canonical(src, config=config, source=source).state
    dst_state = load_canonical(dst, config=config).state
    torch_from_src = src_side == "torch" or dst_side == "flax"
    torch_state, flax_state = (src_state, dst_state) if torch_from_src else (dst_state, src_state)
    head = config.head_name()
    if (f"{head}.weight" in torch_state) != (f"{head}.weight" in flax_state):
        # A head added during the conversion exists on one side only: compare the backbones.
        torch_state = {k: v for k, v in torch_state.items() if not k.startswith(f"{head}.")}
        flax_state = {k: v for k, v in flax_state.items() if not k.startswith(f"{head}.")}
    return compare_models(torch_state, flax_state, config=config, leaky_slope=leaky_slope, seed=seed)
