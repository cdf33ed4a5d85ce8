"""The single, framework-free description of Darknet-53 that both models read."""

from darknet_arch.config import (
    ARCHS,
    DARKNET53,
    DARKNET_LEAKY_SLOPE,
    REMAT_MODES,
    SEED_LEAKY_SLOPE,
    TINY,
    DarknetConfig,
    FeatureInfo,
    InputShapeError,
    StageSpec,
    check_input_shape,
)
from darknet_arch.summary import ModelSummary, summarize

__all__ = [
    "ARCHS",
    "DARKNET53",
    "DARKNET_LEAKY_SLOPE",
    "REMAT_MODES",
    "SEED_LEAKY_SLOPE",
    "TINY",
    "DarknetConfig",
    "FeatureInfo",
    "InputShapeError",
    "ModelSummary",
    "StageSpec",
    "check_input_shape",
    "summarize",
]
