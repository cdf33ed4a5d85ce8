"""Darknet-53 as data: depths, widths, activation and BatchNorm settings, and the layer names.

Both `torch_ref` and `flax_darknet` build their networks by looping over a `DarknetConfig`, and
`porting` derives its key maps from the same names, so the architecture is written down once.
This module imports neither framework.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

# Darknet's own leaky slope; nn.LeakyReLU() and timm default to 0.01 (what the seed's code used).
DARKNET_LEAKY_SLOPE = 0.1
SEED_LEAKY_SLOPE = 0.01


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One stage: a stride-2 3x3 conv to `out_channels`, then `num_blocks` residual blocks."""

    out_channels: int
    num_blocks: int


@dataclasses.dataclass(frozen=True)
class FeatureInfo:
    """One feature level a model can return (timm's feature_info entry): its dict key, width and stride."""

    level: int  # 0: the stem; i >= 1: stage i - 1
    name: str  # the key in the returned dict, "stride{stride}"
    channels: int
    stride: int  # relative to the input
    module: str  # the layer whose output it is (its checkpoint name)


@dataclasses.dataclass(frozen=True)
class DarknetConfig:
    """Architecture of a Darknet backbone plus classifier head (defaults: Darknet-53)."""

    in_channels: int = 3
    stem_channels: int = 32
    stem_kernel: int = 3
    down_kernel: int = 3
    down_stride: int = 2
    # Residual block: 1x1 conv to out_channels // bottleneck_ratio, then a 3x3 conv back.
    bottleneck_ratio: int = 2
    block_kernel: int = 3
    stages: tuple[StageSpec, ...] = (
        StageSpec(64, 1),
        StageSpec(128, 2),
        StageSpec(256, 8),
        StageSpec(512, 8),
        StageSpec(1024, 4),
    )
    # Stages whose outputs are returned as feature maps (stride 8, 16 and 32 for Darknet-53).
    feature_stages: tuple[int, ...] = (2, 3, 4)
    leaky_slope: float = DARKNET_LEAKY_SLOPE
    # PyTorch's convention: running = (1 - m) * running + m * batch. Flax's momentum is 1 - m.
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("DarknetConfig.stages must not be empty")
        for i, stage in enumerate(self.stages):
            if stage.out_channels % self.bottleneck_ratio:
                raise ValueError(
                    f"stage {i}: out_channels {stage.out_channels} is not divisible by "
                    f"bottleneck_ratio {self.bottleneck_ratio}"
                )
        for i in self.feature_stages:
            if not 0 <= i < len(self.stages):
                raise ValueError(f"feature_stages index {i} is outside 0..{len(self.stages) - 1}")

    @property
    def total_stride(self) -> int:
        """Input sides must be multiples of this (32 for Darknet-53)."""
        return self.down_stride ** len(self.stages)

    @property
    def width(self) -> int:
        """Channels of the last stage: the pooled feature size fed to the classifier."""
        return self.stages[-1].out_channels

    def stage_stride(self, index: int) -> int:
        """Stride of stage `index`'s output relative to the input."""
        return self.down_stride ** (index + 1)

    @property
    def num_feature_levels(self) -> int:
        """Feature levels a model can return: the stem (level 0, stride 1) and every stage (levels 1..len(stages))."""
        return len(self.stages) + 1

    @property
    def default_feature_levels(self) -> tuple[int, ...]:
        """The levels of `feature_stages` (3, 4, 5 for Darknet-53: strides 8, 16, 32)."""
        return tuple(i + 1 for i in self.feature_stages)

    def feature_info(self, levels: Sequence[int] | None = None) -> tuple[FeatureInfo, ...]:
        """Name, channels, stride and layer of each requested level, in the order given (None: the defaults).

        Level 0 is the stem's output (stride 1), level i >= 1 the output of stage i - 1, `residual_block{i}`
        (stride 2**i for Darknet-53), as timm numbers its `out_indices`. A level out of range or repeated raises
        ValueError naming it.
        """
        if levels is None:
            levels = self.default_feature_levels
        if isinstance(levels, int | str) or not isinstance(levels, Sequence):
            raise ValueError(f"feature levels must be a sequence of ints, got {levels!r}")
        if not levels:
            raise ValueError(f"feature levels must name at least one level of 0..{self.num_feature_levels - 1}")
        seen: set[int] = set()
        infos = []
        for level in levels:
            if isinstance(level, bool) or not isinstance(level, int):
                raise ValueError(f"feature level {level!r} is not an int; levels are 0..{self.num_feature_levels - 1}")
            if not 0 <= level < self.num_feature_levels:
                raise ValueError(
                    f"feature level {level} is out of range: this network has levels 0..{self.num_feature_levels - 1} "
                    f"(0: the stem {self.stem_name()!r} at stride 1; 1..{len(self.stages)}: the outputs of "
                    f"{self.blocks_name(0)}..{self.blocks_name(len(self.stages) - 1)})"
                )
            if level in seen:
                raise ValueError(f"feature level {level} is requested twice in {tuple(levels)}; name each level once")
            seen.add(level)
            if level == 0:
                infos.append(FeatureInfo(0, "stride1", self.stem_channels, 1, self.stem_name()))
            else:
                stride = self.stage_stride(level - 1)
                channels = self.stages[level - 1].out_channels
                infos.append(FeatureInfo(level, f"stride{stride}", channels, stride, self.blocks_name(level - 1)))
        return tuple(infos)

    def feature_names(self, levels: Sequence[int] | None = None) -> tuple[str, ...]:
        """Keys of the feature-map dict the models return: ('stride8', 'stride16', 'stride32') by default."""
        return tuple(info.name for info in self.feature_info(levels))

    def feature_channels(self, levels: Sequence[int] | None = None) -> dict[str, int]:
        """Channel count of each returned feature map."""
        return {info.name: info.channels for info in self.feature_info(levels)}

    # Layer names are the checkpoint format: they follow the seed's code, conv1..conv6,
    # residual_block1..5 and fc, so its state_dicts load unchanged.
    @staticmethod
    def stem_name() -> str:
        return "conv1"

    @staticmethod
    def down_name(stage: int) -> str:
        return f"conv{stage + 2}"

    @staticmethod
    def blocks_name(stage: int) -> str:
        return f"residual_block{stage + 1}"

    @staticmethod
    def head_name() -> str:
        return "fc"

    def with_slope(self, leaky_slope: float | None) -> DarknetConfig:
        """This config with another leaky slope (None keeps it)."""
        if leaky_slope is None:
            return self
        return dataclasses.replace(self, leaky_slope=float(leaky_slope))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (lists, stages as objects), as checkpoints and exports record the architecture."""
        d = dataclasses.asdict(self)
        return {**d, "stages": [dict(s) for s in d["stages"]], "feature_stages": list(d["feature_stages"])}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DarknetConfig:
        """Inverse of to_dict (a recorded architecture); TypeError/ValueError for anything else."""
        d = dict(d)
        d["stages"] = tuple(StageSpec(**s) for s in d["stages"])
        d["feature_stages"] = tuple(d["feature_stages"])
        return cls(**d)


DARKNET53 = DarknetConfig()
# A five-stage Darknet with a few channels: the mechanism at a fraction of the cost, for tests, CI and smoke
# benchmarks (32 px inputs still pass all five stride-2 stages). Not for accuracy.
TINY = DarknetConfig(
    stem_channels=8,
    stages=(StageSpec(16, 1), StageSpec(32, 1), StageSpec(32, 1), StageSpec(64, 1), StageSpec(64, 1)),
)
# Rematerialisation (activation checkpointing) granularity of the Flax models: "none" keeps every activation for
# the backward pass; "block" keeps only each residual block's input and recomputes the block; "stage" keeps only
# each stage's input and recomputes its blocks. Parameter names are the same in every mode.
REMAT_MODES = ("none", "block", "stage")
# Named architectures (train.flax/train.torch --arch).
ARCHS: dict[str, DarknetConfig] = {"darknet53": DARKNET53, "tiny": TINY}


class InputShapeError(ValueError):
    """An input batch whose rank, layout, channel count, size or dtype the network cannot take."""


def check_input_shape(shape: Sequence[int], layout: str, config: DarknetConfig) -> None:
    """Raise InputShapeError unless `shape` is a 4-D batch in `layout` ('NHWC' or 'NCHW') the net takes."""
    c = config.in_channels
    expected = f"(N, H, W, {c})" if layout == "NHWC" else f"(N, {c}, H, W)"
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4:
        raise InputShapeError(f"expected a 4-D {layout} batch {expected}, got shape {shape} (rank {len(shape)})")
    if layout == "NHWC":
        h, w, channels = shape[1], shape[2], shape[3]
        other_layout_channels = shape[1]
    elif layout == "NCHW":
        channels, h, w = shape[1], shape[2], shape[3]
        other_layout_channels = shape[3]
    else:
        raise ValueError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")
    if channels != c:
        hint = ""
        if other_layout_channels == c:
            other = "NCHW" if layout == "NHWC" else "NHWC"
            perm = "x.transpose(0, 2, 3, 1)" if layout == "NHWC" else "x.permute(0, 3, 1, 2)"
            hint = f"; this looks like an {other} batch, convert it with {perm}"
        raise InputShapeError(f"expected an {layout} batch {expected} with {c} channels, got shape {shape}{hint}")
    stride = config.total_stride
    if h < stride or w < stride or h % stride or w % stride:
        raise InputShapeError(
            f"expected an {layout} batch {expected} with H and W positive multiples of {stride} "
            f"(the network's total stride), got H={h}, W={w} in shape {shape}"
        )
