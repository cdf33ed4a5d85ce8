"""Run benchmark cases in-process or one per subprocess, with a time budget, never losing a finished result.

One process per case (the default on a GPU) gives each case its own cold compile and its own peak-memory
counter (JAX's `peak_bytes_in_use` cannot be reset), keeps JAX and PyTorch from fighting over device
memory, and lets one crashing case leave the others standing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import CaseSpec, result_record

RESULT_PREFIX = "BENCH_RESULT "
REPO_ROOT = Path(__file__).resolve().parent.parent
_TAIL_CHARS = 2000
# A real-loop run compiles the trainer's train and eval steps and writes a checkpoint: allow it more time.
E2E_TIMEOUT_FACTOR = 2


def run_case(spec: CaseSpec, spawn_time: float | None = None) -> dict[str, Any]:
    """Measure `spec` in this process; an exception becomes a 'failed' record with its traceback's tail."""
    try:
        if spec.framework == "flax":
            from bench.flax_cases import run_flax_case

            return run_flax_case(spec, spawn_time)
        from bench.torch_cases import run_torch_case

        return run_torch_case(spec, spawn_time)
    except Exception as e:
        return result_record(
            spec, "failed", reason=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-_TAIL_CHARS:]
        )


def run_isolated(spec: CaseSpec, timeout_s: float) -> dict[str, Any]:
    """Measure `spec` in a fresh Python process (`python -m bench.worker`) and parse its result line."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    spec_json = json.dumps(spec.__dict__)
    spawn_time = time.time()
    cmd = [sys.executable, "-m", "bench.worker", "--spec", spec_json, "--spawn-time", repr(spawn_time)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-_TAIL_CHARS:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return result_record(spec, "failed", reason=f"timeout after {timeout_s:.0f} s", stderr_tail=tail)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            record = json.loads(line[len(RESULT_PREFIX) :])
            record["process_wall_s"] = time.time() - spawn_time
            return record
    return result_record(
        spec,
        "failed",
        reason=f"worker exited with status {proc.returncode} and printed no result",
        stderr_tail=proc.stderr[-_TAIL_CHARS:],
    )


def run_plan(
    specs: list[CaseSpec],
    isolate: bool,
    budget_s: float | None,
    case_timeout_s: float,
    on_result: Callable[[list[dict[str, Any]]], None],
    log: Callable[[str], None] = print,
    e2e_workers: int | None = None,
) -> list[dict[str, Any]]:
    """Run `specs` in order; once `budget_s` has elapsed the rest are recorded as skipped.

    `on_result` is called with all records so far after every case, so a killed run keeps what it measured.
    """
    start = time.perf_counter()
    records: list[dict[str, Any]] = []
    for i, spec in enumerate(specs):
        elapsed = time.perf_counter() - start
        if budget_s is not None and elapsed > budget_s:
            record = result_record(spec, "skipped", reason=f"time budget of {budget_s:.0f} s used up")
        else:
            log(f"[{i + 1}/{len(specs)}] {spec.name} ({elapsed:.0f} s elapsed)")
            t0 = time.perf_counter()
            if spec.framework == "e2e":  # it starts train.flax as its own process
                from bench.e2e import run_e2e_case

                work = Path(spec.cache_dir).parent / "e2e"
                work.mkdir(exist_ok=True)
                record = run_e2e_case(spec, work, spec.cache_dir, E2E_TIMEOUT_FACTOR * case_timeout_s, e2e_workers)
            # A cache case measures a process start, so it always gets its own process.
            elif isolate or spec.cache_dir is not None:
                record = run_isolated(spec, case_timeout_s)
            else:
                record = run_case(spec)
            record["case_wall_s"] = time.perf_counter() - t0
            log(f"    -> {record['status']}: " + _one_line(record))
        records.append(record)
        on_result(records)
    return records


def _one_line(record: dict[str, Any]) -> str:
    if record["status"] != "ok":
        return str(record.get("reason", ""))
    first = record.get("first_step_s")
    return f"{record['img_per_s']:.1f} img/s" + ("" if first is None else f", first step {first:.1f} s")
