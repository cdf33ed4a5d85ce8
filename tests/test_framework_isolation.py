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
