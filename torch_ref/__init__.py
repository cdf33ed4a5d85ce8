"""PyTorch reference Darknet-53: the seed's model made correct, with its module names kept."""

from typing import Any

from torch_ref.model import Darknet53, ResidualBlock, conv_bn_act

__all__ = ["Darknet53", "ResidualBlock", "conv_bn_act", "from_pretrained"]


def from_pretrained(name_or_path: Any, **kwargs: Any) -> Any:
    """porting.torch_from_pretrained: a Darknet53 (eval mode) with the weights of a Hub id or a local location, and
    their preprocessing record. Needs the porting extra."""
    from porting.pretrained import torch_from_pretrained  # porting is a separate layer: loaded on first use

    return torch_from_pretrained(name_or_path, **kwargs)
