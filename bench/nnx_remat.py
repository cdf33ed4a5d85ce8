"""The NNX training step against the linen one, and rematerialisation's memory and time, side by side.

    python -m bench.nnx_remat nnx [--arch darknet53] [--size 32] [--batch 32] [--rounds 7] [--steps 3]
    python -m bench.nnx_remat remat [--size 256] [--batch 32] [--time-batch 32] [--rounds 3]

`nnx` times train.steps.train_step (linen TrainState, jitted with the state donated, as train/loop.py runs it)
and `nnx_train_step` on the same weights, in interleaved rounds, and prints the median step of each.
`remat` compiles the linen step for every flax_darknet.REMAT_MODES mode (with and without
flax_darknet.remat_compiler_options), reads XLA's own memory plan (`compiled.memory_analysis()`), and times
the step. Both print markdown rows for bench/RESULTS.md.

`nnx_train_step` is the documented NNX step (docs/model.md): the same loss, normalisation and non-finite
skip as train.steps.train_step, on an `nnx.Optimizer`; tests/test_nnx_train_step.py checks that both give
the same parameters.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bench.common import DATA_SEED, NUM_CLASSES, TRAIN_CONFIG, run_meta
from darknet_arch import ARCHS, DarknetConfig
from flax_darknet import REMAT_MODES, Darknet53, remat_compiler_options
from flax_darknet import nnx as dnnx
from train.state import TrainState, make_optimizer, zero_init_residual
from train.steps import global_norm, normalize, train_step


def nnx_train_step(
    model: dnnx.Darknet53, optimizer: nnx.Optimizer, batch: dict[str, jax.Array], label_smoothing: float = 0.0
) -> dict[str, jax.Array]:
    """One optimizer step on an NNX Darknet53 in train mode, in place; the twin of train.steps.train_step."""
    images = normalize(batch["image"])
    labels = batch["label"]

    def loss_fn(model: dnnx.Darknet53) -> tuple[jax.Array, jax.Array]:
        logits = model(images)  # BatchNorm in train mode updates the running statistics in place
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
        return optax.softmax_cross_entropy(logits, targets).mean(), logits

    before = nnx.as_pure(nnx.state((model, optimizer)))  # arrays, not references: what a skipped step restores
    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    grad_norm = global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    optimizer.update(model, grads)
    after = nnx.as_pure(nnx.state((model, optimizer)))
    nnx.update((model, optimizer), jax.tree.map(lambda new, old: jnp.where(finite, new, old), after, before))
    return {
        "loss": loss,
        "correct": jnp.sum(jnp.argmax(logits, -1) == labels),
        "finite": finite,
        "grad_norm": grad_norm,
    }


class JittedNNXStep:
    """`step(batch) -> metrics` over an NNX model and optimizer: split once, pure arrays through jax.jit.

    The state travels as one pytree of arrays, donated as the linen loop donates its TrainState, so a call
    costs what a linen step costs (nnx.jit walks the module graph in Python on every call instead). The
    model's own arrays are donated by the first call: `sync()` writes the trained state back into `model`
    and `optimizer` before you evaluate or save them.
    """

    def __init__(self, model: dnnx.Darknet53, optimizer: nnx.Optimizer, label_smoothing: float = 0.0) -> None:
        graphdef, state = nnx.split((model, optimizer))
        self.objects = (model, optimizer)
        self.state = nnx.as_pure(state)

        def pure_step(state: nnx.State, batch: dict[str, jax.Array]) -> tuple[nnx.State, dict[str, jax.Array]]:
            model, optimizer = nnx.merge(graphdef, state)
            metrics = nnx_train_step(model, optimizer, batch, label_smoothing)
            return nnx.as_pure(nnx.state((model, optimizer))), metrics

        self._step = jax.jit(pure_step, donate_argnums=0)

    def __call__(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        self.state, metrics = self._step(self.state, batch)
        return metrics

    def sync(self) -> tuple[dnnx.Darknet53, nnx.Optimizer]:
        """The model and optimizer, holding the trained state."""
        nnx.update(self.objects, self.state)
        return self.objects


def on_pure_dicts(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` for nnx.Optimizer, run on the linen-shaped pure dicts of the nnx.State trees it is given.

    The trainer's optimizer (train.state.make_optimizer) masks weight decay with a function of nested dicts;
    nnx.Optimizer hands its transformation nnx.State trees. On their pure-dict form the very same
    transformation runs, with the same optimizer-state layout as the linen TrainState's.
    """

    def pure(tree: Any) -> Any:
        return None if tree is None else nnx.to_pure_dict(tree)

    def init(params: Any) -> Any:
        return tx.init(pure(params))

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        new_updates, state = tx.update(pure(updates), state, pure(params))
        out = jax.tree.map(lambda x: x, updates)  # a fresh State of the same structure
        nnx.replace_by_pure_dict(out, new_updates)
        return out, state

    return optax.GradientTransformation(init, update)


