"""`python -m train.flax` end to end on the demo data with the tiny network: learning, outputs, bad input."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from porting.runs import CHECKPOINT_DIR, checkpoint_steps, read_meta
from tests.train_helpers import once_per_session, run_module, subprocess_env, tiny_cli_args
from train import flax as train_flax
from train.data import load_splits
from train.logging_utils import read_metrics
from train.predict import main as predict_main

EPOCHS = 4
STDOUT_FILE = "train_cli_run.stdout"  # what the shared run printed, beside (not in) its workdir


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny demo run shared by every xdist worker, and what it printed."""

    def train(workdir):
        proc = run_module("train.flax", tiny_cli_args(workdir, "--epochs", str(EPOCHS), "--batch-size", "32"))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        (workdir.parent / STDOUT_FILE).write_text(proc.stdout)

    workdir = once_per_session(tmp_path_factory, "train_cli_run", train)
    return workdir, (workdir.parent / STDOUT_FILE).read_text()


@pytest.mark.slow
def test_demo_run_learns_far_above_chance(trained):
    workdir, _ = trained
    val = [r for r in read_metrics(workdir) if r["kind"] == "val"]
    assert len(val) == EPOCHS
    # 18 classes: chance is 0.056. The tiny net should be several times better after a few epochs.
    assert val[-1]["accuracy"] > 0.3, val[-1]["accuracy"]
    train = [r for r in read_metrics(workdir) if r["kind"] == "train_epoch"]
    assert train[-1]["loss"] < train[0]["loss"]


@pytest.mark.slow
def test_best_checkpoint_is_the_one_with_best_macro_f1(trained):
    workdir, _ = trained
    val = [r for r in read_metrics(workdir) if r["kind"] == "val"]
    # Last maximum: orbax's best-checkpoint ranking keeps the later of equal scores, and the loop follows it.
    best = max(reversed(val), key=lambda r: r["macro_f1"])
    _, best_step = checkpoint_steps(workdir / CHECKPOINT_DIR)
    step, meta = read_meta(workdir / CHECKPOINT_DIR, best_step)
    assert step == best["step"]
    assert meta["val"]["macro_f1"] == pytest.approx(best["macro_f1"])
    # The per-class F1 mean of that record is the macro F1 it reports (classes seen in the val split).
    cm = np.asarray(best["confusion_matrix"])
    seen = (cm.sum(0) + cm.sum(1)) > 0
    assert np.mean(np.asarray(list(best["per_class_f1"].values()))[seen]) == pytest.approx(best["macro_f1"])


@pytest.mark.slow
def test_run_writes_config_metrics_plots_and_latest_checkpoints(trained):
    workdir, stdout = trained
    config = json.loads((workdir / "config.json").read_text())
    assert config["image_size"] == 32 and config["arch"] == "tiny"
    _, meta = read_meta(workdir / CHECKPOINT_DIR)  # what the weights expect travels with them
    assert meta["preprocessing"]["mean"] and meta["preprocessing"]["image_size"] == 32
    assert '"batch_size": 32' in stdout  # the resolved config is printed
    for name in ("metrics.jsonl", "curves.png", "confusion_matrix.png", "summary.json", "data_summary.json"):
        assert (workdir / name).is_file(), name
    assert list((workdir / "tensorboard").iterdir())
    steps = sorted(int(p.name) for p in (workdir / CHECKPOINT_DIR).iterdir() if p.name.isdigit())
    val = [r for r in read_metrics(workdir) if r["kind"] == "val"]
    best = max(reversed(val), key=lambda r: r["macro_f1"])["step"]
    assert steps[-3:] == [r["step"] for r in val[-3:]]  # --keep-checkpoints default: the latest 3 ...
    assert steps[:-3] == ([] if best in steps[-3:] else [best])  # ... plus the best, nothing else
    assert steps[-1] == val[-1]["step"]
    assert len(val[-1]["per_class_f1"]) == 18 and np.asarray(val[-1]["confusion_matrix"]).shape == (18, 18)


