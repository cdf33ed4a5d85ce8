"""TrainState with BatchNorm statistics, the optax optimizer (schedule, decay mask, parameter groups) and the pure
train and eval steps: uint8 batches in, normalised inside, non-finite steps skipped without a trace."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from darknet_arch import DarknetConfig
from flax_darknet import Darknet53
from porting.preprocessing import IMAGENET_MEAN, IMAGENET_STD, PIXEL_SCALE
from train.finetune import group_label, param_labels, unit_multipliers
from train.options import TrainConfig


class TrainState(train_state.TrainState):
    """flax TrainState plus the BatchNorm running statistics (as in flax examples/imagenet) and an optional EMA."""

    batch_stats: Any
    ema: Any = None  # {"params", "batch_stats"} averaged over steps (--ema-decay), or None


def state_tree(state: TrainState) -> dict[str, Any]:
    """The array part of a TrainState, as a run checkpoint holds it (apply_fn and tx are code: rebuilt)."""
    tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state, "batch_stats": state.batch_stats}
    return tree if state.ema is None else {**tree, "ema": state.ema}


def compute_dtype(precision: str, platform: str | None = None) -> Any:
    """'bf16' -> bfloat16, 'fp32' -> float32, 'auto' -> bfloat16 on accelerators and float32 on CPU."""
    if precision == "auto":
        platform = platform or jax.default_backend()
        return jnp.float32 if platform == "cpu" else jnp.bfloat16
    return {"bf16": jnp.bfloat16, "fp32": jnp.float32}[precision]


def create_model(
    model_config: DarknetConfig, num_classes: int, precision: str = "fp32", remat: str = "none"
) -> Darknet53:
    """The Flax Darknet with float32 parameters, the compute dtype `precision` asks for, and `remat`."""
    return Darknet53(
        num_classes=num_classes,
        config=model_config,
        dtype=compute_dtype(precision),
        param_dtype=jnp.float32,
        remat=remat,
    )


def make_schedule(config: TrainConfig, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to the peak lr, then cosine decay to 0 at total_steps."""
    warmup = min(round(config.warmup_epochs * steps_per_epoch), max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1)
    )


def decay_mask(params: Any) -> Any:
    """True for conv and dense kernels; False for BatchNorm scale/bias and every bias (no decay there).

    A tree map, so it also takes the partial trees optax.multi_transform hands each parameter group.
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def make_optimizer(config: TrainConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """SGD with Nesterov momentum (coupled L2 decay, as torch.optim.SGD) or AdamW, decay masked, optional clip.

    Parameters fall into groups by unit (train.finetune): each group runs the same optimizer at its multiple of
    the rate (the head's --head-lr-mult, --layer-decay), and frozen ones (--freeze) get optax.set_to_zero, which
    keeps no state. The rate is an injected hyperparameter, so `learning_rate(opt_state)` is the base rate the
    optimizer applied at its last update (its own count, which does not advance on a skipped non-finite step).
    """
    multipliers = unit_multipliers(config.model_config, config.freeze, config.head_lr_mult, config.layer_decay)

    def group(learning_rate: Any) -> optax.GradientTransformation:
        parts = []
        if config.optimizer == "sgd":
            if config.weight_decay:
                parts.append(optax.add_decayed_weights(config.weight_decay, mask=decay_mask))
            parts.append(optax.sgd(learning_rate, momentum=config.momentum, nesterov=True))
        else:
            parts.append(optax.adamw(learning_rate, weight_decay=config.weight_decay, mask=decay_mask))
        return optax.chain(*parts)

    def chain(learning_rate: Any) -> optax.GradientTransformation:
        groups = {group_label(m): optax.set_to_zero() if m == 0 else group(learning_rate * m) for m in multipliers}
        grouped = optax.multi_transform(groups, param_labels(config.model_config, multipliers))
        if config.grad_clip is None:
            return grouped
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), grouped)

    return optax.inject_hyperparams(chain)(learning_rate=schedule)


def learning_rate(opt_state: Any) -> jax.Array:
    """The learning rate of make_optimizer's last update (read from its injected hyperparameters)."""
    return opt_state.hyperparams["learning_rate"]


def zero_init_residual(params: Any) -> Any:
    """Zero the last BatchNorm scale of every residual block, so each block starts as the identity.

    The deep residual stream of a freshly initialised Darknet-53 otherwise grows block by block and early
    SGD steps diverge (Goyal et al. 2017, torchvision's zero_init_residual).
    """
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    out = {
        path: jnp.zeros_like(v) if len(path) >= 3 and path[-3:] == ("layer2", "bn", "scale") else v
        for path, v in flat.items()
    }
    return flax.traverse_util.unflatten_dict(out)


def init_variables(rng: jax.Array, model: Darknet53, image_size: int, zero_residual: bool = False) -> Any:
    """Freshly initialised {"params", "batch_stats"} (optionally with residual blocks starting as the identity)."""
    dummy = jnp.zeros((1, image_size, image_size, model.config.in_channels), jnp.float32)
    variables = jax.jit(lambda r: model.init(r, dummy, train=False))(rng)
    if zero_residual:
        variables = {**variables, "params": zero_init_residual(variables["params"])}
    return variables


def variable_shapes(model: Darknet53, image_size: int) -> Any:
    """The shapes and dtypes of the model's variables, without computing them (jax.eval_shape)."""
    dummy = jax.ShapeDtypeStruct((1, image_size, image_size, model.config.in_channels), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), dummy)


def create_train_state(
    rng: jax.Array,
    model: Darknet53,
    image_size: int,
    tx: optax.GradientTransformation,
    variables: Any = None,
    zero_residual: bool = False,
    ema: bool = False,
) -> TrainState:
    """The optimizer state over `variables` (e.g. from --init-from), or a fresh initialisation; `ema` starts it."""

    def build(rng: jax.Array, variables: Any) -> TrainState:
        if variables is None:
            variables = init_variables(rng, model, image_size, zero_residual)
        params, stats = variables["params"], variables["batch_stats"]
        averages = {"params": params, "batch_stats": stats} if ema else None
        return TrainState.create(apply_fn=model.apply, params=params, batch_stats=stats, tx=tx, ema=averages)

    # One program for the initialisation and the optimizer state: one compilation-cache entry, and none of the
    # op-by-op dispatch of ~300 optimizer-state zeros (a warm start 0.9 s sooner, bench/NOTES.md 6.3 row 27).
    return jax.jit(build)(rng, variables)


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
