"""`darknet53-export SRC OUT`: Darknet-53 weights as a serialised JAX program and ONNX, each checked, for serving.

A thin layer over porting.export.export; see docs/export.md.
"""

from __future__ import annotations

import argparse
import sys

from darknet_arch import ARCHS
from porting.cli import signals_raise
from porting.errors import EXIT_BAD_INPUT, EXIT_OK, SIGNAL_EXIT_BASE, PortingError, Stopped, raise_if_stopped
from porting.export import DEFAULT_PLATFORMS, DEFAULT_TARGETS, GATE_REL, PLATFORMS, TARGETS, export
from porting.locations import ACCEPTED
from porting.preprocessing import DEFAULT_IMAGE_SIZE, FIELDS, TRAINER_DEFAULTS, parse_preprocessing, read_class_names


def build_parser() -> argparse.ArgumentParser:
    """SRC OUT, the targets and platforms, and the options that describe a weights file."""
    parser = argparse.ArgumentParser(prog="darknet53-export", description=__doc__.splitlines()[0])
    parser.add_argument("src", metavar="SRC", help=f"the weights: {ACCEPTED}")
    parser.add_argument("out", metavar="OUT", help="output folder (created if missing; its parent must exist)")
    parser.add_argument("--targets", nargs="+", choices=tuple(TARGETS), default=list(DEFAULT_TARGETS),
                        help=f"artefacts to write (default: {' '.join(DEFAULT_TARGETS)}); jax-bf16 computes in "
                        "bfloat16 and records its error against fp32")  # fmt: skip
    parser.add_argument("--platforms", nargs="+", choices=PLATFORMS, default=list(DEFAULT_PLATFORMS),
                        help="platforms the JAX program is lowered for (default: both)")  # fmt: skip
    parser.add_argument("--check-images", default=None, metavar="DIR",
                        help=f"check each artefact (fp32: to {GATE_REL:g} of the max logit) on the first images "
                        "of DIR instead of seeded noise")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="overwrite existing artefacts in OUT")
    record = parser.add_argument_group("what the weights do not record (contradicting their record is refused)")
    record.add_argument("--arch", choices=tuple(ARCHS), default=None,
                        help="architecture (default: what SRC records, else the one its tensors fit)")  # fmt: skip
    record.add_argument("--leaky-slope", type=float, default=None,
                        help="LeakyReLU slope (default: what SRC records or its format implies)")  # fmt: skip
    record.add_argument("--class-names", metavar="FILE", default=None,
                        help="text file of class names, one per line in label order (default: 0, 1, ...)")  # fmt: skip
    record.add_argument("--preprocessing", metavar="JSON", default=None,
                        help="record fields as a JSON object or a .json file, e.g. '{\"image_size\": 224}' (fields: "
                        f"{', '.join(FIELDS)}); what neither SRC nor this gives is the trainers': "
                        f"{TRAINER_DEFAULTS.replace(image_size=DEFAULT_IMAGE_SIZE).describe()}")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `darknet53-export` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        with signals_raise():
            names = None if args.class_names is None else read_class_names(args.class_names)
            record = None if args.preprocessing is None else parse_preprocessing(args.preprocessing)
            result = export(args.src, args.out, targets=args.targets, platforms=args.platforms, force=args.force,
                            check_folder=args.check_images, arch=args.arch, leaky_slope=args.leaky_slope,
                            class_names=names, preprocessing=record)  # fmt: skip
            for target, path in result.artefacts.items():
                check = result.sidecars[target]["check"]
                measured = "" if "skipped" in check else (
                    f", max |logit - {check['reference']}| = {check['max_abs_diff']:.3e} "
                    f"({check['relative_diff']:.2e} of max), top-1 agreement {check['top1_agreement']:.3f}"
                )  # fmt: skip
                print(f"wrote {path} (+{path.name}.json){measured}")
            for note in result.notes:
                print(f"note: {note}")
            raise_if_stopped()
    except (PortingError, OSError) as exc:
        print(f"darknet53-export: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Stopped as stop:
        print(f"darknet53-export: stopped by {stop}; nothing was written", file=sys.stderr)
        return SIGNAL_EXIT_BASE + stop.signum
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
