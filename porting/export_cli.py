"""`darknet53-export SRC OUT`: Darknet-53 weights as a serialised JAX program and ONNX, each checked, for serving.

A thin layer over porting.export.export; see docs/export.md.
"""

from __future__ import annotations

import argparse
import sys

from darknet_arch import ARCHS
from porting.cli import EXIT_ERROR, SIGNAL_EXIT_BASE, signals_raise
from porting.errors import PortingError, Stopped, raise_if_stopped
from porting.export import DEFAULT_PLATFORMS, DEFAULT_TARGETS, GATE_REL, PLATFORMS, TARGETS, export


def build_parser() -> argparse.ArgumentParser:
    """SRC OUT, the targets and platforms, and the options that describe a weights file."""
    parser = argparse.ArgumentParser(prog="darknet53-export", description=__doc__.splitlines()[0])
    parser.add_argument("src", metavar="SRC", help="a training run folder (its best checkpoint), its checkpoints/ "
                        "folder or a step folder; or any weights file port-weights reads")  # fmt: skip
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
    file_opts = parser.add_argument_group("a weights file (a run records these itself)")
    file_opts.add_argument("--arch", choices=tuple(ARCHS), default=None, help="architecture (default: darknet53)")
    file_opts.add_argument("--leaky-slope", type=float, default=None,
                           help="LeakyReLU slope (default: what the file records or implies)")  # fmt: skip
    file_opts.add_argument("--image-size", type=int, default=None, help="input side in pixels (default: 256)")
    file_opts.add_argument("--mean", type=float, nargs="+", default=None, help="per-channel mean after x/255 "
                           "(default: ImageNet's; Darknet's own weights: 0 0 0)")  # fmt: skip
    file_opts.add_argument("--std", type=float, nargs="+", default=None, help="per-channel std after x/255 "
                           "(default: ImageNet's; Darknet's own weights: 1 1 1)")  # fmt: skip
    file_opts.add_argument("--class-names", default=None, metavar="A,B,...",
                           help="comma-separated names in label order (default: 0, 1, ...)")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `darknet53-export` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    names = None if args.class_names is None else args.class_names.split(",")
    try:
        with signals_raise():
            result = export(args.src, args.out, targets=args.targets, platforms=args.platforms, force=args.force,
                            check_folder=args.check_images, arch=args.arch, leaky_slope=args.leaky_slope,
                            image_size=args.image_size, mean=args.mean, std=args.std, class_names=names)  # fmt: skip
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
        return EXIT_ERROR
    except Stopped as stop:
        print(f"darknet53-export: stopped by {stop}; nothing was written", file=sys.stderr)
        return SIGNAL_EXIT_BASE + stop.signum
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
