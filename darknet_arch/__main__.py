"""`python -m darknet_arch`: print Darknet-53's per-stage shapes, parameters and FLOPs."""

from __future__ import annotations

import argparse

from darknet_arch.config import DARKNET53
from darknet_arch.summary import summarize


def main(argv: list[str] | None = None) -> int:
    """Print the summary table for the requested input size and head."""
    parser = argparse.ArgumentParser(prog="python -m darknet_arch", description=__doc__)
    parser.add_argument("--image-size", type=int, default=256, help="input side, a multiple of 32")
    parser.add_argument("--num-classes", type=int, default=18, help="classifier width; 0 for the backbone alone")
    args = parser.parse_args(argv)
    if args.num_classes < 0:
        parser.error(f"--num-classes must be >= 0, got {args.num_classes}")
    try:
        summary = summarize(DARKNET53, args.num_classes or None, args.image_size)
    except ValueError as exc:
        parser.error(str(exc))
    print(summary.table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
