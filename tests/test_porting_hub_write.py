"""port-weights X2hub writes a Hub model repository that timm itself loads (timm.create_model("local-dir:...")) with
the Flax model's logits and the class names as label_names, and that our own from_pretrained reads back bitwise;
weights it cannot describe to timm are refused with nothing written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from porting_helpers import TINY, randomize_torch_state

import porting
import torch_ref
from darknet_arch import DARKNET_LEAKY_SLOPE, SEED_LEAKY_SLOPE
from porting import cli, keymap
from porting.errors import EXIT_BAD_INPUT, EXIT_OK
from porting.preprocessing import PIXEL_SCALE, UINT8_RGB

CLASSES = 4
NAMES = ["wear", "incorrect", "absent", "other"]
SIZE = 64  # one full-size forward at 64 px per framework
REL_TOL = 1e-5  # fp32, docs/porting.md "Tolerances"
RECORD = {"image_size": SIZE, "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "squash",
          "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # fmt: skip


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _msgpack_source(root: Path, slope: float) -> Path:
    """A full-size Flax .msgpack with random weights and statistics, its record, class names and slope."""
    model = torch_ref.Darknet53(CLASSES, slope)
    randomize_torch_state(model, seed=5)
    pt, src = root / "src.pt", root / "src.msgpack"
    torch.save(model.state_dict(), pt)
    porting.convert(pt, src, leaky_slope=slope, class_names=NAMES, preprocessing=RECORD)
    return src


@pytest.mark.slow
def test_flax2hub_gives_timm_the_flax_logits_and_reads_back_bitwise(tmp_path):
    """Darknet's slope 0.1 reaches timm as act_layer 'prelu' holding 0.1 in every unit (timm's own 0.01 needs no
    model_args: test_timms_own_slope_needs_no_model_args); timm's model computes the Flax model's logits."""
    import jax
    import timm

    slope = DARKNET_LEAKY_SLOPE
    src, out = _msgpack_source(tmp_path, slope), tmp_path / "hub"
    assert cli.main(["flax2hub", str(src), str(out)]) == EXIT_OK
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]

    reference = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # timm's own loader, strict
    assert reference.pretrained_cfg["label_names"] == NAMES
    assert tuple(reference.pretrained_cfg["input_size"]) == (3, SIZE, SIZE)
    assert reference.pretrained_cfg["interpolation"] == "bilinear"
    assert json.loads((out / "config.json").read_text())["model_args"] == {"act_layer": "prelu"}
    x = np.random.default_rng(0).standard_normal((2, SIZE, SIZE, 3)).astype(np.float32)
    with torch.no_grad():
        want = reference(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    flax = porting.flax_from_pretrained(src)
    got = np.asarray(jax.jit(flax.model.apply)(flax.variables, x))
    assert np.max(np.abs(got - want)) <= REL_TOL * np.max(np.abs(want))

    back, original = porting.load_flax_variables(out), porting.load_flax_variables(src)
    # The folder states timm's input convention, uint8 RGB x 1/255, which the source left implicit.
    assert back.preprocessing == original.preprocessing.replace(input=UINT8_RGB, scale=PIXEL_SCALE)
    assert back.config == original.config
    for key, value in original.state.items():
        np.testing.assert_array_equal(back.state[key], value, err_msg=key)


def test_a_runs_hub_folder_carries_its_validation_metrics_and_reads_back_bitwise(tiny_run, tmp_path):
    """A run's best checkpoint: the card shows the metrics that step recorded; the tiny network is named as ours."""
    from porting import runs

    out = tmp_path / "hub"
    assert cli.main(["flax2hub", str(tiny_run / "best"), str(out)]) == EXIT_OK
    card = (out / "README.md").read_text()
    step = porting.load_flax_variables(tiny_run / "best").location.step
    val = runs.read_meta(tiny_run / runs.CHECKPOINT_DIR, step)[1]["val"]
    assert f"| {val['loss']:.4f} | {val['accuracy']:.4f} | {val['macro_f1']:.4f} |" in card
    assert json.loads((out / "config.json").read_text())["architecture"] == "tiny"
    # A replaced head is not the head those metrics measured: its card shows none.
    replaced = ["--num-classes", "5", "--reset-head"]
    assert cli.main(["flax2hub", str(tiny_run / "best"), str(tmp_path / "new"), *replaced]) == EXIT_OK
    assert "Validation" not in (tmp_path / "new" / "README.md").read_text()
    back, original = porting.load_flax_variables(out), porting.load_flax_variables(tiny_run / "best")
    assert back.preprocessing == original.preprocessing
    for key, value in original.state.items():
        np.testing.assert_array_equal(back.state[key], value, err_msg=key)


