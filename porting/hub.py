"""A Hugging Face Hub model repository as timm writes it (timm.models.save_for_hf): config.json beside the weights.

`hub_meta` turns its config.json (timm's pretrained_cfg, or one with our own preprocessing record) into porting
metadata (files.clean_meta's form): num_classes, the preprocessing record and the architecture.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from darknet_arch import ARCHS
from porting.errors import PortingError, failing_as, parse_json, shown
from porting.preprocessing import IMAGENET_MEAN, IMAGENET_STD, PIXEL_SCALE, UINT8_RGB, Preprocessing, combine

HUB_CONFIG = "config.json"
HUB_SAFETENSORS, HUB_PYTORCH = "model.safetensors", "pytorch_model.bin"  # timm's save_for_hf: safe_serialization
HUB_WEIGHTS = (HUB_SAFETENSORS, HUB_PYTORCH)  # the order a directory's weights are looked for
HUB_CONFIG_KEYS = ("architecture", "pretrained_cfg")  # what tells a Hub config.json from a training run's
# timm's defaults where a pretrained_cfg is silent (timm.data.config.resolve_data_config, timm.data.constants).
TIMM_DEFAULT_INPUT_SIZE = (3, 224, 224)
TIMM_DEFAULT_INTERPOLATION = "bicubic"
TIMM_DEFAULT_CROP_PCT = 0.875
TIMM_DEFAULT_CROP_MODE = "center"
TIMM_GLOBAL_POOL = "avg"  # what our models do; timm's other pools are other networks
# config.json model_args our models can honour (in_chans is checked against the architecture).
TIMM_MODEL_ARGS = ("in_chans", "num_classes", "global_pool", "drop_rate", "drop_path_rate")


def hub_weights(directory: str | os.PathLike) -> Path | None:
    """The weights file of a Hub-layout directory (model.safetensors first), None if it has none."""
    return next((Path(directory) / n for n in HUB_WEIGHTS if (Path(directory) / n).is_file()), None)


def _numbers(cfg: Mapping[str, Any], key: str, default: tuple[float, ...], where: str) -> tuple[Any, ...]:
    """A pretrained_cfg list (mean, std) as a tuple, timm's default where it is absent; Preprocessing checks values."""
    value = cfg.get(key) or default
    if not isinstance(value, list | tuple):
        raise PortingError(f"{where}: {key} must be a list of one number per channel, got {shown(value)}")
    return tuple(value)


def _label_names(value: Any, where: str) -> tuple[str, ...] | None:
    """timm's label_names: a list, or a dict {index: name} without gaps."""
    if value is None:
        return None
    if not isinstance(value, list | tuple | Mapping):
        raise PortingError(f"{where}: label_names must be a list of names (or {{index: name}}), got {shown(value)}")
    if isinstance(value, Mapping):
        try:
            by_index = {int(k): v for k, v in value.items()}
        except (TypeError, ValueError):
            raise PortingError(f"{where}: label_names keys must be class indices, got {list(value)[:5]}") from None
        if sorted(by_index) != list(range(len(by_index))):
            raise PortingError(f"{where}: label_names has gaps; expected indices 0..{len(by_index) - 1}")
        return tuple(by_index[i] for i in range(len(by_index)))
    return tuple(value) if isinstance(value, list | tuple) else value


def hub_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """Porting metadata of a Hub-layout directory's config.json (timm's, or one with our own preprocessing record).

    The record follows timm.data.resolve_data_config(use_test_size=True): the test size and crop when given, timm's
    defaults where the pretrained_cfg is silent.
    """
    where = os.path.join(os.fspath(directory), HUB_CONFIG)
    with failing_as(f"{where}: not a readable JSON config"):
        data = Path(where).read_bytes()
    raw = parse_json(data, where)
    if not isinstance(raw, Mapping):
        raise PortingError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    cfg = raw.get("pretrained_cfg", raw)  # timm's legacy config.json is the pretrained_cfg itself
    if not isinstance(cfg, Mapping):
        raise PortingError(f"{where}: pretrained_cfg must be an object")
    arch = raw.get("architecture", cfg.get("architecture"))
    if not isinstance(arch, str):
        raise PortingError(f"{where}: architecture must be a string such as 'darknet53', got {shown(arch)}")
    if arch not in ARCHS:
        raise PortingError(
            f"{where}: holds a {arch!r} model; porting reads {' and '.join(ARCHS)} (timm's darknet53, or ours)"
        )
    config = ARCHS[arch]
    args = raw.get("model_args") or {}
    if not isinstance(args, Mapping):
        raise PortingError(f"{where}: model_args must be an object of timm.create_model arguments, got {shown(args)}")
    unsupported = sorted(set(args) - set(TIMM_MODEL_ARGS))
    pool = args.get("global_pool", raw.get("global_pool", TIMM_GLOBAL_POOL))
    if unsupported or pool != TIMM_GLOBAL_POOL or args.get("in_chans", config.in_channels) != config.in_channels:
        raise PortingError(
            f"{where}: model_args {dict(args)} / global_pool {pool!r} describe another network than {arch} "
            f"({config.in_channels} input channels, global average pooling)"
        )
    key = "test_input_size" if cfg.get("test_input_size") is not None else "input_size"
    size = cfg.get(key, TIMM_DEFAULT_INPUT_SIZE)
    if not (isinstance(size, list | tuple) and len(size) == len(TIMM_DEFAULT_INPUT_SIZE)
            and all(isinstance(d, int) and not isinstance(d, bool) for d in size)):  # fmt: skip
        raise PortingError(f"{where}: {key} must be a list of 3 integers [channels, height, width], got {shown(size)}")
    if size[1] != size[2] or size[0] != config.in_channels:
        raise PortingError(f"{where}: input size {size} is not a square {config.in_channels}-channel input")
    crop_mode = cfg.get("crop_mode") or TIMM_DEFAULT_CROP_MODE
    try:
        timm_record = Preprocessing(
            input=UINT8_RGB,
            scale=PIXEL_SCALE,
            mean=_numbers(cfg, "mean", IMAGENET_MEAN, where),
            std=_numbers(cfg, "std", IMAGENET_STD, where),
            image_size=size[1],
            interpolation=cfg.get("interpolation") or TIMM_DEFAULT_INTERPOLATION,
            crop_pct=cfg.get("test_crop_pct") or cfg.get("crop_pct") or TIMM_DEFAULT_CROP_PCT,
            crop_mode=crop_mode,
            class_names=_label_names(raw.get("label_names", cfg.get("label_names")), where),
        )
    except PortingError as exc:
        raise PortingError(f"{where}: pretrained_cfg: {exc}") from None
    ours, _ = Preprocessing.from_json(raw.get("preprocessing"), f"{where} preprocessing", strict=False)
    record = combine([(f"{where} pretrained_cfg", timm_record), (f"{where} preprocessing", ours)], where)
    classes = raw.get("num_classes", cfg.get("num_classes"))
    if classes is not None and (isinstance(classes, bool) or not isinstance(classes, int) or classes < 1):
        raise PortingError(f"{where}: num_classes must be an int >= 1, got {shown(classes)}")
    return {"num_classes": classes, "preprocessing": record.to_json(), "model_config": config.to_dict()}
