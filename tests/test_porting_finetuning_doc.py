"""docs/finetuning.md works as written: every shell command in it runs, in order, from a timm-layout directory and a
Darknet .conv.74 file (both full-size, random weights, built here) to submission CSVs, and its Python example runs.

The training commands get `--steps 2 --batch-size 8 --image-size 32 --compile-cache none` appended (argparse keeps
the last value), which the page itself says.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from porting_helpers import darknet_layers, write_weights_file

from darknet_arch import DARKNET53
from train.data import MASK_CLASS_NAMES, load_splits

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "finetuning.md"
FAST = "--steps 2 --batch-size 8 --image-size 32 --compile-cache none"
ASSIGNMENT = re.compile(r"^[A-Z_]+=")
COMMAND_TIMEOUT_S = 600


def blocks(language: str) -> list[str]:
    """The fenced code blocks of the page in `language`, in order."""
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def commands() -> list[str]:
    """Every shell command of the page, in order; the variable settings are the test's own."""
    lines = [line.strip() for block in blocks("sh") for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#") and not ASSIGNMENT.match(line)]


def test_the_page_holds_the_commands_this_test_runs():
    names = {re.sub(r"\s.*", "", c.removeprefix("python -m ")) for c in commands()}
    assert names == {"python", "train.flax", "train.predict", "port-weights"}
    assert FAST.removesuffix(" --compile-cache none") in DOC.read_text()  # the page says what the test appends
    assert set(re.findall(r'"\$(\w+)"', DOC.read_text())) == {"DATA", "EVAL", "TIMM_DIR", "DARKNET"}


def _eval_folder(root: Path) -> Path:
    """A mask-layout eval/ folder of nine demo images, as the competition ships it."""
    (root / "images").mkdir(parents=True)
    with open(root / "info.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageID", "ans"])
        for i, path in enumerate(load_splits("demo").val.paths[:9]):
            shutil.copy(path, root / "images" / f"{i:03d}.jpg")
            w.writerow([f"{i:03d}.jpg", 0])
    return root


@pytest.mark.slow
def test_every_command_in_docs_finetuning_md_runs(tmp_path):
    import timm
    from timm.models import save_for_hf

    save_for_hf(timm.create_model("darknet53", pretrained=False), tmp_path / "darknet53-timm", safe_serialization=True)
    layers = darknet_layers(DARKNET53, None, seed=0)  # darknet53.conv.74: no head
    for unit in [layers["stem"], *(c for down, blocks in layers["stages"] for c in (down, *sum(blocks, ())))]:
        unit["rolling_mean"][:], unit["rolling_variance"][:] = 0.0, 1.0  # a fresh network's statistics
    write_weights_file(tmp_path / "darknet53.conv.74", layers)
    shutil.copy(load_splits("demo").val.paths[0], tmp_path / "photo.jpg")
    env = {
        **os.environ,
        "DATA": "demo",
        "EVAL": str(_eval_folder(tmp_path / "eval")),
        "TIMM_DIR": str(tmp_path / "darknet53-timm"),
        "DARKNET": str(tmp_path / "darknet53.conv.74"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(REPO),
        "JAX_PLATFORMS": "cpu",
    }
    outputs = []
    for command in commands():
        line = f"{command} {FAST}" if command.startswith("python -m train.flax") else command
        proc = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S)  # fmt: skip
        assert proc.returncode == 0, f"{line}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        outputs.append(proc.stdout)
    assert "288 px, bicubic, center crop_pct 1.0" in outputs[0] and "leaky_slope 0.01" in outputs[0]
    for name in ("submission.csv", "submission-darknet.csv"):
        with open(tmp_path / name, newline="") as f:
            rows = list(csv.DictReader(f))
        assert [r["ImageID"] for r in rows] == [f"{i:03d}.jpg" for i in range(9)]
        assert all(0 <= int(r["ans"]) < len(MASK_CLASS_NAMES) for r in rows)
    assert (tmp_path / "ft.pt").is_file() and (tmp_path / "ft.pt.meta.json").is_file()
    (example,) = blocks("python")
    proc = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() in MASK_CLASS_NAMES
