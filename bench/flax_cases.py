"""Flax cases: the jitted SGD-momentum train step and the inference step on synthetic uint8 data on device.

The step follows google/flax examples/imagenet: a TrainState with batch_stats, a pure jitted function of
(state, images, labels), the state donated so XLA updates parameters in place, uint8 images normalised
inside the step (the trainer's layout: the host ships bytes, the device does the arithmetic).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from flax.training import train_state

from bench.common import (
    DATA_SEED,
    LEARNING_RATE,
    MOMENTUM,
    NUM_CLASSES,
    RGB_MEAN,
    RGB_STD,
    CaseSpec,
    arch_config,
    result_record,
    time_windows,
)
from flax_darknet import Darknet53

COMPUTE_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "trainer_bf16": jnp.bfloat16}
# Steps per epoch and total steps for the trainer's learning-rate schedule (shape only, not timing).
TRAINER_SCHEDULE_STEPS = 1000


class TrainState(train_state.TrainState):
    """Parameters, optimizer state and BatchNorm running statistics."""

    batch_stats: Any


def enable_compilation_cache(cache_dir: str) -> None:
    """Turn on JAX's persistent compilation cache in `cache_dir`, caching every program however small."""
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def normalize_u8(images: jnp.ndarray) -> jnp.ndarray:
    """uint8 NHWC RGB -> float32 normalised with the ImageNet statistics (the model casts to its dtype)."""
    mean = jnp.asarray(RGB_MEAN, jnp.float32)
    inv_std = 1.0 / jnp.asarray(RGB_STD, jnp.float32)
    return (images.astype(jnp.float32) - mean) * inv_std


def make_train_step(model: Darknet53) -> Callable[[TrainState, jnp.ndarray, jnp.ndarray], tuple[TrainState, Any]]:
    """The pure train step: cross-entropy on integer labels, batch statistics updated, SGD applied."""

    def train_step(state: TrainState, images: jnp.ndarray, labels: jnp.ndarray) -> tuple[TrainState, jnp.ndarray]:
        x = normalize_u8(images)

        def loss_fn(params: Any) -> tuple[jnp.ndarray, Any]:
            logits, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats}, x, train=True, mutable=["batch_stats"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads=grads, batch_stats=batch_stats), loss

    return train_step


def make_infer_step(model: Darknet53) -> Callable[[dict, jnp.ndarray], jnp.ndarray]:
    """Logits with running statistics, from uint8 images."""

    def infer_step(variables: dict, images: jnp.ndarray) -> jnp.ndarray:
        return model.apply(variables, normalize_u8(images), train=False)

    return infer_step


@functools.cache
def init_variables(arch: str) -> dict:
    """Initial {"params", "batch_stats"} of `arch`, drawn with numpy from the shapes alone.

    Timing does not depend on the values, and compiling `model.init` costs seconds on a CPU: the shapes come
    from `jax.eval_shape` (a trace, no compile), the values from the model's scheme (He-normal fan-out convs,
    unit BN scale and variance, zero biases and means, a uniform head as in PyTorch's Linear).
    """
    config = arch_config(arch)
    model = Darknet53(num_classes=NUM_CLASSES, config=config)
    side = config.total_stride  # parameters do not depend on the spatial size
    dummy = jax.ShapeDtypeStruct((1, side, side, config.in_channels), jnp.float32)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(DATA_SEED), dummy)
    rng = np.random.default_rng(DATA_SEED)
    gain = 2.0 / (1.0 + config.leaky_slope**2)
    values = {}
    for path, leaf in traverse_util.flatten_dict(flax.core.unfreeze(shapes)).items():
        shape, name = leaf.shape, path[-1]
        if name == "kernel" and len(shape) == 4:  # HWIO conv
            std = np.sqrt(gain / (shape[0] * shape[1] * shape[3]))
            value = rng.normal(0.0, std, shape)
        elif name == "kernel":  # (in, out) dense head
            value = rng.uniform(-1.0, 1.0, shape) / np.sqrt(shape[0])
        elif name in ("scale", "var"):
            value = np.ones(shape)
        else:  # BN bias and mean, dense bias
            value = np.zeros(shape)
        values[path] = jnp.asarray(value, leaf.dtype)
    return traverse_util.unflatten_dict(values)


def trainer_step_and_state(model: Darknet53, variables: dict) -> tuple[Any, Any]:
    """The product's jitted-able train step over {"image", "label"} batches and its initial TrainState."""
    from train.options import TrainConfig
    from train.state import create_train_state, make_optimizer, make_schedule
    from train.steps import train_step

    config = TrainConfig(data="synthetic", workdir="unused", precision="bf16")
    schedule = make_schedule(config, TRAINER_SCHEDULE_STEPS, TRAINER_SCHEDULE_STEPS)
    state = create_train_state(None, model, 0, make_optimizer(config, schedule), variables=variables)

    def step(state: Any, images: jnp.ndarray, labels: jnp.ndarray) -> tuple[Any, jnp.ndarray]:
        state, metrics = train_step(state, {"image": images, "label": labels})
        return state, metrics["loss"]

    return step, state


