"""Fine-tuning controls of train.flax: frozen units stay bitwise unchanged with no optimizer state, the head and
layer-wise multipliers scale exactly their groups' updates, the EMA is Polyak averaging, bad specs are refused."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import traverse_util

from tests.train_helpers import SIZE, TINY, random_batch, tiny_cli_args
from train import flax as train_flax
from train.finetune import frozen_modules, unit_names
from train.options import ConfigError, TrainConfig, validate
from train.state import create_model, create_train_state, make_optimizer, train_step

LR = 0.1


def _setup(**kw):
    config = TrainConfig(data="demo", workdir="unused", arch="tiny", weight_decay=0.0, steps=20, **kw)
    model = create_model(TINY, 18, "fp32")
    state = create_train_state(
        jax.random.key(0), model, SIZE, make_optimizer(config, lambda step: LR), ema=config.ema_decay is not None
    )
    step = jax.jit(
        lambda s, b: train_step(s, b, frozen=frozen_modules(TINY, config.freeze), ema_decay=config.ema_decay)
    )
    return config, state, step


def _flat(tree) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def _batches(n: int):
    rng = np.random.default_rng(0)
    return [random_batch(rng, 8) for _ in range(n)]


@pytest.mark.parametrize("freeze", ["backbone", "stage2"])
def test_frozen_units_and_their_statistics_stay_bitwise_unchanged_for_20_steps(freeze):
    # With an EMA of the weights too: the EMA is what is evaluated and exported, so its frozen leaves must not
    # drift either (an average of equal numbers rounds by an ulp).
    _, state, step = _setup(freeze=freeze, ema_decay=0.9)
    frozen = frozen_modules(TINY, freeze)
    before_p, before_s, before_ema = _flat(state.params), _flat(state.batch_stats), _flat(state.ema)
    for batch in _batches(20):
        state, m = step(state, batch)
        assert bool(m["finite"])
    after_p, after_s, after_ema = _flat(state.params), _flat(state.batch_stats), _flat(state.ema)
    for key, value in before_ema.items():
        if key.split("/")[1] in frozen:
            assert np.array_equal(value, after_ema[key]), f"ema/{key}"
    for flat_before, flat_after in ((before_p, after_p), (before_s, after_s)):
        for key, value in flat_before.items():
            if key.split("/")[0] in frozen:
                assert np.array_equal(value, flat_after[key]), key
    trained = [k for k in before_p if k.split("/")[0] not in frozen]
    assert trained and all(not np.array_equal(before_p[k], after_p[k]) for k in trained if k.endswith("kernel"))
    # No optimizer state (momentum) is kept for frozen parameters: the state holds exactly the trained ones' size.
    state_floats = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state) if x.ndim > 0)
    assert state_floats == sum(before_p[k].size for k in trained)


def _first_update(**kw) -> dict[str, np.ndarray]:
    _, state, step = _setup(**kw)
    before = _flat(state.params)
    state, _ = step(state, _batches(1)[0])
    return {k: v - before[k] for k, v in _flat(state.params).items()}


@pytest.mark.slow
def test_head_and_layer_wise_multipliers_scale_exactly_their_groups_updates():
    plain = _first_update()
    scaled = _first_update(head_lr_mult=10.0, layer_decay=0.5)
    units = unit_names(TINY)
    for key, delta in plain.items():
        unit = next(i for i, names in enumerate(units) if key.split("/")[0] in names)
        mult = 0.5 ** (len(units) - 1 - unit) * (10.0 if unit == len(units) - 1 else 1.0)
        # The deltas are differences of float32 parameters of magnitude <= ~1: 4 ulp of 1.0 is their rounding.
        np.testing.assert_allclose(scaled[key], mult * delta, rtol=1e-5, atol=4 * np.finfo(np.float32).eps, err_msg=key)


def test_ema_of_the_weights_is_polyak_averaging_of_the_steps():
    decay = 0.9
    _, state, step = _setup(ema_decay=decay)
    want = _flat({"params": state.params, "batch_stats": state.batch_stats})
    for batch in _batches(3):
        state, _ = step(state, batch)
        now = _flat({"params": state.params, "batch_stats": state.batch_stats})
        want = {k: decay * want[k].astype(np.float64) + (1 - decay) * now[k] for k in want}
    got = _flat(state.ema)
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-7, err_msg=k)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"freeze": "stage9"}, "--freeze must be one of none, stem, stage1"),
        ({"head_lr_mult": 0.0}, "--head-lr-mult must be > 0"),
        ({"layer_decay": 1.5}, "--layer-decay must be in (0, 1]"),
        ({"ema_decay": 1.0}, "--ema-decay must be in (0, 1)"),
    ],
)
def test_bad_fine_tuning_flags_are_refused_naming_the_flag(kw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(TrainConfig(data="demo", workdir="unused", **kw))


def test_the_cli_refuses_a_freeze_spec_that_names_no_unit(tmp_path, capsys):
    assert train_flax.main(tiny_cli_args(tmp_path / "w", "--freeze", "layer7")) == 2
    assert "--freeze must be one of" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_the_remat_flag_reaches_the_model_and_may_change_on_resume():
    from train.options import build_parser, config_from_args, mutable_on_resume

    config = config_from_args(build_parser("x").parse_args(["--data", "demo", "--arch", "tiny", "--remat", "stage"]))
    assert create_model(config.model_config, 18, "fp32", config.remat).remat == "stage"
    assert mutable_on_resume("remat")  # memory, not numerics: a resumed run may switch it
    with pytest.raises(ConfigError, match="--remat must be one of 'none', 'block', 'stage'"):
        validate(TrainConfig(data="demo", workdir="unused", remat="layer"))
