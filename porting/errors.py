"""The one error type every bad-weights case raises."""

from __future__ import annotations


class PortingError(ValueError):
    """Weights that cannot be ported: a bad file, missing or unexpected keys, a wrong shape or dtype, NaN/Inf."""
