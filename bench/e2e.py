"""The real training loop (`python -m train.flax`) over JPEG files and over the decoded cache.

A case writes a synthetic dataset in the competition's layout (384x512 JPEGs, 7 per person, every one of
the 18 classes present), runs `train.flax` on it for (warmup + repeats + 1) * steps optimizer steps with
`--log-every steps`, and reads the loop's own img/s lines: the first `warmup` windows hold the compile, and
the last is dropped because the loop reads metrics one step late and flushes the last step at the end, which
moves time between the last two windows. The figure is images over seconds across the `repeats` windows
between (the harmonic mean of their rates, robust to time shifting between neighbours). The report divides
it by the pure trainer step (flax/train/trainer_bf16).
"""

from __future__ import annotations

import importlib.util
import math
import multiprocessing
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import DATA_SEED, CaseSpec, result_record

# The competition's photos: 384 wide, 512 high (shared/reference.md section 7).
JPEG_WIDTH, JPEG_HEIGHT = 384, 512
JPEG_QUALITY = 90
_COARSE = (16, 12)  # random colour field upsampled to the photo size: JPEG-compressible like a photo
_NOISE_STD = 6.0
MASK_STEMS = ("mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal")
PERSON_KINDS = tuple((g, age) for g in ("male", "female") for age in (25, 45, 70))  # every gender x age band
VAL_FRACTION = 0.02
SPARE = 1.1  # more persons than one run's steps need, so no epoch ends (eval + checkpoint) inside the timing
PROGRESS_RE = re.compile(r"^step (\d+)/(\d+) epoch \d+ loss \S+ ([0-9.]+) img/s", re.MULTILINE)
REQUIRED_MODULES = ("grain", "tensorboardX", "train.flax")


def missing_modules() -> list[str]:
    """Modules the loop needs that this Python cannot import."""
    return [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]


def end_to_end_status() -> list[str]:
    """Lines for the report naming the end-to-end parts this machine cannot run, and why."""
    missing = missing_modules()
    if missing:
        return [
            f"end-to-end train.flax loop (JPEG and decoded cache): skipped: {', '.join(missing)} not importable "
            "(on the GPU host carry the wheels, see bench/NOTES.md)"
        ]
    return []


def _write_person(args: tuple[Path, int, int, int]) -> None:
    root, person, height, width = args
    gender, age = PERSON_KINDS[person % len(PERSON_KINDS)]
    folder = root / "images" / f"{person:06d}_{gender}_Asian_{age}"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng((DATA_SEED, person))
    from PIL import Image

    for stem in MASK_STEMS:
        coarse = Image.fromarray(rng.integers(0, 256, (*_COARSE, 3), dtype=np.uint8)).resize((width, height))
        pixels = np.asarray(coarse, np.float32) + rng.normal(0.0, _NOISE_STD, (height, width, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{stem}.jpg", quality=JPEG_QUALITY)


def write_dataset(root: Path, num_images: int, height: int = JPEG_HEIGHT, width: int = JPEG_WIDTH) -> Path:
    """At least `num_images` JPEGs in the mask layout under `root` (written in parallel); returns `root`."""
    persons = max(len(PERSON_KINDS) * 2, math.ceil(num_images / len(MASK_STEMS)))
    jobs = [(root, p, height, width) for p in range(persons)]
    # spawn, not fork: the parent may hold JAX's threads, and a forked copy of them can deadlock.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1, mp_context=context) as pool:
        list(pool.map(_write_person, jobs, chunksize=16))
    return root


def parse_rates(stdout: str) -> list[float]:
    """The img/s of every progress line `train.flax` printed, in order."""
    return [float(m.group(3)) for m in PROGRESS_RE.finditer(stdout)]


def run_e2e_case(
    spec: CaseSpec, work: Path, compile_cache: str, timeout_s: float, num_workers: int | None = None
) -> dict[str, Any]:
    """Run `train.flax` over JPEGs (variant 'jpeg') or the decoded cache ('cache') and read its throughput.

    `num_workers` is train.flax's --num-workers (default: one per CPU core).
    """
    workers = (os.cpu_count() or 1) if num_workers is None else num_workers
    missing = missing_modules()
    if missing:
        return result_record(spec, "skipped", reason=f"{', '.join(missing)} not importable")
    windows = spec.warmup + spec.repeats + 1  # + 1: the last window, dropped (see the module docstring)
    total_steps = windows * spec.steps
    data = work / "jpeg-data"
    if not data.is_dir():  # shared by the jpeg and the cache case
        t0 = time.perf_counter()
        write_dataset(data, math.ceil(SPARE * total_steps * spec.batch / (1 - VAL_FRACTION)))
        (work / "dataset_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n")
    workdir = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    cmd = [
        sys.executable, "-m", "train.flax", "--data", str(data), "--workdir", str(workdir), "--overwrite",
        "--arch", spec.arch, "--image-size", str(spec.image_size), "--batch-size", str(spec.batch),
        "--steps", str(total_steps), "--epochs", "1", "--log-every", str(spec.steps), "--precision", "bf16",
        "--val-fraction", str(VAL_FRACTION), "--num-workers", str(workers),
        "--compile-cache", compile_cache,
    ]  # fmt: skip
    if spec.variant == "cache":
        cmd += ["--cache-dir", str(work / "decoded-cache")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return result_record(spec, "failed", reason=f"train.flax did not finish in {timeout_s:.0f} s")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    wall = time.perf_counter() - t0
    rates = parse_rates(proc.stdout)
    if proc.returncode != 0 or len(rates) < windows:
        return result_record(
            spec,
            "failed",
            reason=f"train.flax exited {proc.returncode} with {len(rates)} of {windows} progress lines",
            stderr_tail=(proc.stderr or proc.stdout)[-2000:],
        )
    timed = rates[spec.warmup : spec.warmup + spec.repeats]
    rate = statistics.harmonic_mean(timed)
    return result_record(
        spec,
        "ok",
        img_per_s=rate,
        step_ms_median=1e3 * spec.batch / statistics.median(timed),
        step_ms_windows=[1e3 * spec.batch / r for r in timed],
        window_img_per_s=rates,
        process_wall_s=wall,
        command=" ".join(cmd[1:]),
        device=_device_line(proc.stdout),
    )


def _device_line(stdout: str) -> str | None:
    m = re.search(r"devices: (\d+ \(\w+\))", stdout)
    return None if m is None else f"train.flax on {m.group(1)}"
