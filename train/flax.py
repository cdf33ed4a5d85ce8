"""`python -m train.flax --data PATH ...`: train Darknet-53 with Flax (a thin layer over train.loop)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

# Exit codes (documented in docs/training.md).
EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3
EXIT_CHECKPOINT = 4
SIGNAL_EXIT_BASE = 128  # stopped by a signal after saving: 128 + signal number (143 SIGTERM, 130 SIGINT)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, train, and map failures to a clear message and an exit code."""
    from train.options import ConfigError, parse_config

    try:
        config = parse_config(argv, prog="python -m train.flax")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT

    from train.checkpointing import CheckpointError
    from train.data import DataError
    from train.loop import Interrupted, NonFiniteError, WorkdirError, train
    from train.sharding import ShardingError

    try:
        summary = train(config)
    except (ConfigError, DataError, ShardingError, WorkdirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CHECKPOINT
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return SIGNAL_EXIT_BASE + e.signum
    final = summary["final_val"] or {}
    print(
        f"done: {summary['steps']} steps in {summary['train_seconds']:.1f} s; final val accuracy "
        f"{final.get('accuracy', float('nan')):.4f}, macro F1 {final.get('macro_f1', float('nan')):.4f}; "
        f"best macro F1 {summary['best_macro_f1']:.4f} at step {summary['best_step']}; outputs in {summary['workdir']}"
    )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
