"""Any feature level (stem at stride 1, stages at strides 2..32): torch_ref, linen and NNX give the same maps.

Weights are ported from a randomised torch_ref (running statistics far from 0/1) with `porting`, so a level
taken from the wrong layer, or a layout slip, shows as a mismatch against the PyTorch reference.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from porting_helpers import TINY, randomize_torch_state, relative_max_diff

import flax_darknet
import torch_ref
from darknet_arch import DARKNET53, FeatureInfo
from flax_darknet import nnx as dnnx
from porting import torch_state_dict_to_flax

SIZE = 64
CLASSES = 3
ALL_LEVELS = tuple(range(TINY.num_feature_levels))
TOL = 1e-5  # the linen equivalence gate: max |diff| <= 1e-5 x max |torch|


@pytest.fixture(scope="module")
def ported():
    tmodel = torch_ref.Darknet53(num_classes=CLASSES, config=TINY, feature_levels=ALL_LEVELS).eval()
    randomize_torch_state(tmodel, seed=5)
    return tmodel, torch_state_dict_to_flax(tmodel.state_dict(), config=TINY)


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    return np.random.default_rng(6).uniform(-1, 1, (2, 3, SIZE, SIZE)).astype(np.float32)


def test_every_level_matches_torch_ref_in_linen_and_nnx(ported, batch):
    tmodel, variables = ported
    with torch.no_grad():
        want = {k: v.numpy() for k, v in tmodel.forward_features(torch.from_numpy(batch)).items()}
    assert list(want) == ["stride1", "stride2", "stride4", "stride8", "stride16", "stride32"]
    x = batch.transpose(0, 2, 3, 1)
    linen_model = flax_darknet.Darknet53(num_classes=CLASSES, config=TINY, feature_levels=ALL_LEVELS)
    linen_maps = jax.jit(lambda v, x: linen_model.apply(v, x, return_features=True))(variables, x)
    nnx_model = dnnx.from_linen_variables(variables, config=TINY, feature_levels=ALL_LEVELS)
    nnx_model.eval()
    nnx_maps = nnx.jit(lambda m, x: m(x, return_features=True))(nnx_model, x)
    for name, maps in (("linen", linen_maps), ("nnx", nnx_maps)):
        assert set(maps) == set(want), name  # jit returns dicts key-sorted; feature_info keeps the order
        for key, ref in want.items():
            got = np.asarray(maps[key]).transpose(0, 3, 1, 2)
            assert got.shape == ref.shape, (name, key)
            err = relative_max_diff(got, ref.astype(np.float64))
            assert err <= TOL, f"{name} {key}: max |diff| / max |ref| = {err:.2e} > {TOL}"


def test_feature_info_agrees_across_models_and_with_the_maps(batch):
    levels = (5, 0, 2)  # any subset, in the caller's order
    expected = (
        FeatureInfo(5, "stride32", TINY.stages[4].out_channels, 32, "residual_block5"),
        FeatureInfo(0, "stride1", TINY.stem_channels, 1, "conv1"),
        FeatureInfo(2, "stride4", TINY.stages[1].out_channels, 4, "residual_block2"),
    )
    t = torch_ref.Darknet53(num_classes=CLASSES, config=TINY, feature_levels=levels)
    f = flax_darknet.Darknet53(num_classes=CLASSES, config=TINY, feature_levels=levels)
    n = dnnx.Darknet53(CLASSES, config=TINY, feature_levels=levels, rngs=nnx.Rngs(0))
    assert t.feature_info == f.feature_info == n.feature_info == expected
    with torch.no_grad():
        maps = t.forward_features(torch.from_numpy(batch))
    assert list(maps) == [i.name for i in expected]
    for info in expected:
        assert tuple(maps[info.name].shape) == (2, info.channels, SIZE // info.stride, SIZE // info.stride)


def test_default_levels_stay_stride_8_16_32():
    want = ("stride8", "stride16", "stride32")
    assert DARKNET53.default_feature_levels == (3, 4, 5)
    assert tuple(i.name for i in flax_darknet.Darknet53().feature_info) == want
    assert tuple(i.channels for i in flax_darknet.Darknet53().feature_info) == (256, 512, 1024)
    with torch.device("meta"):
        assert tuple(i.name for i in torch_ref.Darknet53().feature_info) == want
    abstract = nnx.eval_shape(lambda: dnnx.Darknet53(rngs=nnx.Rngs(0)))
    assert tuple(i.name for i in abstract.feature_info) == want


@pytest.mark.parametrize(
    ("levels", "message"),
    [
        ((3, 6), "feature level 6 is out of range: this network has levels 0..5"),
        ((-1,), "feature level -1 is out of range"),
        ((2, 4, 2), r"feature level 2 is requested twice in \(2, 4, 2\)"),
        ((), "at least one level"),
        ((1.0,), "feature level 1.0 is not an int"),
        (3, "must be a sequence of ints, got 3"),
    ],
)
def test_bad_levels_are_named_by_every_model(levels, message):
    with pytest.raises(ValueError, match=message):
        flax_darknet.Darknet53(config=TINY, feature_levels=levels)
    with pytest.raises(ValueError, match=message):
        torch_ref.Darknet53(config=TINY, feature_levels=levels)
    with pytest.raises(ValueError, match=message):
        dnnx.Darknet53(config=TINY, feature_levels=levels, rngs=nnx.Rngs(0))
