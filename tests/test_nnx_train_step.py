"""The documented NNX training step (bench.nnx_remat) gives train.state.train_step's parameters after 3 steps.

Both start from the same weights, take the trainer's own optimizer (train.state.make_optimizer: SGD with
Nesterov momentum and masked weight decay) and the same uint8 batch three times, in float32 on the CPU.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from model_helpers import assert_trees_close

from bench.nnx_remat import JittedNNXStep, initial_variables, nnx_train_step, on_pure_dicts, synthetic_batch
from bench.nnx_remat import trainer_optimizer as make_tx
from darknet_arch import TINY
from flax_darknet import Darknet53
from flax_darknet import nnx as dnnx
from train.state import TrainState, train_step

SIZE = 32
BATCH = 4
STEPS = 3
TOL = 1e-6  # relative, per tensor: max |diff| <= 1e-6 x max |linen|
CLASSES = 18  # bench.common.NUM_CLASSES, the labels synthetic_batch draws

pytestmark = pytest.mark.slow  # three jitted training programs (~25 s on 2 cores): out of the quick tier


@pytest.fixture(scope="module")
def linen_result():
    model = Darknet53(num_classes=CLASSES, config=TINY)
    variables = initial_variables(model, SIZE)
    state = TrainState.create(
        apply_fn=model.apply, params=variables["params"], batch_stats=variables["batch_stats"], tx=make_tx()
    )
    batch = synthetic_batch(TINY, BATCH, SIZE)
    step = jax.jit(train_step)
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return variables, batch, {"params": state.params, "batch_stats": state.batch_stats}, losses


def _nnx_model(variables) -> tuple[dnnx.Darknet53, nnx.Optimizer]:
    model = dnnx.from_linen_variables(jax.tree.map(np.asarray, variables), config=TINY)
    model.train()
    return model, nnx.Optimizer(model, on_pure_dicts(make_tx()), wrt=nnx.Param)


def test_jitted_nnx_step_gives_the_linen_steps_parameters(linen_result):
    variables, batch, want, want_losses = linen_result
    step = JittedNNXStep(*_nnx_model(variables))
    losses = [float(step(batch)["loss"]) for _ in range(STEPS)]
    model, optimizer = step.sync()
    np.testing.assert_allclose(losses, want_losses, rtol=TOL)
    assert want_losses[-1] < want_losses[0]  # the step trains
    assert_trees_close(dnnx.linen_variables(model), want, TOL)
    assert int(optimizer.step[...]) == STEPS


def test_nnx_jit_step_gives_the_linen_steps_parameters(linen_result):
    variables, batch, want, _ = linen_result
    model, optimizer = _nnx_model(variables)
    step = nnx.jit(nnx_train_step)
    for _ in range(STEPS):
        step(model, optimizer, batch)
    assert_trees_close(dnnx.linen_variables(model), want, TOL)


def test_a_non_finite_step_changes_nothing(linen_result):
    variables, batch, _, _ = linen_result
    model, optimizer = _nnx_model(variables)
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state((model, optimizer))))
    bad = {**batch, "image": batch["image"].astype(np.float32) * np.inf}  # normalize() gives inf/nan
    metrics = nnx.jit(nnx_train_step)(model, optimizer, bad)
    assert not bool(metrics["finite"])
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state((model, optimizer))))
    jax.tree.map(np.testing.assert_array_equal, after, before)
