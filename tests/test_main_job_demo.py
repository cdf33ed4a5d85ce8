"""The README's main job, `python -m train.flax --data demo` with every default, meets its accuracy target."""

from __future__ import annotations

import json

import pytest

from tests.train_helpers import run_module
from train.data import DEMO_IMAGE_SIZE
from train.options import PRESETS

# Issue 5's acceptance: >= 90% validation accuracy for the full Darknet-53 on the demo (its time, under 5 minutes
# on a 2-core CPU, is measured and reported in docs/training.md, not asserted here).
TARGET_ACCURACY = 0.90


@pytest.mark.slow
def test_main_job_trains_full_darknet53_on_the_demo_to_90_percent(tmp_path) -> None:
    workdir = tmp_path / "run"
    # As the README runs it: with XLA's full optimisation (without it the job takes ~1.5x as long).
    proc = run_module("train.flax", ["--data", "demo", "--workdir", str(workdir)], timeout=1800, optimized=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    config = json.loads((workdir / "config.json").read_text())
    want = ("darknet53", DEMO_IMAGE_SIZE, PRESETS["demo"]["steps"])
    assert (config["arch"], config["image_size"], config["steps"]) == want
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["nonfinite_steps"] == 0
    assert summary["final_val"]["accuracy"] >= TARGET_ACCURACY, summary
