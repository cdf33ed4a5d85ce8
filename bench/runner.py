"""Which cases a run measures (in priority order) and how: in-process or one per subprocess, within a budget.

One process per case (the default on a GPU) gives each case its own cold compile and its own peak-memory
counter (JAX's `peak_bytes_in_use` cannot be reset), keeps JAX and PyTorch from fighting over device
memory, and lets one crashing case leave the others standing. `python -m bench.runner --spec JSON` is that
process: it measures one case and prints its record on the last line.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import MODES, TAIL_CHARS, VARIANTS, CaseSpec, result_record

RESULT_PREFIX = "BENCH_RESULT "
REPO_ROOT = Path(__file__).resolve().parent.parent
WARM_CACHE_LABEL = "warm-cache"
# A real-loop run compiles the trainer's train and eval steps and writes a checkpoint: allow it more time.
E2E_TIMEOUT_FACTOR = 2


@dataclasses.dataclass(frozen=True)
class PlanSettings:
    """Shapes and timing shared by every case of a run."""

    batch_sizes: tuple[int, ...]
    image_size: int
    arch: str
    warmup: int
    steps: int
    repeats: int
    torch_threads: tuple[int, ...] = ()  # each PyTorch CPU case once per thread count; () = torch's default


def build_plan(
    settings: PlanSettings,
    work_dir: str,
    only: list[str] | None = None,
    skip: list[str] | None = None,
    e2e: bool = True,
) -> tuple[list[CaseSpec], list[str]]:
    """(cases to run, most important first; 'name: skipped: reason' lines for those `only`/`skip` removed).

    First: bf16 train at every batch size (Flax, PyTorch AMP), then at the first batch size bf16 inference,
    the warm-cache start, the real loop, torch.compile, the fp32 baselines; then every other combination.
    The first bf16 Flax train case compiles into a fresh persistent cache in `work_dir` (its compile is the
    cold one) and a second process reruns it warm; the real loop's JPEG run compiles cold, its cache run warm.
    """
    first, *rest = settings.batch_sizes
    timing = dataclasses.asdict(settings)
    del timing["batch_sizes"], timing["torch_threads"]

    def case(framework: str, mode: str, variant: str, batch: int = first, **kw: Any) -> CaseSpec:
        return CaseSpec(framework, mode, variant, batch, **{**timing, **kw})

    cold_cache, trainer_cache = str(Path(work_dir) / "jax-cache"), str(Path(work_dir) / "trainer-cache")
    specs = [case("flax", "train", "bf16", b, cache_dir=cold_cache if b == first else None) for b in (first, *rest)]
    specs += [case("torch", "train", "eager_amp_bf16_cl", b) for b in (first, *rest)]
    specs += [case("flax", "infer", "bf16"), case("torch", "infer", "eager_amp_bf16_cl")]
    # Start-up is the figure here: one window is enough.
    specs.append(case("flax", "train", "bf16", cache_dir=cold_cache, label=WARM_CACHE_LABEL, repeats=1))
    if e2e:
        specs += [case("e2e", "train", v, cache_dir=trainer_cache) for v in VARIANTS["e2e"]]
    specs += [case("torch", m, "compile_amp_bf16_cl") for m in MODES]
    specs += [case(f, m, v) for f, v in (("flax", "fp32"), ("torch", "eager_fp32")) for m in MODES]
    names = {s.name for s in specs}
    for b in rest:
        combos = [(f, m, v) for f in ("flax", "torch") for m in MODES for v in VARIANTS[f]]
        specs += [s for s in (case(*c, b) for c in combos) if s.name not in names]

    if settings.torch_threads:  # "PyTorch at its best thread setting" needs each setting in the same run
        specs = [
            dataclasses.replace(s, threads=t) if s.framework == "torch" else s
            for s in specs
            for t in (settings.torch_threads if s.framework == "torch" else (None,))
        ]
    kept, skipped = [], []
    for spec in specs:
        if only and not any(fnmatch.fnmatch(spec.name, p) for p in only):
            skipped.append(f"{spec.name}: skipped: not selected by --only {' '.join(only)}")
        elif skip and any(fnmatch.fnmatch(spec.name, p) for p in skip):
            skipped.append(f"{spec.name}: skipped: excluded by --skip {' '.join(skip)}")
        else:
            kept.append(spec)
    return kept, skipped


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
            spec, "failed", reason=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-TAIL_CHARS:]
        )


def run_isolated(spec: CaseSpec, timeout_s: float) -> dict[str, Any]:
    """Measure `spec` in a fresh Python process (`python -m bench.runner`) and parse its result line."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    spawn_time = time.time()
    cmd = [sys.executable, "-m", "bench.runner", "--spec", json.dumps(dataclasses.asdict(spec))]
    try:
        proc = subprocess.run(
            [*cmd, "--spawn-time", repr(spawn_time)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
            cwd=REPO_ROOT,
        )
    except subprocess.TimeoutExpired as e:
        tail = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return result_record(spec, "failed", reason=f"timeout after {timeout_s:.0f} s", stderr_tail=tail[-TAIL_CHARS:])
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return {**json.loads(line[len(RESULT_PREFIX) :]), "process_wall_s": time.time() - spawn_time}
    reason = f"worker exited with status {proc.returncode} and printed no result"
    return result_record(spec, "failed", reason=reason, stderr_tail=proc.stderr[-TAIL_CHARS:])


def run_plan(
    specs: list[CaseSpec],
    isolate: bool,
    budget_s: float | None,
    case_timeout_s: float,
    on_result: Callable[[list[dict[str, Any]]], None],
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
            print(f"[{i + 1}/{len(specs)}] {spec.name} ({elapsed:.0f} s elapsed)")
            t0 = time.perf_counter()
            if spec.framework == "e2e":  # it starts train.flax as its own process
                from bench.e2e import run_e2e_case

                work = Path(spec.cache_dir).parent / "e2e"
                work.mkdir(exist_ok=True)
                record = run_e2e_case(spec, work, E2E_TIMEOUT_FACTOR * case_timeout_s, e2e_workers)
            elif isolate or spec.cache_dir is not None:  # a cache case measures a process start
                record = run_isolated(spec, case_timeout_s)
            else:
                record = run_case(spec)
            record["case_wall_s"] = time.perf_counter() - t0
            detail = f"{record['img_per_s']:.1f} img/s" if record["status"] == "ok" else record.get("reason", "")
            print(f"    -> {record['status']}: {detail}")
        records.append(record)
        on_result(records)
    return records


def main(argv: list[str] | None = None) -> int:
    """Measure the --spec case, print `BENCH_RESULT {json}` last; exit 0 even when the case failed."""
    parser = argparse.ArgumentParser(description="measure one benchmark case in this fresh process")
    parser.add_argument("--spec", required=True, help="CaseSpec fields as a JSON object")
    parser.add_argument("--spawn-time", type=float, default=None, help="time.time() when the parent spawned us")
    args = parser.parse_args(argv)
    record = run_case(CaseSpec(**json.loads(args.spec)), args.spawn_time)
    print(RESULT_PREFIX + json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
