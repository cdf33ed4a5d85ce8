"""Rematerialisation (none / per residual block / per stage): same names, same gradients, less temporary memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_helpers import assert_trees_close

import flax_darknet
from darknet_arch import TINY
from flax_darknet import REMAT_MODES, remat_compiler_options
from flax_darknet import nnx as dnnx

SIZE = 32
CLASSES = 4
TOL = 1e-6  # relative, per tensor: max |diff| <= 1e-6 x max |reference|


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(0.3, 1.5, (4, SIZE, SIZE, 3)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(4, CLASSES)), jnp.float32)  # every logit matters to the loss
    variables = jax.jit(flax_darknet.Darknet53(num_classes=CLASSES, config=TINY).init)(jax.random.key(0), x)
    return x, cotangent, variables


def _linen_grads(mode: str, variables, x, cotangent):
    model = flax_darknet.Darknet53(num_classes=CLASSES, config=TINY, remat=mode)

    def loss(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(logits * cotangent), (logits, updates["batch_stats"])

    return jax.jit(jax.grad(loss, has_aux=True))(variables["params"])


def test_every_mode_keeps_every_variable_name_and_shape(data):
    x, _, variables = data
    want = jax.tree.map(lambda v: (v.shape, v.dtype), variables)
    for mode in REMAT_MODES:
        model = flax_darknet.Darknet53(num_classes=CLASSES, config=TINY, remat=mode)
        assert jax.tree.map(lambda v: (v.shape, v.dtype), jax.eval_shape(model.init, jax.random.key(0), x)) == want
        nnx_model = nnx.eval_shape(lambda mode=mode: dnnx.Darknet53(CLASSES, config=TINY, remat=mode, rngs=nnx.Rngs(0)))
        assert jax.tree.map(lambda v: (v.shape, v.dtype), dnnx.linen_variables(nnx_model)) == want


@pytest.mark.slow
@pytest.mark.parametrize("mode", [m for m in REMAT_MODES if m != "none"])
def test_linen_gradients_logits_and_statistics_equal_without_remat(data, mode):
    x, cotangent, variables = data
    want_grads, want_aux = _linen_grads("none", variables, x, cotangent)
    got_grads, got_aux = _linen_grads(mode, variables, x, cotangent)
    assert_trees_close(got_grads, want_grads, TOL)
    assert_trees_close(got_aux, want_aux, TOL)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [m for m in REMAT_MODES if m != "none"])
def test_nnx_gradients_and_statistics_equal_without_remat(data, mode):
    x, cotangent, variables = data

    def grads(remat: str):
        model = dnnx.from_linen_variables(variables, config=TINY, remat=remat)
        model.train()
        g = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) * cotangent)))(model)
        return nnx.to_pure_dict(g), dnnx.linen_variables(model)["batch_stats"]

    assert_trees_close(grads(mode), grads("none"), TOL)


def _temp_bytes(mode: str, variables, x, cotangent) -> int:
    model = flax_darknet.Darknet53(num_classes=CLASSES, config=TINY, remat=mode)

    def loss(params):
        logits, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(logits * cotangent)

    jitted = jax.jit(jax.grad(loss), compiler_options=remat_compiler_options(mode))
    return jitted.lower(variables["params"]).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_block_remat_needs_less_temporary_memory_in_xla_analysis(data, xla_optimized):
    # Only the block inputs are kept for the backward pass, not each block's four intermediate activations.
    x, cotangent, variables = data
    big, big_cotangent = jnp.tile(x, (4, 2, 2, 1)), jnp.tile(cotangent, (4, 1))  # 16 x 64 px: activations dominate
    none = _temp_bytes("none", variables, big, big_cotangent)
    block = _temp_bytes("block", variables, big, big_cotangent)
    assert block < 0.85 * none, (block, none)


def test_remat_compiler_options_only_where_remat_needs_them():
    assert remat_compiler_options("none", "cpu") == {}
    assert remat_compiler_options("block", "cpu") == {"xla_disable_hlo_passes": "cse_barrier_expander"}
    assert remat_compiler_options("stage", "cuda") == {}
    with pytest.raises(ValueError, match="unknown remat mode 'blocks'"):
        remat_compiler_options("blocks", "cpu")


def test_unknown_remat_mode_is_named():
    with pytest.raises(ValueError, match=r"unknown remat mode 'full': choose one of 'none', 'block', 'stage'"):
        flax_darknet.Darknet53(config=TINY, remat="full")
    with pytest.raises(ValueError, match="unknown remat mode 'full'"):
        dnnx.Darknet53(config=TINY, remat="full", rngs=nnx.Rngs(0))
