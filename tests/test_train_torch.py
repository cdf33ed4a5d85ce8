"""python -m train.torch runs the same demo and writes the same metrics as train.flax (tiny network)."""

from __future__ import annotations

import copy
import os

import pytest

from porting.runs import TORCH_BEST, TORCH_CHECKPOINT_DIR, TORCH_LATEST
from tests.train_helpers import run_module, tiny_cli_args
from train.logging_utils import read_metrics
from train.run import summarize
from train.torch import lr_at


@pytest.mark.slow
def test_train_torch_runs_the_demo_and_writes_the_shared_metrics(tmp_path):
    workdir = tmp_path / "w"
    proc = run_module("train.torch", [*tiny_cli_args(workdir, "--epochs", "2", "--batch-size", "32"), "--threads", "1"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    val = [r for r in read_metrics(workdir) if r["kind"] == "val"]
    assert len(val) == 2
    import numpy as np

    expected_keys = set(summarize(np.eye(18, dtype=int), 0.0)) | {"kind", "step", "epoch"}
    assert set(val[-1]) == expected_keys
    assert val[-1]["accuracy"] > 3 / 18  # learning: well above chance after two epochs
    assert (workdir / TORCH_CHECKPOINT_DIR / TORCH_LATEST).is_file()
    assert (workdir / TORCH_CHECKPOINT_DIR / TORCH_BEST).is_file()
    assert (workdir / "curves.png").is_file() and (workdir / "config.json").is_file()


def test_torch_schedule_matches_optax():
    import optax

    from train.options import TrainConfig

    config = TrainConfig(data="demo", workdir="unused", lr=0.3, warmup_epochs=1.5)
    want = optax.warmup_cosine_decay_schedule(0.0, 0.3, 6, 40)
    for step in range(41):
        assert lr_at(config, 4, 40, step) == pytest.approx(float(want(step)), rel=1e-5, abs=1e-7)


def test_an_unreadable_init_from_is_refused_before_anything_is_written(tmp_path, capsys):
    from train.torch import main

    workdir = tmp_path / "w"
    assert main([*tiny_cli_args(workdir, "--steps", "1"), "--init-from", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert "--init-from" in err and "x.pt" in err and "Traceback" not in err
    assert not workdir.exists()


def test_train_torch_starts_from_weights_keeps_an_ema_and_resumes(tmp_path, capsys):
    """--init-from (a 5-class file at slope 0.01: its backbone, its slope, a fresh 18-class head), --freeze backbone
    (so the backbone stays the file's, statistics too), --ema-decay (saved, and what porting reads), then --resume."""
    import numpy as np
    import torch
    from porting_helpers import TINY, randomize_torch_state

    import porting
    import torch_ref
    from train.options import TrainConfig
    from train.torch import main

    source = torch_ref.Darknet53(5, 0.01, config=TINY)
    randomize_torch_state(source, seed=8)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    porting.convert(tmp_path / "w.pt", tmp_path / "w.msgpack", leaky_slope=0.01)
    workdir, latest = tmp_path / "run", tmp_path / "run" / TORCH_CHECKPOINT_DIR / TORCH_LATEST
    flags = ["--init-from", str(tmp_path / "w.msgpack"), "--freeze", "backbone", "--ema-decay", "0.5"]
    assert main(tiny_cli_args(workdir, "--steps", "2", "--batch-size", "8", *flags)) == 0  # no --threads: global
    assert "init-from: loaded" in capsys.readouterr().out

    saved = torch.load(latest, weights_only=True)
    assert TrainConfig.from_json(saved["config"]).leaky_slope == 0.01  # from the weights, recorded for --resume
    for key, value in source.state_dict().items():
        if not key.startswith("fc.") and not key.endswith("num_batches_tracked"):
            assert torch.equal(saved["model"][key], value) and torch.equal(saved["ema"][key], value), key
    head = saved["model"]["fc.weight"]
    assert head.shape == (18, TINY.width) and not torch.equal(saved["ema"]["fc.weight"], head)
    run = porting.load_flax_variables(workdir)  # the EMA: what was evaluated and chosen
    np.testing.assert_array_equal(run.state["fc.weight"], saved["ema"]["fc.weight"].numpy())

    # Stopped after step 1 and resumed, the run ends where the straight one did, EMA included: the slope it took from
    # the weights is the saved run's (not a changed flag) and the EMA is restored with the rest.
    import signal

    import train.torch

    step = train.torch.train_step

    def stopped_after_the_first(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # seen at the end of this step: the run saves it and stops
        return step(*args, **kwargs)

    again = tmp_path / "again"
    args = tiny_cli_args(again, "--steps", "2", "--batch-size", "8", *flags)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train.torch, "train_step", stopped_after_the_first)
        assert main(args) == 128 + signal.SIGTERM
    assert main([*args, "--resume"]) == 0
    assert "resumed from step 1" in capsys.readouterr().out
    resumed = torch.load(again / TORCH_CHECKPOINT_DIR / TORCH_LATEST, weights_only=True)
    assert resumed["loop"]["step"] == 2
    for key, value in saved["ema"].items():
        assert torch.equal(resumed["ema"][key], value), key


def test_a_run_that_recorded_flags_train_torch_never_applied_is_not_resumed_as_if_it_had(tmp_path, capsys):
    """Earlier versions (checkpoints without model_config) recorded --freeze & co. without applying them: --resume
    says so instead of continuing with them applied from the middle of the run."""
    import json

    import torch

    from train.options import get_config
    from train.torch import main

    workdir = tmp_path / "w"
    (workdir / TORCH_CHECKPOINT_DIR).mkdir(parents=True)
    saved = get_config("demo", arch="tiny", workdir=str(workdir), freeze="backbone")
    (workdir / "config.json").write_text(json.dumps(saved.to_json()))
    torch.save({"config": saved.to_json()}, workdir / TORCH_CHECKPOINT_DIR / TORCH_LATEST)
    before = sorted(p.name for p in workdir.rglob("*"))
    assert main([*tiny_cli_args(workdir, "--steps", "1"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "recorded --freeze backbone, which train.torch never applied" in err and "Traceback" not in err
    assert sorted(p.name for p in workdir.rglob("*") if p.name != ".lock") == before  # the run's lock file aside


@pytest.mark.parametrize(
    "setting",
    # --freeze backbone: test_finetune. The EMA's setting freezes stage2 too: frozen units' averages stay bitwise.
    [{}, {"freeze": "stage2"}, {"head_lr_mult": 10.0}, {"layer_decay": 0.5}, {"ema_decay": 0.9, "freeze": "stage2"}],
    ids=["plain", "freeze-stage2", "head-lr-mult", "layer-decay", "ema"],
)
def test_one_step_of_each_trainer_makes_the_same_update(setting):
    """The two trainers are one algorithm: from the same weights on the same batch, one step of train.torch's update
    rule moves every parameter (with --ema-decay: its average) as train.flax's does (to 1e-5 of the tensor's largest
    update, plus two float32 ulps of its weights), frozen units and their BatchNorm statistics stay bitwise as they
    were in both."""
    import jax
    import numpy as np
    import torch
    from porting_helpers import TINY, randomize_torch_state

    import torch_ref
    from porting import flax_to_torch_state_dict, torch_state_dict_to_flax
    from tests.train_helpers import SIZE, random_batch
    from train.finetune import frozen_modules
    from train.options import TrainConfig
    from train.state import create_model, create_train_state, make_optimizer, make_schedule, train_step
    from train.torch import Device, freeze_statistics, make_torch_optimizer, set_learning_rate
    from train.torch import train_step as torch_train_step

    config = TrainConfig(data="demo", workdir="unused", arch="tiny", warmup_epochs=0.0, steps=10, lr=0.1,
                         weight_decay=5e-4, **setting)  # fmt: skip
    model = torch_ref.Darknet53(18, config=TINY)
    randomize_torch_state(model, seed=7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = random_batch(np.random.default_rng(3), 8)
    frozen = frozen_modules(TINY, config.freeze)

    tx = make_optimizer(config, make_schedule(config, 10, 10))
    variables = torch_state_dict_to_flax(model.state_dict(), config=TINY)
    ema = config.ema_decay is not None
    state = create_train_state(jax.random.key(0), create_model(TINY, 18, "fp32"), SIZE, tx, variables, ema=ema)
    state, metrics = jax.jit(lambda s, b: train_step(s, b, frozen=frozen, ema_decay=config.ema_decay))(state, batch)
    assert bool(metrics["finite"])
    weights = state.ema if ema else {"params": state.params, "batch_stats": state.batch_stats}
    flax_after = flax_to_torch_state_dict(weights, config=TINY)

    freeze_statistics(model, config)
    optimizer = make_torch_optimizer(model, config)
    set_learning_rate(optimizer, config.lr)  # the schedule's first value without warm-up (test_torch_schedule_...)
    model.train()
    dev = Device(torch.device("cpu"), amp=False, channels_last=False, mean_std=config.mean_std)
    average = copy.deepcopy(model) if ema else None
    assert torch_train_step(model, model, optimizer, dev, batch, config, average)["finite"]
    torch_after = (average or model).state_dict()

    moved = 0
    for key, old in before.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.split(".")[0] in frozen:
            assert torch.equal(torch_after[key], old) and torch.equal(flax_after[key], old), key
            continue
        if "running_" in key:
            continue  # BatchNorm statistics: compared in docs/training.md's note, not the optimizer's work
        want, got = (torch_after[key] - old).double(), (flax_after[key] - old).double()
        # An update is only as exact as the float32 weights it lands in: two of their ulps on top of 1e-5.
        floor = 2 * float(np.spacing(np.float32(old.abs().max())))
        assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max()) + floor, key
        moved += 1
    assert moved > 0
