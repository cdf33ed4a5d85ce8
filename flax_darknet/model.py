"""Darknet-53 in Flax linen (NHWC), built from `darknet_arch.DarknetConfig`.

Parameter paths mirror torch_ref's module names, which makes porting a mechanical rename:
torch `conv1.0.weight` is `params/conv1/conv/kernel`, `residual_block3.7.layer2.1.running_var` is
`batch_stats/residual_block3/block7/layer2/bn/var`, `fc.weight` is `params/fc/kernel`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from darknet_arch import DARKNET53, DarknetConfig, InputShapeError, check_input_shape
from flax_darknet.conv import darknet_conv

Dtype = Any
ModuleDef = Any


# PyTorch's kaiming_normal_(mode="fan_out", nonlinearity="leaky_relu") with the same slope as the
# torch model, so both start training from the same distribution.
def conv_init(leaky_slope: float) -> nn.initializers.Initializer:
    """He-normal (fan-out) initializer with the leaky-ReLU gain."""
    return nn.initializers.variance_scaling(2.0 / (1.0 + leaky_slope**2), "fan_out", "normal")


class ConvBN(nn.Module):
    """Conv(no bias, symmetric padding k // 2) -> BatchNorm -> LeakyReLU, as submodules `conv` and `bn`."""

    features: int
    kernel_size: int
    strides: int
    leaky_slope: float
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        # Explicit (p, p) padding: 'SAME' pads (0, 1) for stride 2 on even inputs, unlike PyTorch and Darknet.
        pad = self.kernel_size // 2
        x = self.conv(
            self.features,
            (self.kernel_size, self.kernel_size),
            (self.strides, self.strides),
            padding=((pad, pad), (pad, pad)),
            name="conv",
        )(x)
        x = self.norm(use_running_average=not train, name="bn")(x)
        return nn.leaky_relu(x, negative_slope=self.leaky_slope)


class ResidualBlock(nn.Module):
    """1x1 ConvBN to C / ratio (`layer1`), 3x3 ConvBN back to C (`layer2`), plus the input."""

    channels: int
    config: DarknetConfig
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        cfg = self.config
        layer = functools.partial(ConvBN, strides=1, leaky_slope=cfg.leaky_slope, conv=self.conv, norm=self.norm)
        y = layer(self.channels // cfg.bottleneck_ratio, 1, name="layer1")(x, train)
        y = layer(self.channels, cfg.block_kernel, name="layer2")(y, train)
        return x + y


class ResidualStage(nn.Module):
    """`num_blocks` residual blocks named `block0`, `block1`, ... (torch's Sequential indices)."""

    channels: int
    num_blocks: int
    config: DarknetConfig
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        for j in range(self.num_blocks):
            x = ResidualBlock(self.channels, self.config, self.conv, self.norm, name=f"block{j}")(x, train)
        return x


class Darknet53(nn.Module):
    """Darknet backbone with a linear head; variables are {"params", "batch_stats"}.

    `model.apply(v, x)` gives logits (N, num_classes) in float32 (pooled (N, 1024) features when
    num_classes is None); `model.apply(v, x, return_features=True)` gives the dict
    {"stride8", "stride16", "stride32"} of NHWC maps in the compute dtype. Pass
    `train=True, mutable=["batch_stats"]` to train with batch statistics.
    """

    num_classes: int | None = 18
    leaky_slope: float | None = None  # None: the config's (0.1, Darknet's); 0.01 is the seed's and timm's
    config: DarknetConfig = DARKNET53
    dtype: Dtype = jnp.float32  # compute dtype of convs and BN outputs; bf16 keeps f32 params and stats
    param_dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None  # for pmap/shard_map users; under jit with sharded arrays BN is global anyway

    @property
    def resolved_config(self) -> DarknetConfig:
        """The config with `leaky_slope` applied."""
        return self.config.with_slope(self.leaky_slope)

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, train: bool = False, return_features: bool = False
    ) -> jnp.ndarray | dict[str, jnp.ndarray]:
        cfg = self.resolved_config
        check_input_shape(x.shape, "NHWC", cfg)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise InputShapeError(
                f"expected a floating-point NHWC batch, got dtype {x.dtype}; convert and normalise it first"
            )
        conv = functools.partial(
            nn.Conv,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=conv_init(cfg.leaky_slope),
            conv_general_dilated=darknet_conv,  # tiny maps as a matmul: see flax_darknet/conv.py
        )
        norm = functools.partial(
            nn.BatchNorm,
            momentum=1.0 - cfg.bn_momentum,  # Flax keeps `momentum` of the old value; PyTorch's m is the new one's
            epsilon=cfg.bn_eps,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            axis_name=self.bn_axis_name,
        )
        layer = functools.partial(ConvBN, leaky_slope=cfg.leaky_slope, conv=conv, norm=norm)
        x = layer(cfg.stem_channels, cfg.stem_kernel, 1, name=cfg.stem_name())(x, train)
        names = dict(zip(cfg.feature_stages, cfg.feature_names(), strict=True))
        features = {}
        for i, stage in enumerate(cfg.stages):
            x = layer(stage.out_channels, cfg.down_kernel, cfg.down_stride, name=cfg.down_name(i))(x, train)
            x = ResidualStage(stage.out_channels, stage.num_blocks, cfg, conv, norm, name=cfg.blocks_name(i))(x, train)
            if i in names:
                features[names[i]] = x
        if return_features:
            return features
        # Pool and classify in float32 so bf16 compute still yields f32 logits.
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if self.num_classes is None:
            return pooled
        head = nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=self.param_dtype, name=cfg.head_name())
        return head(pooled)
