"""`python -m train.flax --data PATH ...`: train Darknet-53 with Flax (a thin layer over train.loop)."""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from porting.errors import (
    EXIT_BAD_INPUT,
    EXIT_CHECKPOINT,
    EXIT_ERROR,
    EXIT_NONFINITE,
    EXIT_OK,
    SIGNAL_EXIT_BASE,
)


def _run(config: Any, is_main: bool = True) -> tuple[int, str | None, bool]:
    """Train; (exit code, error message or None, whether every process stops the same way)."""
    from porting.runs import CheckpointError
    from train.data import DataError
    from train.distributed import DistributedError, ShardingError
    from train.loop import train
    from train.options import ConfigError
    from train.run import Interrupted, NonFiniteError, WorkdirError

    try:
        summary = train(config)
    except (ConfigError, DataError, ShardingError, WorkdirError, DistributedError) as e:
        return EXIT_BAD_INPUT, f"error: {e}", False
    except NonFiniteError as e:  # decided from global metrics: the same on every process
        return EXIT_NONFINITE, f"error: {e}", True
    except CheckpointError as e:
        return EXIT_CHECKPOINT, f"error: {e}", False
    except Interrupted as e:  # agreed between the processes before anyone stops
        return SIGNAL_EXIT_BASE + e.signum, str(e), True
    except Exception as e:
        traceback.print_exc()
        return EXIT_ERROR, f"error: {type(e).__name__}: {e}", False
    final = summary["final_val"] or {}
    if not is_main:
        return EXIT_OK, None, True
    print(
        f"done: {summary['steps']} steps in {summary['train_seconds']:.1f} s; final val accuracy "
        f"{final.get('accuracy', float('nan')):.4f}, macro F1 {final.get('macro_f1', float('nan')):.4f}; "
        f"best macro F1 {summary['best_macro_f1']:.4f} at step {summary['best_step']}; outputs in {summary['workdir']}"
    )
    return EXIT_OK, None, True


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, join the other processes if any, train, and map failures to a clear message and an exit code."""
    from train.options import missing_train_extra

    if missing := missing_train_extra():
        print(f"error: {missing}", file=sys.stderr)
        return EXIT_BAD_INPUT
    # Our messages name every failure with its cause; orbax's and asyncio's own error logs would add a page of
    # tracebacks from background threads to a full disk or a read-only folder.
    for name in ("absl", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    from train import distributed
    from train.options import ConfigError, build_parser, config_from_args, per_host_fields, resolve, validate

    parser = build_parser("python -m train.flax")
    distributed.add_flags(parser)
    args = parser.parse_args(argv)
    try:
        dist = distributed.options_from_args(args)
        distributed.validate(dist)
        if dist.explicit and args.workdir is None:
            raise ConfigError("a multi-process run needs --workdir: one folder that every process can reach")
        config = config_from_args(args)
        validate(config)
        multi = distributed.initialize(dist)
        import jax  # after initialize: the backend decides the default image size

        config = resolve(config, accelerator=jax.default_backend() != "cpu")
    except (ConfigError, distributed.DistributedError) as e:
        print(f"error: {e}", file=sys.stderr)
        if distributed.joined():  # connected, then refused: leave without JAX's exit barrier, which waits for all
            distributed.exit_now(EXIT_BAD_INPUT)
        return EXIT_BAD_INPUT
    if not multi:
        code, message, _ = _run(config)
        if message:
            print(message, file=sys.stderr)
        return code

    me = jax.process_index()
    watcher = distributed.start_failure_watcher()
    try:
        if args.workdir is None:  # SLURM / Open MPI launch: each process would pick its own timestamped folder
            raise distributed.DistributedError("a multi-process run needs --workdir: one folder every process reaches")
        shared = {k: v for k, v in config.to_json().items() if k not in per_host_fields()}
        distributed.check_same_config(shared, dist.timeout_s)
    except distributed.DistributedError as e:
        code, message, agreed = EXIT_BAD_INPUT, f"error: {e}", False
    else:
        code, message, agreed = _run(config, is_main=me == 0)
    if message:
        message = message.replace("error: ", f"error: process {me}: ", 1) if message.startswith("error: ") else message
        print(message, file=sys.stderr, flush=True)
    if agreed:  # every process ends here together: leave the runtime in step
        distributed.stop_failure_watcher()
        distributed.shutdown()
        return code
    watcher.announce(message or f"exit code {code}")
    distributed.exit_now(code)
    return code  # not reached


if __name__ == "__main__":
    sys.exit(main())
