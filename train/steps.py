"""Pure train and eval steps: uint8 batches in, normalised inside, non-finite steps skipped without a trace."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from porting.preprocessing import IMAGENET_MEAN, IMAGENET_STD, PIXEL_SCALE
from train.state import TrainState, learning_rate

# Backends (jax.default_backend()) where the jitted train step donates its input state, updating it in place.
# Not XLA:CPU: there donation makes copy insertion copy the parameters and the momentum (the skip-select of
# train_step still reads the old state), 325 MB per step, and the step was 1.3x slower at 256 px batch 8 and
# 1.5x at 32 px batch 32 (bench/NOTES.md 6.2). On an accelerator donation saves a whole state of device memory.
STATE_DONATION_BACKENDS = ("gpu", "tpu")


def state_donation(backend: str | None = None) -> tuple[int, ...]:
    """`donate_argnums` for a jitted train_step on `backend` (default: JAX's): the state on accelerators only."""
    return (0,) if (backend or jax.default_backend()) in STATE_DONATION_BACKENDS else ()


def normalize(
    images: jax.Array,
    dtype: Any = jnp.float32,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> jax.Array:
    """uint8 (or float 0..255) RGB NHWC -> (x / 255 - mean) / std in `dtype`; the same as train.torch and predict."""
    x = images.astype(jnp.float32) * PIXEL_SCALE
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return x.astype(dtype)


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    label_smoothing: float = 0.0,
    frozen: frozenset[str] = frozenset(),
    ema_decay: float | None = None,
    mean_std: tuple[Sequence[float], Sequence[float]] = (IMAGENET_MEAN, IMAGENET_STD),
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD/AdamW step; a non-finite loss or gradient returns `state` unchanged with metrics["finite"]=False.

    `frozen` names top-level modules whose BatchNorm statistics stay as they are (their parameters are frozen by
    the optimizer); `ema_decay` updates state.ema (optax.incremental_update, Polyak averaging).
    """
    images = normalize(batch["image"], mean=mean_std[0], std=mean_std[1])
    labels = batch["label"]
    num_classes = None

    def loss_fn(params: Any) -> tuple[jax.Array, tuple[jax.Array, Any]]:
        nonlocal num_classes
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats}, images, train=True, mutable=["batch_stats"]
        )
        num_classes = logits.shape[-1]
        targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        return loss, (logits, updates["batch_stats"])

    (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    # The global norm is inf or NaN whenever any gradient element is, so one scalar check covers every leaf
    # (a per-leaf isfinite reduction doubled the compiled program's size and slowed its compile by about 25%).
    grad_norm = optax.tree.norm(grads)  # float32: the parameters (and so their gradients) are float32
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_stats = {k: state.batch_stats[k] if k in frozen else v for k, v in new_stats.items()}
    new_state = state.apply_gradients(grads=grads, batch_stats=new_stats)
    if ema_decay is not None:
        current = {"params": new_state.params, "batch_stats": new_state.batch_stats}
        ema = optax.incremental_update(current, state.ema, step_size=1.0 - ema_decay)
        # Frozen modules keep their EMA as it is: averaging a value with itself drifts by an ulp per step.
        ema = {c: {k: state.ema[c][k] if k in frozen else v for k, v in tree.items()} for c, tree in ema.items()}
        new_state = new_state.replace(ema=ema)
    # Select the whole state (step, params, optimizer state, BN statistics): a skipped step leaves no trace.
    state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    metrics = {
        "loss": loss,
        "correct": jnp.sum(jnp.argmax(logits, -1) == labels),
        "finite": finite,
        "grad_norm": grad_norm,
        "lr": learning_rate(state.opt_state),  # what the optimizer applied (unchanged by a skipped step)
    }
    return state, metrics


def eval_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    mean_std: tuple[Sequence[float], Sequence[float]] = (IMAGENET_MEAN, IMAGENET_STD),
) -> dict[str, jax.Array]:
    """The batch's confusion matrix (unmasked rows) and summed loss, on the device (running BN statistics).

    With an EMA of the weights (--ema-decay) the EMA is what is evaluated.
    """
    variables = state.ema if state.ema is not None else {"params": state.params, "batch_stats": state.batch_stats}
    logits = state.apply_fn(variables, normalize(batch["image"], mean=mean_std[0], std=mean_std[1]))
    num_classes = logits.shape[-1]
    mask = batch["mask"].astype(jnp.int32)
    labels, preds = batch["label"], jnp.argmax(logits, -1)
    # Padding rows carry label 0 with weight 0: they add nothing to the counts or the loss.
    cm = jnp.zeros((num_classes, num_classes), jnp.int32).at[labels, preds].add(mask)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {"confusion": cm, "loss_sum": jnp.sum(losses * mask)}
