"""Flax Darknet-53, NHWC: linen (`Darknet53`) and NNX (`flax_darknet.nnx.Darknet53`) twins of one config.

Logits, pooled features, or the feature maps of any level (stem at stride 1, stages at strides 2-32);
optional rematerialisation per residual block or per stage.
"""

import importlib
from types import ModuleType
from typing import Any

from darknet_arch import DARKNET53, DarknetConfig, FeatureInfo, InputShapeError, summarize
from flax_darknet.common import REMAT_MODES, remat_compiler_options
from flax_darknet.fold import fold_batchnorm, fold_for_inference
from flax_darknet.model import ConvBN, Darknet53, ResidualBlock, ResidualStage

__all__ = [
    "DARKNET53",
    "REMAT_MODES",
    "ConvBN",
    "Darknet53",
    "DarknetConfig",
    "FeatureInfo",
    "InputShapeError",
    "ResidualBlock",
    "ResidualStage",
    "fold_batchnorm",
    "fold_for_inference",
    "from_pretrained",
    "nnx",
    "remat_compiler_options",
    "summarize",
]


def from_pretrained(name_or_path: Any, **kwargs: Any) -> Any:
    """porting.flax_from_pretrained: a Darknet53 with the variables of a Hub id or a local weights location, and
    their preprocessing record. Needs the porting extra (it reads PyTorch and orbax files)."""
    from porting.pretrained import flax_from_pretrained  # not at import: flax_darknet imports no torch or orbax

    return flax_from_pretrained(name_or_path, **kwargs)


def __getattr__(name: str) -> ModuleType:
    # `flax_darknet.nnx` is imported on first use: flax.nnx loads optax and treescope, which linen users skip.
    if name == "nnx":
        return importlib.import_module("flax_darknet.nnx")
    raise AttributeError(f"module 'flax_darknet' has no attribute {name!r}")
