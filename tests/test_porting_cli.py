"""`port-weights`: conversions, --check output, and bad input -> stderr message, exit 2, nothing left behind."""

from __future__ import annotations

import os
import re

import pytest
import torch

import torch_ref
from porting import PortingError
from porting.atomic import atomic_write
from porting.cli import main

CHECK_LINE = re.compile(r"check (\w+): max \|torch - flax\| = (\S+) \(max \|torch\| = (\S+)\)")


@pytest.fixture(scope="module")
def full_pt(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("src") / "darknet53.pt"
    torch.save(torch_ref.Darknet53(num_classes=18, leaky_slope=0.01).state_dict(), path)
    return str(path)


@pytest.mark.slow
def test_torch2flax_check_prints_small_differences_and_records_metadata(tmp_path, full_pt, capsys):
    dst = tmp_path / "d53.msgpack"
    assert main(["torch2flax", full_pt, str(dst), "--leaky-slope", "0.01", "--check"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "head: 18 classes" in out and "leaky_slope: 0.01" in out
    diffs = {m[1]: (float(m[2]), float(m[3])) for m in CHECK_LINE.finditer(out)}
    assert set(diffs) == {"logits", "stride8", "stride16", "stride32"}
    for name, (diff, scale) in diffs.items():
        assert diff <= 1e-5 * scale, name
    # A Darknet file would be read back with slope 0.1: weights trained with 0.01 are refused, nothing written.
    assert main(["flax2darknet", str(dst), str(tmp_path / "d53.weights")]) == 2
    assert "leaky_slope: 0.01 (the weights record) vs 0.1 (a Darknet file implies)" in capsys.readouterr().err
    assert not (tmp_path / "d53.weights").exists()


def test_existing_dst_is_refused_unless_forced(tmp_path, full_pt, capsys):
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"keep me")
    assert main(["torch2darknet", full_pt, str(dst)]) == 2  # wrong side for DST
    assert main(["flax2torch", full_pt, str(dst)]) == 2  # wrong side for SRC
    err = capsys.readouterr().err
    assert "expected .msgpack or an orbax directory" in err
    assert dst.read_bytes() == b"keep me"
    weights = tmp_path / "out.weights"
    weights.write_bytes(b"keep me")
    assert main(["torch2darknet", full_pt, str(weights)]) == 2
    assert "already exists" in capsys.readouterr().err and weights.read_bytes() == b"keep me"
    assert main(["torch2darknet", full_pt, str(weights), "--force"]) == 0
    assert weights.stat().st_size == 20 + 4 * (40_620_640 + 18 * 1025)
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors", "out.weights"]


def test_bad_input_exits_2_with_a_message_and_leaves_no_output(tmp_path, capsys):
    truncated = tmp_path / "darknet53.weights"
    truncated.write_bytes(b"\0" * 20 + b"\0" * 4 * 1000)
    dst = tmp_path / "out.pt"
    assert main(["darknet2torch", str(truncated), str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("port-weights: error: Darknet .weights size mismatch") and "got 4020" in err
    assert sorted(os.listdir(tmp_path)) == ["darknet53.weights"]


def test_a_pickle_payload_is_refused_by_the_cli(tmp_path, capsys):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pth"
    torch.save({"x": torch.zeros(1), "y": _Marker(str(marker))}, evil)
    assert main(["torch2flax", str(evil), str(tmp_path / "out.msgpack")]) == 2
    assert "weights_only=True" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out.msgpack").exists()


class _Marker:
    """Unpickling creates the marker file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_an_interrupted_write_leaves_neither_output_nor_temporary(tmp_path):
    def write_half_then_fail(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write({tmp_path / "out.weights": write_half_then_fail}, force=False)
    assert os.listdir(tmp_path) == []
    with pytest.raises(PortingError, match=r"directory .* does not exist"):
        atomic_write({tmp_path / "missing" / "out.weights": write_half_then_fail}, force=False)