def trainer_optimizer() -> optax.GradientTransformation:
    """bench.common's optimizer: TRAIN_CONFIG's SGD (Nesterov, masked decay) at its constant lr."""
    return make_optimizer(TRAIN_CONFIG, optax.constant_schedule(TRAIN_CONFIG.lr))


def synthetic_batch(config: DarknetConfig, batch: int, size: int) -> dict[str, jax.Array]:
    """uint8 NHWC images and int32 labels, as the trainer's iterators give them."""
    rng = np.random.default_rng(DATA_SEED)
    return {
        "image": jnp.asarray(rng.integers(0, 256, (batch, size, size, config.in_channels), dtype=np.uint8)),
        "label": jnp.asarray(rng.integers(0, NUM_CLASSES, batch), jnp.int32),
    }


def initial_variables(model: Darknet53, size: int) -> dict[str, Any]:
    """Fresh variables with zero-initialised residual branches (as bench.common's cases train)."""
    dummy = jnp.zeros((1, size, size, model.config.in_channels), jnp.float32)
    variables = jax.jit(model.init)(jax.random.key(0), dummy)
    return {**variables, "params": zero_init_residual(variables["params"])}


def _time(run: Callable[[], Any], steps: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process over all its threads) per step of `steps` steps.

    On a shared machine the CPU time is the steadier figure: other processes stretch the wall time.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    out = None
    for _ in range(steps):
        out = run()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def bench_nnx(arch: str, size: int, batch: int, rounds: int, steps: int) -> dict[str, Any]:
    """Median seconds per step of the linen and the NNX step, timed in alternating rounds on one machine."""
    config = ARCHS[arch]
    data = synthetic_batch(config, batch, size)
    linen_model = Darknet53(num_classes=NUM_CLASSES, config=config)
    variables = initial_variables(linen_model, size)
    tx = trainer_optimizer()
    box = {"state": TrainState.create(apply_fn=linen_model.apply, params=variables["params"],
                                      batch_stats=variables["batch_stats"], tx=tx)}  # fmt: skip
    linen_step = jax.jit(train_step, donate_argnums=0)

    def run_linen() -> jax.Array:
        box["state"], metrics = linen_step(box["state"], data)
        return metrics["loss"]

    model = dnnx.from_linen_variables(jax.tree.map(np.asarray, variables), config=config)
    model.train()
    nnx_step = JittedNNXStep(model, nnx.Optimizer(model, on_pure_dicts(tx), wrt=nnx.Param))
    runs = {"linen": run_linen, "nnx": lambda: nnx_step(data)["loss"]}
    compile_s = {}
    for name, run in runs.items():
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        compile_s[name] = time.perf_counter() - t0
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            times[name].append(_time(run, steps))
    wall = {name: statistics.median(t[0] for t in ts) for name, ts in times.items()}
    cpu = {name: statistics.median(t[1] for t in ts) for name, ts in times.items()}
    return {"wall": wall, "cpu": cpu, "times": times, "compile_s": compile_s}


