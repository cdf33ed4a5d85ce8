"""Flax Darknet-53, NHWC: linen (`Darknet53`) and NNX (`flax_darknet.nnx.Darknet53`) twins of one config.

Logits, pooled features, or the feature maps of any level (stem at stride 1, stages at strides 2-32);
optional rematerialisation per residual block or per stage.
"""

import importlib
from types import ModuleType

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
    "nnx",
    "remat_compiler_options",
    "summarize",
]


def __getattr__(name: str) -> ModuleType:
    # `flax_darknet.nnx` is imported on first use: flax.nnx loads optax and treescope, which linen users skip.
    if name == "nnx":
        return importlib.import_module("flax_darknet.nnx")
    if name == "from_pretrained":  # weights are read one layer up, where PyTorch and orbax files are
        raise AttributeError("flax_darknet.from_pretrained moved to porting.flax_from_pretrained (the porting extra)")
    raise AttributeError(f"module 'flax_darknet' has no attribute {name!r}")
