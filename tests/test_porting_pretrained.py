"""from_pretrained: a timm-layout directory (built here from a randomly initialised timm darknet53; nothing is
downloaded) gives the Flax and PyTorch models timm's logits, each fed by its own preprocessing (timm's
resolve_data_config / create_transform; ours: the directory's record); Hub ids resolve through huggingface_hub's
cache, offline too; directories without weights or of another network, wrong class names and an uncached id while
offline are clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from porting_helpers import TINY, randomize_torch_state

import porting
import torch_ref
from porting.locations import HUB_CONFIG

CLASSES = 5
NAMES = ["ant", "bee", "cat", "dog", "eel"]
SIZE = 64  # one full-size forward at 64 px per framework
REL_TOL = 1e-5  # fp32, docs/porting.md "Tolerances"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def timm_dirs(tmp_path_factory) -> dict[bool, Path]:
    """timm's own Hub exports (timm.models.save_for_hf) of one darknet53 with random weights and running statistics:
    {True: model.safetensors, False: pytorch_model.bin} (its safe_serialization)."""
    import timm
    from timm.models import save_for_hf

    model = timm.create_model("darknet53", pretrained=False, num_classes=CLASSES)
    randomize_torch_state(model, seed=2)
    root, dirs = tmp_path_factory.mktemp("hub"), {}
    for safe in (True, False):
        dirs[safe] = root / f"darknet53-timm{'' if safe else '-bin'}"
        data = {"input_size": (3, SIZE, SIZE), "crop_pct": 0.875, "interpolation": "bicubic"}
        save_for_hf(model, dirs[safe], safe_serialization=safe, model_config={"label_names": NAMES}, data_config=data)
    return dirs


@pytest.fixture(scope="module")
def timm_dir(timm_dirs) -> Path:
    return timm_dirs[True]


def test_a_hub_directory_holding_pytorch_model_bin_reads_as_its_safetensors_twin(timm_dirs):
    """timm's save_for_hf writes pytorch_model.bin without safe_serialization (and many Hub repositories hold only
    that): read with torch.load(weights_only=True), the same weights and record as the safetensors export."""
    import timm

    assert (timm_dirs[False] / "pytorch_model.bin").is_file() and not (timm_dirs[False] / "model.safetensors").exists()
    timm.create_model(f"local-dir:{timm_dirs[False]}", pretrained=True)  # timm itself reads the folder
    got, want = porting.load_flax_variables(timm_dirs[False]), porting.load_flax_variables(timm_dirs[True])
    assert got.location.format == "torch" and got.preprocessing == want.preprocessing
    assert got.state.keys() == want.state.keys()
    for key, value in want.state.items():
        np.testing.assert_array_equal(got.state[key], value, err_msg=key)


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(4)  # two aspect ratios: the centre crop matters
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in ((83, 70), (66, 97))]


@pytest.mark.slow
def test_from_pretrained_on_a_timm_directory_gives_timms_logits(timm_dir):
    import timm
    from timm.data import create_transform, resolve_data_config

    reference = timm.create_model(f"local-dir:{timm_dir}", pretrained=True).eval()  # timm's own loader
    transform = create_transform(**resolve_data_config(model=reference, use_test_size=True))
    with torch.no_grad():
        want = reference(torch.stack([transform(img) for img in _images()])).numpy()

    flax = porting.flax_from_pretrained(timm_dir)
    assert flax.preprocessing.class_names == tuple(NAMES) and flax.preprocessing.leaky_slope == 0.01
    assert (flax.preprocessing.image_size, flax.preprocessing.interpolation) == (SIZE, "bicubic")
    x = np.stack([flax.preprocessing.prepare(img) for img in _images()])
    got = np.asarray(flax.model.apply(flax.variables, x))
    assert np.max(np.abs(got - want)) <= REL_TOL * np.max(np.abs(want))

    pt = porting.torch_from_pretrained(timm_dir)
    with torch.no_grad():
        got = pt.model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    assert np.max(np.abs(got - want)) <= REL_TOL * np.max(np.abs(want))


def _tiny_hub_dir(root: Path, config: dict | None = None, classes: int = 3) -> Path:
    """A Hub-layout directory of our own tiny network (torch_ref names), with our preprocessing record."""
    root.mkdir(parents=True, exist_ok=True)
    model = torch_ref.Darknet53(classes, config=TINY)
    randomize_torch_state(model, seed=3)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / "model.safetensors")
    config = config or {"architecture": "tiny", "num_classes": classes,
                        "preprocessing": {"leaky_slope": 0.1, "class_names": ["a", "b", "c"][:classes]}}  # fmt: skip
    (root / HUB_CONFIG).write_text(json.dumps(config))
    return root


def test_a_hub_directory_without_weights_or_of_another_network_is_refused(tmp_path):
    empty = tmp_path / "no_weights"
    empty.mkdir()
    (empty / HUB_CONFIG).write_text(json.dumps({"architecture": "darknet53", "pretrained_cfg": {}}))
    with pytest.raises(porting.PortingError, match=r"config\.json but no weights: expected model\.safetensors"):
        porting.flax_from_pretrained(empty)
    other = _tiny_hub_dir(tmp_path / "csp", {"architecture": "cspdarknet53", "pretrained_cfg": {}})
    with pytest.raises(porting.PortingError, match="holds a 'cspdarknet53' model"):
        porting.torch_from_pretrained(other)
    mislabelled = _tiny_hub_dir(tmp_path / "tiny_as_d53", {"architecture": "darknet53", "pretrained_cfg": {}})
    with pytest.raises(porting.PortingError, match=r"size mismatch for conv1\.0\.weight"):
        porting.flax_from_pretrained(mislabelled)
    names = _tiny_hub_dir(tmp_path / "names", {"architecture": "tiny", "label_names": ["x", "y"], "pretrained_cfg": {}})
    with pytest.raises(porting.PortingError, match="2 class names for a 3-class head"):
        porting.torch_from_pretrained(names)
    heads = _tiny_hub_dir(tmp_path / "heads", {"architecture": "tiny", "num_classes": 7, "pretrained_cfg": {}})
    with pytest.raises(porting.PortingError, match="records 7 classes, but its head has 3"):
        porting.torch_from_pretrained(heads)


def test_a_record_without_a_slope_needs_one(tmp_path):
    pt = tmp_path / "plain.pt"
    torch.save(torch_ref.Darknet53(3, config=TINY).state_dict(), pt)
    with pytest.raises(porting.PortingError, match=r"records no leaky slope.*pass leaky_slope="):
        porting.torch_from_pretrained(pt)
    assert porting.torch_from_pretrained(pt, leaky_slope=0.01).model.config.leaky_slope == 0.01


def _offline(code: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONPATH": str(REPO),
           "JAX_PLATFORMS": "cpu"}  # fmt: skip
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)


def test_an_uncached_hub_id_while_offline_names_the_id_and_hf_hub_offline(tmp_path):
    code = (
        "import porting, sys\n"
        "try:\n"
        "    porting.flax_from_pretrained('timm/darknet53.c2ns_in1k')\n"
        "except porting.PortingError as e:\n"
        "    print(e); sys.exit(2)\n"
    )
    proc = _offline(code, tmp_path / "empty_cache")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Hub id 'timm/darknet53.c2ns_in1k'" in proc.stdout and "HF_HUB_OFFLINE is set" in proc.stdout
    assert str(tmp_path / "empty_cache") in proc.stdout


def test_a_cached_hub_id_loads_offline_with_its_record(tmp_path):
    """huggingface_hub's cache layout (models--OWNER--NAME/refs/main -> snapshots/<commit>/) filled by hand."""
    commit = "0" * 40
    repo = tmp_path / "cache" / "models--someone--tiny-darknet"
    _tiny_hub_dir(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code = (
        "import sys, numpy as np, torch, porting\n"
        f"x = torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))\n"
        "for name in ('someone/tiny-darknet', 'hf-hub:someone/tiny-darknet'):\n"
        "    p = porting.torch_from_pretrained(name)\n"
        "    print(p.location.given, p.preprocessing.class_names, p.model.config.leaky_slope)\n"
        f"    np.save({str(tmp_path / 'y.npy')!r}, p.model(x).detach().numpy())\n"
        "print('jax imported:', 'jax' in sys.modules)\n"
    )
    proc = _offline(code, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hf-hub:someone/tiny-darknet ('a', 'b', 'c') 0.1" in proc.stdout
    assert "jax imported: False" in proc.stdout  # porting.torch_from_pretrained imports no jax
    want = porting.torch_from_pretrained(repo / "snapshots" / commit).model(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), want)


def test_every_command_that_takes_weights_takes_a_cached_hub_id(tmp_path, monkeypatch):
    """port-weights, --init-from, darknet53-export and train.predict read a Hub id as from_pretrained does: through
    huggingface_hub's cache (laid out by hand here; HF_HUB_OFFLINE is set for the suite), bare or hf-hub:-prefixed."""
    from huggingface_hub import constants

    from porting.cli import main as port_weights
    from porting.export import read_weights
    from train.options import TrainConfig, load_init_weights
    from train.predict import Predictor

    commit = "1" * 40
    repo = tmp_path / "cache" / "models--someone--tiny-darknet"
    cfg = {"input_size": [3, 32, 32], "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "squash",
           "mean": [0.5] * 3, "std": [0.25] * 3}  # fmt: skip
    config = {"architecture": "tiny", "pretrained_cfg": cfg, "label_names": ["a", "b", "c"],
              "preprocessing": {"leaky_slope": 0.1}}  # fmt: skip
    snapshot = _tiny_hub_dir(repo / "snapshots" / commit, config)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))  # read by hf_hub_download at each call
    want = porting.load_flax_variables(snapshot).variables["params"]["fc"]["bias"]

    assert port_weights(["torch2flax", "someone/tiny-darknet", str(tmp_path / "x.msgpack")]) == 0
    np.testing.assert_array_equal(porting.load_flax_variables(tmp_path / "x.msgpack").variables["params"]["fc"]["bias"],
                                  want)  # fmt: skip
    run = TrainConfig(data="demo", workdir=str(tmp_path / "run"), arch="tiny", init_from="hf-hub:someone/tiny-darknet")
    loaded = load_init_weights(run, TINY, 3)
    variables, slope = loaded.variables, loaded.leaky_slope
    np.testing.assert_array_equal(variables["params"]["fc"]["bias"], want)
    assert slope == 0.1
    weights = read_weights("hf-hub:someone/tiny-darknet")
    assert weights.location.given == "hf-hub:someone/tiny-darknet" and weights.preprocessing.image_size == 32
    predictor = Predictor.from_checkpoint("someone/tiny-darknet")
    assert (predictor.class_names, predictor.image_size) == (["a", "b", "c"], 32)
    with pytest.raises(porting.PortingError, match=r"Hub id 'someone/absent' \(no local path of that name exists"):
        porting.load_flax_variables("someone/absent")


def test_wrong_options_and_an_existing_destination_are_refused_before_a_hub_id_is_looked_up(tmp_path, capsys):
    from porting.cli import main as port_weights

    with pytest.raises(TypeError, match=r"unexpected option\(s\) dtype.*go in model_kwargs="):
        porting.flax_from_pretrained("someone/absent", dtype="bf16")
    with pytest.raises(TypeError, match=r"unexpected option\(s\) reset_head; the weights readers take"):
        porting.convert("someone/absent", tmp_path / "x.msgpack", reset_head=True)
    (tmp_path / "x.msgpack").write_bytes(b"kept")
    assert port_weights(["torch2flax", "someone/absent", str(tmp_path / "x.msgpack")]) == 2
    assert "already exists; pass force=True (--force)" in capsys.readouterr().err  # not the uncached Hub id
    assert (tmp_path / "x.msgpack").read_bytes() == b"kept"
