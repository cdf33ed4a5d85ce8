"""PyTorch reference Darknet-53: the seed's model made correct, with its module names kept."""

from torch_ref.model import Darknet53, ResidualBlock, conv_bn_act

__all__ = ["Darknet53", "ResidualBlock", "conv_bn_act"]
