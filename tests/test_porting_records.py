"""The preprocessing record survives every conversion, in every format, as far as the format can hold it: torch ->
flax -> torch -> darknet -> flax keeps the slope and the input scaling (a Darknet file implies them) and says that
the class names, size and resize were lost there; the other formats keep the whole record; old files still read."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
from porting_helpers import TINY, randomize_torch_state

import porting
import torch_ref
from porting.cli import main
from porting.preprocessing import DARKNET_HELD, Preprocessing

CLASSES = 4
NAMES = ("cat", "dog", "mask", "no mask")
# Weights trained the Darknet way (RGB in [0, 1], slope 0.1), at 32 px, the whole image resized bilinearly.
DARKNET_STYLE = Preprocessing(input="uint8 RGB", scale=1 / 255, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                              image_size=32, interpolation="bilinear", crop_pct=1.0, crop_mode="squash",
                              class_names=NAMES, leaky_slope=0.1)  # fmt: skip
ARCH = ["--arch", "tiny"]


@pytest.fixture
def state_dict() -> dict:
    model = torch_ref.Darknet53(CLASSES, config=TINY)
    randomize_torch_state(model, seed=11)
    return model.state_dict()


def _record_of(path) -> Preprocessing:
    return porting.load_flax_variables(path, config=TINY).preprocessing


def _flags(record: Preprocessing, tmp_path) -> list[str]:
    names = tmp_path / "names.txt"
    names.write_text("\n".join(record.class_names) + "\n")
    rest = record.without("class_names").to_json()
    return ["--class-names", str(names), "--preprocessing", json.dumps(rest)]


def test_torch_flax_torch_darknet_flax_keeps_what_each_format_can_hold(tmp_path, state_dict, capsys):
    src, a, b, c, d = (tmp_path / n for n in ("src.pt", "a.msgpack", "b.safetensors", "c.weights", "d_orbax"))
    torch.save(state_dict, src)  # a plain state_dict: the record is given once, here
    assert main(["torch2flax", str(src), str(a), *_flags(DARKNET_STYLE, tmp_path), *ARCH]) == 0
    assert main(["flax2torch", str(a), str(b)]) == 0
    assert _record_of(a) == _record_of(b) == DARKNET_STYLE
    capsys.readouterr()
    assert main(["torch2darknet", str(b), str(c)]) == 0
    note = capsys.readouterr().out
    assert "cannot hold image_size, interpolation, crop_pct, crop_mode, class_names" in note
    assert main(["darknet2flax", str(c), str(d)]) == 0
    assert _record_of(d) == DARKNET_STYLE.only(*DARKNET_HELD)  # scaling and slope: implied by the Darknet file
    # What the Darknet file could not hold is given again; it must agree with what the file implies.
    e = tmp_path / "e.msgpack"
    assert main(["darknet2flax", str(c), str(e), *_flags(DARKNET_STYLE, tmp_path)]) == 0
    assert _record_of(e) == DARKNET_STYLE
    # The tensors went through unchanged.
    back = porting.flax_to_torch_state_dict(porting.load_flax_variables(d).variables, config=TINY)
    for key, value in state_dict.items():
        assert torch.equal(back[key], value), key


@pytest.mark.parametrize("torch_name", ["m.pt", "m.safetensors"])
@pytest.mark.parametrize("flax_name", ["m.msgpack", "m_orbax"])
def test_a_trainers_record_survives_torch_flax_torch_in_every_format(tmp_path, state_dict, torch_name, flax_name):
    from porting.runs import trainer_preprocessing
    from train.options import get_config

    config = get_config(data="demo", image_size=32, arch="tiny")
    trained = Preprocessing.from_json(trainer_preprocessing(config.mean_std, 32, list(NAMES), 0.1), "trainer")[0]
    src = tmp_path / "src.pt"
    torch.save({"model": state_dict, "preprocessing": trained.to_json(), "class_names": list(NAMES),
                "config": get_config(data="demo", image_size=32, arch="tiny").to_json()}, src)  # train.torch's payload
    flax_path, torch_path, again = tmp_path / flax_name, tmp_path / torch_name, tmp_path / f"again_{flax_name}"
    for s, t in ((src, flax_path), (flax_path, torch_path), (torch_path, again)):
        assert main([f"{'flax' if s == flax_path else 'torch'}2{'torch' if s == flax_path else 'flax'}", str(s),
                     str(t)]) == 0  # fmt: skip
    first = _record_of(flax_path)
    assert first.only(*trained.known()) == trained  # the trainer's fields; the crop it never wrote is filled in
    assert _record_of(torch_path) == _record_of(again) == first
    # The ImageNet-normalised weights cannot become a Darknet file, whose readers assume RGB in [0, 1].
    assert main(["torch2darknet", str(torch_path), str(tmp_path / "x.weights")]) == 2
    assert not (tmp_path / "x.weights").exists()


def test_files_written_before_the_record_still_read_and_a_contradicting_sidecar_is_refused(tmp_path, state_dict):
    pt = tmp_path / "old.pt"
    torch.save(state_dict, pt)
    sidecar = tmp_path / "old.pt.meta.json"
    sidecar.write_text(json.dumps({"num_classes": CLASSES, "leaky_slope": 0.01, "source_format": "seed"}))
    result = porting.load_flax_variables(pt, config=TINY)
    assert (result.leaky_slope, result.source_format) == (0.01, "seed")
    sidecar.write_text(json.dumps({"leaky_slope": 0.01, "preprocessing": {"leaky_slope": 0.1}}))
    with pytest.raises(porting.PortingError, match=r"contradictory preprocessing:\n  leaky_slope: 0.1"):
        porting.load_flax_variables(pt, config=TINY)
    sidecar.write_text(json.dumps({"preprocessing": {"class_names": ["a", "b"]}}))
    with pytest.raises(porting.PortingError, match="2 class names for a 4-class head"):
        porting.load_flax_variables(pt, config=TINY)


def test_the_architecture_is_inferred_from_the_tensors(tmp_path, state_dict, capsys):
    pt = tmp_path / "tiny.pt"
    torch.save(state_dict, pt)
    assert main(["torch2flax", str(pt), str(tmp_path / "t.msgpack"), "--leaky-slope", "0.1"]) == 0  # no --arch
    assert "tiny, head: 4 classes" in capsys.readouterr().out
    result = porting.load_flax_variables(tmp_path / "t.msgpack")
    assert result.config == TINY and jax.tree.leaves(result.variables)[0].dtype == np.float32
    (tmp_path / "bad.pt").write_bytes(b"")
    torch.save({"conv1.0.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(porting.PortingError, match=r"the weights fit none of darknet53, tiny: pass config= / --arch"):
        porting.load_flax_variables(tmp_path / "bad.pt")
