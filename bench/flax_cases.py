"""Flax cases: the product's own step (train.state.train_step on a TrainState) and its inference (BN folded).

The batch is synthetic uint8 NHWC with int32 labels, already on the device; the step normalises it
(train.state.normalize), as in the trainer. The step is jitted as train/loop.py does: state donated on accelerators
(train.state.state_donation).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import numpy as np
import optax

from bench.common import DATA_SEED, NUM_CLASSES, TRAIN_CONFIG, CaseSpec, measure, time_windows
from darknet_arch import ARCHS, DarknetConfig
from flax_darknet import fold_for_inference
from train.state import (
    TrainState,
    create_model,
    create_train_state,
    make_optimizer,
    normalize,
    state_donation,
    train_step,
)


def enable_compilation_cache(cache_dir: str) -> None:
    """JAX's persistent compilation cache in `cache_dir`, every program however small (a warm start is all warm).

    Not train.loop.setup_compilation_cache: that skips programs under 0.5 s, and train.loop imports grain.
    """
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def trainer_optimizer() -> optax.GradientTransformation:
    """The trainer's optimizer (train.state.make_optimizer) at TRAIN_CONFIG's settings and constant lr."""
    return make_optimizer(TRAIN_CONFIG, optax.constant_schedule(TRAIN_CONFIG.lr))


def synthetic_batch(config: DarknetConfig, batch: int, image_size: int, device: Any = None) -> dict[str, jax.Array]:
    """A seeded uint8 NHWC image batch with int32 labels of the competition's classes, on `device`."""
    rng = np.random.default_rng(DATA_SEED)
    shape = (batch, image_size, image_size, config.in_channels)
    return {
        "image": jax.device_put(rng.integers(0, 256, shape, dtype=np.uint8), device),
        "label": jax.device_put(rng.integers(0, NUM_CLASSES, (batch,), dtype=np.int32), device),
    }


def inference_fn(state: TrainState, model: Any) -> tuple[Any, Any]:
    """(logits fn, its variables): the model with BatchNorm folded, as train.predict.Predictor runs it."""
    folded, variables = fold_for_inference(model, {"params": state.params, "batch_stats": state.batch_stats})
    return (lambda v, images: folded.apply(v, normalize(images), train=False)), variables


def _compiled_fields(compiled: Any) -> dict[str, Any]:
    """This process's peak device memory (None without statistics), XLA's memory plan and cost of `compiled`."""
    stats = jax.local_devices()[0].memory_stats() or {}
    fields: dict[str, Any] = {"peak_mem_bytes": stats.get("peak_bytes_in_use")}
    try:
        plan = compiled.memory_analysis()
        keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")
        fields["xla_memory_plan"] = {k: getattr(plan, k) for k in keys}
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost  # a one-element list on some jax versions
        fields["xla_cost"] = {"flops": cost.get("flops"), "bytes_accessed": cost.get("bytes accessed")}
    except Exception as e:  # not every backend implements them; the measured peak is the figure
        fields["xla_cost"] = f"unavailable: {type(e).__name__}"
    return fields


def run_flax_case(spec: CaseSpec, spawn_time: float | None = None) -> dict[str, Any]:
    """Measure one Flax case; returns its result record."""
    if spec.cache_dir:
        enable_compilation_cache(spec.cache_dir)
    config = ARCHS[spec.arch]
    device = jax.local_devices()[0]
    batch = synthetic_batch(config, spec.batch, spec.image_size, device)
    train = spec.mode == "train"
    tx = trainer_optimizer() if train else optax.identity()
    model = create_model(config, NUM_CLASSES, spec.variant)
    t0 = time.perf_counter()
    # The cheaper PRNG: compiling the init program is mostly its random numbers (threefry: 3-4x longer on a
    # CPU, bench/NOTES.md 3.1), and timing does not depend on the values.
    rng, zero = jax.random.key(DATA_SEED, impl="unsafe_rbg"), TRAIN_CONFIG.zero_init_residual
    holder: dict[str, Any] = {"state": create_train_state(rng, model, spec.image_size, tx, zero_residual=zero)}
    jax.block_until_ready(holder)
    init_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    if train:
        compiled = jax.jit(train_step, donate_argnums=state_donation()).lower(holder["state"], batch).compile()
    else:
        infer, holder["variables"] = inference_fn(holder["state"], model)
        compiled = jax.jit(infer).lower(holder["variables"], batch["image"]).compile()
    compile_s = time.perf_counter() - t0

    def run_steps(n: int) -> None:
        for _ in range(n):
            if train:
                holder["state"], holder["metrics"] = compiled(holder["state"], batch)
            else:
                holder["logits"] = compiled(holder["variables"], batch["image"])

    def sync() -> None:
        jax.block_until_ready(holder)

    final_loss = (lambda: float(holder["metrics"]["loss"])) if train else None
    record = measure(spec, run_steps, sync, final_loss, spawn_time)
    if train and record["status"] == "ok":
        # The same step with a host read of the loss after every step: what those syncs cost by themselves.
        def run_steps_reading_loss(n: int) -> None:
            for _ in range(n):
                run_steps(1)
                float(holder["metrics"]["loss"])

        per_step = time_windows(run_steps_reading_loss, sync, 0, spec.steps, spec.repeats)
        record["img_per_s_read_back_each_step"] = spec.batch / statistics.median(per_step)
    record.update(
        device=device.device_kind,
        platform=device.platform,
        init_s=init_s,
        compile_s=compile_s,
        matmul_precision=str(jax.config.jax_default_matmul_precision),
        **_compiled_fields(compiled),
    )
    return record
