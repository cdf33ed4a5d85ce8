"""BatchNorm folded into the convs (flax_darknet.fold_batchnorm): the eval-only model gives the unfolded logits.

The reference is the unfolded model evaluated in float64 (it shares no code with the fold); running statistics,
scales and shifts are random, so every term of the fold matters. TINY at 32 px also takes conv.py's
small-map matmul path (its last maps are 2x2 and 1x1), so the bias is checked on both conv paths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from darknet_arch import TINY
from flax_darknet import Darknet53, fold_batchnorm, fold_for_inference

SIZE, BATCH, CLASSES = 32, 3, 5
FP32_REL_TOL = 1e-6  # issue 16: folded equals unfolded to 1e-6 relative (max |diff| / max |logit|)
FP64_REL_TOL = 1e-12  # in float64 only the algebra is left


def _variables(dtype: jnp.dtype) -> dict:
    """Initialised variables with random BN scale/bias and running mean/var (init's 1/0/0/1 would fold to W, 0)."""
    model = Darknet53(num_classes=CLASSES, config=TINY, dtype=dtype, param_dtype=dtype)
    variables = model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3), dtype))
    rng = np.random.default_rng(0)
    draws = {
        "scale": lambda s: rng.uniform(0.5, 1.5, s),
        "bias": lambda s: rng.normal(0.0, 0.3, s),
        "mean": lambda s: rng.normal(0.0, 0.5, s),
        "var": lambda s: rng.uniform(0.3, 2.0, s),
    }

    def redraw(path: tuple, leaf: jax.Array) -> jax.Array:
        in_bn = any(getattr(k, "key", None) == "bn" for k in path)
        return jnp.asarray(draws[path[-1].key](leaf.shape), dtype) if in_bn else leaf

    return jax.tree_util.tree_map_with_path(redraw, variables)


def _images(dtype: jnp.dtype) -> jax.Array:
    return jnp.asarray(np.random.default_rng(1).normal(size=(BATCH, SIZE, SIZE, 3)), dtype)


def _logits(variables: dict, images: jax.Array, dtype: jnp.dtype, folded: bool) -> np.ndarray:
    model = Darknet53(num_classes=CLASSES, config=TINY, dtype=dtype, param_dtype=dtype, bn_folded=folded)
    return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images), np.float64)


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _as_float64(tree: dict) -> dict:
    return jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a, np.float64)), tree)


@pytest.fixture(scope="module")
def variables32() -> dict:
    return _variables(jnp.float32)


@pytest.fixture(scope="module")
def reference(variables32: dict) -> np.ndarray:
    """The unfolded model's logits in float64 arithmetic, from the same (fp32) values."""
    with jax.enable_x64(True):
        return _logits(_as_float64(variables32), _as_float64(_images(jnp.float32)), jnp.float64, folded=False)


@pytest.mark.slow
def test_folded_fp32_equals_unfolded_to_1e6_relative_checked_against_float64(variables32, reference):
    images = _images(jnp.float32)
    unfolded = _logits(variables32, images, jnp.float32, folded=False)
    folded = _logits(fold_batchnorm(variables32, TINY), images, jnp.float32, folded=True)
    # The bound is close to fp32's floor for this net: the unfolded fp32 logits are ~6e-7 from float64 here,
    # while a fold that drops eps (1e-5) is off by ~3e-5.
    assert _rel(folded, unfolded) <= FP32_REL_TOL
    assert _rel(folded, reference) <= FP32_REL_TOL
    assert _rel(unfolded, reference) <= FP32_REL_TOL


@pytest.mark.slow
def test_fold_in_float64_is_exact_up_to_rounding(variables32, reference):
    with jax.enable_x64(True):
        folded_variables = fold_batchnorm(_as_float64(variables32), TINY)
        folded = _logits(folded_variables, _as_float64(_images(jnp.float32)), jnp.float64, folded=True)
    assert _rel(folded, reference) <= FP64_REL_TOL


def test_folded_variables_fit_the_folded_model_and_keep_the_names(variables32):
    variables = variables32
    folded = fold_batchnorm(variables, TINY)
    model = Darknet53(num_classes=CLASSES, config=TINY, bn_folded=True)
    want = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
    assert set(want) == set(folded) == {"params"}  # no statistics: the eval path needs none
    assert jax.tree_util.tree_structure(folded) == jax.tree_util.tree_structure(want)
    assert jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), folded) == jax.tree_util.tree_map(
        lambda a: (a.shape, a.dtype), want
    )
    # Same names as the unfolded params, minus every `bn`, plus `conv/bias` where there was one.
    keystr = jax.tree_util.keystr
    before = {keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(variables["params"])[0]}
    after = {keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(folded["params"])[0]}
    bn_layers = {k.split("['bn']")[0] for k in before if "['bn']" in k}
    assert after == {k for k in before if "['bn']" not in k} | {f"{layer}['conv']['bias']" for layer in bn_layers}


def test_folded_model_refuses_training(variables32):
    folded = fold_batchnorm(variables32, TINY)
    model = Darknet53(num_classes=CLASSES, config=TINY, bn_folded=True)
    with pytest.raises(ValueError, match="bn_folded"):
        model.apply(folded, _images(jnp.float32), train=True)


def test_fold_refuses_variables_without_statistics(variables32):
    variables = variables32
    with pytest.raises(ValueError, match="batch_stats"):
        fold_batchnorm({"params": variables["params"]}, TINY)
    folded = fold_batchnorm(variables, TINY)
    with pytest.raises(ValueError, match="unfolded"):
        fold_batchnorm(folded, TINY)


def test_fold_for_inference_gives_the_folded_clone_and_its_variables(variables32, reference):
    model = Darknet53(num_classes=CLASSES, config=TINY)
    folded_model, folded = fold_for_inference(model, variables32)
    assert folded_model.bn_folded and folded_model.num_classes == CLASSES and not model.bn_folded
    logits = np.asarray(folded_model.apply(folded, _images(jnp.float32), train=False), np.float64)
    assert _rel(logits, reference) <= FP32_REL_TOL
