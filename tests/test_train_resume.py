"""Exact resume after kill -9, and SIGTERM saving the current step (the CLI in subprocesses, tiny network)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from porting.runs import CHECKPOINT_DIR, TMP_MARKER, read_meta
from tests.train_helpers import REPO, run_module, subprocess_env, tiny_cli_args

TOTAL = 8
ARGS = ("--steps", str(TOTAL), "--batch-size", "16", "--checkpoint-every", "1", "--log-every", "1")


def _popen(workdir: Path, *extra: str) -> subprocess.Popen:
    env = subprocess_env()
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.Popen(
        [sys.executable, "-m", "train.flax", *tiny_cli_args(workdir, *extra)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _steps(workdir: Path) -> list[int]:
    root = workdir / CHECKPOINT_DIR
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []


def _all_arrays(workdir: Path, step: int) -> dict[str, np.ndarray]:
    """Every array of a checkpoint's state (step, params, optimizer state, BN statistics), by path."""
    tree = ocp.StandardCheckpointer().restore(workdir / CHECKPOINT_DIR / str(step) / "state")
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.slow
def test_kill9_then_resume_gives_bitwise_the_straight_run(tmp_path):
    straight = tmp_path / "straight"
    proc = run_module("train.flax", tiny_cli_args(straight, *ARGS))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    killed = tmp_path / "killed"
    p = _popen(killed, *ARGS)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and p.poll() is None and not [s for s in _steps(killed) if s >= 3]:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    p.stdout.close()
    k = max(_steps(killed))
    assert 3 <= k < TOTAL, f"the run was not killed mid-way (latest checkpoint {k})"

    proc = run_module("train.flax", tiny_cli_args(killed, *ARGS, "--resume"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"resumed from step {k}" in proc.stdout
    assert not [p for p in (killed / CHECKPOINT_DIR).iterdir() if TMP_MARKER in p.name]

    a, b = _all_arrays(straight, TOTAL), _all_arrays(killed, TOTAL)
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert read_meta(straight / CHECKPOINT_DIR)[1]["data_state"] == read_meta(killed / CHECKPOINT_DIR)[1]["data_state"]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_at_the_current_step(tmp_path):
    workdir = tmp_path / "w"
    p = _popen(workdir, "--steps", "500", "--batch-size", "16", "--log-every", "1")
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith("step 3/"):
            p.send_signal(signal.SIGTERM)
            break
    out = "".join(lines) + p.stdout.read()
    p.wait(timeout=120)
    p.stdout.close()
    assert p.returncode == 128 + signal.SIGTERM, out[-3000:]
    stopped = int(re.search(r"stopped by SIGTERM after step (\d+)", out).group(1))
    assert 3 <= stopped < 500
    step, meta = read_meta(workdir / CHECKPOINT_DIR)
    assert step == stopped == meta["loop"]["step"]
    assert meta["data_state"]["step"] == stopped
    assert os.listdir(workdir / CHECKPOINT_DIR)


def test_a_stop_at_an_epoch_end_between_periodic_checkpoints_saves_that_step(tmp_path, monkeypatch):
    """With --checkpoint-every, an epoch end that is neither periodic, the last step nor the best saves nothing by
    itself: a SIGTERM that lands on it must still save the step the run stops at."""
    from train import flax as train_flax
    from train import loop, run

    seen: dict[str, int] = {"steps": 0}
    make_iterators, place_batch = run.make_run_iterators, loop.place_batch

    def iterators(*args, **kwargs):
        train_iter, eval_iter = make_iterators(*args, **kwargs)
        seen["steps_per_epoch"] = train_iter.steps_per_epoch
        return train_iter, eval_iter

    def placed(*args, **kwargs):
        seen["steps"] += 1
        if seen["steps"] == seen["steps_per_epoch"]:  # during the step that ends the first epoch
            os.kill(os.getpid(), signal.SIGTERM)
        return place_batch(*args, **kwargs)

    monkeypatch.setattr(run, "make_run_iterators", iterators)
    monkeypatch.setattr(loop, "place_batch", placed)
    monkeypatch.setattr(run.StepTracker, "end_epoch", lambda self, *a, **k: False)  # never the best
    workdir = tmp_path / "w"
    args = tiny_cli_args(workdir, "--epochs", "3", "--batch-size", "8", "--checkpoint-every", "1000")
    assert train_flax.main(args) == 128 + signal.SIGTERM
    step, meta = read_meta(workdir / CHECKPOINT_DIR)
    assert step == seen["steps_per_epoch"] == meta["loop"]["step"]
