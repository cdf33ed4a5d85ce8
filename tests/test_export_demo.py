"""docs/export.md run as written: a demo run exported to every target and served; both artefacts reproduce the
checkpoint's Flax logits in processes holding none of our code; and one full-size Darknet-53 export."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from porting_helpers import randomize_torch_state
from test_export import (
    FRAMEWORKS,
    OUR_PACKAGES,
    assert_close,
    flax_reference,
    flax_tree_from_torch,
    run_isolated,
    uint8_images,
)

from darknet_arch import DARKNET53
from porting import write_torch_file
from porting.export_cli import main
from torch_ref import Darknet53 as TorchDarknet

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "export.md"
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
DEMO_IMAGES = 9  # copied from the demo's validation split into images/, plus example.jpg
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.M | re.S)

pytestmark = pytest.mark.slow


def doc_blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(DOC.read_text()) if lang == language]


def as_argv(words: list[str]) -> list[str]:
    """A console script as installed by pyproject's [project.scripts] (not needing `pip install`), or python."""
    if words[0] == "python":
        return [sys.executable, *words[1:]]
    module, func = SCRIPTS[words[0]].split(":")
    code = f"import sys; from {module} import {func}; sys.exit({func}(sys.argv[1:]))"
    return [sys.executable, "-c", code, *words[1:]]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    """docs/export.md's commands in a fresh folder holding images/ (demo validation JPEGs), in order."""
    from train.data import load_splits

    cwd = tmp_path_factory.mktemp("demo")
    (cwd / "images").mkdir()
    val = load_splits("demo", val_fraction=0.05).val  # the demo data the training command uses
    for i, path in enumerate(val.paths[:DEMO_IMAGES]):
        shutil.copy(path, cwd / "images" / f"{i:02d}_{Path(path).name}")
    shutil.copy(val.paths[DEMO_IMAGES], cwd / "images" / "example.jpg")
    commands = [shlex.split(line[2:]) for block in doc_blocks("console") for line in block.splitlines()
                if line.startswith("$ ")]  # fmt: skip
    assert [c[0] for c in commands] == ["darknet53-train", "darknet53-export", "darknet53-serve-predict",
                                        "darknet53-serve-predict", "darknet53-predict"]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    outputs = []
    for words in commands:
        proc = subprocess.run(as_argv(words), cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (words, proc.stdout[-2000:], proc.stderr[-3000:])
        outputs.append(proc.stdout)
    return {"cwd": cwd, "outputs": outputs}


def checkpoint_model(workdir: Path) -> tuple[dict, dict, object]:
    """(variables, meta, config) of the run's best checkpoint, read with the run format's own readers directly."""
    from darknet_arch import DarknetConfig
    from porting.runs import checkpoint_steps, restore_variables

    directory = workdir / "checkpoints"
    _, step = checkpoint_steps(directory)
    variables, meta = restore_variables(directory, step)
    return variables, {**meta, "step": step}, DarknetConfig.from_dict(meta["model_config"])


def test_the_docs_commands_export_the_demo_run_and_every_artefact_predicts_what_the_checkpoint_does(demo) -> None:
    cwd = demo["cwd"]
    export_out = demo["outputs"][1]
    for name in ("darknet53.jax", "darknet53-bf16.jax", "darknet53.onnx"):
        assert f"wrote exported/{name} (+{name}.json)" in export_out
    flax = read_csv(cwd / "predictions-flax.csv")
    assert len(flax) == DEMO_IMAGES + 1
    for target in ("jax", "onnx"):
        served = read_csv(cwd / f"predictions-{target}.csv")
        assert [r["path"] for r in served] == [r["path"] for r in flax]
        assert [r["class"] for r in served] == [r["class"] for r in flax], target
        np.testing.assert_allclose([float(r["probability"]) for r in served],
                                   [float(r["probability"]) for r in flax], atol=2e-6)  # fmt: skip


def test_the_demo_sidecars_record_the_run(demo) -> None:
    _, meta, config = checkpoint_model(demo["cwd"] / "runs" / "demo")
    for name in ("darknet53.jax", "darknet53-bf16.jax", "darknet53.onnx"):
        side = json.loads((demo["cwd"] / "exported" / f"{name}.json").read_text())
        assert side["class_names"] == meta["class_names"] == meta["preprocessing"]["class_names"]
        assert side["source"] == {"path": "runs/demo", "format": "train_flax", "step": meta["step"]}
        size = meta["preprocessing"]["image_size"]
        assert side["input"]["shape"] == [None, size, size, config.in_channels]
        assert side["model"]["config"] == meta["model_config"]
        assert side["check"]["batch_sizes"] == [1, 3, 3, 3]  # all 10 images of --check-images
    bf16 = json.loads((demo["cwd"] / "exported" / "darknet53-bf16.jax.json").read_text())["check"]
    assert 0 < bf16["relative_diff"] < 0.1 and 0 <= bf16["top1_agreement"] <= 1


@pytest.mark.parametrize("target", ["jax", "onnx"])
def test_the_demo_artefacts_reproduce_the_checkpoints_flax_logits_without_our_code(demo, target, tmp_path) -> None:
    from train.data import decode_image

    variables, meta, config = checkpoint_model(demo["cwd"] / "runs" / "demo")
    pre = meta["preprocessing"]
    paths = sorted((demo["cwd"] / "images").iterdir())
    images = np.stack([decode_image(str(p), pre["image_size"]) for p in paths])
    artefact = demo["cwd"] / "exported" / ("darknet53.onnx" if target == "onnx" else "darknet53.jax")
    for batch in (1, 7):
        got = run_isolated(target, artefact, images[:batch], tmp_path / str(batch))["logits"]
        assert_close(got, flax_reference(variables, images[:batch], config=config, mean=pre["mean"], std=pre["std"]))


def test_the_docs_python_snippets_run_with_only_their_runtime(demo) -> None:
    _, meta, _ = checkpoint_model(demo["cwd"] / "runs" / "demo")
    snippets = doc_blocks("python")
    assert len(snippets) == 2 and "import jax" in snippets[0] and "import onnxruntime" in snippets[1]
    for code, runtime, other in ((snippets[0], "jax", "onnxruntime"), (snippets[1], "onnxruntime", "jax")):
        forbidden = sorted(OUR_PACKAGES | FRAMEWORKS | {other})
        check = f"\nimport sys\nprint(sorted({{m.split('.')[0] for m in sys.modules}} & set({forbidden!r})))\n"
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        proc = subprocess.run([sys.executable, "-I", "-c", code + check], cwd=demo["cwd"], capture_output=True,
                              text=True, env={**env, "JAX_PLATFORMS": "cpu"}, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        printed_class, imported = proc.stdout.strip().splitlines()[-2:]
        assert printed_class in meta["class_names"] and imported == "[]", (runtime, proc.stdout)


def test_an_option_contradicting_the_runs_record_is_refused(demo, capsys) -> None:
    out = demo["cwd"] / "refused"
    assert main([str(demo["cwd"] / "runs" / "demo"), str(out), "--preprocessing", '{"image_size": 64}']) == 2
    err = capsys.readouterr().err
    assert "contradicts what the weights record" in err and "image_size: 32" in err and "64" in err
    assert not out.exists()


def test_full_size_darknet53_exports_and_both_artefacts_reproduce_flax(tmp_path) -> None:
    # The full architecture (every stage's real width and depth) at 64 px: the 256 px default a file without a
    # recorded size gets is test_export's, on the tiny network; 256 px equivalence is test_porting_equivalence's.
    net = TorchDarknet(num_classes=18, config=DARKNET53)
    randomize_torch_state(net, seed=5)
    pt = tmp_path / "darknet53.pt"
    write_torch_file(pt, net.state_dict(), {"num_classes": 18, "leaky_slope": DARKNET53.leaky_slope})
    out = tmp_path / "out"
    assert main([str(pt), str(out), "--platforms", "cpu", "--preprocessing", json.dumps({"image_size": 64})]) == 0
    variables = flax_tree_from_torch(net.state_dict())
    images = uint8_images(7, seed=11, size=64)
    want = flax_reference(variables, images, config=DARKNET53)
    # Batch 7 alone: batches of 1 and 7 through one artefact are test_export's check, on the tiny network.
    for target, name in (("jax", "darknet53.jax"), ("onnx", "darknet53.onnx")):
        assert_close(run_isolated(target, out / name, images, tmp_path / target)["logits"], want)
