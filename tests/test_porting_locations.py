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
