"""Multi-process training on 127.0.0.1 with JAX's CPU collectives: 2 processes x 2 devices equal 1 x 4 devices,
their checkpoint continues in one process, and failures stop every process with a clear message."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from porting.runs import CHECKPOINT_DIR, read_meta, restore_variables
from tests.train_helpers import REPO, subprocess_env, tiny_cli_args

K = 2  # steps between the checkpoints compared; the runs train 2K steps
# A small learning rate from the first step: the first steps of a fresh network amplify float rounding (the
# order of cross-device sums) by 10-100x per step at the demo's peak rate; at this one the runs stay within RTOL.
RUN = (
    *("--steps", str(2 * K), "--batch-size", "8", "--checkpoint-every", str(K), "--val-fraction", "0.05"),
    *("--lr", "0.005", "--warmup-epochs", "0"),
)
TIMEOUT_S = 300
RTOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], devices: int) -> subprocess.Popen:
    env = subprocess_env(devices)
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.Popen(
        [sys.executable, "-m", "train.flax", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(procs: list[subprocess.Popen], timeout: float = TIMEOUT_S) -> list[tuple[int, str]]:
    """(exit code, output) of each process; every process is killed if any is still running at the end."""
    try:
        deadline = time.monotonic() + timeout
        outs = [p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for p in procs]
        return [(p.returncode, out) for p, out in zip(procs, outs, strict=True)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def two_processes(per_process_args: list[list[str]], devices: int = 2) -> list[subprocess.Popen]:
    port = free_port()
    flags = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--distributed-timeout", "60"]
    return [start([*args, *flags, "--process-id", str(i)], devices) for i, args in enumerate(per_process_args)]


def variables(workdir: Path, step: int) -> dict[str, np.ndarray]:
    from flax import traverse_util

    return traverse_util.flatten_dict(restore_variables(workdir / CHECKPOINT_DIR, step)[0], sep="/")


def assert_close(a: dict[str, np.ndarray], b: dict[str, np.ndarray], what: str) -> None:
    """Parameters, and BatchNorm statistics, equal to RTOL relative: |a - b| / |b| over the whole set (L2 norms).

    Per array would be ill-posed: with zero-initialised residual blocks some BatchNorm biases are still ~1e-7
    after a few steps, pure rounding noise.
    """
    assert a.keys() == b.keys() and len(a) > 10
    for group in ("params/", "batch_stats/"):
        keys = [k for k in a if k.startswith(group)]
        diff = np.sqrt(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in keys))
        norm = np.sqrt(sum(np.sum(b[k].astype(np.float64) ** 2) for k in keys))
        assert keys and diff <= RTOL * norm, f"{what}: {group} differ by {diff / norm:.2e} relative (> {RTOL})"


@pytest.mark.slow
def test_two_processes_equal_one_process_with_four_devices_and_their_checkpoint_continues_in_one_process(tmp_path):
    # One test, so that xdist never splits the runs it compares over two workers (each would redo them).
    multi, single = tmp_path / "multi", tmp_path / "single"
    procs = two_processes([tiny_cli_args(multi, *RUN)] * 2)
    procs.append(start(tiny_cli_args(single, *RUN), devices=4))  # at the same time: the CI has 2 cores
    (code0, out0), (code1, out1), (code4, out4) = finish(procs)
    for code, out in ((code0, out0), (code1, out1), (code4, out4)):
        assert code == 0, out[-3000:]
    assert "devices: 4" in out0 and "devices: 4" in out4
    # Progress, metrics and plots come from process 0 only.
    assert f"step {2 * K}/{2 * K}" in out0 and "done:" in out0
    assert f"step {2 * K}/{2 * K}" not in out1 and "done:" not in out1
    assert (multi / "metrics.jsonl").is_file() and (multi / "curves.png").is_file()
    final = variables(multi, 2 * K)
    for step in (K, 2 * K):
        assert_close(variables(single, step), variables(multi, step), f"1 x 4 devices vs 2 x 2, step {step}")

    # The 2-process checkpoint of step K continues in 1 process (4 devices) to the same step-2K parameters.
    shutil.rmtree(multi / CHECKPOINT_DIR / str(2 * K))
    [(code, out)] = finish([start(tiny_cli_args(multi, *RUN, "--resume"), devices=4)])
    assert code == 0, out[-3000:]
    assert f"resumed from step {K}" in out and "devices: 4" in out
    resumed = variables(multi, 2 * K)
    assert_close(variables(single, 2 * K), resumed, "straight 1 x 4 vs resumed from 2 x 2 at step K")
    assert_close(final, resumed, "straight 2 x 2 vs resumed in 1 x 4 at step K")


@pytest.mark.slow
def test_an_error_on_one_process_stops_both_and_names_it(tmp_path):
    # --cache-dir is per host; process 1's is a file, so only process 1 fails (while building its data cache).
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    args = tiny_cli_args(tmp_path / "run", *RUN)
    start_time = time.monotonic()
    (code0, out0), (code1, out1) = finish(two_processes([args, [*args, "--cache-dir", str(not_a_folder)]]), timeout=120)
    assert time.monotonic() - start_time < 90
    assert code1 == 1 and "error: process 1: FileExistsError" in out1, out1[-3000:]  # an unexpected error: 1
    assert code0 == 5 and "process 0: stopping because process 1 failed" in out0, out0[-3000:]


@pytest.mark.slow
def test_a_batch_that_does_not_split_over_all_devices_is_refused_on_every_process(tmp_path):
    args = tiny_cli_args(tmp_path / "run", "--steps", "1", "--batch-size", "6")
    results = finish(two_processes([args, args]), timeout=120)
    # Each process exits 2 with the error, or 5 when the other one reported it first.
    needle = "--batch-size 6 cannot be split over 4 devices; use a multiple of 4"
    for code, out in results:
        assert code in (2, 5) and needle in out, out[-3000:]
    assert any(code == 2 for code, _ in results)


@pytest.mark.slow
def test_processes_given_different_flags_are_refused(tmp_path):
    args = tiny_cli_args(tmp_path / "run", "--steps", "1")
    results = finish(two_processes([[*args, "--lr", "0.1"], [*args, "--lr", "0.2"]]), timeout=120)
    for code, out in results:
        assert code in (2, 5), out[-3000:]
    assert any("differ from process 0's (lr: 0.1 -> 0.2)" in out for _, out in results), results


@pytest.mark.slow
def test_a_process_count_that_differs_from_the_coordinators_is_refused(tmp_path):
    port = free_port()
    args = [*tiny_cli_args(tmp_path / "run"), "--coordinator", f"127.0.0.1:{port}", "--distributed-timeout", "60"]
    procs = [start([*args, "--num-processes", "2", "--process-id", "0"], devices=2)]
    procs.append(start([*args, "--num-processes", "3", "--process-id", "1"], devices=2))
    (code0, out0), (code1, out1) = finish(procs, timeout=120)
    needle = f"process 1: --num-processes 3, but the coordinator at 127.0.0.1:{port} runs 2 processes"
    assert code1 == 2 and f"error: {needle}" in out1, out1[-3000:]
    assert code0 == 5 and "process 0: stopping because process 1 failed" in out0, out0[-3000:]


def test_unreachable_coordinator_fails_the_cli_within_the_timeout(tmp_path):
    port = free_port()  # nothing listens there
    args = [*tiny_cli_args(tmp_path / "run"), "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    start_time = time.monotonic()
    [(code, out)] = finish([start([*args, "--process-id", "1", "--distributed-timeout", "2"], devices=2)], 60)
    assert code == 2, out[-3000:]
    assert f"process 1: the coordinator at 127.0.0.1:{port} did not answer within 2 s" in out
    assert time.monotonic() - start_time < 30


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--coordinator", "127.0.0.1:1", "--num-processes", "2"], "missing ['--process-id']"),
        (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"], "--process-id must be in 0..1"),
        (["--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
    ],
)
def test_inconsistent_process_flags_fail_the_cli(tmp_path, capsys, flags, needle):
    from train.flax import EXIT_BAD_INPUT, main

    # Refused before JAX's runtime starts, so in-process.
    assert main([*tiny_cli_args(tmp_path / "run"), *flags]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert needle in err, err


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_agreed_step_with_a_checkpoint(tmp_path):
    # JAX's preemption service turns a SIGTERM seen by one process into one step at which every process saves
    # (orbax's reached_preemption) and stops with 128 + SIGTERM.
    workdir = tmp_path / "run"
    args = tiny_cli_args(workdir, "--steps", "2000", "--batch-size", "8", "--val-fraction", "0.05", "--log-every", "1")
    procs = two_processes([args, args])
    try:
        for line in procs[0].stdout:  # wait until the run is in its loop (process 0 prints the progress)
            if "first step done" in line:
                break
        procs[1].send_signal(signal.SIGTERM)  # the other process: the notice must travel
    finally:
        results = finish(procs, timeout=180)
    step, _ = read_meta(workdir / CHECKPOINT_DIR)
    for code, out in results:
        assert code == 128 + signal.SIGTERM, out[-3000:]
    assert f"stopped by SIGTERM after step {step}; checkpoint saved" in results[0][1], results[0][1][-3000:]
    assert 0 < step < 2000
