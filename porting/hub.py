"""A Hugging Face Hub model repository as timm writes it (timm.models.save_for_hf): config.json beside the weights.

`hub_meta` turns its config.json (timm's pretrained_cfg, or one with our own preprocessing record) into porting
metadata (files.clean_meta's form): num_classes, the preprocessing record and the architecture. `write_hub` writes
one: config.json, model.safetensors in timm's names, and a README.md model card.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from darknet_arch import ARCHS, SEED_LEAKY_SLOPE, DarknetConfig
from porting import atomic, keymap
from porting.errors import PortingError, failing_as, parse_json, shown
from porting.preprocessing import IMAGENET_MEAN, IMAGENET_STD, PIXEL_SCALE, UINT8_RGB, Preprocessing, combine
from porting.state import CanonicalStateDict, float32_slope
from porting.torch_flax import canonical_to_torch, torch_to_timm_state_dict

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
TIMM_MODEL_ARGS = ("in_chans", "num_classes", "global_pool", "drop_rate", "drop_path_rate", "act_layer")
# timm's darknet53 activation (cspnet.py) is nn.LeakyReLU at its default slope; "prelu" holds any one slope in the
# weights (keymap.TIMM_ACT_WEIGHT), which is how a Hub folder carries another slope, such as Darknet's 0.1.
TIMM_LEAKY_RELU, TIMM_PRELU = "leaky_relu", "prelu"
HUB_CARD = "README.md"
HUB_SIDE = "hub"  # port-weights' name for a Hub folder DST (X2hub)
HUB_HELP = "a directory: config.json, model.safetensors in timm's names, README.md"
TIMM_ARCHITECTURES = ("darknet53",)  # the ARCHS names timm builds too (timm/models/cspnet.py)
# What timm's evaluation transform needs from the record; it always takes uint8 RGB x 1/255 (ToTensor).
HUB_RECORD_FIELDS = ("mean", "std", "image_size", "interpolation", "crop_pct", "crop_mode")


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
    act_layer = args.get("act_layer", TIMM_LEAKY_RELU)
    if act_layer not in (TIMM_LEAKY_RELU, TIMM_PRELU):
        raise PortingError(
            f"{where}: model_args act_layer {shown(act_layer)} is not Darknet-53's LeakyReLU; expected "
            f"{TIMM_LEAKY_RELU!r} or {TIMM_PRELU!r} (one slope held in the weights)"
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
    # timm builds the head model_args' num_classes asks for, ahead of the top-level one (timm._factory).
    classes = args.get("num_classes", raw.get("num_classes", cfg.get("num_classes")))
    if classes is not None and (isinstance(classes, bool) or not isinstance(classes, int) or classes < 1):
        raise PortingError(f"{where}: num_classes must be an int >= 1, got {shown(classes)}")
    return {"num_classes": classes, "preprocessing": record.to_json(), "model_config": config.to_dict(),
            "act_layer": act_layer}  # fmt: skip


def _timm_config(architecture: str, config: DarknetConfig, num_classes: int, record: Preprocessing) -> dict[str, Any]:
    """config.json as timm's save_for_hf lays it out, with our preprocessing record beside timm's pretrained_cfg."""
    size = record.image_size
    pretrained_cfg = {
        "input_size": [config.in_channels, size, size],
        "interpolation": record.interpolation,
        "mean": list(record.mean or ()),
        "std": list(record.std or ()),
        "crop_pct": record.crop_pct,
        "crop_mode": record.crop_mode,
        "num_classes": num_classes,
        "first_conv": f"{next(keymap.conv_units(config)).timm_prefix}.{keymap.TIMM_CONV}",
        "classifier": keymap.head_unit(config, num_classes).timm_prefix,
    }
    hub_config: dict[str, Any] = {
        "architecture": architecture,
        "num_classes": num_classes,
        "num_features": config.width,
        "global_pool": TIMM_GLOBAL_POOL,
    }
    if record.class_names is not None:
        hub_config["label_names"] = list(record.class_names)
    if config.leaky_slope != SEED_LEAKY_SLOPE:
        hub_config["model_args"] = {"act_layer": TIMM_PRELU}
    return {**hub_config, "pretrained_cfg": pretrained_cfg, "preprocessing": record.to_json()}


def _model_card(
    architecture: str, num_classes: int, record: Preprocessing, source: str, metrics: Mapping[str, float] | None
) -> str:
    """README.md: where the weights come from, their classes and preprocessing, a run's validation metrics."""
    timm_reads = architecture in TIMM_ARCHITECTURES
    names = ", ".join(record.class_names) if record.class_names else "not recorded"
    lines = [
        "---",
        f"library_name: {'timm' if timm_reads else 'darknet53-jax'}",
        "tags: [image-classification, darknet53]",
        "---",
        "",
        f"# Darknet-53 ({architecture}), {num_classes} classes",
        "",
        f"Converted by `port-weights` from `{source}`.",
        "",
        f"- classes, in label order: {names}",
        f"- preprocessing: {record.describe()}",
    ]
    if record.leaky_slope != SEED_LEAKY_SLOPE:
        lines.append(
            f"- LeakyReLU slope {record.leaky_slope}: timm builds it as act_layer '{TIMM_PRELU}' (config.json "
            "model_args), each unit's weight holding that slope"
        )
    if metrics:
        values = " | ".join(f"{v:.4f}" for v in metrics.values())
        table = [f"| {' | '.join(metrics)} |", "|" + "---|" * len(metrics), f"| {values} |"]
        lines += ["", "## Validation (the training run, at this checkpoint)", "", *table]
    lines += ["", "## Use", "", "```python"]
    if timm_reads:
        lines += ["import timm", 'model = timm.create_model("hf-hub:OWNER/NAME", pretrained=True).eval()']
    lines += ["from porting import flax_from_pretrained", 'pretrained = flax_from_pretrained("hf-hub:OWNER/NAME")']
    return "\n".join([*lines, "```", ""])


