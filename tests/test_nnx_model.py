"""flax_darknet.nnx.Darknet53: linen's paths, bitwise conversion both ways, train()/eval(), bf16, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flax_darknet
from darknet_arch import TINY
from flax_darknet import nnx as dnnx

SIZE = 32
CLASSES = 5


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_bitwise(a, b) -> None:
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for key, value in fa.items():
        assert value.dtype == fb[key].dtype, key
        np.testing.assert_array_equal(value, fb[key], err_msg=key)


@pytest.fixture(scope="module")
def linen():
    model = flax_darknet.Darknet53(num_classes=CLASSES, config=TINY)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
    # Non-default statistics, so a conversion that dropped or swapped them would show.
    rng = np.random.default_rng(0)
    stats = jax.tree.map(lambda v: jnp.asarray(rng.uniform(0.5, 2.0, v.shape), v.dtype), variables["batch_stats"])
    return model, {"params": variables["params"], "batch_stats": stats}


@pytest.fixture(scope="module")
def batch():
    return jax.random.normal(jax.random.key(1), (4, SIZE, SIZE, 3)) * 2.0 + 0.5


def test_fresh_nnx_model_has_the_linen_paths_shapes_and_dtypes(linen):
    _, variables = linen
    model = dnnx.Darknet53(CLASSES, config=TINY, rngs=nnx.Rngs(0))
    want = jax.tree.map(lambda v: (v.shape, v.dtype), variables)
    got = jax.tree.map(lambda v: (v.shape, v.dtype), dnnx.linen_variables(model))
    assert got == want
    kinds = {type(v).__name__ for v in jax.tree.leaves(nnx.state(model), is_leaf=lambda v: isinstance(v, nnx.Variable))}
    assert kinds == {"Param", "BatchStat"}


def test_linen_to_nnx_and_back_is_bitwise(linen):
    _, variables = linen
    numpy_variables = jax.tree.map(np.asarray, variables)  # what porting.load_flax_variables returns
    model = dnnx.from_linen_variables(numpy_variables, config=TINY)
    assert model.num_classes == CLASSES  # taken from the head
    _assert_bitwise(dnnx.linen_variables(model), variables)
    # And back into a freshly initialised model, in place.
    other = dnnx.Darknet53(CLASSES, config=TINY, rngs=nnx.Rngs(7))
    dnnx.load_state(other, nnx.state(model))
    _assert_bitwise(dnnx.linen_variables(other), variables)


def test_nnx_equals_linen_in_eval_and_train_mode(linen, batch):
    linen_model, variables = linen
    model = dnnx.from_linen_variables(variables, config=TINY)
    model.eval()
    eval_fn = nnx.jit(lambda m, x: m(x))
    # Both jitted: the same XLA program is bitwise the same whatever XLA's optimisation level (an eager linen
    # apply is a different program, equal to the jitted one only while XLA fuses both alike).
    want = jax.jit(linen_model.apply)(variables, batch)
    np.testing.assert_array_equal(np.asarray(eval_fn(model, batch)), np.asarray(want))
    _assert_bitwise(dnnx.linen_variables(model)["batch_stats"], variables["batch_stats"])  # eval: untouched

    model.train()
    logits = eval_fn(model, batch)
    want, updates = jax.jit(lambda v, x: linen_model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, batch)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want), rtol=0, atol=1e-6 * float(jnp.abs(want).max()))
    got_stats, want_stats = _flat(dnnx.linen_variables(model)["batch_stats"]), _flat(updates["batch_stats"])
    for key, value in want_stats.items():
        np.testing.assert_allclose(got_stats[key], value, rtol=1e-6, atol=1e-7, err_msg=key)
        assert not np.array_equal(value, _flat(variables["batch_stats"])[key]), f"{key} did not move in train mode"


def test_new_model_is_in_train_mode_and_eval_switches_every_batchnorm():
    model = dnnx.Darknet53(CLASSES, config=TINY, rngs=nnx.Rngs(0))
    bns = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]
    assert len(bns) == 1 + sum(1 + 2 * s.num_blocks for s in TINY.stages)
    assert not any(bn.use_running_average for bn in bns)
    model.eval()
    assert all(bn.use_running_average for bn in bns)


def test_bf16_compute_keeps_f32_params_stats_and_logits(linen, batch):
    _, variables = linen
    model = dnnx.from_linen_variables(variables, config=TINY, dtype=jnp.bfloat16)
    model.train()
    step = nnx.jit(lambda m, x: (m(x), m(x, return_features=True)))
    logits, features = step(model, batch)
    assert logits.dtype == jnp.float32
    assert {v.dtype for v in features.values()} == {jnp.dtype(jnp.bfloat16)}
    assert {v.dtype for v in jax.tree.leaves(dnnx.linen_variables(model))} == {jnp.dtype(jnp.float32)}


def test_backbone_mode_gives_pooled_features():
    model = dnnx.Darknet53(None, config=TINY, rngs=nnx.Rngs(0))
    assert not hasattr(model, TINY.head_name())
    out = nnx.jit(lambda m, x: m(x))(model, jnp.zeros((2, SIZE, SIZE, 3)))
    assert out.shape == (2, TINY.width)


# ----------------------------------------------------------------------------------------------- bad input


def test_state_of_another_class_count_names_the_head(linen):
    _, variables = linen
    model = dnnx.Darknet53(CLASSES + 1, config=TINY, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"params/fc/kernel: the variables have shape \(64, 5\), this model \(64, 6\)"):
        dnnx.load_linen_variables(model, variables)
    other = dnnx.Darknet53(CLASSES, config=TINY, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_classes"):
        dnnx.load_state(model, nnx.state(other))


def test_state_of_another_config_names_missing_and_extra_leaves(linen):
    _, variables = linen
    full = dnnx.Darknet53(CLASSES, rngs=nnx.Rngs(0))  # Darknet-53's blocks and widths, not TINY's
    with pytest.raises(ValueError, match=r"missing .*residual_block2/block1.*another config"):
        dnnx.load_linen_variables(full, variables)
    tiny = dnnx.Darknet53(CLASSES, config=TINY, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"unexpected .*residual_block2/block1"):
        dnnx.load_state(tiny, nnx.state(full))


def test_missing_extra_or_retyped_leaves_are_named_and_nothing_is_loaded(linen):
    _, variables = linen
    model = dnnx.Darknet53(CLASSES, config=TINY, rngs=nnx.Rngs(3))
    before = jax.tree.map(np.asarray, dnnx.linen_variables(model))
    params = jax.tree.map(np.asarray, variables["params"])
    stats = jax.tree.map(np.asarray, variables["batch_stats"])

    no_bias = {**params, "fc": {"kernel": params["fc"]["kernel"]}}
    with pytest.raises(ValueError, match="missing params/fc/bias"):
        dnnx.load_linen_variables(model, {"params": no_bias, "batch_stats": stats})
    extra = {**params, "fc": {**params["fc"], "scale": np.ones(CLASSES, np.float32)}}
    with pytest.raises(ValueError, match="unexpected params/fc/scale"):
        dnnx.load_linen_variables(model, {"params": extra, "batch_stats": stats})
    f64 = {**params, "fc": {**params["fc"], "bias": params["fc"]["bias"].astype(np.float64)}}
    with pytest.raises(ValueError, match="params/fc/bias: dtype float64"):
        dnnx.load_linen_variables(model, {"params": f64, "batch_stats": stats})
    with pytest.raises(ValueError, match=r"missing \['batch_stats'\]"):
        dnnx.load_linen_variables(model, {"params": params})
    with pytest.raises(ValueError, match=r"extra \['cache'\]"):
        dnnx.load_linen_variables(model, {"params": params, "batch_stats": stats, "cache": {}})
    _assert_bitwise(dnnx.linen_variables(model), before)


def test_bad_constructor_arguments_are_named():
    with pytest.raises(ValueError, match="num_classes"):
        dnnx.Darknet53(0, config=TINY, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown remat mode 'blocks'"):
        dnnx.Darknet53(CLASSES, config=TINY, remat="blocks", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="feature level 6 is out of range"):
        dnnx.Darknet53(CLASSES, config=TINY, feature_levels=(3, 6), rngs=nnx.Rngs(0))
