"""The Flax model's modes: train mode updates BatchNorm statistics, eval mode does not, jit works, bf16 is bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_darknet
from darknet_arch import DARKNET_LEAKY_SLOPE, SEED_LEAKY_SLOPE

SIZE = 32  # the smallest side the network takes; the full Darknet-53 still runs every layer


@pytest.fixture(scope="module")
def model_and_variables():
    model = flax_darknet.Darknet53(num_classes=18)
    x = jnp.zeros((2, SIZE, SIZE, 3))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    return model, variables


@pytest.fixture(scope="module")
def batch():
    return jax.random.normal(jax.random.key(1), (4, SIZE, SIZE, 3)) * 2.0 + 0.5


def test_train_mode_updates_batch_stats_and_eval_mode_does_not(model_and_variables, batch):
    model, variables = model_and_variables

    @jax.jit
    def train_apply(variables, x):
        return model.apply(variables, x, train=True, mutable=["batch_stats"])

    logits, updates = train_apply(variables, batch)
    assert logits.shape == (4, 18)
    old = variables["batch_stats"]["conv1"]["bn"]
    new = updates["batch_stats"]["conv1"]["bn"]
    # The first BN sees the stem conv's output; its batch mean is non-zero for this input, so the
    # running mean (initially 0) must move by (1 - 0.9) * batch mean.
    assert not np.allclose(new["mean"], old["mean"])
    assert not np.allclose(new["var"], old["var"])
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), updates["batch_stats"], variables["batch_stats"])
    assert all(jax.tree.leaves(changed)), "every BatchNorm layer must update its statistics in train mode"

    # Eval mode: batch_stats is not mutable, and apply succeeds without asking to mutate it.
    eval_logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, batch)
    assert eval_logits.shape == (4, 18)
    assert np.all(np.isfinite(np.asarray(eval_logits)))


def test_bn_running_mean_moves_by_pytorch_momentum(model_and_variables, batch):
    model, variables = model_and_variables
    # Recompute the stem conv output independently and check the running-mean update rule
    # new = 0.9 * old + 0.1 * batch_mean (PyTorch momentum 0.1).
    kernel = variables["params"]["conv1"]["conv"]["kernel"]
    y = jax.lax.conv_general_dilated(
        batch, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    batch_mean = np.asarray(y).mean(axis=(0, 1, 2))
    _, updates = model.apply(variables, batch, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(updates["batch_stats"]["conv1"]["bn"]["mean"], 0.1 * batch_mean, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_bf16_compute_keeps_f32_params_and_logits(batch):
    model = flax_darknet.Darknet53(num_classes=18, dtype=jnp.bfloat16)
    variables = jax.jit(model.init)(jax.random.key(0), batch)
    assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    logits = jax.jit(lambda v, x: model.apply(v, x))(variables, batch)
    assert logits.dtype == jnp.float32
    features = jax.jit(lambda v, x: model.apply(v, x, return_features=True))(variables, batch)
    assert {v.dtype for v in features.values()} == {jnp.dtype(jnp.bfloat16)}
    _, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, batch)
    assert {x.dtype for x in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}


def test_leaky_slope_defaults_to_darknet_and_is_selectable():
    assert flax_darknet.Darknet53().resolved_config.leaky_slope == DARKNET_LEAKY_SLOPE == 0.1
    assert flax_darknet.Darknet53(leaky_slope=SEED_LEAKY_SLOPE).resolved_config.leaky_slope == 0.01
