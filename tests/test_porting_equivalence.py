"""Full Darknet-53: torch_ref, timm's darknet53 and Flax compute the same function on ported weights (eval)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from porting_helpers import randomize_torch_state, relative_max_diff

import flax_darknet
import torch_ref
from darknet_arch import DARKNET53
from porting import canonical_from_torch, canonical_to_torch, timm_to_torch_state_dict, torch_state_dict_to_flax

pytestmark = pytest.mark.slow

# timm's darknet53 uses nn.LeakyReLU's 0.01 and a 1000-class head; one Flax compile serves both checks.
SLOPE = 0.01
CLASSES = 1000
SIZE = 64
FULL_SIZE = 256  # the competition's input (docs/architecture.md)
TOL = 1e-5  # max |diff| <= 1e-5 x max |reference| (HF transformers' PyTorch-vs-Flax bar)


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    return np.random.default_rng(0).uniform(-1, 1, (2, 3, SIZE, SIZE)).astype(np.float32)


@pytest.fixture(scope="module")
def flax_forward():
    model = flax_darknet.Darknet53(num_classes=CLASSES, leaky_slope=SLOPE)
    return jax.jit(lambda v, x: (model.apply(v, x), model.apply(v, x, return_features=True)))


def _torch_outputs(model: torch.nn.Module, x: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = {"logits": model(torch.from_numpy(x)).numpy()}
        out.update({k: v.numpy() for k, v in model.forward_features(torch.from_numpy(x)).items()})
    return out


def _assert_close(flax_out, ref: dict[str, np.ndarray]) -> None:
    logits, features = flax_out
    assert set(features) == set(DARKNET53.feature_names())
    got = {"logits": np.asarray(logits), **{k: np.asarray(v).transpose(0, 3, 1, 2) for k, v in features.items()}}
    for name, want in ref.items():
        assert got[name].shape == want.shape, name
        err = relative_max_diff(got[name], want)
        assert err <= TOL, f"{name}: max |diff| / max |ref| = {err:.2e} > {TOL}"


def test_torch_ref_and_flax_agree_on_ported_full_darknet53(batch, flax_forward):
    model = torch_ref.Darknet53(num_classes=CLASSES, leaky_slope=SLOPE).eval()
    randomize_torch_state(model, seed=1)
    variables = torch_state_dict_to_flax(model.state_dict())
    _assert_close(flax_forward(variables, batch.transpose(0, 2, 3, 1)), _torch_outputs(model, batch))


def test_torch_ref_and_flax_agree_on_ported_full_darknet53_at_the_competitions_256_px(flax_forward):
    # The suite's one full-size 256 px equivalence on the CPU (the GPU's is tests/gpu_equivalence.py): the size
    # the models are built for, where a stage's 8x8 final map, not 64 px's 2x2, is pooled.
    model = torch_ref.Darknet53(num_classes=CLASSES, leaky_slope=SLOPE).eval()
    randomize_torch_state(model, seed=2)
    x = np.random.default_rng(1).uniform(-1, 1, (1, 3, FULL_SIZE, FULL_SIZE)).astype(np.float32)
    _assert_close(flax_forward(torch_state_dict_to_flax(model.state_dict()), x.transpose(0, 2, 3, 1)),
                  _torch_outputs(model, x))  # fmt: skip


def _timm_outputs(model: torch.nn.Module, x: np.ndarray) -> dict[str, np.ndarray]:
    """timm's logits and its stage 2, 3, 4 outputs (stride 8, 16, 32), run stage by stage."""
    names = dict(zip(DARKNET53.feature_stages, DARKNET53.feature_names(), strict=True))
    with torch.no_grad():
        t = torch.from_numpy(x)
        out = {"logits": model(t).numpy()}
        h = model.stem(t)
        for i, stage in enumerate(model.stages):
            h = stage(h)
            if i in names:
                out[names[i]] = h.numpy()
    return out


@pytest.fixture(scope="module")
def timm_model():
    timm = pytest.importorskip("timm")
    model = timm.create_model("darknet53", pretrained=False, num_classes=CLASSES).eval()
    randomize_torch_state(model, seed=2)
    return model


def test_timm_darknet53_ported_to_torch_ref_matches_timm(timm_model, batch):
    state = timm_to_torch_state_dict(timm_model.state_dict())
    ours = torch_ref.Darknet53(num_classes=CLASSES, leaky_slope=SLOPE).eval()
    ours.load_state_dict(state, strict=True)
    ref = _timm_outputs(timm_model, batch)
    got = _torch_outputs(ours, batch)
    for name, want in ref.items():
        assert relative_max_diff(got[name], want) <= TOL, name


def test_timm_darknet53_ported_to_flax_matches_timm(timm_model, batch, flax_forward):
    # Auto-detected naming, through the canonical form and back to a torch state_dict as load_state_dict wants it.
    canonical = canonical_from_torch(timm_model.state_dict())
    assert set(canonical_to_torch(canonical)) == set(torch_ref.Darknet53(num_classes=CLASSES).state_dict())
    variables = torch_state_dict_to_flax(timm_model.state_dict(), source="timm")
    _assert_close(flax_forward(variables, batch.transpose(0, 2, 3, 1)), _timm_outputs(timm_model, batch))