def test_weights_timm_cannot_be_told_about_are_refused_with_nothing_written(tmp_path, capsys):
    model = torch_ref.Darknet53(None, config=TINY)
    randomize_torch_state(model, seed=1)
    torch.save(model.state_dict(), tmp_path / "backbone.pt")
    headed = torch_ref.Darknet53(3, config=TINY)
    torch.save(headed.state_dict(), tmp_path / "bare.pt")  # records nothing: no size, mean or std
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    before = _tree(tmp_path)
    cases = {
        "backbone.pt": ("no classifier head", "--num-classes"),
        "bare.pt": ("timm's evaluation transform needs", "--preprocessing"),
    }
    for name, words in cases.items():
        assert cli.main(["torch2hub", str(tmp_path / name), str(tmp_path / "out"), "--leaky-slope", "0.1"]) == 2
        err = capsys.readouterr().err
        assert all(w in err for w in words) and "Traceback" not in err, err
    assert cli.main(["torch2hub", str(tmp_path / "bare.pt"), str(tmp_path / "taken")]) == EXIT_BAD_INPUT
    assert "already exists" in capsys.readouterr().err
    # A DST that holds SRC (a Hub DST is any folder name): --force would have replaced the folder and SRC with it.
    assert cli.main(["torch2hub", str(tmp_path / "bare.pt"), str(tmp_path), "--force"]) == EXIT_BAD_INPUT
    assert "inside DST" in capsys.readouterr().err
    bad_val = {"state_dict": headed.state_dict(), "meta": {"val": {"loss": "low"}}}
    torch.save(bad_val, tmp_path / "taken" / "val.pt")
    before = _tree(tmp_path)
    assert cli.main(["torch2hub", str(tmp_path / "taken" / "val.pt"), str(tmp_path / "out")]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "metadata val must map loss, accuracy, macro_f1 to finite numbers" in err and "Traceback" not in err
    assert _tree(tmp_path) == before


def test_prelu_slopes_that_are_not_one_leaky_slope_are_refused(tmp_path, capsys):
    """A timm state_dict whose PReLU units hold different (learned) slopes, or a config naming prelu without them."""
    from porting.torch_flax import torch_to_timm_state_dict

    model = torch_ref.Darknet53(3, config=TINY)
    state = torch_to_timm_state_dict(model.state_dict(), TINY)
    keys = [f"{u.timm_prefix}.bn.act.weight" for u in keymap.conv_units(TINY)]
    slopes = {k: torch.tensor([0.1]) for k in keys}
    torch.save({**state, **slopes, keys[-1]: torch.tensor([0.25])}, tmp_path / "learned.pt")
    assert cli.main(["torch2flax", str(tmp_path / "learned.pt"), str(tmp_path / "o.msgpack"), "--arch", "tiny"]) == 2
    assert "PReLU slopes differ" in capsys.readouterr().err

    torch.save({**state, **slopes, keys[0]: torch.tensor(0.1)}, tmp_path / "scalar.pt")  # timm's PReLU refuses it
    assert cli.main(["torch2flax", str(tmp_path / "scalar.pt"), str(tmp_path / "o.msgpack"), "--arch", "tiny"]) == 2
    assert "shape (1,)" in capsys.readouterr().err

    torch.save({**state, **slopes}, tmp_path / "one.pt")  # one slope: read as that LeakyReLU slope
    assert porting.load_flax_variables(tmp_path / "one.pt", config=TINY).leaky_slope == DARKNET_LEAKY_SLOPE

    hub = tmp_path / "hub"
    hub.mkdir()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, hub / "model.safetensors")
    (hub / "config.json").write_text(json.dumps({"architecture": "tiny", "model_args": {"act_layer": "prelu"},
                                                 "pretrained_cfg": {}}))  # fmt: skip
    with pytest.raises(porting.PortingError, match="lack PReLU slopes"):
        porting.load_flax_variables(hub)
    # timm builds model_args' num_classes ahead of the top-level one: a 7-class model for these 3-class weights.
    (hub / "config.json").write_text(json.dumps({"architecture": "tiny", "num_classes": 3,
                                                 "model_args": {"num_classes": 7}, "pretrained_cfg": {}}))  # fmt: skip
    with pytest.raises(porting.PortingError, match="records 7 classes, but its head has 3"):
        porting.load_flax_variables(hub)


def test_timms_own_slope_needs_no_model_args(tmp_path):
    """Weights at nn.LeakyReLU's default slope are written as timm's plain darknet53: no act_layer, no PReLU tensors."""
    from safetensors import safe_open

    model = torch_ref.Darknet53(3, SEED_LEAKY_SLOPE, config=TINY)
    randomize_torch_state(model, seed=6)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    args = ["--leaky-slope", str(SEED_LEAKY_SLOPE), "--preprocessing", json.dumps(RECORD)]
    assert cli.main(["torch2hub", str(tmp_path / "w.pt"), str(tmp_path / "hub"), *args]) == EXIT_OK
    assert "model_args" not in json.loads((tmp_path / "hub" / "config.json").read_text())
    with safe_open(tmp_path / "hub" / "model.safetensors", framework="pt") as f:
        assert not [k for k in f.keys() if k.endswith(".act.weight")]  # noqa: SIM118 (safe_open is not iterable)
    back = porting.load_flax_variables(tmp_path / "hub")
    assert back.leaky_slope == SEED_LEAKY_SLOPE and back.source_format == "timm"
    for key, value in model.state_dict().items():
        if key in back.state:
            np.testing.assert_array_equal(back.state[key], value.numpy(), err_msg=key)


@pytest.mark.parametrize(("given", "held"), [(0.123456789, 0.12345679), (0.0100000001, SEED_LEAKY_SLOPE)])
def test_the_folder_records_the_float32_slope_its_tensors_hold(tmp_path, given, held):
    """The models compute in float32: a slope float32 cannot hold exactly is written as the float32 it becomes, so the
    record and the tensors agree on reading; one that becomes timm's 0.01 is timm's plain LeakyReLU."""
    model = torch_ref.Darknet53(3, given, config=TINY)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    args = ["--leaky-slope", str(given), "--preprocessing", json.dumps(RECORD)]
    assert cli.main(["torch2hub", str(tmp_path / "w.pt"), str(tmp_path / "hub"), *args]) == EXIT_OK
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["preprocessing"]["leaky_slope"] == held
    assert ("model_args" in config) == (held != SEED_LEAKY_SLOPE)
    assert porting.load_flax_variables(tmp_path / "hub").leaky_slope == held
