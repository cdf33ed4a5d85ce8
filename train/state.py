"""TrainState with BatchNorm statistics, the optax optimizer, its schedule and the weight-decay mask."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from darknet_arch import DarknetConfig
from flax_darknet import Darknet53
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
