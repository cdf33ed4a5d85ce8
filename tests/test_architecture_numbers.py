"""Both models have the architecture of docs/architecture.md: shapes, parameters, running stats, FLOPs.

The expected numbers are the reference's (from the YOLOv3 paper's table and counted independently), not
values computed by the code under test; the MAC count is also recomputed from the real torch modules.
"""

import jax
import jax.numpy as jnp
import pytest
import torch
from torch import nn

import flax_darknet
import torch_ref
from darknet_arch import DARKNET53, summarize

# docs/architecture.md ("Shapes at 256x256"): the seed's per-stage outputs (C, H, W) at 256x256.
REFERENCE_SHAPES_256 = {
    "conv1": (32, 256, 256),
    "conv2": (64, 128, 128),
    "residual_block1": (64, 128, 128),
    "conv3": (128, 64, 64),
    "residual_block2": (128, 64, 64),
    "conv4": (256, 32, 32),
    "residual_block3": (256, 32, 32),
    "conv5": (512, 16, 16),
    "residual_block4": (512, 16, 16),
    "conv6": (1024, 8, 8),
    "residual_block5": (1024, 8, 8),
}
PARAMS_18 = 40_603_378
PARAMS_1000 = 41_609_928
RUNNING_STAT_FLOATS = 35_712
GMACS_256 = 9.284
GFLOP_256 = 18.57


def expected_shapes(size: int) -> dict[str, tuple[int, int, int]]:
    """The reference shapes scaled to another input side (the network is fully convolutional)."""
    return {k: (c, h * size // 256, w * size // 256) for k, (c, h, w) in REFERENCE_SHAPES_256.items()}


def torch_stage_shapes(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    shapes = {}
    hooks = [
        getattr(model, name).register_forward_hook(lambda _m, _i, out, name=name: shapes.__setitem__(name, out.shape))
        for name in REFERENCE_SHAPES_256
    ]
    model(x)
    for h in hooks:
        h.remove()
    return {k: tuple(v[1:]) for k, v in shapes.items()}


@pytest.mark.parametrize("size", [256, 64])
def test_torch_stage_shapes_match_reference(size):
    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        model = torch_ref.Darknet53()
        shapes = torch_stage_shapes(model, torch.empty(2, 3, size, size))
    assert shapes == expected_shapes(size)


@pytest.mark.parametrize("size", [256, 64])
def test_flax_stage_shapes_match_reference(size):
    model = flax_darknet.Darknet53()
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)

    def run(x):
        variables = model.init(jax.random.key(0), x)
        _, inter = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
        return inter["intermediates"]

    inter = jax.eval_shape(run, x)
    shapes = {name: inter[name]["__call__"][0].shape for name in REFERENCE_SHAPES_256}
    # NHWC -> (C, H, W) for comparison with the seed's NCHW table.
    assert {k: (s[3], s[1], s[2]) for k, s in shapes.items()} == expected_shapes(size)


@pytest.mark.parametrize(("num_classes", "expected"), [(18, PARAMS_18), (1000, PARAMS_1000)])
def test_parameter_counts_match_reference(num_classes, expected):
    with torch.device("meta"):
        tmodel = torch_ref.Darknet53(num_classes=num_classes)
    assert sum(p.numel() for p in tmodel.parameters()) == expected
    stats = sum(b.numel() for n, b in tmodel.named_buffers() if n.endswith(("running_mean", "running_var")))
    assert stats == RUNNING_STAT_FLOATS

    fmodel = flax_darknet.Darknet53(num_classes=num_classes)
    shapes = jax.eval_shape(fmodel.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert sum(x.size for x in jax.tree.leaves(shapes["params"])) == expected
    assert sum(x.size for x in jax.tree.leaves(shapes["batch_stats"])) == RUNNING_STAT_FLOATS

    summary = summarize(DARKNET53, num_classes, 256)
    assert summary.params == expected
    assert summary.running_stats == RUNNING_STAT_FLOATS


def test_summary_flops_match_reference_and_real_modules():
    summary = summarize(DARKNET53, 18, 256)
    assert round(summary.macs / 1e9, 3) == GMACS_256
    assert round(summary.flops / 1e9, 2) == GFLOP_256
    # A second count: multiply-adds of each real torch Conv2d/Linear, from the shapes they produce.
    macs = []

    def count(module, inputs, out):
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            macs.append(out[0].numel() * module.in_channels * kh * kw)
        elif isinstance(module, nn.Linear):
            macs.append(module.in_features * module.out_features)

    with torch.device("meta"):
        model = torch_ref.Darknet53()
        for m in model.modules():
            m.register_forward_hook(count)
        model(torch.empty(1, 3, 256, 256))
    assert sum(macs) == summary.macs
    # Per-stage shapes in the printed summary are the reference's too.
    assert {r.name: r.out_shape for r in summary.rows if r.name in REFERENCE_SHAPES_256} == REFERENCE_SHAPES_256
    assert "40,603,378" in summary.table()


def test_feature_maps_have_strides_8_16_32_and_widths_256_512_1024():
    x = torch.empty(1, 3, 256, 256)
    with torch.device("meta"):
        tfeat = torch_ref.Darknet53().forward_features(x.to("meta"))
    assert {k: tuple(v.shape) for k, v in tfeat.items()} == {
        "stride8": (1, 256, 32, 32),
        "stride16": (1, 512, 16, 16),
        "stride32": (1, 1024, 8, 8),
    }
    model = flax_darknet.Darknet53()

    def run(x):
        v = model.init(jax.random.key(0), x)
        return model.apply(v, x, return_features=True)

    ffeat = jax.eval_shape(run, jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32))
    assert {k: v.shape for k, v in ffeat.items()} == {
        "stride8": (1, 32, 32, 256),
        "stride16": (1, 16, 16, 512),
        "stride32": (1, 8, 8, 1024),
    }


def test_backbone_mode_returns_pooled_1024_vector():
    with torch.device("meta"):
        out = torch_ref.Darknet53(num_classes=None)(torch.empty(2, 3, 64, 64))
    assert tuple(out.shape) == (2, 1024)
    model = flax_darknet.Darknet53(num_classes=None)
    x = jnp.zeros((2, 64, 64, 3))
    shapes = jax.eval_shape(lambda x: model.apply(model.init(jax.random.key(0), x), x), x)
    assert shapes.shape == (2, 1024)
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    assert "fc" not in params