def bench_remat(arch: str, size: int, batch: int, time_batch: int, rounds: int) -> list[dict[str, Any]]:
    """XLA's memory plan of the compiled linen train step at (size, batch), and its step time at time_batch.

    Each remat mode is compiled with flax_darknet.remat_compiler_options (what makes remat work on XLA:CPU);
    the remat modes are also compiled without them ("default XLA"), for the memory plan only. The timed steps
    run in `rounds` alternating rounds (one step of each mode per round), so load drifts hit all alike.
    """
    config = ARCHS[arch]
    data = synthetic_batch(config, batch, size)
    timed_data = data if time_batch == batch else synthetic_batch(config, time_batch, size)
    rows, runs = [], {}
    for mode in REMAT_MODES:
        model = Darknet53(num_classes=NUM_CLASSES, config=config, remat=mode)
        variables = initial_variables(model, size)
        state = TrainState.create(apply_fn=model.apply, params=variables["params"],
                                  batch_stats=variables["batch_stats"], tx=trainer_optimizer())  # fmt: skip
        variants = [("default XLA", {})] if mode != "none" else []
        variants.append(("remat_compiler_options", remat_compiler_options(mode)))
        for label, options in variants:
            jitted = jax.jit(train_step, donate_argnums=0, compiler_options=options)
            t0 = time.perf_counter()
            compiled = jitted.lower(state, data).compile()
            plan = compiled.memory_analysis()
            rows.append({"mode": mode, "compile": label, "options": options, "temp_bytes": plan.temp_size_in_bytes,
                         "compile_s": time.perf_counter() - t0})  # fmt: skip
            if rounds and label == "remat_compiler_options":
                box = {"state": state, "step": compiled if time_batch == batch else jitted}

                def run(box: dict = box) -> jax.Array:
                    box["state"], metrics = box["step"](box["state"], timed_data)
                    return metrics["loss"]

                jax.block_until_ready(run())  # warm-up (and the compile, when time_batch differs)
                runs[mode] = (rows[-1], run)
    for _ in range(rounds):
        for row, run in runs.values():
            row.setdefault("step_s", []).append(_time(run, 1))
    return rows


def _header(argv: list[str] | None) -> str:
    meta = run_meta(" ".join(["python -m bench.nnx_remat", *(sys.argv[1:] if argv is None else argv)]),
                    ("jax", "jaxlib", "flax", "optax"))  # fmt: skip
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    return f"{meta['date']}; `{meta['command']}`; {meta['host']}; backend {jax.default_backend()}; {versions}"


def main(argv: list[str] | None = None) -> int:
    """Run one of the two benchmarks and print its markdown table."""
    parser = argparse.ArgumentParser(prog="python -m bench.nnx_remat", description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=("nnx", "remat"))
    parser.add_argument("--arch", default="darknet53", choices=tuple(ARCHS))
    parser.add_argument("--size", type=int, default=None, help="image side (default: 32 for nnx, 256 for remat)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--time-batch", type=int, default=None, help="remat: batch of the timed steps")
    parser.add_argument("--rounds", type=int, default=None, help="alternating timed rounds (default 7 nnx, 3 remat)")
    parser.add_argument("--steps", type=int, default=3, help="nnx: steps per round (remat: one per round)")
    args = parser.parse_args(argv)
    print(_header(argv))
    if args.part == "nnx":
        size = args.size or 32
        r = bench_nnx(args.arch, size, args.batch, 7 if args.rounds is None else args.rounds, args.steps)
        print(f"| step ({args.arch}, {size} px, batch {args.batch}, fp32) | median wall s/step | median CPU s/step "
              "| first call s | rounds, wall s/step |")  # fmt: skip
        print("|---|---|---|---|---|")
        for name in ("linen", "nnx"):
            rounds = ", ".join(f"{t[0]:.3f}" for t in r["times"][name])
            print(f"| {name} | {r['wall'][name]:.3f} | {r['cpu'][name]:.3f} | {r['compile_s'][name]:.1f} | {rounds} |")
        ratios = {k: r[k]["nnx"] / r[k]["linen"] for k in ("wall", "cpu")}
        print(f"NNX / linen: wall {ratios['wall']:.3f}, CPU {ratios['cpu']:.3f}")
        return 0
    size = args.size or 256
    time_batch = args.time_batch or args.batch
    rows = bench_remat(args.arch, size, args.batch, time_batch, 3 if args.rounds is None else args.rounds)
    base = rows[0]

    def median(row: dict[str, Any], which: int) -> float:
        return statistics.median(t[which] for t in row["step_s"])

    print(f"| remat ({args.arch}, {size} px, fp32) | compiled with | XLA temp MiB (batch {args.batch}) | vs none "
          f"| median wall s/step (batch {time_batch}) | vs none | median CPU s/step | vs none "
          "| rounds, wall s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        timing = "- | - | - | - | -"
        if "step_s" in row:
            wall, cpu = median(row, 0), median(row, 1)
            timing = (
                f"{wall:.2f} | {wall / median(base, 0) - 1:+.0%} | {cpu:.1f} | {cpu / median(base, 1) - 1:+.0%} | "
                + ", ".join(f"{t[0]:.1f}" for t in row["step_s"])
            )
        print(
            f"| {row['mode']} | {row['options'] or row['compile']} | {row['temp_bytes'] / 2**20:,.0f} | "
            f"{row['temp_bytes'] / base['temp_bytes'] - 1:+.0%} | {timing} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
