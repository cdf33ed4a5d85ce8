"""The real training loop (`train.flax` over JPEG files and over the decoded cache) against the pure step."""

from __future__ import annotations

import importlib.util


def end_to_end_status() -> list[str]:
    """Lines for the report naming the end-to-end parts this checkout cannot run yet, and why."""
    if importlib.util.find_spec("train.flax") is None:
        return ["end-to-end train.flax loop (JPEG and decoded cache): skipped: train/flax.py is not in this checkout"]
    return []
