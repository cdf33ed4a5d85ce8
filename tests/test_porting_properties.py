"""Property tests: corrupt files, random headers, shapes and dtypes raise PortingError, never crash or allocate."""

from __future__ import annotations

import contextlib
import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from porting_helpers import TINY, darknet_layers, write_weights_file

import torch_ref
from porting import PortingError, canonical_from_flax, canonical_from_torch, load_flax_variables, read_darknet_weights
from porting.torch_flax import canonical_to_flax

CLASSES = 3
# A generous per-example deadline: long enough for a loaded CI machine, short enough to catch a hang.
SETTINGS = settings(max_examples=60, deadline=10_000, suppress_health_check=[HealthCheck.function_scoped_fixture])
# Reading a valid file needs its floats plus one float32 copy; anything far above that is a leak or a trap.
ALLOCATION_SLACK = 3


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("valid") / "tiny.weights"
    write_weights_file(path, darknet_layers(TINY, CLASSES, seed=11))
    return path.read_bytes()


def _read_or_refuse(data: bytes) -> None:
    with contextlib.suppress(PortingError):
        read_darknet_weights(data, config=TINY)


@SETTINGS
@given(st.binary(max_size=4096))
def test_random_bytes_are_refused(data):
    with pytest.raises(PortingError):
        read_darknet_weights(data, config=TINY)


@SETTINGS
@given(st.data())
def test_truncated_files_are_refused(valid_file, data):
    cut = data.draw(st.integers(0, len(valid_file) - 1))
    with pytest.raises(PortingError):
        read_darknet_weights(valid_file[:cut], config=TINY, num_classes=CLASSES)
    with pytest.raises(PortingError):
        read_darknet_weights(valid_file[:cut], config=TINY)


@SETTINGS
@given(st.data())
def test_flipped_bytes_load_or_raise_porting_error(valid_file, data):
    buf = bytearray(valid_file)
    for _ in range(data.draw(st.integers(1, 8))):
        buf[data.draw(st.integers(0, len(buf) - 1))] ^= data.draw(st.integers(1, 255))
    _read_or_refuse(bytes(buf))


@SETTINGS
@given(
    major=st.integers(-(2**31), 2**31 - 1),
    minor=st.integers(-(2**31), 2**31 - 1),
    revision=st.integers(-(2**31), 2**31 - 1),
    seen=st.integers(0, 2**32 - 1),
)
def test_random_headers_allocate_nothing_beyond_the_file(valid_file, tmp_path, major, minor, revision, seen):
    payload = valid_file[20:]
    path = tmp_path / "h.weights"
    path.write_bytes(struct.pack("<iiiI", major, minor, revision, seen) + struct.pack("<I", seen) + payload)
    tracemalloc.start()
    try:
        read_darknet_weights(path, config=TINY)
    except PortingError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < ALLOCATION_SLACK * len(valid_file) + 1_000_000


@pytest.fixture(scope="module")
def tiny_state() -> dict:
    return {k: v.numpy() for k, v in torch_ref.Darknet53(num_classes=CLASSES, config=TINY).state_dict().items()}


DTYPES = [np.int8, np.uint8, np.int32, np.int64, np.bool_, np.float16, np.float32, np.float64, np.complex64]


@SETTINGS
@given(st.data())
def test_random_shapes_and_dtypes_raise_porting_error(tiny_state, data):
    key = data.draw(st.sampled_from(sorted(k for k in tiny_state if "num_batches" not in k)))
    shape = tuple(data.draw(st.lists(st.integers(0, 9), max_size=4)))
    dtype = data.draw(st.sampled_from(DTYPES))
    state = {**tiny_state, key: np.zeros(shape, dtype)}
    valid = shape == tiny_state[key].shape and np.dtype(dtype).kind == "f"
    if valid:
        canonical_from_torch(state, config=TINY)
    else:
        with pytest.raises(PortingError, match=key.replace(".", r"\.")):
            canonical_from_torch(state, config=TINY)
    variables = canonical_to_flax(canonical_from_torch(tiny_state, config=TINY), TINY)
    leaf = variables["params"]["conv2"]["conv"]
    leaf["kernel"] = np.zeros(shape, dtype)
    if shape != (3, 3, 8, 16) or np.dtype(dtype).kind != "f":
        with pytest.raises(PortingError, match="params/conv2/conv/kernel"):
            canonical_from_flax(variables, config=TINY)


@SETTINGS
@given(data=st.binary(max_size=512), suffix=st.sampled_from([".pt", ".pth", ".safetensors", ".msgpack", ".conv.74"]))
def test_random_bytes_in_any_format_raise_porting_error(tmp_path, data, suffix):
    path = tmp_path / f"random{suffix}"
    path.write_bytes(data)
    with pytest.raises(PortingError):
        load_flax_variables(path, config=TINY)
