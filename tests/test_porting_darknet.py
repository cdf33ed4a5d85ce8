"""Darknet .weights: an independently written file, loaded into both models, matches a float64 Darknet forward."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from porting_helpers import TINY, darknet_forward, darknet_layers, relative_max_diff, write_weights_file

import flax_darknet
import torch_ref
from darknet_arch import DARKNET53
from porting import PortingError, darknet_float_count, load_flax_variables, read_darknet_weights
from porting.torch_flax import canonical_to_torch

CLASSES = 5
SIZE = 64
TOL = 1e-5


@pytest.fixture(scope="module")
def layers() -> dict:
    return darknet_layers(TINY, CLASSES, seed=8)


@pytest.fixture(scope="module")
def reference(layers) -> tuple[np.ndarray, np.ndarray, list]:
    # Darknet's input: RGB scaled to [0, 1].
    x = np.random.default_rng(9).uniform(0, 1, (2, 3, SIZE, SIZE)).astype(np.float32)
    logits, features = darknet_forward(layers, x, TINY.feature_stages)
    return x, logits, features


def _check(logits, features: dict, reference, layout: str) -> None:
    _, want_logits, want_features = reference
    assert relative_max_diff(logits, want_logits) <= TOL
    for name, want in zip(TINY.feature_names(), want_features, strict=True):
        got = np.asarray(features[name])
        got = got.transpose(0, 3, 1, 2) if layout == "NHWC" else got
        assert relative_max_diff(got, want) <= TOL, name


@pytest.mark.parametrize("minor", [2, 1])  # 20-byte and 16-byte headers
def test_weights_file_in_flax_matches_float64_darknet_forward(tmp_path, layers, reference, minor):
    path = tmp_path / "net.weights"
    write_weights_file(path, layers, minor=minor, seen=12345)
    result = load_flax_variables(path, config=TINY)
    assert (result.num_classes, result.leaky_slope, result.source_format) == (CLASSES, 0.1, "darknet")
    model = flax_darknet.Darknet53(num_classes=CLASSES, config=TINY)
    fx = reference[0].transpose(0, 2, 3, 1)
    logits = jax.jit(model.apply)(result.variables, fx)
    features = jax.jit(lambda v, x: model.apply(v, x, return_features=True))(result.variables, fx)
    _check(np.asarray(logits), features, reference, "NHWC")


def test_weights_file_in_torch_ref_matches_float64_darknet_forward(tmp_path, layers, reference):
    path = tmp_path / "net.weights"
    write_weights_file(path, layers)
    assert read_darknet_weights(path, config=TINY).header.seen == 0
    model = torch_ref.Darknet53(num_classes=CLASSES, config=TINY).eval()
    model.load_state_dict(canonical_to_torch(load_flax_variables(path, config=TINY).state, TINY), strict=True)
    with torch.no_grad():
        x = torch.from_numpy(reference[0])
        logits, features = model(x).numpy(), {k: v.numpy() for k, v in model.forward_features(x).items()}
    _check(logits, features, reference, "NCHW")


def test_backbone_only_conv74_says_the_head_is_fresh(tmp_path):
    layers = darknet_layers(TINY, None, seed=10)
    path = tmp_path / "tiny.conv.74"
    write_weights_file(path, layers)
    bare = load_flax_variables(path, config=TINY)
    assert bare.num_classes is None and "fc" not in bare.variables["params"]
    assert any("no classifier head" in n for n in bare.notes)
    headed = load_flax_variables(path, num_classes=18, config=TINY)
    assert headed.num_classes == 18
    assert headed.variables["params"]["fc"]["kernel"].shape == (TINY.width, 18)
    assert any("tiny.conv.74 has no classifier head; fc freshly initialised" in n and "seed 0" in n
               for n in headed.notes)  # fmt: skip
    np.testing.assert_array_equal(
        headed.variables["params"]["conv1"]["conv"]["kernel"], layers["stem"]["weights"].transpose(2, 3, 1, 0)
    )
    other_seed = load_flax_variables(path, num_classes=18, config=TINY, seed=1)
    assert not np.array_equal(
        other_seed.variables["params"]["fc"]["kernel"], headed.variables["params"]["fc"]["kernel"]
    )


def test_a_mismatched_head_is_replaced_with_a_note_or_refused(tmp_path, layers):
    path = tmp_path / "net.weights"
    write_weights_file(path, layers)
    result = load_flax_variables(path, num_classes=3, config=TINY)
    assert result.variables["params"]["fc"]["bias"].shape == (3,)
    assert any("5-class head was replaced" in n for n in result.notes)
    with pytest.raises(PortingError, match=r"expected shape \(3, 64\), got \(5, 64\)"):
        load_flax_variables(path, num_classes=3, config=TINY, reset_mismatched_head=False)


def test_darknet53_file_sizes_match_the_published_files():
    # docs/darknet-weights.md: darknet53.weights 41,645,640 floats (166,582,580 bytes), conv.74 40,620,640.
    assert darknet_float_count(DARKNET53, 1000) == 41_645_640
    assert darknet_float_count(DARKNET53, None) == 40_620_640
    assert 20 + 4 * darknet_float_count(DARKNET53, 1000) == 166_582_580


@pytest.mark.parametrize(("change", "what"), [(-4, "truncated"), (4, "extra bytes"), (-1, "odd size")])
def test_wrong_size_is_refused_with_expected_and_actual_sizes(tmp_path, layers, change, what):
    path = tmp_path / "net.weights"
    write_weights_file(path, layers)
    data = path.read_bytes()
    path.write_bytes(data[:change] if change < 0 else data + b"\0" * change)
    with pytest.raises(PortingError, match=rf"expected .* got {len(data) + change}\b"):
        read_darknet_weights(path, config=TINY, num_classes=CLASSES)
    with pytest.raises(PortingError, match=rf"got {len(data) + change}\b"):
        read_darknet_weights(path, config=TINY)


def test_a_file_for_another_network_is_refused(tmp_path, layers):
    path = tmp_path / "tiny.weights"
    write_weights_file(path, layers)
    with pytest.raises(PortingError, match=r"expected 162482580 bytes \(backbone only.*got"):
        read_darknet_weights(path)


def test_nan_in_a_weights_file_names_the_tensor(tmp_path, layers):
    broken = {**layers, "head": {**layers["head"], "weights": layers["head"]["weights"].copy()}}
    broken["head"]["weights"][0, 0, 0, 0] = np.nan
    path = tmp_path / "nan.weights"
    write_weights_file(path, broken)
    with pytest.raises(PortingError, match=r"fc\.weight.*NaN"):
        load_flax_variables(path, config=TINY)


def test_check_after_darknet2torch_with_a_fresh_head_compares_the_backbones(tmp_path):
    from porting import check_conversion, convert

    src, dst = tmp_path / "tiny.conv.74", tmp_path / "tiny.safetensors"
    write_weights_file(src, darknet_layers(TINY, None, seed=12))
    result = convert(src, dst, num_classes=4, config=TINY)
    assert (result.num_classes, result.leaky_slope, result.source_format) == (4, 0.1, "darknet")
    assert any("tiny.conv.74 has no classifier head" in n for n in result.notes)
    diffs = check_conversion(src, dst, config=TINY)
    assert set(diffs) == {"pooled", *TINY.feature_names()}
    for name, (diff, scale) in diffs.items():
        assert diff <= TOL * scale, name
