"""porting.locate: which kind of location each path is, and the refusals.
(Real run folders are read in tests/test_porting_runs.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from porting_helpers import TINY

import porting
import torch_ref
from porting.locations import locate


def test_files_port_weights_outputs_and_hub_directories_are_told_apart(tmp_path):
    pt = tmp_path / "w.pt"
    torch.save(torch_ref.Darknet53(3, config=TINY).state_dict(), pt)
    assert (locate(pt).kind, locate(pt).format, locate(pt).side) == ("file", "torch", "torch")
    porting.convert(pt, tmp_path / "orbax_out", config=TINY, leaky_slope=0.1)
    assert (locate(tmp_path / "orbax_out").kind, locate(tmp_path / "orbax_out").side) == ("orbax", "flax")
    hub = tmp_path / "hub"
    hub.mkdir()
    porting.convert(tmp_path / "orbax_out", hub / "model.safetensors")
    (hub / "config.json").write_text(json.dumps({"architecture": "tiny"}))
    assert (locate(hub).kind, locate(hub).format) == ("hub_dir", "safetensors")
    assert porting.load_flax_variables(hub).config == TINY


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({"config.json": '{"data": "demo", "arch": "tiny", "workdir": "run"}'}, "a training run folder without checkp"),
        ({"config.json": "[1, 2]"}, "neither a training run's nor a timm/Hub model's"),
        ({"config.json": '{"architectures": ["BertModel"], "model_type": "bert"}'}, "neither a training run's"),
        ({"checkpoints/": None, "torch_checkpoints/": None}, r"holds both checkpoints/ \(train\.flax\) and torch_"),
        ({"torch_checkpoints/": None}, "is a train.torch run whose"),
        ({"x.txt": "hi"}, "holds no checkpoint or weights file"),
    ],
)
def test_folders_that_hold_no_weights_are_refused_saying_why(tmp_path, layout, message):
    run = tmp_path / "run"
    run.mkdir()
    for name, text in layout.items():
        (run / name).mkdir() if text is None else (run / name).write_text(text)
    with pytest.raises(porting.PortingError, match=message):
        locate(run)


def test_best_and_latest_need_a_run_and_files_need_a_known_suffix(tmp_path):
    with pytest.raises(porting.PortingError, match=r"names a best checkpoint, but .* is not a training run"):
        locate(tmp_path / "best")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(porting.PortingError, match="format porting cannot tell; expected a training run folder"):
        locate(tmp_path / "w.npz")


def test_a_mistyped_local_path_is_named_missing_and_never_read_as_a_hub_id(tmp_path, monkeypatch):
    """owner/name is a Hub id only when nothing local could be meant: a weights suffix, or an existing first folder,
    make it a local path (reported missing), so a typo never reaches the Hub."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for typo in ("runs/exp1", "runs/exp1.pt", "out/model.safetensors", "out/w.msgpack", "a/x..y"):
        with pytest.raises(porting.PortingError, match=rf"'{typo}' does not exist; expected"):
            locate(typo)
    for hub_id in ("someone/tiny-darknet", "timm/darknet53.c2ns_in1k", "hf-hub:runs/exp1"):
        with pytest.raises(porting.PortingError, match="is not in the Hugging Face cache"):
            locate(hub_id)  # HF_HUB_OFFLINE is set for the suite (conftest)
    with pytest.raises(porting.PortingError, match="does not exist"):
        locate(tmp_path / "someone" / "tiny-darknet")  # a Path is always local
