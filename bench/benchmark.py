"""`python -m bench.benchmark [--quick] [--out DIR]`: Flax vs PyTorch Darknet-53, side by side on one device.

Writes DIR/results.json (every record) and DIR/results.md (the tables), rewritten after every case so a
killed run keeps what it measured. `--quick` is the CPU smoke test: a tiny network at 32 px, batch 2,
one-step windows. Exit status: 0 when every selected case ran, 1 when one failed, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import ARCHS, arch_config
from bench.counting import step_counts
from bench.e2e import end_to_end_status
from bench.plan import PlanSettings, build_plan
from bench.report import goals, markdown
from bench.runner import run_plan

# Ceilings measured on the H200 (shared/reference.md section 7): bf16 matmul and device-to-device copy.
H200_BF16_FLOP_S = 794e12
H200_COPY_BYTES_S = 4.26e12
FULL = {"batch_sizes": (128, 256), "image_size": 256, "arch": "darknet53", "warmup": 3, "steps": 10, "repeats": 5}
QUICK = {"batch_sizes": (2,), "image_size": 32, "arch": "tiny", "warmup": 1, "steps": 1, "repeats": 2}
DEFAULT_CASE_TIMEOUT_S = 300.0
VERSIONED = ("jax", "jaxlib", "flax", "optax", "torch", "numpy")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes like 128,256, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive, got {text!r}")
    return sizes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The CLI; shapes and timing default to the full GPU run, or to the tiny CPU run with --quick."""
    p = argparse.ArgumentParser(prog="python -m bench.benchmark", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny network, 32 px, batch 2: the CPU smoke test")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="output directory (default ./bench-out)")
    p.add_argument("--batch-sizes", type=_batch_sizes, help="comma-separated; the first is the primary (128,256)")
    p.add_argument("--image-size", type=_positive_int)
    p.add_argument("--arch", choices=ARCHS)
    p.add_argument("--warmup", type=int, help="untimed steps after the first one")
    p.add_argument("--steps", type=_positive_int, help="steps per timed window")
    p.add_argument("--repeats", type=_positive_int, help="timed windows; the figure is their median")
    p.add_argument("--only", action="append", metavar="GLOB", help="run only cases whose name matches")
    p.add_argument("--skip", action="append", metavar="GLOB", help="skip cases whose name matches")
    p.add_argument("--budget-s", type=float, help="stop starting cases after this many seconds")
    p.add_argument("--case-timeout-s", type=float, default=DEFAULT_CASE_TIMEOUT_S)
    p.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one process per case (default: on, off with --quick; the cache cases are always isolated)",
    )
    p.add_argument(
        "--e2e",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time the real loop, python -m train.flax, over JPEGs and the decoded cache (default: on, off "
        "with --quick: its CPU compile of the trainer takes about a minute)",
    )
    p.add_argument("--e2e-workers", type=int, help="train.flax --num-workers for the real loop (default: CPU cores)")
    args = p.parse_args(argv)
    if args.e2e is None:
        args.e2e = not args.quick
    base = QUICK if args.quick else FULL
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.isolate is None:
        args.isolate = not args.quick
    stride = arch_config(args.arch).total_stride
    if args.image_size % stride:
        p.error(f"--image-size must be a multiple of {stride} (the network's total stride), got {args.image_size}")
    return args


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _counts(args: argparse.Namespace) -> dict[str, Any]:
    config = arch_config(args.arch)
    b = args.batch_sizes[0]
    bf16, f32 = (step_counts(b, args.image_size, n, config) for n in (2, 4))
    floors = bf16.floors(H200_BF16_FLOP_S, H200_COPY_BYTES_S)
    return {
        "GFLOP per training image": round(bf16.train_flop_per_image / 1e9, 3),
        "GFLOP per inference image": round(bf16.fwd_flop_per_image / 1e9, 3),
        "activation elements per image": bf16.activation_elems_per_image,
        f"estimated GB moved per train step, B={b}, bf16 / fp32": (
            round(bf16.train_bytes_per_step / 1e9, 2),
            round(f32.train_bytes_per_step / 1e9, 2),
        ),
        f"estimated GB moved per inference step, B={b}, bf16": round(bf16.infer_bytes_per_step / 1e9, 2),
        "H200 ceilings used (reference.md 7)": f"{H200_BF16_FLOP_S / 1e12:.0f} TFLOP/s bf16, "
        f"{H200_COPY_BYTES_S / 1e12:.2f} TB/s copy",
        "bf16 floors on an H200, img/s (arithmetic / memory)": {k: round(v) for k, v in floors.items()},
    }


def _add_rates(records: list[dict[str, Any]], args: argparse.Namespace) -> None:
    counts = step_counts(1, args.image_size, 2, arch_config(args.arch))
    for r in records:
        if r.get("status") == "ok":
            per_image = counts.train_flop_per_image if r["mode"] == "train" else counts.fwd_flop_per_image
            r["tflop_per_s"] = r["img_per_s"] * per_image / 1e12


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory, then rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    """Run the plan, write results.json and results.md into --out, print the markdown."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work_dir = tempfile.mkdtemp(prefix="bench-")  # fresh compilation caches (first compiles cold), e2e data
    settings = PlanSettings(args.batch_sizes, args.image_size, args.arch, args.warmup, args.steps, args.repeats)
    specs, deselected = build_plan(settings, work_dir, args.only, args.skip, e2e=args.e2e)
    e2e_status = end_to_end_status() if args.e2e else ["end-to-end train.flax loop: skipped: --no-e2e"]

    result: dict[str, Any] = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python -m bench.benchmark " + shlex.join(sys.argv[1:] if argv is None else argv),
            "host": f"{platform.node()}, {platform.platform()}, {os.cpu_count()} CPUs",
            "versions": _versions(),
            "settings": {
                **{k: getattr(args, k) for k in ("quick", "isolate", "arch", "image_size", "batch_sizes")},
                **{k: getattr(args, k) for k in ("warmup", "steps", "repeats", "budget_s")},
                "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
                "JAX_DEFAULT_MATMUL_PRECISION": os.environ.get("JAX_DEFAULT_MATMUL_PRECISION", "(default)"),
            },
        },
        "counts": _counts(args),
        "skipped_parts": deselected + e2e_status,
    }

    def on_result(records: list[dict[str, Any]]) -> None:
        _add_rates(records, args)
        result["cases"] = records
        result["meta"]["devices"] = sorted({r["device"] for r in records if r.get("device")})
        result["goals"] = goals(records)
        write_atomic(args.out / "results.json", json.dumps(result, indent=1, default=str))
        write_atomic(args.out / "results.md", markdown(result))

    try:
        records = run_plan(
            specs, args.isolate, args.budget_s, args.case_timeout_s, on_result, e2e_workers=args.e2e_workers
        )
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    on_result(records)
    print(markdown(result))
    failed = [r["name"] for r in records if r["status"] == "failed"]
    if failed:
        print(f"failed cases: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
