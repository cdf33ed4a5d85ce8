"""`python -m bench.donation [--size 32] [--batch 32] [--rounds 15]`: the train step with and without state donation.

train.steps.state_donation donates the state on accelerators only: on XLA:CPU donation made copy insertion copy
the parameters and momentum every step (bench/NOTES.md 6.2). This re-measures that choice on the machine at hand:
the product's train_step compiled both ways in one process and timed step by step in alternation, so that both
see the same load; it prints the median step of each, the median of the per-round ratios, and XLA's copy count
and bytes accessed of each program.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
from typing import Any

import jax
import jax.numpy as jnp
import optax

from bench.common import DATA_SEED, NUM_CLASSES, TRAIN_CONFIG, alternate
from bench.flax_cases import synthetic_batch, xla_cost
from darknet_arch import ARCHS
from train.state import create_model, create_train_state, make_optimizer
from train.steps import train_step

VARIANTS = {"donated": (0,), "not donated": ()}


def measure(size: int, batch: int, rounds: int, arch: str = "darknet53") -> dict[str, Any]:
    """Median step seconds of both variants, the median per-round ratio, and each program's copies and bytes."""
    data = synthetic_batch(batch, size, ARCHS[arch].in_channels)
    tx = make_optimizer(TRAIN_CONFIG, optax.constant_schedule(TRAIN_CONFIG.lr))
    model = create_model(ARCHS[arch], NUM_CLASSES, "fp32")
    runs: dict[str, list[Any]] = {}
    record: dict[str, Any] = {"size": size, "batch": batch, "rounds": rounds, "backend": jax.default_backend()}
    initial = create_train_state(jax.random.key(DATA_SEED), model, size, tx, zero_residual=True)
    for name, donate in VARIANTS.items():
        state = jax.tree_util.tree_map(jnp.copy, initial)  # each variant its own buffers (one is donated)
        compiled = jax.jit(train_step, donate_argnums=donate).lower(state, data).compile()
        gb = xla_cost(compiled)["bytes accessed"] / 1e9
        record[name] = {"copies": compiled.as_text().count(" copy("), "gb_accessed": gb}
        runs[name] = [compiled, state]

    def step(name: str) -> None:
        compiled, state = runs[name]
        runs[name][1], metrics = compiled(state, data)
        jax.block_until_ready(metrics)

    times = alternate({name: functools.partial(step, name) for name in runs}, rounds)  # untimed first calls allocate
    for name, t in times.items():
        record[name]["step_ms_median"] = 1e3 * statistics.median(t)
    ratios = [d / n for d, n in zip(times["donated"], times["not donated"], strict=True)]
    record["donated_over_not_median"] = statistics.median(ratios)
    return record


def main(argv: list[str] | None = None) -> int:
    """Print the record as JSON."""
    p = argparse.ArgumentParser(prog="python -m bench.donation", description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=32, help="image side (a multiple of 32)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=15, help="alternating rounds of one step each")
    p.add_argument("--arch", default="darknet53", choices=sorted(ARCHS))
    args = p.parse_args(argv)
    if args.size % ARCHS[args.arch].total_stride or min(args.batch, args.rounds) < 1:
        p.error("--size must be a multiple of the network's stride; --batch and --rounds at least 1")
    print(json.dumps(measure(args.size, args.batch, args.rounds, args.arch), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
