"""PyTorch reference Darknet-53: the seed's model made correct, with its module names kept."""

from typing import NoReturn

from torch_ref.model import Darknet53, ResidualBlock, conv_bn_act

__all__ = ["Darknet53", "ResidualBlock", "conv_bn_act"]


def __getattr__(name: str) -> NoReturn:
    if name == "from_pretrained":  # weights are read one layer up, where every file format is
        raise AttributeError("torch_ref.from_pretrained moved to porting.torch_from_pretrained (the porting extra)")
    raise AttributeError(f"module 'torch_ref' has no attribute {name!r}")
