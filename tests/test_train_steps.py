"""The jitted train step: non-finite batches leave no trace, decay mask, schedule, sharding invariance."""

from __future__ import annotations

import math
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from tests.train_helpers import REPO, SIZE, TINY, one_step, random_batch, subprocess_env
from train.options import TrainConfig
from train.state import (
    create_model,
    create_train_state,
    decay_mask,
    init_variables,
    make_optimizer,
    make_schedule,
    train_step,
    zero_init_residual,
)


@pytest.fixture(scope="module")
def tiny_state():
    config = TrainConfig(data="demo", workdir="unused", lr=0.1, warmup_epochs=0.0)
    model = create_model(TINY, 18, "fp32")
    tx = make_optimizer(config, make_schedule(config, 10, 10))
    return create_train_state(jax.random.PRNGKey(0), model, SIZE, tx)


@pytest.fixture(scope="module")
def step_fn():
    return jax.jit(train_step)  # not donated: the test keeps the input state to compare


def _leaves(state):
    return jax.tree_util.tree_leaves_with_path(
        {"step": state.step, "params": state.params, "opt": state.opt_state, "bs": state.batch_stats}
    )


@pytest.mark.slow
def test_nan_batch_leaves_every_leaf_unchanged(tiny_state, step_fn):
    batch = random_batch(np.random.default_rng(1), 4)
    image = batch["image"].astype(np.float32)
    image[0, 0, 0, 0] = np.nan  # a float batch can carry a NaN; the step normalises it like uint8
    new, metrics = step_fn(tiny_state, {"image": image, "label": batch["label"]})
    assert not bool(metrics["finite"])
    before, after = _leaves(tiny_state), _leaves(new)
    assert len(before) == len(after)
    for (path, a), (_, b) in zip(before, after, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    # The same step on a finite batch does change parameters, statistics, optimizer state and step.
    good, metrics = step_fn(tiny_state, batch)
    assert bool(metrics["finite"])
    changed = [
        not np.array_equal(np.asarray(a), np.asarray(b)) for (_, a), (_, b) in zip(before, _leaves(good), strict=True)
    ]
    assert sum(changed) > len(changed) // 2
    assert int(good.step) == int(tiny_state.step) + 1


def test_state_built_in_one_program_equals_its_parts_built_apart() -> None:
    # create_train_state jits initialisation and optimizer state together; the parts, built on their own (the
    # initialisation jitted alone, the optimizer state op by op), give the same bits.
    config = TrainConfig(data="demo", workdir="unused", lr=0.1)
    model = create_model(TINY, 18, "fp32")
    tx = make_optimizer(config, make_schedule(config, 10, 10))
    rng = jax.random.PRNGKey(3)
    state = create_train_state(rng, model, SIZE, tx, zero_residual=True, ema=True)
    variables = init_variables(rng, model, SIZE, zero_residual=True)
    want = {
        "params": variables["params"],
        "batch_stats": variables["batch_stats"],
        "opt": tx.init(variables["params"]),
        "ema": {"params": variables["params"], "batch_stats": variables["batch_stats"]},
        "step": 0,
    }
    got = {"params": state.params, "batch_stats": state.batch_stats, "opt": state.opt_state, "ema": state.ema,
           "step": state.step}  # fmt: skip
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    assert state.apply_fn == model.apply and state.tx is tx


def test_weight_decay_mask_covers_only_conv_and_dense_kernels(tiny_state):
    flat = traverse_util.flatten_dict(decay_mask(tiny_state.params))
    decayed = sorted("/".join(k) for k, v in flat.items() if v)
    # Independent count from the architecture: stem + 5 down convs + 2 convs per block + the fc kernel.
    expected = 1 + len(TINY.stages) + 2 * sum(s.num_blocks for s in TINY.stages) + 1
    assert len(decayed) == expected
    assert all(k.endswith("conv/kernel") or k == "fc/kernel" for k in decayed)
    assert not any(k.endswith(("scale", "bias")) for k in decayed)


def test_zero_init_residual_zeroes_only_last_bn_scale_of_blocks(tiny_state):
    flat = traverse_util.flatten_dict(zero_init_residual(tiny_state.params), sep="/")
    zeroed = sorted(k for k, v in flat.items() if not np.any(np.asarray(v)) and k.endswith("scale"))
    assert len(zeroed) == sum(s.num_blocks for s in TINY.stages)
    assert all("/layer2/bn/scale" in k for k in zeroed)


def test_schedule_warms_up_linearly_then_follows_a_cosine():
    config = TrainConfig(data="demo", workdir="unused", lr=0.4, warmup_epochs=2.0)
    sched = make_schedule(config, steps_per_epoch=5, total_steps=30)
    for step in range(31):
        want = 0.4 * step / 10 if step < 10 else 0.4 * 0.5 * (1 + math.cos(math.pi * (step - 10) / 20))
        assert float(sched(step)) == pytest.approx(want, rel=1e-5, abs=1e-7)


@pytest.mark.slow
def test_one_step_on_four_devices_equals_one_device(tmp_path):
    # One device: this process's own CPU. Four: a child started with four host devices (a flag read at startup).
    one_step(str(tmp_path / "d1.npz"))
    out = tmp_path / "d4.npz"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "train_helpers.py"), "one-step", str(out)],
        env=subprocess_env(4),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {1: dict(np.load(tmp_path / "d1.npz")), 4: dict(np.load(out))}
    assert int(results[1]["devices"]) == 1 and int(results[4]["devices"]) == 4
    one, four = results[1], results[4]
    assert set(one) == set(four)
    for key in sorted(one):
        if key == "devices":
            continue
        a, b = one[key].astype(np.float64), four[key].astype(np.float64)
        scale = max(np.abs(a).max(), 1e-12)
        assert np.abs(a - b).max() <= 1e-5 * scale, key
