"""bench/export_bench.py at smoke size: every runtime is timed at each batch size and agrees with the Flax model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.export_bench import RUNTIMES

REPO = Path(__file__).resolve().parent.parent
# Out of the CI budget on 2 cores: torch.compile's C++ compilation (the full benchmark runs it).
SKIP = ("torch_compile",)


@pytest.mark.slow
def test_quick_run_times_every_runtime_side_by_side_and_all_agree_with_flax(tmp_path) -> None:
    cmd = [sys.executable, "-m", "bench.export_bench", "--arch", "tiny", "--image-size", "32", "--batches", "1", "2",
           "--steps", "1", "--rounds", "2", "--skip", *SKIP, "--out", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    expected = [r for r in RUNTIMES if r not in SKIP]
    assert sorted(data["results"]) == ["1", "2"]
    for batch, records in data["results"].items():
        assert list(records) == expected
        for name, rec in records.items():
            assert len(rec["window_s_per_call"]) == 2 and rec["img_per_s"] == pytest.approx(
                int(batch) / rec["s_per_call_median"]
            )
            assert rec["relative_diff_vs_flax"] <= 1e-5, (batch, name)
    assert all(check["ok"] for check in data["meta"]["export_checks"].values())
    table = (tmp_path / "results.md").read_text()
    assert table.count("\n| ") == len(expected) + 1 and "b2 img/s" in table