@pytest.mark.slow
def test_existing_workdir_is_not_overwritten(trained, capsys):
    workdir, _ = trained
    before = sorted(p.name for p in workdir.iterdir())
    assert train_flax.main(tiny_cli_args(workdir)) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in workdir.iterdir()) == before


@pytest.mark.slow
def test_resume_with_another_config_is_refused(trained, capsys):
    workdir, _ = trained
    args = tiny_cli_args(workdir, "--epochs", str(EPOCHS), "--batch-size", "32", "--lr", "0.01", "--resume")
    assert train_flax.main(args) == 2
    assert "lr: 0.05 -> 0.01" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--batch-size", "0"], "--batch-size must be > 0"),
        (["--lr", "-1"], "--lr must be > 0"),
        (["--image-size", "40"], "multiple of 32"),
        (["--epochs", "0"], "--epochs must be > 0"),
        (["--momentum", "1.5"], "--momentum"),
        (["--resume", "--overwrite"], "contradict"),
        (["--init-from", "/no/such/file.pt"], "does not exist"),
    ],
)
def test_invalid_flags_exit_2_with_the_flag_named(tmp_path, capsys, flags, message):
    assert train_flax.main(tiny_cli_args(tmp_path / "w", *flags)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_resume_without_checkpoint_exits_2(tmp_path, capsys):
    assert train_flax.main(tiny_cli_args(tmp_path / "w", "--resume")) == 2
    assert "no checkpoints" in capsys.readouterr().err


def test_unwritable_workdir_exits_2_before_training(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert train_flax.main(tiny_cli_args(blocker / "w")) == 2
    assert "not writable" in capsys.readouterr().err


@pytest.mark.slow
def test_batch_that_does_not_split_over_devices_exits_2(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "train.flax", *tiny_cli_args(tmp_path / "w", "--batch-size", "6")],
        env=subprocess_env(devices=4),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cannot be split over 4 devices" in proc.stderr


@pytest.mark.slow
def test_nonfinite_steps_in_a_row_stop_the_run_with_a_checkpoint(tmp_path, capsys):
    # lr 1e30: the first update blows the weights up; every later step is non-finite and skipped.
    workdir = tmp_path / "w"
    args = tiny_cli_args(workdir, "--steps", "6", "--batch-size", "16", "--lr", "1e30", "--warmup-epochs", "0")
    assert train_flax.main([*args, "--max-nonfinite", "2"]) == 3
    err = capsys.readouterr().err
    assert "non-finite steps in a row (limit --max-nonfinite 2)" in err
    step, meta = read_meta(workdir / CHECKPOINT_DIR)
    assert meta["loop"]["nonfinite_run"] >= 2 and step < 6
    records = [r for r in read_metrics(workdir) if r["kind"] == "nonfinite"]
    assert [r["in_a_row"] for r in records][:2] == [1, 2]


@pytest.mark.slow
def test_default_relative_workdir_trains_checkpoints_and_predicts(tmp_path, monkeypatch):
    # The README's command gives no --workdir: the run goes to the relative runs/<time>, which orbax (it wants
    # absolute paths) must still accept; predict is then pointed at the relative folder too. In this process:
    # what is tested is the relative path, not a process boundary.
    monkeypatch.chdir(tmp_path)
    assert train_flax.main(["--data", "demo", "--arch", "tiny", "--steps", "2", "--compile-cache", "none"]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "summary.json").is_file() and read_meta(run / CHECKPOINT_DIR)[0] == 2
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(load_splits("demo").val.paths[0], images / "a.jpg")
    rel = os.path.relpath(run, tmp_path)
    assert predict_main(["--checkpoint", rel, "--data", "images", "--out", "pred.csv"]) == 0
    assert (tmp_path / "pred.csv").read_text().splitlines()[0] == "path,class,probability"
