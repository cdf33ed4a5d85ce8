"""Round trips are bit-exact: torch -> flax -> torch, flax -> torch -> flax, darknet -> torch -> darknet (bytes)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from porting_helpers import TINY, darknet_layers, flax_leaf, randomize_torch_state, torch_key_to_flax

import flax_darknet
import torch_ref
from porting import (
    PortingError,
    convert,
    flax_to_torch_state_dict,
    load_flax_variables,
    read_torch_file,
    torch_state_dict_to_flax,
)

CLASSES = 7


@pytest.fixture
def torch_model() -> torch.nn.Module:
    model = torch_ref.Darknet53(num_classes=CLASSES, config=TINY)
    randomize_torch_state(model, seed=5)
    return model


def _assert_state_dicts_bit_equal(a: dict, b: dict, ordered: bool = True) -> None:
    assert list(a) == list(b) if ordered else sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def test_torch_flax_torch_is_bit_exact_and_follows_the_naming_contract(torch_model):
    state = torch_model.state_dict()
    variables = torch_state_dict_to_flax(state, config=TINY)
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        path, transpose = torch_key_to_flax(key)
        want = value.numpy() if transpose is None else value.numpy().transpose(transpose)
        np.testing.assert_array_equal(flax_leaf(variables, path), want, err_msg=key)
    back = flax_to_torch_state_dict(variables, config=TINY)
    _assert_state_dicts_bit_equal(state, back)
    torch_ref.Darknet53(num_classes=CLASSES, config=TINY).load_state_dict(back, strict=True)


def test_flax_torch_flax_is_bit_exact():
    model = flax_darknet.Darknet53(num_classes=CLASSES, config=TINY)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))
    # Random values everywhere (running stats included) so no swap of two same-shaped tensors could pass.
    rng = np.random.default_rng(7)
    variables = jax.tree.map(lambda s: rng.uniform(0.5, 3.0, s.shape).astype(np.float32), shapes)
    back = torch_state_dict_to_flax(flax_to_torch_state_dict(variables, config=TINY), config=TINY)
    assert jax.tree.structure(back) == jax.tree.structure(jax.tree.map(np.asarray, dict(variables)))
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(variables), strict=True):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, np.asarray(want))


@pytest.mark.parametrize(("torch_name", "flax_name"), [("m.pt", "m.msgpack"), ("m.safetensors", "ckpt")])
def test_file_round_trip_is_bit_exact_and_records_metadata(tmp_path, torch_model, torch_name, flax_name):
    src = tmp_path / "src.pth"
    torch.save(torch_model.state_dict(), src)
    flax_path, torch_path = tmp_path / flax_name, tmp_path / torch_name
    convert(src, flax_path, config=TINY, leaky_slope=0.01)
    convert(flax_path, torch_path, config=TINY)
    state, meta = read_torch_file(torch_path)
    # safetensors stores keys sorted; .pt keeps torch_ref's order.
    _assert_state_dicts_bit_equal(torch_model.state_dict(), dict(state), ordered=torch_name.endswith(".pt"))
    source = "flax_msgpack" if flax_name.endswith(".msgpack") else "orbax"
    assert meta == {"num_classes": CLASSES, "source_format": source, "preprocessing": {"leaky_slope": 0.01}}
    result = load_flax_variables(flax_path, config=TINY)
    assert (result.num_classes, result.leaky_slope, result.notes) == (CLASSES, 0.01, ())


def test_darknet_torch_darknet_is_byte_exact(tmp_path):
    from porting_helpers import write_weights_file

    src, mid, back = tmp_path / "net.weights", tmp_path / "net.pt", tmp_path / "back.weights"
    write_weights_file(src, darknet_layers(TINY, CLASSES, seed=6))
    convert(src, mid, config=TINY)
    convert(mid, back, config=TINY)
    assert back.read_bytes() == src.read_bytes()
    with pytest.raises(PortingError, match="already exists"):
        convert(mid, back, config=TINY)
    assert back.read_bytes() == src.read_bytes()


def test_an_orbax_training_checkpoint_gives_its_params_and_batch_stats(tmp_path, torch_model):
    import orbax.checkpoint as ocp

    variables = torch_state_dict_to_flax(torch_model.state_dict(), config=TINY)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "train_state", {**variables, "step": np.int32(7), "opt_state": {"mu": np.ones(3)}})
    checkpointer.wait_until_finished()
    result = load_flax_variables(tmp_path / "train_state", config=TINY)
    assert result.notes[0] == "ignored checkpoint entries: opt_state, step"
    assert len(result.notes) == 2 and "records no leaky slope" in result.notes[1]
    assert (result.num_classes, result.leaky_slope, result.source_format) == (CLASSES, None, "orbax")
    for got, want in zip(jax.tree.leaves(result.variables), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(got, want)


def test_flax_weights_read_into_flax_stay_in_flax_layout(tmp_path, torch_model, monkeypatch):
    """A Flax file read for Flax is checked and handed back as read (float32), never transposed to torch's layout and
    back; a head replaced on the way is the one case that converts."""
    import porting.api

    src = tmp_path / "w.msgpack"
    convert_from = tmp_path / "w.pt"
    torch.save(torch_model.state_dict(), convert_from)
    convert(convert_from, src, config=TINY, leaky_slope=0.1)
    reference = load_flax_variables(src).state  # canonical, torch layout: what the conversion path starts from

    def no_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("Flax weights went through the torch layout")

    monkeypatch.setattr(porting.api, "canonical_to_flax", no_conversion)
    variables = load_flax_variables(src).variables
    for key, value in reference.items():  # the test's own key map (porting_helpers), not porting's
        path, transpose = torch_key_to_flax(key)
        leaf = flax_leaf(variables, path)
        np.testing.assert_array_equal(leaf, value if transpose is None else value.transpose(transpose), err_msg=key)
        assert leaf.dtype == np.float32, key
    with pytest.raises(AssertionError, match="went through the torch layout"):
        _ = load_flax_variables(src, num_classes=CLASSES + 1).variables
