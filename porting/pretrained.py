"""`from_pretrained` for the Flax and PyTorch models: any local weights location, or a Hugging Face Hub id.

A Hub id ("timm/darknet53.c2ns_in1k", or "hf-hub:..." as timm writes it) is resolved with huggingface_hub into its
cache (HF_HUB_CACHE; nothing is fetched when HF_HUB_OFFLINE is set) and read as the local Hub-layout directory it
gives: config.json (timm's pretrained_cfg, or our own preprocessing record) beside model.safetensors.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from darknet_arch import DARKNET_LEAKY_SLOPE, SEED_LEAKY_SLOPE
from porting.api import Loaded, LoadOptions, load
from porting.errors import PortingError, failing_as
from porting.hub import HUB_CONFIG, HUB_WEIGHTS
from porting.locations import SELECTORS, Location, locate
from porting.preprocessing import Preprocessing
from porting.torch_flax import canonical_to_torch

if TYPE_CHECKING:  # imported where used: the torch reader must not load jax, nor the Flax one torch
    import flax_darknet
    import torch_ref

HUB_PREFIX = "hf-hub:"  # timm's spelling of an explicit Hub id
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name


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


def resolve(name_or_path: str | os.PathLike, *, revision: str | None = None, cache_dir: str | None = None) -> Location:
    """A local weights location (porting.locations.ACCEPTED), or the Hub-layout cache directory of a Hub id."""
    name = os.fspath(name_or_path)
    if name.startswith(HUB_PREFIX):
        return hub_location(name[len(HUB_PREFIX) :], revision=revision, cache_dir=cache_dir)
    path = Path(name)
    if path.exists() or (path.name in SELECTORS and path.parent.is_dir()) or not HUB_ID.fullmatch(name):
        return locate(name)
    return hub_location(name, revision=revision, cache_dir=cache_dir, also_a_path=True)


def hub_location(
    repo_id: str, *, revision: str | None = None, cache_dir: str | None = None, also_a_path: bool = False
) -> Location:
    """config.json and the weights of Hub repository `repo_id`, from huggingface_hub's cache (downloaded if needed
    and allowed), as the Location of their snapshot directory."""
    try:
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError, RepositoryNotFoundError
    except ImportError as exc:
        raise PortingError(
            f"reading Hub id {repo_id!r} needs huggingface_hub: pip install 'darknet53-jax[porting]'"
        ) from exc
    label = f"{HUB_PREFIX}{repo_id}"
    not_cached = (
        f"Hub id {repo_id!r}" + (" (no local path of that name exists either)" if also_a_path else "")
        + f" is not in the Hugging Face cache {cache_dir or constants.HF_HUB_CACHE}, and "
        + ("HF_HUB_OFFLINE is set, so nothing is downloaded: unset HF_HUB_OFFLINE to download it once, or pass a "
           "local directory" if constants.HF_HUB_OFFLINE else "the Hub could not be reached: connect and retry, or "
           "pass a local directory (HF_HUB_OFFLINE=1 uses the cache only)")
    )  # fmt: skip

    def download(filename: str) -> str:
        with failing_as(f"{label}: cannot fetch {filename}"):
            return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir)

    try:
        config = download(HUB_CONFIG)
        missing_here = False
        for weights in HUB_WEIGHTS:
            try:
                download(weights)
                break
            except PortingError as exc:
                if isinstance(exc.__cause__, LocalEntryNotFoundError):
                    missing_here = True
                elif not isinstance(exc.__cause__, RemoteEntryNotFoundError):
                    raise
        else:
            if missing_here:
                raise PortingError(not_cached)
            raise PortingError(f"{label}: the repository holds no weights ({' or '.join(HUB_WEIGHTS)})")
    except PortingError as exc:
        if isinstance(exc.__cause__, LocalEntryNotFoundError):
            raise PortingError(not_cached) from None
        if isinstance(exc.__cause__, RepositoryNotFoundError):
            raise PortingError(f"{label}: no such Hub repository (or it is private or gated: log in first)") from None
        raise
    location = locate(Path(config).parent)
    return dataclasses.replace(location, given=label, notes=(*location.notes, f"{label}: read {location.path}"))


def _loaded(name_or_path: str | os.PathLike, revision: str | None, cache_dir: str | None, options: Any) -> Loaded:
    loaded = load(resolve(name_or_path, revision=revision, cache_dir=cache_dir), LoadOptions(**options))
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
