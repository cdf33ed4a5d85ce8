"""Importing torch_ref never imports jax, and importing flax_darknet never imports torch."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("torch_ref", ("jax", "flax")), ("flax_darknet", ("torch",)), ("darknet_arch", ("jax", "flax", "torch"))],
)
def test_package_does_not_import_other_framework(package, forbidden):
    code = (
        f"import sys, {package}\n"
        f"bad = [m for m in {forbidden!r} if m in sys.modules]\n"
        "print(bad)\n"
        "raise SystemExit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{package} imported {proc.stdout.strip()} {proc.stderr[-2000:]}"


def test_the_run_logger_writes_tensorboard_events_without_importing_torch(tmp_path):
    # tensorboardX's writer tries `import torch` at import time: 2.8 s of train.flax's start-up, for nothing.
    code = (
        "import sys\n"
        "from train.logging_utils import RunLogger\n"
        f"logger = RunLogger({str(tmp_path)!r})\n"
        "logger.log({'kind': 'train', 'step': 1, 'loss': 0.5})\n"
        "logger.close()\n"
        "print('torch' in sys.modules)\n"
        "import torch\n"  # and a later import of torch still works
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
