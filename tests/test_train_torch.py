"""python -m train.torch runs the same demo and writes the same metrics as train.flax (tiny network)."""

from __future__ import annotations

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


FLAX_ONLY_FLAGS = [["--freeze", "backbone"], ["--head-lr-mult", "10"], ["--layer-decay", "0.7"],
                   ["--ema-decay", "0.99"], ["--init-from", "x.pt"]]  # fmt: skip


@pytest.mark.parametrize("flag", FLAX_ONLY_FLAGS, ids=lambda flag: flag[0])
def test_a_flag_train_torch_does_not_apply_is_refused_before_anything_is_written(tmp_path, capsys, flag):
    from train.torch import main

    workdir = tmp_path / "w"
    assert main([*tiny_cli_args(workdir, "--steps", "1"), *flag]) == 2
    err = capsys.readouterr().err
    assert f"{flag[0]} {flag[1]}" in err and "train.torch does not implement" in err and "Traceback" not in err
    assert not workdir.exists()


def test_a_run_that_recorded_flags_train_torch_never_applied_is_not_resumed_as_if_it_had(tmp_path, capsys):
    """Earlier versions recorded --freeze & co. without applying them: --resume says so instead of continuing."""
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
