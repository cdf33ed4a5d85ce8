"""XLA's conv against flax_darknet.conv.darknet_conv (im2col matmul) on the small maps of Darknet-53 at 32-64 px.

    python -m bench.small_map_conv [--batch 32] [--repeats 5]

Prints one markdown row per (map side, channels, stride): forward and forward+backward milliseconds of both,
measured side by side in one process. The model takes the matmul for outputs up to SMALL_MAP_MAX_SIDE wide.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bench.common import time_windows
from flax_darknet.conv import SMALL_MAP_MAX_SIDE, darknet_conv

NHWC = ("NHWC", "HWIO", "NHWC")
# (input side, C_in, C_out, stride) of Darknet-53's 3x3 convs from 16x16 maps down to 1x1.
SHAPES = (
    (16, 32, 64, 1),
    (8, 64, 128, 1),
    (8, 128, 256, 2),
    (4, 128, 256, 1),
    (4, 256, 512, 2),
    (2, 256, 512, 1),
    (2, 512, 1024, 2),
    (1, 512, 1024, 1),
)


def _ms(fn: Callable, *args: jax.Array, repeats: int) -> float:
    """Median milliseconds of one call, after a first (compiling) one."""
    out: dict[str, Any] = {}

    def run(n: int) -> None:
        for _ in range(n):
            out["y"] = fn(*args)

    return 1e3 * statistics.median(time_windows(run, lambda: jax.block_until_ready(out), 1, 1, repeats))


def measure(side: int, c_in: int, c_out: int, stride: int, batch: int, repeats: int) -> dict[str, float]:
    """Median milliseconds of forward and of input+kernel gradients, for XLA's conv and darknet_conv."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, side, side, c_in)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, c_in, c_out)), jnp.float32)
    out = {}
    for name, conv in (("xla", lax.conv_general_dilated), ("matmul", darknet_conv)):

        def fwd(x, w, conv=conv):
            return conv(x, w, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=NHWC)

        grad = jax.grad(lambda x, w, f=fwd: jnp.sum(f(x, w) ** 2), argnums=(0, 1))
        out[f"{name}_fwd"] = _ms(jax.jit(fwd), x, w, repeats=repeats)
        out[f"{name}_grad"] = _ms(jax.jit(grad), x, w, repeats=repeats)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        parser.error("--batch and --repeats must be >= 1")
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, batch {args.batch}, float32, median ms")
    print("| map in | C_in->C_out | stride | model uses | XLA fwd | matmul fwd | XLA fwd+bwd | matmul fwd+bwd |")
    print("|---|---|---|---|---|---|---|---|")
    for side, c_in, c_out, stride in SHAPES:
        r = measure(side, c_in, c_out, stride, args.batch, args.repeats)
        out_side = (side - 1) // stride + 1
        used = "matmul" if out_side <= SMALL_MAP_MAX_SIDE else "XLA conv"
        print(
            f"| {side}x{side} | {c_in}->{c_out} | {stride} | {used} | {r['xla_fwd']:.2f} | {r['matmul_fwd']:.2f} "
            f"| {r['xla_grad']:.2f} | {r['matmul_grad']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
