"""Darknet-53 in Flax NNX, built from the same `darknet_arch` config as the linen model, with its parameter paths.

`nnx.state(model, nnx.Param)` has the linen model's `params` tree (`conv1/conv/kernel`,
`residual_block3/block7/layer2/bn/scale`, `fc/kernel`, ...) and `nnx.state(model, nnx.BatchStat)` its
`batch_stats`, so `linen_variables` and `load_linen_variables` convert between the two bitwise, and every
weights file `porting.load_flax_variables` reads (torch_ref, the seed, timm, Darknet, Flax) feeds this model.

Like `nnx.BatchNorm` and a torch module, a new model is in train mode: call `model.eval()` for inference and
`model.train()` to train again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen, nnx

from darknet_arch import DARKNET53, DarknetConfig, FeatureInfo
from flax_darknet.common import Dtype, batch_norm_kwargs, check_input, check_remat_mode, conv_init, model_output
from flax_darknet.conv import darknet_conv

# The linen variable collections and the NNX Variable type that holds each.
COLLECTIONS: dict[str, type[nnx.Variable]] = {"params": nnx.Param, "batch_stats": nnx.BatchStat}
# How many missing or extra leaves an error lists by name before it says "and N more".
_LISTED_LEAVES = 5


@dataclasses.dataclass(frozen=True)
class LayerSettings:
    """What every ConvBN of one model shares: the resolved config and the dtypes (hashable NNX static data)."""

    config: DarknetConfig
    dtype: Dtype
    param_dtype: Dtype
    bn_axis_name: str | None


def _call(module: nnx.Module, x: jax.Array) -> jax.Array:
    return module(x)


# The module's forward with its activations recomputed in the backward pass (BatchNorm updates still apply).
_checkpointed_call = nnx.remat(_call)


class ConvBN(nnx.Module):
    """Conv(no bias, symmetric padding k // 2) -> BatchNorm -> LeakyReLU, as submodules `conv` and `bn`."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, strides: int, s: LayerSettings, *, rngs: nnx.Rngs
    ) -> None:
        pad = kernel_size // 2  # explicit (p, p): 'SAME' pads (0, 1) for stride 2 on even inputs
        self.conv = nnx.Conv(
            in_channels,
            out_channels,
            (kernel_size, kernel_size),
            (strides, strides),
            padding=((pad, pad), (pad, pad)),
            use_bias=False,
            dtype=s.dtype,
            param_dtype=s.param_dtype,
            kernel_init=conv_init(s.config.leaky_slope),
            conv_general_dilated=darknet_conv,
            rngs=rngs,
        )
        self.bn = nnx.BatchNorm(
            out_channels,
            **batch_norm_kwargs(s.config),
            dtype=s.dtype,
            param_dtype=s.param_dtype,
            axis_name=s.bn_axis_name,
            rngs=rngs,
        )
        self.leaky_slope = s.config.leaky_slope

    def __call__(self, x: jax.Array) -> jax.Array:
        return linen.leaky_relu(self.bn(self.conv(x)), negative_slope=self.leaky_slope)


