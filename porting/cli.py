"""`port-weights`: convert Darknet-53 weights between PyTorch, Flax and Darknet files (thin layer over porting)."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

from darknet_arch import ARCHS
from porting.api import arch_name
from porting.convert import DIRECTIONS, check_conversion, convert
from porting.errors import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    SIGNAL_EXIT_BASE,
    STOP_SIGNALS,
    PortingError,
    Stopped,
    pending_stop,
    raise_if_stopped,
)
from porting.files import SIDE_HELP
from porting.hub import HUB_HELP, HUB_SIDE
from porting.preprocessing import FIELDS, parse_preprocessing, read_class_names
from porting.torch_flax import SOURCES


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Within the block, the first SIGTERM/SIGINT raises Stopped; later ones are ignored so cleanup can finish."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread can install handlers
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        if not pending_stop:
            pending_stop.append(signum)
            raise Stopped(signum)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
        pending_stop.clear()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one subcommand per direction, SRC DST and shared options."""
    parser = argparse.ArgumentParser(prog="port-weights", description=__doc__)
    sub = parser.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    side_help = {**SIDE_HELP, HUB_SIDE: HUB_HELP}
    for direction, (src_side, dst_side) in DIRECTIONS.items():
        p = sub.add_parser(direction, help=f"{src_side} ({SIDE_HELP[src_side]}) -> {dst_side} ({side_help[dst_side]})")
        p.add_argument("src", metavar="SRC", help=f"input: {SIDE_HELP[src_side]}" + (
            ", or a training run folder, its checkpoints/ or a step folder, <run>/best, <run>/latest"
            if src_side == "flax" else ", or a train.torch run folder, or a Hub-layout directory (config.json + "
            "model.safetensors)" if src_side == "torch" else ""))
        p.add_argument("dst", metavar="DST", help=f"output: {side_help[dst_side]}")
        p.add_argument(
            "--num-classes",
            type=int,
            default=None,
            help="classifier width; a head-less SRC (darknet53.conv.74) gets a freshly initialised head",
        )
        p.add_argument(
            "--reset-head",
            action="store_true",
            help="replace a head whose width differs from --num-classes by a freshly initialised one",
        )
        p.add_argument(
            "--leaky-slope",
            type=float,
            default=None,
            help="LeakyReLU slope to record and use for --check (default: what SRC records or implies)",
        )
        p.add_argument(
            "--source",
            choices=SOURCES,
            default="auto",
            help="naming of a PyTorch SRC: torch_ref and seed share names, timm is timm's darknet53",
        )
        p.add_argument("--seed", type=int, default=0, help="seed of a freshly initialised head")
        p.add_argument(
            "--check",
            action="store_true",
            help="run torch_ref and Flax on one random batch and print the max difference of each output",
        )
        p.add_argument(
            "--class-names",
            metavar="FILE",
            default=None,
            help="text file of class names, one per line in label order, to record in DST (their count must be the "
            "head's; SRC's own names must agree)",
        )
        p.add_argument(
            "--preprocessing",
            metavar="JSON",
            default=None,
            help="record fields to add, as a JSON object or a .json file, e.g. "
            '\'{"image_size": 256, "interpolation": "bilinear"}\' (fields: ' + ", ".join(FIELDS) + "); a field SRC "
            "records or its format implies must not be contradicted",
        )
        p.add_argument("--force", action="store_true", help="overwrite an existing DST")
        p.add_argument(
            "--arch",
            choices=ARCHS,
            default=None,
            help="architecture of SRC and DST (default: the one SRC records, else the one its tensors fit)",
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `port-weights` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    config = None if args.arch is None else ARCHS[args.arch]
    try:
        with signals_raise():
            class_names = None if args.class_names is None else read_class_names(args.class_names)
            preprocessing = None if args.preprocessing is None else parse_preprocessing(args.preprocessing)
            result = convert(args.src, args.dst, direction=args.direction, force=args.force,
                             num_classes=args.num_classes, leaky_slope=args.leaky_slope, class_names=class_names,
                             preprocessing=preprocessing, source=args.source, seed=args.seed,
                             reset_mismatched_head=args.reset_head, config=config)  # fmt: skip
            head = "none" if result.num_classes is None else f"{result.num_classes} classes"
            print(f"wrote {args.dst} ({args.direction}, from {result.source_format}, {arch_name(result.config)}, "
                  f"head: {head}, leaky_slope: {result.leaky_slope})")  # fmt: skip
            print(f"preprocessing: {result.preprocessing.describe()}")
            for note in result.notes:
                print(f"note: {note}")
            if args.check:
                diffs = check_conversion(args.src, args.dst, leaky_slope=result.leaky_slope, source=args.source,
                                         config=result.config, direction=args.direction)  # fmt: skip
                for name, (diff, scale) in diffs.items():
                    print(f"check {name}: max |torch - flax| = {diff:.3e} (max |torch| = {scale:.3e})")
            raise_if_stopped()
    except (PortingError, OSError) as exc:
        print(f"port-weights: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Stopped as stop:
        print(f"port-weights: stopped by {stop}; nothing was written ({args.dst} as it was, no temporary left)",
              file=sys.stderr)
        return SIGNAL_EXIT_BASE + stop.signum
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
