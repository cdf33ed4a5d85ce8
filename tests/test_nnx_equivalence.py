"""The NNX Darknet53 fed by porting computes torch_ref's function: eval to 1e-5, train-mode logits and gradients.

The weights travel as a user's would: a torch_ref state_dict saved with torch.save, read back by
`porting.load_flax_variables`, converted by `flax_darknet.nnx.from_linen_variables`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from model_helpers import assert_trees_close, torch_tensors_as_flax_tree
from porting_helpers import TINY, flax_leaf, randomize_torch_state, relative_max_diff, torch_key_to_flax

import torch_ref
from darknet_arch import DARKNET53
from flax_darknet import nnx as dnnx
from porting import load_flax_variables

SIZE = 64
EVAL_TOL = 1e-5  # the linen gate (tests/test_porting_equivalence.py)
TRAIN_TOL = 1e-4  # the linen train-mode gate (tests/test_porting_train_mode.py)


def _ported_nnx(tmodel: torch.nn.Module, tmp_path, config) -> dnnx.Darknet53:
    path = tmp_path / "weights.pt"
    torch.save(tmodel.state_dict(), path)
    result = load_flax_variables(path, config=config)
    return dnnx.from_linen_variables(result.variables, config=config, leaky_slope=result.leaky_slope)


@pytest.mark.slow
def test_nnx_matches_torch_ref_on_ported_full_darknet53_in_eval_mode(tmp_path):
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, SIZE, SIZE)).astype(np.float32)
    tmodel = torch_ref.Darknet53().eval()
    randomize_torch_state(tmodel, seed=1)
    with torch.no_grad():
        want = {"logits": tmodel(torch.from_numpy(x)).numpy()}
        want.update({k: v.numpy() for k, v in tmodel.forward_features(torch.from_numpy(x)).items()})
    model = _ported_nnx(tmodel, tmp_path, DARKNET53)
    model.eval()
    logits, features = nnx.jit(lambda m, x: (m(x), m(x, return_features=True)))(model, x.transpose(0, 2, 3, 1))
    got = {"logits": np.asarray(logits), **{k: np.asarray(v).transpose(0, 3, 1, 2) for k, v in features.items()}}
    assert set(got) == set(want) == {"logits", *DARKNET53.feature_names()}
    for name, ref in want.items():
        assert got[name].shape == ref.shape, name
        err = relative_max_diff(got[name], ref.astype(np.float64))
        assert err <= EVAL_TOL, f"{name}: max |diff| / max |ref| = {err:.2e} > {EVAL_TOL}"


def test_nnx_train_mode_logits_and_every_gradient_agree_with_torch_ref(tmp_path):
    classes = 5
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (3, 3, SIZE, SIZE)).astype(np.float32)
    weights = rng.normal(size=(3, classes)).astype(np.float32)  # a fixed cotangent: every logit matters

    tmodel = torch_ref.Darknet53(num_classes=classes, config=TINY).train()
    randomize_torch_state(tmodel, seed=4)
    model = _ported_nnx(tmodel, tmp_path, TINY)  # saved before torch's forward moves its statistics
    t_logits = tmodel(torch.from_numpy(x))
    (t_logits * torch.from_numpy(weights)).sum().backward()
    t_grads = {k: p.grad.numpy() for k, p in tmodel.named_parameters()}

    model.train()

    def loss(m: dnnx.Darknet53) -> tuple[jax.Array, jax.Array]:
        logits = m(jnp.asarray(x.transpose(0, 2, 3, 1)))
        return jnp.sum(logits * weights), logits

    (_, f_logits), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
    assert relative_max_diff(np.asarray(f_logits), t_logits.detach().numpy().astype(np.float64)) <= TRAIN_TOL
    want = torch_tensors_as_flax_tree(t_grads)["params"]  # every parameter, none left out
    assert_trees_close(nnx.to_pure_dict(grads), want, TRAIN_TOL)
    # Train mode moved the running means as torch's BatchNorm did (momentum 0.1). The running variances differ
    # by design: torch updates them with the unbiased batch variance, Flax with the biased one (docs/porting.md).
    stats = dnnx.linen_variables(model)["batch_stats"]
    for key, buffer in tmodel.state_dict().items():
        if key.endswith("running_mean"):
            path, _ = torch_key_to_flax(key)
            err = relative_max_diff(flax_leaf(stats, path[1:]), buffer.numpy().astype(np.float64))
            assert err <= TRAIN_TOL, f"{key}: relative max diff {err:.2e}"
