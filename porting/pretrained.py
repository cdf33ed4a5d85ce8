"""`from_pretrained` for the Flax and PyTorch models: any local weights location, or a Hugging Face Hub id.

A Hub id ("timm/darknet53.c2ns_in1k", or "hf-hub:..." as timm writes it) is resolved with huggingface_hub into its
cache (HF_HUB_CACHE; nothing is fetched when HF_HUB_OFFLINE is set) and read as the local Hub-layout directory it
gives: config.json (timm's pretrained_cfg, or our own preprocessing record) beside model.safetensors.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from darknet_arch import DARKNET_LEAKY_SLOPE, SEED_LEAKY_SLOPE
from porting.api import Loaded, load, load_options
from porting.errors import PortingError
from porting.locations import Location, locate
from porting.preprocessing import Preprocessing
from porting.torch_flax import canonical_to_torch

if TYPE_CHECKING:  # imported where used: the torch reader must not load jax, nor the Flax one torch
    import flax_darknet
    import torch_ref



@dataclasses.dataclass(frozen=True)
class FlaxPretrained:
    """A Flax (linen) Darknet-53 with its variables and what they expect as input (`preprocessing.prepare`)."""

    model: flax_darknet.Darknet53
    variables: dict[str, Any]
    preprocessing: Preprocessing
    location: Location
    notes: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TorchPretrained:
    """A torch_ref Darknet-53 in eval mode with the weights loaded, and what they expect as input."""

    model: torch_ref.Darknet53
    preprocessing: Preprocessing
    location: Location
    notes: tuple[str, ...]


def _loaded(name_or_path: str | os.PathLike, revision: str | None, cache_dir: str | None, options: Any) -> Loaded:
    try:  # a wrong option is named before anything is fetched
        checked = load_options(**options)
    except TypeError as exc:
        hint = "the Flax model's own arguments, such as dtype or remat, go in model_kwargs="
        raise TypeError(f"{exc} ({hint})") from None
    loaded = load(locate(name_or_path, revision=revision, cache_dir=cache_dir), checked)
    if loaded.leaky_slope is None:
        raise PortingError(
            f"{loaded.location.given} records no leaky slope and its format implies none: pass leaky_slope= (the "
            f"one it was trained with: {DARKNET_LEAKY_SLOPE} for Darknet's, {SEED_LEAKY_SLOPE} for timm's and the "
            "seed's)"
        )
    return loaded


def flax_from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    **options: Any,
) -> FlaxPretrained:
    """flax_darknet.Darknet53 (model_kwargs: dtype, remat, ...) with the weights of a Hub id or any local location.

    `options` are porting.LoadOptions fields: num_classes of another width than the weights' head replaces it with a
    fresh one (seed), as timm's create_model(pretrained=True, num_classes=...) does; leaky_slope is needed only where
    nothing records one.
    """
    import flax_darknet

    loaded = _loaded(name_or_path, revision, cache_dir, options)
    model = flax_darknet.Darknet53(num_classes=loaded.num_classes, config=loaded.config, **(model_kwargs or {}))
    return FlaxPretrained(model, loaded.variables, loaded.preprocessing, loaded.location, loaded.notes)


def torch_from_pretrained(
    name_or_path: str | os.PathLike, *, revision: str | None = None, cache_dir: str | None = None, **options: Any
) -> TorchPretrained:
    """torch_ref.Darknet53 in eval mode with the weights of a Hub id or any local location; see flax_from_pretrained."""
    import torch_ref

    loaded = _loaded(name_or_path, revision, cache_dir, options)
    model = torch_ref.Darknet53(loaded.num_classes, config=loaded.config)
    model.load_state_dict(canonical_to_torch(loaded.state, loaded.config), strict=True)
    return TorchPretrained(model.eval(), loaded.preprocessing, loaded.location, loaded.notes)
