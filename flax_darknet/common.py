"""What the linen and NNX Darknets share: initialisers, BatchNorm settings, input checks, remat modes, pooling."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypedDict

import jax
import jax.numpy as jnp
from flax import linen as nn

from darknet_arch import REMAT_MODES, DarknetConfig, FeatureInfo, InputShapeError, check_input_shape

# XLA:CPU's `cse_barrier_expander` pass replaces the optimization barriers jax.checkpoint puts around the
# recomputation by plain values; CSE then merges the recomputation back into the forward pass (and even without
# CSE the scheduler runs it there), so on the CPU remat saves no memory at all unless the step is compiled with
# this pass disabled (measured in bench/RESULTS.md). Other backends were not measured and get no option.
REMAT_COMPILER_OPTIONS = {"cpu": {"xla_disable_hlo_passes": "cse_barrier_expander"}}


def remat_compiler_options(remat: str, platform: str | None = None) -> dict[str, str]:
    """`compiler_options` for the jax.jit of a train step whose model uses `remat` on `platform` (default backend).

    `jax.jit(train_step, compiler_options=remat_compiler_options(model.remat))`: {} unless remat is on and the
    platform needs an option for it to take effect (XLA:CPU).
    """
    if check_remat_mode(remat) == "none":
        return {}
    return dict(REMAT_COMPILER_OPTIONS.get(platform or jax.default_backend(), {}))


def check_remat_mode(remat: str) -> str:
    """`remat` if it is one of REMAT_MODES; otherwise a ValueError naming it."""
    if remat not in REMAT_MODES:
        raise ValueError(f"unknown remat mode {remat!r}: choose one of {', '.join(map(repr, REMAT_MODES))}")
    return remat


# PyTorch's kaiming_normal_(mode="fan_out", nonlinearity="leaky_relu") with the same slope as the
# torch model, so both start training from the same distribution.
def conv_init(leaky_slope: float) -> nn.initializers.Initializer:
    """He-normal (fan-out) initializer with the leaky-ReLU gain."""
    return nn.initializers.variance_scaling(2.0 / (1.0 + leaky_slope**2), "fan_out", "normal")


class BatchNormArgs(TypedDict):
    """The BatchNorm settings flax's linen and NNX BatchNorm take from a DarknetConfig."""

    momentum: float
    epsilon: float


def batch_norm_kwargs(config: DarknetConfig) -> BatchNormArgs:
    """momentum and epsilon for flax's BatchNorm (linen and NNX) from the config's PyTorch-convention values."""
    # Flax keeps `momentum` of the old value; PyTorch's m is the new one's.
    return BatchNormArgs(momentum=1.0 - config.bn_momentum, epsilon=config.bn_eps)


def check_input(x: jax.Array, config: DarknetConfig) -> None:
    """Raise InputShapeError unless `x` is a floating-point NHWC batch the network takes."""
    check_input_shape(x.shape, "NHWC", config)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise InputShapeError(
            f"expected a floating-point NHWC batch, got dtype {x.dtype}; convert and normalise it first"
        )


def model_output(
    levels: Sequence[jax.Array],
    feature_info: Sequence[FeatureInfo],
    return_features: bool,
    head: Callable[[jax.Array], jax.Array] | None,
) -> jax.Array | dict[str, jax.Array]:
    """From the stem's and every stage's output: the maps of `feature_info` by name, or the pooled features
    through `head` (None: the pooled features themselves)."""
    if return_features:
        # Stages after the last requested level are dead code under jit (their parameters still exist).
        return {info.name: levels[info.level] for info in feature_info}
    # Pool in float32 so bf16 compute still yields f32 pooled features and logits.
    pooled = jnp.mean(levels[-1].astype(jnp.float32), axis=(1, 2))
    return pooled if head is None else head(pooled)


Dtype = Any
