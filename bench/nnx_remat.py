"""The NNX twin of train.state.train_step, documented in docs/model.md and checked by tests/test_nnx_train_step.py.

`nnx_train_step` has the same loss, normalisation and non-finite skip, on an `nnx.Optimizer`; `JittedNNXStep`
runs it through `jax.jit` at the linen step's cost. The harness that timed it against the linen step and measured
rematerialisation (`python -m bench.nnx_remat nnx|remat`, bench/RESULTS.md) is at commit c6262d4.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

# Re-exported: tests/test_nnx_train_step.py builds its batch and the trainer's optimizer from here.
from bench.flax_cases import synthetic_batch as synthetic_batch
from bench.flax_cases import trainer_optimizer as trainer_optimizer
from flax_darknet import Darknet53
from flax_darknet import nnx as dnnx
from train.state import normalize, zero_init_residual


def nnx_train_step(
    model: dnnx.Darknet53, optimizer: nnx.Optimizer, batch: dict[str, jax.Array], label_smoothing: float = 0.0
) -> dict[str, jax.Array]:
    """One optimizer step on an NNX Darknet53 in train mode, in place; the twin of train.state.train_step."""
    images = normalize(batch["image"])
    labels = batch["label"]

    def loss_fn(model: dnnx.Darknet53) -> tuple[jax.Array, jax.Array]:
        logits = model(images)  # BatchNorm in train mode updates the running statistics in place
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
        return optax.softmax_cross_entropy(logits, targets).mean(), logits

    before = nnx.as_pure(nnx.state((model, optimizer)))  # arrays, not references: what a skipped step restores
    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    grad_norm = optax.tree.norm(grads)
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


def initial_variables(model: Darknet53, size: int) -> dict[str, Any]:
    """Fresh variables with zero-initialised residual branches (as bench.common's cases train)."""
    dummy = jnp.zeros((1, size, size, model.config.in_channels), jnp.float32)
    variables = jax.jit(model.init)(jax.random.key(0), dummy)
    return {**variables, "params": zero_init_residual(variables["params"])}
