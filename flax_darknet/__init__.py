"""Flax (linen) Darknet-53, NHWC: logits, pooled features, or stride 8/16/32 feature maps."""

from darknet_arch import DARKNET53, DarknetConfig, InputShapeError, summarize
from flax_darknet.model import ConvBN, Darknet53, ResidualBlock, ResidualStage

__all__ = [
    "DARKNET53",
    "ConvBN",
    "Darknet53",
    "DarknetConfig",
    "InputShapeError",
    "ResidualBlock",
    "ResidualStage",
    "summarize",
]