def write_hub(dst: str | os.PathLike, state: CanonicalStateDict, config: DarknetConfig, record: Preprocessing, *,
              architecture: str, source: str, metrics: Mapping[str, float] | None = None,
              force: bool = False) -> None:  # fmt: skip
    """Write the directory DST as a Hub model repository timm reads (`timm.create_model("local-dir:DST")`).

    model.safetensors holds timm's names (with each unit's PReLU slope when the slope is not timm's LeakyReLU
    default), config.json timm's config and our record, README.md the model card. All three appear together or not
    at all. The weights need a head and a record timm's evaluation transform can follow (HUB_RECORD_FIELDS).
    """
    from safetensors.torch import save

    dst = os.fspath(dst)
    num_classes = keymap.head_width(state, config)
    if num_classes is None:
        raise PortingError(f"cannot write {dst!r}: the weights have no classifier head, and a Hub model repository "
                           "holds a classifier; pass --num-classes N for a freshly initialised one")  # fmt: skip
    unknown = [k for k in HUB_RECORD_FIELDS if getattr(record, k) is None]
    if unknown or record.input not in (None, UINT8_RGB) or record.scale not in (None, PIXEL_SCALE):
        raise PortingError(
            f"cannot write {dst!r}: timm's evaluation transform needs uint8 RGB x 1/255 with "
            f"{', '.join(HUB_RECORD_FIELDS)}, and the weights record {record.describe()}; give the missing ones "
            "with --preprocessing '{\"image_size\": 256, ...}' (nothing was written)"
        )
    if record.leaky_slope is None:
        raise PortingError(f"cannot write {dst!r}: the weights record no leaky slope; pass --leaky-slope")
    # What the folder states: timm's ToTensor input, and the slope as the float32 its tensors hold (the models
    # compute in float32, so the function is the same; a reader then finds the record and the tensors agree).
    slope = float32_slope(record.leaky_slope)
    record = record.replace(input=UINT8_RGB, scale=PIXEL_SCALE, leaky_slope=slope)
    config = config.with_slope(slope)
    timm_state = torch_to_timm_state_dict(canonical_to_torch(state, config), config)
    if config.leaky_slope != SEED_LEAKY_SLOPE:
        import torch

        held = torch.tensor([slope], dtype=torch.float32)
        timm_state.update({unit.timm_act_key(): held.clone() for unit in keymap.conv_units(config)})
    contents = {
        HUB_SAFETENSORS: save({k: v.contiguous() for k, v in timm_state.items()}),
        HUB_CONFIG: json.dumps(_timm_config(architecture, config, num_classes, record), indent=2).encode(),
        HUB_CARD: _model_card(architecture, num_classes, record, source, metrics).encode(),
    }

    def write(tmp: str) -> None:
        os.mkdir(tmp)
        for name, data in contents.items():
            atomic.write_file(os.path.join(tmp, name), data)

    atomic.atomic_write({dst: write}, force, sum(len(data) for data in contents.values()))
