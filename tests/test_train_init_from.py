"""--init-from a torch file: the Flax train state gives the torch model's eval logits; head swaps and wrong nets."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
import torch

from darknet_arch import StageSpec
from tests.train_helpers import SIZE, TINY, random_batch
from torch_ref import Darknet53 as TorchDarknet
from train.options import ConfigError, TrainConfig, load_init_weights
from train.state import create_model, create_train_state, make_optimizer, make_schedule, normalize
from train.torch import to_tensor


@pytest.fixture(scope="module")
def torch_file(tmp_path_factory):
    torch.manual_seed(0)
    model = TorchDarknet(num_classes=18, config=TINY)
    with torch.no_grad():  # random running statistics: unit ones would hide a mean/var mix-up
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0.0, 0.5)
            elif name.endswith("running_var"):
                buf.uniform_(0.3, 3.0)
    model.eval()
    path = tmp_path_factory.mktemp("w") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path, model


def _config(path, **kw) -> TrainConfig:
    return TrainConfig(data="demo", workdir="unused", init_from=str(path), **kw)


def test_init_from_torch_file_gives_the_torch_models_eval_logits(torch_file):
    path, torch_model = torch_file
    loaded = load_init_weights(_config(path), TINY, 18)
    variables, slope = loaded.variables, loaded.leaky_slope
    config = _config(path)
    model = create_model(TINY.with_slope(slope), 18, "fp32")
    state = create_train_state(
        jax.random.PRNGKey(1), model, SIZE, make_optimizer(config, make_schedule(config, 1, 1)), variables=variables
    )
    batch = random_batch(np.random.default_rng(0), 4)
    batch["mask"] = np.ones(4, bool)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    got = np.asarray(jax.jit(state.apply_fn)(variables, normalize(batch["image"])))  # the trainer's eval input
    with torch.no_grad():
        want = torch_model(to_tensor(batch["image"], torch.device("cpu"), False)).numpy()
    # Anchored tolerance for fp32 PyTorch vs Flax (docs/porting.md: 1e-5 abs as in HF transformers, scaled here).
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_init_from_with_another_class_count_reinitialises_the_head(torch_file):
    path, torch_model = torch_file
    loaded = load_init_weights(_config(path), TINY, 5)
    variables, notes = loaded.variables, loaded.notes
    assert variables["params"]["fc"]["kernel"].shape == (TINY.width, 5)
    assert any("head" in n for n in notes), notes
    stem = torch_model.state_dict()["conv1.0.weight"].numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(variables["params"]["conv1"]["conv"]["kernel"], stem)


def test_init_from_a_different_network_is_a_clear_error(torch_file):
    path, _ = torch_file
    other = dataclasses.replace(TINY, stages=(*TINY.stages[:-1], StageSpec(128, 2)))
    with pytest.raises(ConfigError, match="--init-from"):
        load_init_weights(_config(path), other, 18)


def test_init_from_darknet_weights_trains_on_their_unit_input_unless_forced(tmp_path):
    from tests.porting_helpers import darknet_layers, write_weights_file
    from train.options import input_norm_for

    path = tmp_path / "tiny.weights"
    write_weights_file(path, darknet_layers(TINY, 18, seed=3))
    config = _config(path)
    loaded = load_init_weights(config, TINY, 18)
    slope, record = loaded.leaky_slope, loaded.preprocessing
    resolved, note = input_norm_for(config, record)
    assert (slope, resolved.input_norm) == (0.1, "unit") and "from the weights' record" in note
    # The step then feeds x / 255 unchanged: Darknet's [0, 1] input.
    images = np.arange(0, 256, dtype=np.uint8).reshape(1, 8, 8, 4)[..., :3]
    mean, std = resolved.mean_std
    np.testing.assert_allclose(np.asarray(normalize(images, mean=mean, std=std)), images / 255.0, rtol=1e-6)
    forced, note = input_norm_for(_config(path, input_norm="imagenet"), record)
    assert forced.input_norm == "imagenet" and "forced by --input-norm; the weights expect unit" in note
