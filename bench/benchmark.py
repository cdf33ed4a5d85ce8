"""`python -m bench.benchmark [--quick] [--out DIR]`: Flax vs PyTorch Darknet-53, side by side on one device.

Writes DIR/results.json (every record) and DIR/results.md (the tables), rewritten after every case so a
killed run keeps what it measured. `--quick` is the CPU smoke test: a tiny network at 32 px, batch 2,
one-step windows. Exit status: 0 when every selected case ran, 1 when one failed, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import NUM_CLASSES, OPTIMIZER, run_meta
from bench.counting import counts_summary, step_counts
from bench.e2e import end_to_end_status
from bench.report import headline, markdown
from bench.runner import PlanSettings, build_plan, run_plan
from darknet_arch import ARCHS
from train.logging_utils import atomic_write_text

FULL = {"batch_sizes": (128, 256), "image_size": 256, "arch": "darknet53", "warmup": 3, "steps": 10, "repeats": 5}
QUICK = {"batch_sizes": (2,), "image_size": 32, "arch": "tiny", "warmup": 1, "steps": 1, "repeats": 2}
DEFAULT_CASE_TIMEOUT_S = 300.0
VERSIONED = ("jax", "jaxlib", "flax", "optax", "torch", "numpy")
STEP = f"train.state.train_step on a train.state.TrainState (Flax) and its PyTorch twin; {OPTIMIZER}"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_ints(text: str) -> tuple[int, ...]:
    return tuple(_positive_int(t) for t in text.split(","))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The CLI; shapes and timing default to the full GPU run, or to the tiny CPU run with --quick."""
    p = argparse.ArgumentParser(prog="python -m bench.benchmark", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny network, 32 px, batch 2: the CPU smoke test")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="output directory (default ./bench-out)")
    p.add_argument("--batch-sizes", type=_positive_ints, help="comma-separated, e.g. 128,256; the first is the primary")
    p.add_argument("--image-size", type=_positive_int)
    p.add_argument("--arch", choices=tuple(ARCHS))
    p.add_argument("--warmup", type=int, help="untimed steps after the first one")
    p.add_argument("--steps", type=_positive_int, help="steps per timed window")
    p.add_argument("--repeats", type=_positive_int, help="timed windows; the figure is their median")
    p.add_argument("--only", action="append", metavar="GLOB", help="run only cases whose name matches")
    p.add_argument("--skip", action="append", metavar="GLOB", help="skip cases whose name matches")
    p.add_argument(
        "--torch-threads",
        type=_positive_ints,
        default=(),
        help="comma-separated PyTorch intra-op thread counts, each PyTorch case run once per count (default: "
        "torch's own); the CPU goals compare Flax with the best of them",
    )
    p.add_argument("--budget-s", type=float, help="stop starting cases after this many seconds")
    p.add_argument("--case-timeout-s", type=float, default=DEFAULT_CASE_TIMEOUT_S)
    p.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        help="one process per case (default: on, off with --quick; the cache cases are always isolated)",
    )
    p.add_argument(
        "--e2e",
        action=argparse.BooleanOptionalAction,
        help="also time the real loop, python -m train.flax, over JPEGs and the decoded cache (default: on, off "
        "with --quick: its CPU compile of the trainer takes about a minute)",
    )
    p.add_argument("--e2e-workers", type=int, help="train.flax --num-workers for the real loop (default: CPU cores)")
    args = p.parse_args(argv)
    for key, value in {**(QUICK if args.quick else FULL), "e2e": not args.quick, "isolate": not args.quick}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    stride = ARCHS[args.arch].total_stride
    if args.image_size % stride:
        p.error(f"--image-size must be a multiple of {stride} (the network's total stride), got {args.image_size}")
    return args


def _add_rates(records: list[dict[str, Any]], args: argparse.Namespace) -> None:
    counts = step_counts(ARCHS[args.arch], NUM_CLASSES, args.image_size, 1)
    for r in records:
        if r.get("status") == "ok":
            per_image = counts["train_flop_per_image" if r["mode"] == "train" else "fwd_flop_per_image"]
            r["tflop_per_s"] = r["img_per_s"] * per_image / 1e12


def main(argv: list[str] | None = None) -> int:
    """Run the plan, write results.json and results.md into --out, print the markdown."""
    args = parse_args(argv)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: --out {args.out}: cannot create it ({e.strerror}); pass a writable folder", file=sys.stderr)
        return 2
    work_dir = tempfile.mkdtemp(prefix="bench-")  # fresh compilation caches (first compiles cold), e2e data
    settings = PlanSettings(
        args.batch_sizes, args.image_size, args.arch, args.warmup, args.steps, args.repeats, args.torch_threads
    )
    specs, deselected = build_plan(settings, work_dir, args.only, args.skip, e2e=args.e2e)
    e2e_status = end_to_end_status() if args.e2e else ["end-to-end train.flax loop: skipped: --no-e2e"]
    settings_keys = (
        "quick", "isolate", "arch", "image_size", "batch_sizes", "warmup", "steps", "repeats", "budget_s",
        "torch_threads",
    )  # fmt: skip
    result: dict[str, Any] = {
        "meta": {
            **run_meta("python -m bench.benchmark " + shlex.join(sys.argv[1:] if argv is None else argv), VERSIONED),
            "step": STEP,
            "settings": {
                **{k: getattr(args, k) for k in settings_keys},
                "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
                "JAX_DEFAULT_MATMUL_PRECISION": os.environ.get("JAX_DEFAULT_MATMUL_PRECISION", "(default)"),
            },
        },
        "counts": counts_summary(ARCHS[args.arch], NUM_CLASSES, args.image_size, args.batch_sizes[0]),
        "skipped_parts": deselected + e2e_status,
    }

    def on_result(records: list[dict[str, Any]]) -> None:
        _add_rates(records, args)
        result["cases"] = records
        result["meta"]["devices"] = sorted({r["device"] for r in records if r.get("device")})
        result["headline"] = headline(records)
        atomic_write_text(args.out / "results.json", json.dumps(result, indent=1, default=str))
        atomic_write_text(args.out / "results.md", markdown(result))

    try:
        records = run_plan(
            specs, args.isolate, args.budget_s, args.case_timeout_s, on_result, e2e_workers=args.e2e_workers
        )
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    on_result(records)  # also when no case was selected
    print(markdown(result))
    failed = [r["name"] for r in records if r["status"] == "failed"]
    if failed:
        print(f"failed cases: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
