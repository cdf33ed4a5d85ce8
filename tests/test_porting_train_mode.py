"""Train mode (batch statistics): ported torch_ref and Flax give the same logits and parameter gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
from porting_helpers import TINY, flax_leaf, randomize_torch_state, relative_max_diff, torch_key_to_flax

import flax_darknet
import torch_ref
from porting import torch_state_dict_to_flax

CLASSES = 5
SIZE = 64
TOL = 1e-4  # relative, per tensor: max |diff| <= 1e-4 x max |torch|


def test_train_mode_logits_and_every_gradient_agree():
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (3, 3, SIZE, SIZE)).astype(np.float32)
    # A fixed random cotangent makes every logit matter to the loss.
    weights = rng.normal(size=(3, CLASSES)).astype(np.float32)

    tmodel = torch_ref.Darknet53(num_classes=CLASSES, config=TINY).train()
    randomize_torch_state(tmodel, seed=4)
    variables = torch_state_dict_to_flax(tmodel.state_dict(), config=TINY)
    t_logits = tmodel(torch.from_numpy(x))
    (t_logits * torch.from_numpy(weights)).sum().backward()
    t_grads = {k: p.grad.numpy() for k, p in tmodel.named_parameters()}

    fmodel = flax_darknet.Darknet53(num_classes=CLASSES, config=TINY)

    def loss(params):
        logits, _ = fmodel.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            jnp.asarray(x.transpose(0, 2, 3, 1)),
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.sum(logits * weights), logits

    (_, f_logits), f_grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])

    assert relative_max_diff(np.asarray(f_logits), t_logits.detach().numpy().astype(np.float64)) <= TOL
    assert len(t_grads) == len(jax.tree.leaves(f_grads))
    for key, t_grad in t_grads.items():
        path, transpose = torch_key_to_flax(key)
        assert path[0] == "params"
        f_grad = flax_leaf(f_grads, path[1:])
        if transpose is not None:
            f_grad = f_grad.transpose(np.argsort(transpose))
        assert f_grad.shape == t_grad.shape, key
        err = relative_max_diff(f_grad, t_grad.astype(np.float64))
        assert err <= TOL, f"gradient of {key}: relative max diff {err:.2e} > {TOL}"
