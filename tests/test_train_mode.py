"""Train mode follows the caller: flax examples' step (no `train=`) trains, a plain `apply` evaluates.

The step below is written the way google/flax's examples/imagenet writes it: a TrainState with batch_stats,
`jax.pmap` over a 'batch' axis, `state.apply_fn({'params', 'batch_stats'}, images, mutable=['batch_stats'])`
with no `train=` argument (the example's ResNet trains unless told otherwise), `lax.pmean` of the gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import jax_utils
from flax.training import train_state
from jax import lax

import flax_darknet
from darknet_arch import TINY

SIZE = 32
CLASSES = 4
STEPS = 5
LR = 0.05


class ExampleTrainState(train_state.TrainState):
    """flax examples/imagenet's TrainState: params, optimizer and the BatchNorm statistics."""

    batch_stats: object


def example_train_step(state: ExampleTrainState, batch: dict) -> tuple[ExampleTrainState, jax.Array]:
    def loss_fn(params):
        logits, new_model_state = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, batch["image"], mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, new_model_state

    (loss, new_model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = lax.pmean(grads, axis_name="batch")
    new_state = state.apply_gradients(grads=grads, batch_stats=new_model_state["batch_stats"])
    return new_state, lax.pmean(loss, axis_name="batch")


def explicit_train_step(state: ExampleTrainState, batch: dict) -> tuple[ExampleTrainState, jax.Array]:
    """The same step passing train=True, as train.state.train_step and big_vision-style code do."""

    def loss_fn(params):
        logits, new_model_state = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean(), new_model_state

    (loss, new_model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = lax.pmean(grads, axis_name="batch")
    new_state = state.apply_gradients(grads=grads, batch_stats=new_model_state["batch_stats"])
    return new_state, lax.pmean(loss, axis_name="batch")


@pytest.fixture(scope="module")
def setup():
    model = flax_darknet.Darknet53(num_classes=CLASSES, config=TINY)
    # As the example initialises: jit(model.init) on ones, no train argument.
    variables = jax.jit(model.init)({"params": jax.random.key(0)}, jnp.ones((1, SIZE, SIZE, 3)))
    state = ExampleTrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=optax.sgd(LR, momentum=0.9, nesterov=True),
    )
    rng = np.random.default_rng(0)
    # Off-centre images, so the running statistics (mean 0, var 1 at init) are far from the batch's.
    batch = {
        "image": jnp.asarray(rng.normal(0.5, 2.0, (8, SIZE, SIZE, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, CLASSES, 8), jnp.int32),
    }
    return model, variables, state, batch


def _shard(batch: dict) -> dict:
    n = jax.local_device_count()
    return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)


@pytest.mark.slow
def test_flax_imagenet_style_pmap_step_trains_and_moves_running_statistics(setup):
    _, variables, state, batch = setup
    p_step = jax.pmap(example_train_step, axis_name="batch")
    replicated, sharded = jax_utils.replicate(state), _shard(batch)
    losses = []
    for _ in range(STEPS):
        replicated, loss = p_step(replicated, sharded)
        losses.append(float(loss[0]))
    assert all(np.isfinite(losses)), losses
    # The reported failure: 714, 4e24, NaN. With batch statistics the loss falls from its start near log(4).
    assert losses[0] < 2 * np.log(CLASSES), losses
    assert losses[-1] < 0.7 * losses[0], losses
    trained = jax_utils.unreplicate(replicated)
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), trained.batch_stats,
                         variables["batch_stats"])  # fmt: skip
    assert all(jax.tree.leaves(moved)), "every BatchNorm's running statistics must move"


def test_explicit_train_step_equals_the_implicit_one(setup):
    _, _, state, batch = setup
    replicated, sharded = jax_utils.replicate(state), _shard(batch)
    implicit, implicit_loss = jax.pmap(example_train_step, axis_name="batch")(replicated, sharded)
    explicit, explicit_loss = jax.pmap(explicit_train_step, axis_name="batch")(replicated, sharded)
    np.testing.assert_array_equal(np.asarray(implicit_loss), np.asarray(explicit_loss))
    for a, b in zip(jax.tree.leaves((implicit.params, implicit.batch_stats)),
                    jax.tree.leaves((explicit.params, explicit.batch_stats)), strict=True):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_plain_apply_evaluates_with_running_statistics(setup):
    model, variables, _, batch = setup
    x = batch["image"]
    plain = model.apply(variables, x)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(model.apply(variables, x, train=False)))
    train_logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert not np.allclose(np.asarray(plain), np.asarray(train_logits)), "eval must not use batch statistics"
    # Mutable statistics but an explicit train=False: evaluation, statistics untouched.
    logits, updates = model.apply(variables, x, train=False, mutable=["batch_stats"])
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(plain))
    for a, b in zip(jax.tree.leaves(updates["batch_stats"]), jax.tree.leaves(variables["batch_stats"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Another mutable collection (captured intermediates) is not training either.
    captured, _ = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    np.testing.assert_array_equal(np.asarray(captured), np.asarray(plain))


def test_mutable_batch_stats_without_train_is_train_mode(setup):
    model, variables, _, batch = setup
    implicit = model.apply(variables, batch["image"], mutable=["batch_stats"])
    explicit = model.apply(variables, batch["image"], train=True, mutable=["batch_stats"])
    for a, b in zip(jax.tree.leaves(implicit), jax.tree.leaves(explicit), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_init_without_train_leaves_the_fresh_statistics(setup):
    _, variables, _, _ = setup
    stats = variables["batch_stats"]["conv1"]["bn"]
    np.testing.assert_array_equal(np.asarray(stats["mean"]), 0.0)
    np.testing.assert_array_equal(np.asarray(stats["var"]), 1.0)