def _memory_fields(compiled: Any) -> dict[str, Any]:
    """Peak device memory of this process (None where the backend keeps no statistics), XLA's memory plan and
    XLA's FLOP and byte counts of the compiled step."""
    stats = jax.local_devices()[0].memory_stats() or {}
    fields: dict[str, Any] = {"peak_mem_bytes": stats.get("peak_bytes_in_use")}
    try:
        ma = compiled.memory_analysis()
        fields["xla_memory_plan"] = {
            k: getattr(ma, k)
            for k in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")
        }
    except Exception as e:  # not every backend implements it; the measured peak is the figure
        fields["xla_memory_plan"] = f"unavailable: {type(e).__name__}"
    # XLA's own count of the compiled program, after fusion: a cross-check of bench/counting.py.
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        fields["xla_cost"] = {"flops": cost.get("flops"), "bytes_accessed": cost.get("bytes accessed")}
    except Exception as e:
        fields["xla_cost"] = f"unavailable: {type(e).__name__}"
    return fields


def run_flax_case(spec: CaseSpec, spawn_time: float | None = None) -> dict[str, Any]:
    """Measure one Flax case; returns its result record."""
    if spec.cache_dir:
        enable_compilation_cache(spec.cache_dir)
    dtype = COMPUTE_DTYPES[spec.variant]
    config = arch_config(spec.arch)
    model = Darknet53(num_classes=NUM_CLASSES, config=config, dtype=dtype)
    device = jax.local_devices()[0]
    rng = np.random.default_rng(DATA_SEED)
    shape = (spec.batch, spec.image_size, spec.image_size, config.in_channels)
    images = jax.device_put(rng.integers(0, 256, shape, dtype=np.uint8), device)
    labels = jax.device_put(rng.integers(0, NUM_CLASSES, (spec.batch,), dtype=np.int32), device)

    t0 = time.perf_counter()
    variables = init_variables(spec.arch)
    init_s = time.perf_counter() - t0

    if spec.mode == "train":
        # Copies: the step donates the state, and `variables` is shared by every case in this process.
        fresh = jax.tree.map(jnp.copy, variables)
        if spec.variant.startswith("trainer"):
            step, state = trainer_step_and_state(model, fresh)
        else:
            tx = optax.sgd(LEARNING_RATE, momentum=MOMENTUM)
            step = make_train_step(model)
            state = TrainState.create(
                apply_fn=model.apply, params=fresh["params"], tx=tx, batch_stats=fresh["batch_stats"]
            )
        holder = {"state": state}
        t0 = time.perf_counter()
        compiled = jax.jit(step, donate_argnums=0).lower(holder["state"], images, labels).compile()
        compile_s = time.perf_counter() - t0

        def run_steps(n: int) -> None:
            for _ in range(n):
                holder["state"], holder["loss"] = compiled(holder["state"], images, labels)

        def sync() -> None:
            jax.block_until_ready(holder["state"])
    else:
        holder = {}
        t0 = time.perf_counter()
        compiled = jax.jit(make_infer_step(model)).lower(variables, images).compile()
        compile_s = time.perf_counter() - t0

        def run_steps(n: int) -> None:
            for _ in range(n):
                holder["out"] = compiled(variables, images)

        def sync() -> None:
            jax.block_until_ready(holder.get("out"))

    t0 = time.perf_counter()
    run_steps(1)
    sync()
    first_step_s = time.perf_counter() - t0
    startup_s = time.time() - spawn_time if spawn_time is not None else None
    timing = time_windows(run_steps, sync, spec)
    extra = {}
    if spec.variant.startswith("trainer"):
        # The same step with the loop's habit of reading a metric back after every step (train/loop.py):
        # the difference to the pure figure is what those host syncs cost, apart from the data pipeline.
        def run_steps_read_back(n: int) -> None:
            for _ in range(n):
                run_steps(1)
                float(holder["loss"])

        read_back = time_windows(run_steps_read_back, sync, dataclasses.replace(spec, warmup=0))
        extra["img_per_s_read_back_each_step"] = read_back["img_per_s"]
    if spec.mode == "train":
        loss = float(holder["loss"])
        if not np.isfinite(loss):
            return result_record(spec, "failed", reason=f"non-finite loss {loss}", **timing)
        extra["final_loss"] = loss
    return result_record(
        spec,
        "ok",
        device=device.device_kind,
        platform=device.platform,
        init_s=init_s,
        compile_s=compile_s,
        first_step_s=first_step_s,
        startup_s=startup_s,
        matmul_precision=str(jax.config.jax_default_matmul_precision),
        **_memory_fields(compiled),
        **timing,
        **extra,
    )