class ResidualBlock(nnx.Module):
    """1x1 ConvBN to C / ratio (`layer1`), 3x3 ConvBN back to C (`layer2`), plus the input."""

    def __init__(self, channels: int, s: LayerSettings, *, rngs: nnx.Rngs) -> None:
        reduced = channels // s.config.bottleneck_ratio
        self.layer1 = ConvBN(channels, reduced, 1, 1, s, rngs=rngs)
        self.layer2 = ConvBN(reduced, channels, s.config.block_kernel, 1, s, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.layer2(self.layer1(x))


class ResidualStage(nnx.Module):
    """`num_blocks` residual blocks as attributes `block0`, `block1`, ... (the linen and torch names)."""

    def __init__(self, channels: int, num_blocks: int, s: LayerSettings, remat_blocks: bool, *, rngs: nnx.Rngs):
        self.num_blocks = num_blocks
        self.remat_blocks = remat_blocks
        for j in range(num_blocks):
            setattr(self, f"block{j}", ResidualBlock(channels, s, rngs=rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_blocks):
            block = getattr(self, f"block{j}")
            x = _checkpointed_call(block, x) if self.remat_blocks else block(x)
        return x


class Darknet53(nnx.Module):
    """Darknet backbone with a linear head, the twin of `flax_darknet.Darknet53` (same arguments and outputs).

    `model(x)` gives float32 logits (pooled features when num_classes is None), `model(x, return_features=True)`
    the maps of `feature_levels` by name. BatchNorm follows `model.train()` / `model.eval()`.
    """

    def __init__(
        self,
        num_classes: int | None = 18,
        *,
        leaky_slope: float | None = None,
        config: DarknetConfig = DARKNET53,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        bn_axis_name: str | None = None,
        feature_levels: Sequence[int] | None = None,
        remat: str = "none",
        rngs: nnx.Rngs,
    ) -> None:
        if num_classes is not None and (isinstance(num_classes, bool) or num_classes < 1):
            raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
        cfg = config.with_slope(leaky_slope)
        self.config = cfg
        self.num_classes = num_classes
        self.feature_info: tuple[FeatureInfo, ...] = cfg.feature_info(feature_levels)
        self.remat = check_remat_mode(remat)
        s = LayerSettings(cfg, dtype, param_dtype, bn_axis_name)
        setattr(self, cfg.stem_name(), ConvBN(cfg.in_channels, cfg.stem_channels, cfg.stem_kernel, 1, s, rngs=rngs))
        cin = cfg.stem_channels
        for i, stage in enumerate(cfg.stages):
            down = ConvBN(cin, stage.out_channels, cfg.down_kernel, cfg.down_stride, s, rngs=rngs)
            setattr(self, cfg.down_name(i), down)
            blocks = ResidualStage(stage.out_channels, stage.num_blocks, s, remat == "block", rngs=rngs)
            setattr(self, cfg.blocks_name(i), blocks)
            cin = stage.out_channels
        if num_classes is not None:
            head = nnx.Linear(cfg.width, num_classes, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
            setattr(self, cfg.head_name(), head)

    def __call__(self, x: jax.Array, return_features: bool = False) -> jax.Array | dict[str, jax.Array]:
        cfg = self.config
        check_input(x, cfg)
        x = getattr(self, cfg.stem_name())(x)
        levels = [x]
        for i in range(len(cfg.stages)):
            x = getattr(self, cfg.down_name(i))(x)
            stage = getattr(self, cfg.blocks_name(i))
            x = _checkpointed_call(stage, x) if self.remat == "stage" else stage(x)
            levels.append(x)
        head = None if self.num_classes is None else getattr(self, cfg.head_name())
        return model_output(levels, self.feature_info, return_features, head)


# ------------------------------------------------------------------------------- linen variables <-> NNX state


def linen_variables(model: Darknet53) -> dict[str, dict[str, Any]]:
    """The model's state as linen variables {"params", "batch_stats"} (nested dicts of the same arrays)."""
    return {name: nnx.to_pure_dict(nnx.state(model, kind)) for name, kind in COLLECTIONS.items()}


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    flat = {}
    for key, value in tree.items():
        path = (*prefix, str(key))
        flat.update(_flatten(value, path) if isinstance(value, Mapping) else {path: value})
    return flat


def _names(paths: list[tuple[str, ...]]) -> str:
    shown = ", ".join("/".join(p) for p in paths[:_LISTED_LEAVES])
    return shown + (f" and {len(paths) - _LISTED_LEAVES} more" if len(paths) > _LISTED_LEAVES else "")


def load_linen_variables(model: Darknet53, variables: Mapping[str, Any]) -> Darknet53:
    """Copy linen variables (jax or numpy leaves, e.g. `porting.load_flax_variables(path).variables`) into `model`.

    Strict, like torch's load_state_dict(strict=True): a missing or extra collection or leaf, or a leaf of
    another shape or dtype, raises ValueError naming it, and `model` is left unchanged. Returns `model`.
    """
    if not isinstance(variables, Mapping):
        raise ValueError(f"expected linen variables {{'params': ..., 'batch_stats': ...}}, got {type(variables)}")
    missing = [c for c in COLLECTIONS if c not in variables]
    extra = [c for c in variables if c not in COLLECTIONS]
    if missing or extra:
        raise ValueError(
            f"linen variables must have exactly the collections {list(COLLECTIONS)}; missing {missing}, extra {extra}"
        )
    expected = _flatten(linen_variables(model))
    given = _flatten({c: variables[c] for c in COLLECTIONS})
    problems = []
    missing_leaves = [p for p in expected if p not in given]
    if missing_leaves:
        problems.append(f"missing {_names(missing_leaves)}")
    extra_leaves = [p for p in given if p not in expected]
    if extra_leaves:
        problems.append(f"unexpected {_names(extra_leaves)}")
    for path in (p for p in expected if p in given):
        got, want = given[path], expected[path]
        shape, dtype = tuple(np.shape(got)), (got if hasattr(got, "dtype") else np.asarray(got)).dtype
        if shape != tuple(want.shape):
            problems.append(f"{'/'.join(path)}: the variables have shape {shape}, this model {tuple(want.shape)}")
        elif jnp.dtype(dtype) != want.dtype:
            problems.append(f"{'/'.join(path)}: dtype {dtype}, this model keeps {want.dtype} (cast it first)")
    if problems:
        raise ValueError(
            f"variables do not fit this {type(model).__name__}(num_classes={model.num_classes}, "
            f"{len(model.config.stages)} stages of {[st.num_blocks for st in model.config.stages]} blocks): "
            + "; ".join(problems)
            + " (variables of another config or num_classes, or an incomplete file?)"
        )
    for name, kind in COLLECTIONS.items():
        state = nnx.state(model, kind)
        # jnp.asarray of an array of the same dtype copies it bit for bit.
        nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, dict(variables[name])))
        nnx.update(model, state)
    return model


def load_state(model: Darknet53, state: nnx.State) -> Darknet53:
    """Copy another NNX Darknet53's `nnx.state(...)` into `model`, with load_linen_variables' strict checks."""
    other = {name: nnx.to_pure_dict(nnx.filter_state(state, kind)) for name, kind in COLLECTIONS.items()}
    return load_linen_variables(model, other)


def from_linen_variables(variables: Mapping[str, Any], **model_kwargs: Any) -> Darknet53:
    """An NNX Darknet53 holding `variables`; `model_kwargs` as Darknet53's (num_classes: from the head if absent).

    The model is built abstractly (no random initialisation) and then filled, so this costs one copy.
    """
    if "num_classes" not in model_kwargs:
        config = model_kwargs.get("config", DARKNET53)
        params = variables.get("params") if isinstance(variables, Mapping) else None
        head = params.get(config.head_name()) if isinstance(params, Mapping) else None
        kernel = head.get("kernel") if isinstance(head, Mapping) else None  # absent: load names what is wrong
        model_kwargs["num_classes"] = None if kernel is None else int(np.shape(kernel)[-1])
    model = nnx.eval_shape(lambda: Darknet53(**model_kwargs, rngs=nnx.Rngs(0)))
    return load_linen_variables(model, variables)
