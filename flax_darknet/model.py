"""Darknet-53 in Flax linen (NHWC), built from `darknet_arch.DarknetConfig`.

Parameter paths mirror torch_ref's module names, which makes porting a mechanical rename:
torch `conv1.0.weight` is `params/conv1/conv/kernel`, `residual_block3.7.layer2.1.running_var` is
`batch_stats/residual_block3/block7/layer2/bn/var`, `fc.weight` is `params/fc/kernel`.
`flax_darknet.nnx.Darknet53` is the same network in Flax NNX, with the same paths.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from darknet_arch import DARKNET53, DarknetConfig, FeatureInfo
from flax_darknet.common import Dtype, batch_norm_kwargs, check_input, check_remat_mode, conv_init, model_output
from flax_darknet.conv import darknet_conv

ModuleDef = Any
# ResidualBlock/ResidualStage.__call__(self, x, train): `train` (argument 2, counting self) is a Python bool.
_TRAIN_ARGNUM = 2


class ConvBN(nn.Module):
    """Conv(no bias, symmetric padding k // 2) -> BatchNorm -> LeakyReLU, as submodules `conv` and `bn`.

    With `norm=None` (BatchNorm folded into the conv, flax_darknet.fold) the conv's bias replaces `bn`.
    """

    features: int
    kernel_size: int
    strides: int
    leaky_slope: float
    conv: ModuleDef
    norm: ModuleDef | None

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
        if self.norm is not None:
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
    block: ModuleDef = ResidualBlock  # or nn.remat(ResidualBlock, ...): the same names, recomputed in backward

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        for j in range(self.num_blocks):
            x = self.block(self.channels, self.config, self.conv, self.norm, name=f"block{j}")(x, train)
        return x


class Darknet53(nn.Module):
    """Darknet backbone with a linear head; variables are {"params", "batch_stats"}.

    `model.apply(v, x)` gives logits (N, num_classes) in float32 (pooled (N, 1024) features when
    num_classes is None); `model.apply(v, x, return_features=True)` gives the dict of NHWC maps of
    `feature_levels` in the compute dtype ({"stride8", "stride16", "stride32"} by default; `feature_info`
    describes them).

    Train mode follows the caller: without `train=`, BatchNorm uses batch statistics and updates the
    running ones exactly when "batch_stats" is mutable and the module is not initialising, so
    `apply(v, x, mutable=["batch_stats"])` trains (flax examples' convention) and `apply(v, x)` evaluates
    (big_vision's and Hugging Face's). An explicit `train=True` or `train=False` always wins.
    """

    num_classes: int | None = 18
    leaky_slope: float | None = None  # None: the config's (0.1, Darknet's); 0.01 is the seed's and timm's
    config: DarknetConfig = DARKNET53
    dtype: Dtype = jnp.float32  # compute dtype of convs and BN outputs; bf16 keeps f32 params and stats
    param_dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None  # for pmap/shard_map users; under jit with sharded arrays BN is global anyway
    # Maps return_features gives, as timm's out_indices: 0 the stem (stride 1), i stage i (stride 2**i).
    feature_levels: Sequence[int] | None = None  # None: the config's (3, 4, 5: strides 8, 16, 32)
    remat: str = "none"  # one of REMAT_MODES ("none", "block", "stage"): less activation memory, more compute
    # Eval only: BatchNorm folded into the convs (their bias), variables from flax_darknet.fold_batchnorm.
    bn_folded: bool = False

    def __post_init__(self) -> None:
        # Fail at construction, naming the bad level or mode, not inside the first trace.
        self.config.feature_info(self.feature_levels)
        check_remat_mode(self.remat)
        super().__post_init__()

    @property
    def resolved_config(self) -> DarknetConfig:
        """The config with `leaky_slope` applied."""
        return self.config.with_slope(self.leaky_slope)

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """(level, name, channels, stride, module) of each map `return_features=True` returns, in order."""
        return self.config.feature_info(self.feature_levels)

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, train: bool | None = None, return_features: bool = False
    ) -> jnp.ndarray | dict[str, jnp.ndarray]:
        cfg = self.resolved_config
        check_input(x, cfg)
        if self.bn_folded and train:
            raise ValueError("a bn_folded Darknet53 has no BatchNorm to train: train the unfolded model, then fold")
        if train is None:
            train = self.is_mutable_collection("batch_stats") and not self.is_initializing() and not self.bn_folded
        conv = functools.partial(
            nn.Conv,
            use_bias=self.bn_folded,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=conv_init(cfg.leaky_slope),
            conv_general_dilated=darknet_conv,  # tiny maps as a matmul on CPU: see flax_darknet/conv.py
        )
        norm = (
            None
            if self.bn_folded
            else functools.partial(
                nn.BatchNorm,
                **batch_norm_kwargs(cfg),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                axis_name=self.bn_axis_name,
            )
        )
        # nn.remat on a class keeps the submodule's name, so the parameter paths are the same in every mode.
        block = nn.remat(ResidualBlock, static_argnums=_TRAIN_ARGNUM) if self.remat == "block" else ResidualBlock
        stage_cls = nn.remat(ResidualStage, static_argnums=_TRAIN_ARGNUM) if self.remat == "stage" else ResidualStage
        layer = functools.partial(ConvBN, leaky_slope=cfg.leaky_slope, conv=conv, norm=norm)
        x = layer(cfg.stem_channels, cfg.stem_kernel, 1, name=cfg.stem_name())(x, train)
        levels = [x]
        for i, stage in enumerate(cfg.stages):
            x = layer(stage.out_channels, cfg.down_kernel, cfg.down_stride, name=cfg.down_name(i))(x, train)
            blocks = stage_cls(stage.out_channels, stage.num_blocks, cfg, conv, norm, block, name=cfg.blocks_name(i))
            x = blocks(x, train)
            levels.append(x)
        head = None
        if self.num_classes is not None:
            head = nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=self.param_dtype, name=cfg.head_name())
        return model_output(levels, self.feature_info, return_features, head)
