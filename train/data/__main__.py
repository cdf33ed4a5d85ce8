"""`python -m train.data PATH [--json]`: what a dataset holds, before training on it."""

from __future__ import annotations

import argparse
import json
import sys

from porting.errors import EXIT_BAD_INPUT, EXIT_OK

from .checks import DataError
from .splits import load_splits

_MAX_SKIPPED_SHOWN = 50  # the text summary lists this many skipped files; --json lists all


def format_summary(summary: dict) -> str:
    """The human-readable summary text."""
    lines = [f"format: {summary['format']}  ({summary['root']})", f"classes: {summary['num_classes']}"]
    width = max((len(c["name"]) for c in summary["classes"]), default=len("class"))
    lines.append(f"  {'#':>3}  {'class':<{width}}  {'train':>7}  {'val':>7}")
    lines += [f"  {c['index']:>3}  {c['name']:<{width}}  {c['train']:>7}  {c['val']:>7}" for c in summary["classes"]]
    sizes, groups = summary["split_sizes"], summary["groups"]
    lines.append(
        f"split: train {sizes['train']} images / {groups['train']} groups, "
        f"val {sizes['val']} images / {groups['val']} groups"
    )
    skipped = summary["skipped"]
    lines.append(f"skipped: {len(skipped)}")
    lines += [f"  {s['path']}: {s['reason']}" for s in skipped[:_MAX_SKIPPED_SHOWN]]
    if len(skipped) > _MAX_SKIPPED_SHOWN:
        lines.append(f"  ... {len(skipped) - _MAX_SKIPPED_SHOWN} more (see --json)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the summary of a dataset; exit 2 with the DataError on bad input."""
    parser = argparse.ArgumentParser(prog="python -m train.data", description=__doc__)
    parser.add_argument("path", help='dataset folder, CSV file, or "demo"')
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--val-path", default=None, help="explicit validation dataset (same format rules)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--allow-empty-classes", action="store_true")
    parser.add_argument("--max-bad-fraction", type=float, default=0.01)
    args = parser.parse_args(argv)
    try:
        splits = load_splits(
            args.path,
            val_fraction=args.val_fraction,
            seed=args.seed,
            val_path=args.val_path,
            allow_empty_classes=args.allow_empty_classes,
            max_bad_fraction=args.max_bad_fraction,
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    summary = splits.summary()
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
