"""The real training loop (`python -m train.flax`) over JPEG files and over the decoded cache.

A case writes photo-like JPEGs in the competition's layout (bench/fixture.py), runs `train.flax` on them for
(warmup + repeats + 1) * steps optimizer steps with `--log-every steps`, and reads the loop's own img/s
lines: the first `warmup` windows hold the compile, and the last is dropped because the loop reads metrics
one step late and flushes the last step at the end, which moves time between the last two windows. The
figure is images over seconds across the `repeats` windows between (the harmonic mean of their rates). The
report divides it by the pure train step (flax/train/bf16).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import TAIL_CHARS, CaseSpec, result_record
from bench.fixture import write_dataset

VAL_FRACTION = 0.02
SPARE = 1.1  # more images than one run's steps need, so no epoch ends (eval + checkpoint) inside the timing
PROGRESS_RE = re.compile(r"^step (\d+)/(\d+) epoch \d+ loss \S+ ([0-9.]+) img/s", re.MULTILINE)
DEVICES_RE = re.compile(r"devices: (\d+ \(\w+\))")
REQUIRED_MODULES = ("grain", "tensorboardX", "train.flax")


def missing_modules() -> list[str]:
    """Modules the loop needs that this Python cannot import."""
    return [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]


def end_to_end_status() -> list[str]:
    """Lines for the report naming the end-to-end parts this machine cannot run, and why."""
    missing = missing_modules()
    if not missing:
        return []
    return [
        f"end-to-end train.flax loop (JPEG and decoded cache): skipped: {', '.join(missing)} not importable "
        "(on the GPU host carry the wheels, see bench/NOTES.md)"
    ]


def parse_rates(stdout: str) -> list[float]:
    """The img/s of every progress line `train.flax` printed, in order."""
    return [float(m.group(3)) for m in PROGRESS_RE.finditer(stdout)]


def run_e2e_case(spec: CaseSpec, work: Path, timeout_s: float, num_workers: int | None = None) -> dict[str, Any]:
    """Run `train.flax` over JPEGs (variant 'jpeg') or the decoded cache ('cache') and read its throughput.

    The loop compiles into `spec.cache_dir`; `num_workers` is its --num-workers (default: one per CPU core).
    """
    missing = missing_modules()
    if missing:
        return result_record(spec, "skipped", reason=f"{', '.join(missing)} not importable")
    windows = spec.warmup + spec.repeats + 1  # + 1: the last window, dropped (see the module docstring)
    total_steps = windows * spec.steps
    data = work / "jpeg-data"
    if not data.is_dir():  # shared by the jpeg and the cache case
        write_dataset(data, math.ceil(SPARE * total_steps * spec.batch / (1 - VAL_FRACTION)))
    workdir = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    workers = (os.cpu_count() or 1) if num_workers is None else num_workers
    cmd = [
        sys.executable, "-m", "train.flax", "--data", str(data), "--workdir", str(workdir), "--overwrite",
        "--arch", spec.arch, "--image-size", str(spec.image_size), "--batch-size", str(spec.batch),
        "--steps", str(total_steps), "--epochs", "1", "--log-every", str(spec.steps), "--precision", "bf16",
        "--val-fraction", str(VAL_FRACTION), "--num-workers", str(workers), "--compile-cache", str(spec.cache_dir),
    ]  # fmt: skip
    if spec.variant == "cache":
        cmd += ["--cache-dir", str(work / "decoded-cache")]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout_s, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    except subprocess.TimeoutExpired:
        return result_record(spec, "failed", reason=f"train.flax did not finish in {timeout_s:.0f} s")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rates = parse_rates(proc.stdout)
    if proc.returncode != 0 or len(rates) < windows:
        reason = f"train.flax exited {proc.returncode} with {len(rates)} of {windows} progress lines"
        return result_record(spec, "failed", reason=reason, stderr_tail=(proc.stderr or proc.stdout)[-TAIL_CHARS:])
    timed = rates[spec.warmup : spec.warmup + spec.repeats]
    devices = DEVICES_RE.search(proc.stdout)
    return result_record(
        spec,
        "ok",
        img_per_s=statistics.harmonic_mean(timed),
        step_ms_median=1e3 * spec.batch / statistics.median(timed),
        step_ms_windows=[1e3 * spec.batch / r for r in timed],
        window_img_per_s=rates,
        process_wall_s=time.perf_counter() - t0,
        command=" ".join(cmd[1:]),
        device=None if devices is None else f"train.flax on {devices.group(1)}",
    )
