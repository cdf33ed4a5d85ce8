"""The product's train or inference step with a boolean module switch off and on, compiled in one process and timed
in alternation (this VM's speed drifts 2x within minutes: only side-by-side ratios mean anything).

    python -m bench.ab_step flax_darknet.conv.STRIDED_GRADIENT_AS_MATMUL [--mode train] [--image-size 256]
        [--batch 8] [--rounds 6]

Prints XLA's FLOP/byte counts and temp memory of both programs, the largest difference of their results, and the
median step time of each. The switch must be an existing bool attribute of an importable module, read at trace time.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import statistics
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from bench.common import DATA_SEED, NUM_CLASSES, TRAIN_CONFIG, alternate
from bench.flax_cases import inference_fn, synthetic_batch, xla_cost
from darknet_arch import ARCHS
from train.state import create_model, create_train_state, make_optimizer
from train.steps import train_step

# Only the project's own modules are imported by name: the switch names a setting, it runs no one else's code.
SWITCH_PACKAGES = ("flax_darknet", "train", "darknet_arch")


def _block(run: Callable[[], Any]) -> None:
    jax.block_until_ready(run())


def _switch(name: str) -> tuple[Any, str]:
    """(module, attribute) of a dotted `module.ATTR` naming an existing bool; ValueError otherwise."""
    module_name, _, attr = name.rpartition(".")
    if module_name.split(".")[0] not in SWITCH_PACKAGES:
        raise ValueError(f"{name!r} is not in the project's packages ({', '.join(SWITCH_PACKAGES)})")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import {module_name!r} ({e}); give module.ATTRIBUTE") from None
    if not isinstance(getattr(module, attr, None), bool):
        raise ValueError(f"{name!r} is not a bool attribute of {module_name}")
    return module, attr


def compile_pair(args: argparse.Namespace, module: Any, attr: str) -> dict[str, Callable[[], Any]]:
    """The step compiled with `module.attr` False and True, each a fresh trace."""
    config = ARCHS[args.arch]
    batch = synthetic_batch(args.batch, args.image_size, config.in_channels)
    train = args.mode == "train"
    tx = make_optimizer(TRAIN_CONFIG, optax.constant_schedule(TRAIN_CONFIG.lr)) if train else optax.identity()
    model = create_model(config, NUM_CLASSES, "fp32")
    rng = jax.random.key(DATA_SEED, impl="unsafe_rbg")  # timing does not depend on the values
    state = create_train_state(rng, model, args.image_size, tx, zero_residual=TRAIN_CONFIG.zero_init_residual)
    original, programs = getattr(module, attr), {}
    try:
        for value in (False, True):
            setattr(module, attr, value)
            if train:
                compiled = jax.jit(lambda s, b: train_step(s, b)).lower(state, batch).compile()
                programs[str(value)] = lambda c=compiled: c(state, batch)
            else:
                infer, variables = inference_fn(state, model)
                compiled = jax.jit(lambda v, x, f=infer: f(v, x)).lower(variables, batch["image"]).compile()
                programs[str(value)] = lambda c=compiled, v=variables: c(v, batch["image"])
            cost = xla_cost(compiled)
            temp = compiled.memory_analysis().temp_size_in_bytes
            print(f"{attr}={value}: {cost['flops'] / 1e9:.1f} GFLOP, {cost['bytes accessed'] / 1e9:.2f} GB, "
                  f"temp {temp / 1e6:.0f} MB")
    finally:
        setattr(module, attr, original)
    return programs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("switch", help="module.ATTRIBUTE of a bool read at trace time")
    parser.add_argument("--mode", choices=("train", "infer"), default="train")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="darknet53")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    if args.image_size < 1 or args.image_size % ARCHS[args.arch].total_stride or min(args.batch, args.rounds) < 1:
        parser.error("--image-size must be a positive multiple of the network's stride; --batch and --rounds >= 1")
    try:
        module, attr = _switch(args.switch)
    except ValueError as e:
        parser.error(str(e))
    programs = compile_pair(args, module, attr)
    outputs = {k: jax.device_get(jax.block_until_ready(run())) for k, run in programs.items()}
    diff = max(
        float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
        for a, b in zip(jax.tree.leaves(outputs["False"]), jax.tree.leaves(outputs["True"]), strict=True)
    )
    print(f"largest difference of the two results (state and metrics, or logits): {diff:.3g}")
    times = alternate({k: functools.partial(_block, run) for k, run in programs.items()}, args.rounds)
    for k, seconds in times.items():
        each = " ".join(f"{1e3 * t:.0f}" for t in seconds)
        print(f"{k}: median {1e3 * statistics.median(seconds):.1f} ms over {args.rounds} rounds ({each})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
