"""Bad weights get the project's PortingError naming the key and both shapes; pickle payloads never run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from porting_helpers import TINY

import torch_ref
from porting import (
    PortingError,
    canonical_from_flax,
    canonical_from_torch,
    flax_to_torch_state_dict,
    load_flax_variables,
    torch_state_dict_to_flax,
)

CLASSES = 4


@pytest.fixture
def state() -> dict:
    return torch_ref.Darknet53(num_classes=CLASSES, config=TINY).state_dict()


def test_all_missing_and_unexpected_keys_and_each_shape_mismatch_are_reported(state):
    del state["conv1.0.weight"], state["residual_block2.0.layer1.1.running_var"]
    state["extra.weight"] = torch.zeros(2)
    state["residual_block9.0.layer1.0.weight"] = torch.zeros(2)
    state["conv2.0.weight"] = torch.zeros(16, 8, 1, 1)
    state["fc.bias"] = torch.zeros(CLASSES + 1)
    with pytest.raises(PortingError) as info:
        torch_state_dict_to_flax(state, config=TINY)
    message = str(info.value)
    assert "missing keys (2): 'conv1.0.weight', 'residual_block2.0.layer1.1.running_var'" in message
    assert "unexpected keys (2): 'extra.weight', 'residual_block9.0.layer1.0.weight'" in message
    assert "size mismatch for conv2.0.weight: expected shape (16, 8, 3, 3), got (16, 8, 1, 1)" in message
    assert f"size mismatch for fc.bias: expected shape ({CLASSES},), got ({CLASSES + 1},)" in message


def test_flax_shape_mismatch_names_the_path_and_the_transposed_shape(state):
    variables = torch_state_dict_to_flax(state, config=TINY)
    variables["params"]["conv1"]["conv"]["kernel"] = np.zeros((8, 3, 3, 3), np.float32)  # OIHW by mistake
    with pytest.raises(PortingError, match=r"params/conv1/conv/kernel: expected shape \(3, 3, 3, 8\) \(torch "
                       r"conv1\.0\.weight \(8, 3, 3, 3\) transposed \(2, 3, 1, 0\)\), got \(8, 3, 3, 3\)"):  # fmt: skip
        canonical_from_flax(variables, config=TINY)
    del variables["batch_stats"]
    with pytest.raises(PortingError, match=r"missing keys \(\d+\): 'batch_stats/conv1/bn/mean'"):
        flax_to_torch_state_dict(variables, config=TINY)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8])
def test_a_non_float_tensor_is_refused_by_name(state, dtype):
    state["conv3.1.running_mean"] = state["conv3.1.running_mean"].to(dtype)
    with pytest.raises(PortingError, match=r"conv3\.1\.running_mean: expected a floating-point tensor, got dtype"):
        canonical_from_torch(state, config=TINY)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_is_refused_by_name(state, bad):
    state["residual_block4.0.layer2.1.weight"][3] = bad
    with pytest.raises(PortingError, match=r"residual_block4\.0\.layer2\.1\.weight: contains 1 NaN or Inf"):
        canonical_from_torch(state, config=TINY)


def test_a_non_tensor_value_is_refused_by_name(state):
    state["conv1.1.bias"] = [0.0] * 8
    with pytest.raises(PortingError, match=r"conv1\.1\.bias: expected a tensor or array of shape \(8,\), got list"):
        canonical_from_torch(state, config=TINY)


def test_half_and_double_tensors_are_read_as_float32(state):
    state["conv1.0.weight"] = state["conv1.0.weight"].to(torch.bfloat16)
    state["fc.weight"] = state["fc.weight"].double()
    canonical = canonical_from_torch(state, config=TINY)
    assert {a.dtype for a in canonical.values()} == {np.dtype(np.float32)}


def test_naming_is_detected_only_when_unambiguous(state):
    mixed = {**state, "stem.conv1.conv.weight": torch.zeros(1)}
    with pytest.raises(PortingError, match=r"cannot tell the naming.*source='timm' or 'torch_ref'"):
        canonical_from_torch(mixed, config=TINY)
    with pytest.raises(PortingError, match="unexpected keys for timm darknet53 naming"):
        canonical_from_torch(state, config=TINY, source="timm")


class _Payload:
    """Unpickling this creates the marker file: proof that the payload ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_payload_is_refused_and_never_runs(tmp_path, state):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": state, "extra": _Payload(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(PortingError, match=r"refused by torch\.load\(weights_only=True\)"):
        load_flax_variables(path, config=TINY)
    assert not marker.exists()
    # The same file loaded unsafely does run the payload: the test above could have failed.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_checkpoint_dicts_and_wrapper_prefixes_are_accepted(tmp_path, state):
    for key in ("state_dict", "model"):
        torch.save({key: state, "epoch": 3}, tmp_path / f"{key}.pt")
        assert load_flax_variables(tmp_path / f"{key}.pt", config=TINY).num_classes == CLASSES
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pt")
    result = load_flax_variables(tmp_path / "ddp.pt", config=TINY, leaky_slope=0.1)
    assert result.notes == ("stripped the 'module.' prefix from every key",)


def test_unknown_extensions_and_missing_files_are_refused(tmp_path):
    (tmp_path / "weights.h5").write_bytes(b"")
    with pytest.raises(PortingError, match="has a name whose format porting cannot tell; expected a training run"):
        load_flax_variables(tmp_path / "weights.h5")
    with pytest.raises(PortingError, match=r"absent\.pt' does not exist; expected a training run"):
        load_flax_variables(tmp_path / "absent.pt")
    with pytest.raises(PortingError, match="absent_dir' does not exist; expected a training run"):
        load_flax_variables(tmp_path / "absent_dir")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(PortingError, match="holds no checkpoint or weights file porting can read; expected"):
        load_flax_variables(tmp_path / "empty_dir")


def test_a_nan_in_a_file_of_another_architecture_is_named_not_hidden_behind_shape_mismatches(tmp_path):
    # A tiny-network file read without --arch: darknet53 (tried first) does not fit its shapes; tiny does, and its
    # one NaN is what the user must hear about, not darknet53's ~300 shape mismatches.
    import porting

    state = torch_ref.Darknet53(num_classes=CLASSES, config=TINY).state_dict()
    state["conv1.0.weight"].view(-1)[0] = float("nan")
    torch.save(state, tmp_path / "t.pt")
    with pytest.raises(porting.PortingError) as info:
        porting.load_flax_variables(tmp_path / "t.pt")
    assert str(info.value).startswith("conv1.0.weight: contains 1 NaN or Inf"), str(info.value)[:300]
    assert "size mismatch" not in str(info.value)
