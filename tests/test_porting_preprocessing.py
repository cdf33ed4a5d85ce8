"""The preprocessing record: its schema and checks, how records combine, and that it means what timm and our
trainers do (timm's eval transform and resolve_data_config, the trainers' constants), compared with those rather
than with porting's own code."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import porting
from porting import PortingError, Preprocessing
from porting.hub import hub_meta
from porting.preprocessing import (
    DARKNET,
    FIELDS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PIXEL_SCALE,
    TRAINER_DEFAULTS,
    combine,
    contradictions,
    parse_preprocessing,
    read_class_names,
)

FULL = Preprocessing(input="uint8 RGB", scale=1 / 255, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4), image_size=48,
                     interpolation="bicubic", crop_pct=0.9, crop_mode="center", class_names=("a", "b"),
                     leaky_slope=0.01)  # fmt: skip


def test_the_record_round_trips_through_json_and_gives_every_field():
    assert set(FULL.known()) == set(FIELDS)
    text = json.dumps(FULL.to_json())
    back, unknown = Preprocessing.from_json(json.loads(text), "x")
    assert back == FULL and unknown == []
    assert Preprocessing.from_json(None, "x") == (Preprocessing(), [])
    assert Preprocessing().to_json() == {}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"mean": [0.1, 0.2]}, None),  # fine on its own; the channel count is checked against the network
        ({"std": [0.2, 0.0, 0.2]}, "std must be a non-empty list of positive numbers"),
        ({"mean": "0.5"}, "mean must be a list"),
        ({"scale": float("nan")}, "scale must be a finite number"),
        ({"image_size": 0}, "image_size must be an int in 1..4096"),
        ({"image_size": True}, "image_size must be an int in 1..4096"),
        ({"interpolation": "cubic"}, "interpolation 'cubic' is not one of"),
        ({"crop_pct": 1.5}, r"crop_pct must be in \[0.25, 1\]"),
        ({"crop_mode": "border"}, "crop_mode 'border' is not one of center, squash"),
        ({"class_names": ["a", ""]}, "class_names must be a non-empty list of non-empty strings"),
        ({"leaky_slope": float("inf")}, "leaky_slope must be a finite number"),
        ({"input": "float BGR"}, "input 'float BGR' is not supported"),
    ],
)
def test_bad_fields_are_refused_naming_the_field(fields, message):
    if message is None:
        Preprocessing.from_json(fields, "rec")
        return
    with pytest.raises(PortingError, match=message):
        Preprocessing.from_json(fields, "rec")


def test_unknown_fields_are_an_error_for_the_user_and_reported_for_files():
    with pytest.raises(PortingError, match=r"unknown preprocessing field\(s\) \['image_sise'\]"):
        Preprocessing.from_json({"image_sise": 3}, "--preprocessing")
    record, unknown = Preprocessing.from_json({"image_size": 3, "future": 1}, "file", strict=False)
    assert record == Preprocessing(image_size=3) and unknown == ["future"]


def test_combine_fills_from_each_source_and_refuses_every_disagreement():
    got = combine([("a", Preprocessing(image_size=32)), ("b", Preprocessing(leaky_slope=0.1, image_size=32))], "w")
    assert got == Preprocessing(image_size=32, leaky_slope=0.1)
    assert contradictions([("a", Preprocessing(scale=1 / 255)), ("b", Preprocessing(scale=0.00392156862745098))]) == []
    with pytest.raises(PortingError) as info:
        combine([("file", FULL), ("flag", Preprocessing(leaky_slope=0.1, class_names=("a", "c"), image_size=48))], "w")
    message = str(info.value)
    assert "leaky_slope: 0.01 (file) vs 0.1 (flag)" in message
    assert "class_names: ['a', 'b'] (file) vs ['a', 'c'] (flag)" in message
    assert "image_size" not in message


def test_the_constants_are_timms_and_the_trainers_record_is_complete():
    import timm.data.constants as timm_constants

    from porting.runs import trainer_preprocessing

    assert (IMAGENET_MEAN, IMAGENET_STD) == (timm_constants.IMAGENET_DEFAULT_MEAN, timm_constants.IMAGENET_DEFAULT_STD)
    assert PIXEL_SCALE * 255 == 1
    written = Preprocessing.from_json(trainer_preprocessing((IMAGENET_MEAN, IMAGENET_STD), 32, ["x"], 0.1), "run")[0]
    assert written.known() == FIELDS  # every field a reader needs, so none is filled by a guess
    assert contradictions([("the trainers", written), ("porting", TRAINER_DEFAULTS)]) == []


def _image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    ("interpolation", "crop_pct", "crop_mode"),
    [("bicubic", 0.875, "center"), ("bilinear", 1.0, "center"), ("bicubic", 0.9, "squash"), ("nearest", 1.0, "squash")],
)
@pytest.mark.parametrize(("w", "h"), [(61, 47), (40, 90), (48, 48)])
def test_prepare_equals_timms_eval_transform(interpolation, crop_pct, crop_mode, w, h):
    from timm.data import create_transform

    size, mean, std = 32, (0.5, 0.45, 0.4), (0.25, 0.2, 0.3)
    record = Preprocessing(input="uint8 RGB", scale=PIXEL_SCALE, mean=mean, std=std, image_size=size,
                           interpolation=interpolation, crop_pct=crop_pct, crop_mode=crop_mode)  # fmt: skip
    transform = create_transform(input_size=(3, size, size), interpolation=interpolation, crop_pct=crop_pct,
                                 crop_mode=crop_mode, mean=mean, std=std)  # fmt: skip
    image = _image(w, h, seed=w * h)
    want = transform(image).numpy().transpose(1, 2, 0)
    got = record.prepare(image)
    assert got.shape == (size, size, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def _hub_dir(tmp_path, config: dict):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


DARKNET53_C2NS = {  # timm's pretrained_cfg of darknet53.c2ns_in1k, as timm's config.json holds it
    "input_size": [3, 256, 256], "test_input_size": [3, 288, 288], "interpolation": "bicubic", "crop_pct": 0.887,
    "test_crop_pct": 1.0, "crop_mode": "center", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
    "num_classes": 1000,
}  # fmt: skip


@pytest.mark.parametrize(
    "cfg",
    [
        DARKNET53_C2NS,
        {"input_size": [3, 64, 64]},
        {"crop_pct": 0.95, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3, "test_crop_pct": 0.9},
    ],
    ids=["c2ns_in1k", "defaults", "test_crop_only"],
)
def test_a_hub_config_gives_what_timms_resolve_data_config_gives(tmp_path, cfg):
    from timm.data import resolve_data_config

    meta = hub_meta(_hub_dir(tmp_path, {"architecture": "darknet53", "pretrained_cfg": cfg}))
    record = Preprocessing.from_json(meta["preprocessing"], "x")[0]
    want = resolve_data_config(pretrained_cfg=dict(cfg), use_test_size=True)
    assert record.image_size == want["input_size"][-1]
    assert (record.interpolation, record.crop_pct, record.crop_mode) == (
        want["interpolation"], want["crop_pct"], want["crop_mode"])  # fmt: skip
    assert (record.mean, record.std) == (tuple(want["mean"]), tuple(want["std"]))
    assert record.scale == PIXEL_SCALE and record.leaky_slope is None  # the slope comes from timm's naming


def test_the_c2ns_in1k_record_is_288_px_bicubic_imagenet(tmp_path):
    meta = hub_meta(_hub_dir(tmp_path, {"architecture": "darknet53", "pretrained_cfg": DARKNET53_C2NS}))
    assert meta["preprocessing"]["image_size"] == 288 and meta["preprocessing"]["crop_pct"] == 1.0
    assert meta["num_classes"] == 1000


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"architecture": "cspdarknet53", "pretrained_cfg": {}}, "holds a 'cspdarknet53' model"),
        ({"architecture": "darknet53", "pretrained_cfg": {"input_size": [3, 256, 224]}}, "not a square"),
        ({"architecture": "darknet53", "pretrained_cfg": {"crop_mode": "border"}}, "crop_mode 'border'"),
        ({"architecture": "darknet53", "model_args": {"in_chans": 1}, "pretrained_cfg": {}}, "another network"),
        ({"architecture": "darknet53", "pretrained_cfg": {}, "label_names": {"0": "a", "2": "c"}}, "has gaps"),
        (
            {"architecture": "darknet53", "pretrained_cfg": {"mean": [0.5] * 3}, "preprocessing": {"mean": [0.4] * 3}},
            r"mean: \[0.5, 0.5, 0.5\]",
        ),
        # Wrongly typed fields (each once a TypeError traceback) and numbers that would size allocations.
        ({"architecture": ["darknet53"], "pretrained_cfg": {}}, "architecture must be a string"),
        ({"architecture": "darknet53", "model_args": "in_chans=3", "pretrained_cfg": {}}, "model_args must be an obj"),
        ({"architecture": "darknet53", "pretrained_cfg": {"input_size": 256}}, "input_size must be a list of 3 int"),
        ({"architecture": "darknet53", "pretrained_cfg": {"input_size": [3, "a", "a"]}}, "list of 3 integers"),
        ({"architecture": "darknet53", "pretrained_cfg": {"input_size": [3, 64.9, 64.9]}}, "list of 3 integers"),
        ({"architecture": "darknet53", "pretrained_cfg": {"mean": 0.5}}, "mean must be a list"),
        ({"architecture": "darknet53", "pretrained_cfg": {"input_size": [3, 100000, 100000]}}, "image_size must be"),
        ({"architecture": "darknet53", "pretrained_cfg": {"crop_pct": 0.001}}, "crop_pct must be in"),
        ({"architecture": "darknet53", "pretrained_cfg": {}, "num_classes": "3"}, "num_classes must be an int"),
        ({"architecture": "darknet53", "pretrained_cfg": {}, "num_classes": 3.0}, "num_classes must be an int"),
        ({"architecture": "darknet53", "pretrained_cfg": {}, "label_names": "abc"}, "label_names must be a list"),
    ],
)
def test_a_hub_config_for_another_network_or_with_contradictions_is_refused(tmp_path, config, message):
    with pytest.raises(PortingError, match=message):
        hub_meta(_hub_dir(tmp_path, config))


def test_json_nested_beyond_any_config_is_an_error_naming_the_file_in_every_reader(tmp_path):
    import torch

    import torch_ref
    from darknet_arch import TINY as TINY_ARCH
    from porting.serve_predict import read_sidecar

    deep = "[" * 200_000 + "]" * 200_000
    (tmp_path / "config.json").write_text(deep)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(PortingError):  # the locator reads config.json first: once a RecursionError from it
        porting.load_flax_variables(tmp_path)
    with pytest.raises(PortingError, match=r"config\.json"):
        hub_meta(tmp_path)
    torch.save(torch_ref.Darknet53(num_classes=3, config=TINY_ARCH).state_dict(), tmp_path / "x.pt")
    (tmp_path / "x.pt.meta.json").write_text(deep)
    with pytest.raises(PortingError, match=r"x\.pt\.meta\.json"):
        porting.load_flax_variables(tmp_path / "x.pt")
    (tmp_path / "a.onnx").write_bytes(b"")
    (tmp_path / "a.onnx.json").write_text(deep)
    with pytest.raises(PortingError, match=r"a\.onnx\.json"):
        read_sidecar(tmp_path / "a.onnx")


def test_class_names_files_and_preprocessing_json(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n\n")
    assert read_class_names(names) == ("cat", "dog")
    names.write_text("cat\n\ndog\n")
    with pytest.raises(PortingError, match="blank line"):
        read_class_names(names)
    assert parse_preprocessing('{"image_size": 64}') == Preprocessing(image_size=64)
    (tmp_path / "p.json").write_text(json.dumps(DARKNET.to_json()))
    assert parse_preprocessing(str(tmp_path / "p.json")) == DARKNET
    with pytest.raises(PortingError, match="not valid JSON"):
        parse_preprocessing("{image_size: 64}")
    with pytest.raises(PortingError, match="neither a JSON object nor a readable file"):
        parse_preprocessing(str(tmp_path / "absent.json"))
