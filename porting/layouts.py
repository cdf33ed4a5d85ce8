"""What our trainers' checkpoints and Hub-layout (timm) directories say about their weights, as porting metadata.

Porting metadata is the dict `files.clean_meta` returns: num_classes, source_format, preprocessing (the record's
JSON form) and, when the source names it, model_config (dataclasses.asdict of the DarknetConfig) and run_config (the
training run's TrainConfig JSON). train.flax steps are read with train.checkpointing itself (the train extra).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from darknet_arch import ARCHS, DarknetConfig, StageSpec
from porting.errors import PortingError, failing_as, parse_json, shown
from porting.preprocessing import IMAGENET_MEAN, IMAGENET_STD, PIXEL_SCALE, UINT8_RGB, Preprocessing, combine

# timm's defaults where a pretrained_cfg is silent (timm.data.config.resolve_data_config, timm.data.constants).
TIMM_DEFAULT_INPUT_SIZE = (3, 224, 224)
TIMM_DEFAULT_INTERPOLATION = "bicubic"
TIMM_DEFAULT_CROP_PCT = 0.875
TIMM_DEFAULT_CROP_MODE = "center"
TIMM_GLOBAL_POOL = "avg"  # what our models do; timm's other pools are other networks
# config.json model_args our models can honour (in_chans is checked against the architecture).
TIMM_MODEL_ARGS = ("in_chans", "num_classes", "global_pool", "drop_rate", "drop_path_rate")


def config_from_json(d: Mapping[str, Any]) -> DarknetConfig:
    """Inverse of dataclasses.asdict(DarknetConfig)."""
    d = dict(d)
    d["stages"] = tuple(StageSpec(**s) for s in d["stages"])
    d["feature_stages"] = tuple(d["feature_stages"])
    return DarknetConfig(**d)


def _asdict(config: DarknetConfig | None) -> dict[str, Any] | None:
    return None if config is None else json.loads(json.dumps(dataclasses.asdict(config)))


def trainer_meta(payload: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Porting metadata of a train.flax meta item or a train.torch checkpoint payload.

    Their preprocessing record, checked against the class names, image size and slope they record elsewhere, with the
    fields older records lack filled from what the trainers have always done (preprocessing.TRAINER_DEFAULTS).
    """
    from porting.preprocessing import TRAINER_DEFAULTS

    record, _ = Preprocessing.from_json(payload.get("preprocessing"), f"{where} preprocessing", strict=False)
    run = payload.get("config") if isinstance(payload.get("config"), Mapping) else {}
    try:
        if isinstance(payload.get("model_config"), Mapping):
            config = config_from_json(payload["model_config"])
        else:
            config = ARCHS[run["arch"]].with_slope(run.get("leaky_slope")) if run.get("arch") in ARCHS else None
        recorded = Preprocessing(
            class_names=payload.get("class_names"),
            image_size=run.get("image_size"),
            leaky_slope=None if config is None else config.leaky_slope,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise PortingError(f"{where}: not a training checkpoint's meta ({type(exc).__name__}: {exc})") from exc
    record = combine([(f"{where} preprocessing", record), (f"{where} meta", recorded)], where)
    return {
        "preprocessing": record.filled(TRAINER_DEFAULTS).to_json(),
        "model_config": _asdict(config),
        "run_config": dict(run),
    }


def checkpoint_steps(checkpoints: Path) -> tuple[int | None, int | None, bool]:
    """(latest, best, whether the best was ranked by a score) of a train.flax checkpoints/ folder."""
    checkpointing = _train_checkpointing()
    with failing_as(f"{checkpoints}: not a readable training checkpoint folder"):
        return checkpointing.ranked_steps(checkpoints)


def read_train_step(step_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(Flax variables, porting metadata) of a train.flax step folder (the EMA weights if the run kept them)."""
    checkpointing, step_dir = _train_checkpointing(), Path(step_dir)
    where = f"{step_dir}"
    with failing_as(f"{where}: not a readable training checkpoint"):
        _, meta = checkpointing.read_meta(step_dir.parent, int(step_dir.name))
        variables = checkpointing.restore_variables(step_dir.parent, int(step_dir.name))
    return variables, trainer_meta(meta, where)


def _train_checkpointing() -> Any:
    try:
        from train import checkpointing
    except ImportError as exc:
        raise PortingError(
            f"reading a training run needs the trainers' packages ({exc}): pip install 'darknet53-jax[train]'"
        ) from exc
    return checkpointing


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
    from porting.locations import HUB_CONFIG

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
    return {"num_classes": classes, "preprocessing": record.to_json(), "model_config": _asdict(config)}
