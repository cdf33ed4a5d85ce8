"""Darknet-53 in PyTorch (NCHW), built from `darknet_arch.DarknetConfig`.

Module names are the seed's (`conv1`, `residual_block3.7.layer2.1.running_var`, `fc`, ...), so a
state_dict saved by the seed's code loads here with `load_state_dict(strict=True)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from darknet_arch import DARKNET53, DarknetConfig, InputShapeError, check_input_shape


def conv_bn_act(
    in_channels: int, out_channels: int, kernel_size: int, stride: int, config: DarknetConfig
) -> nn.Sequential:
    """Conv(bias=False) -> BatchNorm -> LeakyReLU; keys `.0.weight`, `.1.running_mean`, ... as in the seed."""
    return nn.Sequential(
        # Symmetric padding k // 2: 0 for the 1x1 conv (the seed's padding=1 there was its main bug).
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels, eps=config.bn_eps, momentum=config.bn_momentum),
        nn.LeakyReLU(config.leaky_slope),
    )


class ResidualBlock(nn.Module):
    """1x1 conv to C / ratio, 3x3 conv back to C, plus the block input (no activation after the add)."""

    def __init__(self, channels: int, config: DarknetConfig = DARKNET53) -> None:
        super().__init__()
        reduced = channels // config.bottleneck_ratio
        self.layer1 = conv_bn_act(channels, reduced, 1, 1, config)
        self.layer2 = conv_bn_act(reduced, channels, config.block_kernel, 1, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer2(self.layer1(x))


class Darknet53(nn.Module):
    """Darknet backbone with an optional linear classifier (`num_classes=None`: pooled features).

    `forward_features` returns the maps of `feature_levels` (0: the stem, i: stage i; default 3, 4, 5, i.e.
    strides 8, 16, 32), described by `feature_info`.
    """

    def __init__(
        self,
        num_classes: int | None = 18,
        leaky_slope: float | None = None,
        config: DarknetConfig = DARKNET53,
        feature_levels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be a positive int or None, got {num_classes}")
        self.config = config = config.with_slope(leaky_slope)
        self.num_classes = num_classes
        self.feature_info = config.feature_info(feature_levels)
        # Registration order is the seed's, so state_dict keys come out in the same order.
        setattr(
            self,
            config.stem_name(),
            conv_bn_act(config.in_channels, config.stem_channels, config.stem_kernel, 1, config),
        )
        cin = config.stem_channels
        for i, stage in enumerate(config.stages):
            down = conv_bn_act(cin, stage.out_channels, config.down_kernel, config.down_stride, config)
            setattr(self, config.down_name(i), down)
            blocks = nn.Sequential(*(ResidualBlock(stage.out_channels, config) for _ in range(stage.num_blocks)))
            setattr(self, config.blocks_name(i), blocks)
            cin = stage.out_channels
        self.global_avg_pool = nn.AdaptiveAvgPool2d(1)
        if num_classes is not None:
            setattr(self, config.head_name(), nn.Linear(config.width, num_classes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He-normal convs (fan-out, leaky gain), unit BN, default Linear: the same scheme as the Flax model."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=self.config.leaky_slope, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()

    def _check_input(self, x: torch.Tensor) -> None:
        check_input_shape(tuple(x.shape), "NCHW", self.config)
        if not x.is_floating_point():
            raise InputShapeError(
                f"expected a floating-point NCHW batch, got dtype {x.dtype}; convert and normalise it first"
            )

    def _stages(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.config
        self._check_input(x)
        out = getattr(self, cfg.stem_name())(x)
        levels = [out]
        for i in range(len(cfg.stages)):
            out = getattr(self, cfg.down_name(i))(out)
            out = getattr(self, cfg.blocks_name(i))(out)
            levels.append(out)
        return out, {info.name: levels[info.level] for info in self.feature_info}

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The maps of `feature_info` by name (default stride 8/16/32: 256, 512, 1024 channels for Darknet-53)."""
        return self._stages(x)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes), or the pooled (N, width) features when num_classes is None."""
        out, _ = self._stages(x)
        out = torch.flatten(self.global_avg_pool(out), 1)
        if self.num_classes is None:
            return out
        return getattr(self, self.config.head_name())(out)
