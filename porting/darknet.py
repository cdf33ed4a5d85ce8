"""Darknet `.weights` files (the classifier `darknet53.weights` and the backbone-only `darknet53.conv.74`).

Layout (docs/darknet-weights.md): int32 major, minor, revision; `seen` as 8 bytes when
major*10 + minor >= 2 (and both < 1000), else 4; then little-endian float32, unit by unit in cfg order. A
batch-normalized conv stores biases (BN beta), scales (gamma), rolling mean, rolling variance, then the OIHW
weights; the classifier head (a 1x1 conv without BN) stores biases then weights (out, in, 1, 1).

BatchNorm epsilon: the values are ported unchanged and our models compute (x - mean) / sqrt(var + 1e-5), which
is Darknet's GPU convention; Darknet's CPU path uses (x - mean) / (sqrt(var) + 1e-6) (see docs/porting.md).
The file size is checked exactly BEFORE any float is read, so a truncated, padded or foreign file is refused
and a header cannot make us allocate anything.
"""

from __future__ import annotations

import dataclasses
import io
import os
import struct
from typing import BinaryIO

import numpy as np

from darknet_arch import DARKNET53, DarknetConfig
from porting import atomic, files, keymap
from porting.errors import LayoutMismatch, PortingError
from porting.state import CanonicalStateDict, check_and_convert, check_num_classes, check_running_var

VERSION = struct.Struct("<3i")  # major, minor, revision
SEEN_LONG = struct.Struct("<Q")  # size_t on the 64-bit machines Darknet runs on
SEEN_SHORT = struct.Struct("<i")
LONG_HEADER_BYTES = VERSION.size + SEEN_LONG.size  # 20
SHORT_HEADER_BYTES = VERSION.size + SEEN_SHORT.size  # 16
FLOAT32 = np.dtype("<f4")
# Darknet reads `seen` as size_t only for version >= 0.2 with sane major/minor; >= 1000 flags transposed FC weights.
LONG_SEEN_MIN_VERSION = 2
VERSION_FLAG = 1000

# Per unit, the order Darknet writes its tensors, as torch_ref suffixes (biases = BN beta, scales = gamma).
CONV_BN_FILE_ORDER = (
    f"{keymap.TORCH_BN}.bias",
    f"{keymap.TORCH_BN}.weight",
    f"{keymap.TORCH_BN}.running_mean",
    f"{keymap.TORCH_BN}.running_var",
    f"{keymap.TORCH_CONV}.weight",
)
HEAD_FILE_ORDER = ("bias", "weight")


@dataclasses.dataclass(frozen=True)
class DarknetHeader:
    """The version numbers and images-seen counter at the start of a .weights file."""

    major: int = 0
    minor: int = 2
    revision: int = 0
    seen: int = 0

    @property
    def seen_struct(self) -> struct.Struct:
        """`seen` as 8 bytes (size_t) or 4, decided as Darknet's loader decides it."""
        long_seen = (
            self.major * 10 + self.minor >= LONG_SEEN_MIN_VERSION
            and self.major < VERSION_FLAG
            and self.minor < VERSION_FLAG
        )
        return SEEN_LONG if long_seen else SEEN_SHORT

    @property
    def size(self) -> int:
        """16 or 20 bytes."""
        return VERSION.size + self.seen_struct.size

    def to_bytes(self) -> bytes:
        return VERSION.pack(self.major, self.minor, self.revision) + self.seen_struct.pack(self.seen)


# What our exports write: version 0.2.0, seen 0, an 8-byte seen (20-byte header).
DEFAULT_HEADER = DarknetHeader()


@dataclasses.dataclass(frozen=True)
class DarknetWeights:
    """A parsed .weights file: header, canonical (torch_ref-named) float32 tensors, and head width."""

    header: DarknetHeader
    state: CanonicalStateDict
    num_classes: int | None


def parse_header(data: bytes) -> DarknetHeader:
    """Parse the first 16 or 20 bytes; PortingError for a short or impossible header."""
    if len(data) < SHORT_HEADER_BYTES:
        raise PortingError(f"not a Darknet .weights file: {len(data)} bytes, shorter than the 16-byte header")
    major, minor, revision = VERSION.unpack_from(data)
    if min(major, minor, revision) < 0:
        raise PortingError(
            f"not a Darknet .weights file: header version {major}.{minor}.{revision} has a negative number"
        )
    header = DarknetHeader(major, minor, revision)
    if len(data) < header.size:
        raise PortingError(f"not a Darknet .weights file: {len(data)} bytes, less than its {header.size}-byte header")
    return dataclasses.replace(header, seen=header.seen_struct.unpack_from(data, VERSION.size)[0])


def _unit_orders(config: DarknetConfig, num_classes: int | None) -> list[tuple[str, tuple[int, ...]]]:
    """(torch key, torch shape) of every float in file order."""
    order = []
    for unit in keymap.units(config, num_classes):
        rules = {r.torch_suffix: r for r in unit.rules}
        for suffix in CONV_BN_FILE_ORDER if unit.kind == "conv_bn" else HEAD_FILE_ORDER:
            order.append((unit.torch_key(rules[suffix]), unit.torch_shape(rules[suffix])))
    return order


def darknet_float_count(config: DarknetConfig = DARKNET53, num_classes: int | None = None) -> int:
    """Floats after the header: 40,620,640 for Darknet-53's backbone, 41,645,640 with the 1000-class head."""
    return sum(int(np.prod(shape)) for _, shape in _unit_orders(config, num_classes))


def _resolve_head(
    payload_bytes: int, header: DarknetHeader, config: DarknetConfig, num_classes: int | None
) -> int | None:
    """The head width (None: backbone only) the file's exact size implies, or PortingError with both sizes."""
    total = header.size + payload_bytes
    if num_classes is not None:
        floats = darknet_float_count(config, num_classes)
        if payload_bytes != FLOAT32.itemsize * floats:
            raise LayoutMismatch(
                f"Darknet .weights size mismatch: expected {header.size + FLOAT32.itemsize * floats} bytes "
                f"({header.size}-byte header + 4 x {floats} floats for this network with a {num_classes}-class head), "
                f"got {total}"
            )
        return num_classes
    backbone = darknet_float_count(config, None)
    per_class = darknet_float_count(config, 1) - backbone  # a 1x1 conv's weights plus its bias
    classes, rest = divmod(payload_bytes - FLOAT32.itemsize * backbone, FLOAT32.itemsize * per_class)
    if classes >= 0 and rest == 0:
        return classes or None
    example = header.size + FLOAT32.itemsize * (backbone + 1000 * per_class)
    raise LayoutMismatch(
        f"Darknet .weights size mismatch: expected {header.size + FLOAT32.itemsize * backbone} bytes (backbone only, "
        f"{backbone} floats) or that plus 4 x {per_class} bytes per class of a classifier head (e.g. {example} for "
        f"1000 classes), got {total}: truncated, extra bytes, or another network"
    )


def _read(f: BinaryIO, size: int, config: DarknetConfig, num_classes: int | None) -> DarknetWeights:
    header = parse_header(f.read(min(size, LONG_HEADER_BYTES)))
    classes = _resolve_head(size - header.size, header, config, check_num_classes(num_classes))
    # Only now, with the size proven to be exactly what the network needs, read the floats.
    f.seek(header.size)
    want = size - header.size
    data = f.read(want)
    if len(data) != want:
        raise PortingError(f"Darknet .weights file changed while reading: wanted {want} bytes, got {len(data)}")
    order = _unit_orders(config, classes)
    chunks = np.split(np.frombuffer(data, FLOAT32), np.cumsum([int(np.prod(shape)) for _, shape in order])[:-1])
    state = {key: chunk.reshape(shape) for (key, shape), chunk in zip(order, chunks, strict=True)}
    canonical = check_and_convert(state, keymap.expected_torch_shapes(config, classes), what="reading Darknet weights")
    check_running_var(canonical)
    return DarknetWeights(header, canonical, classes)


def read_darknet_weights(
    source: str | os.PathLike | bytes, *, config: DarknetConfig = DARKNET53, num_classes: int | None = None
) -> DarknetWeights:
    """Read a .weights file (path or bytes); num_classes None takes the head from the exact size (none: backbone)."""
    if isinstance(source, bytes | bytearray | memoryview):
        return _read(io.BytesIO(source), len(source), config, num_classes)
    where = files.require_file(source)
    try:
        with open(where, "rb") as f:
            return _read(f, os.fstat(f.fileno()).st_size, config, num_classes)
    except OSError as exc:
        raise PortingError(f"cannot read Darknet weights {where!r}: {exc}") from exc


def darknet_bytes(
    state: CanonicalStateDict, *, config: DarknetConfig = DARKNET53, header: DarknetHeader = DEFAULT_HEADER
) -> bytes:
    """Serialise a canonical state dict (checked strictly) as a Darknet .weights file."""
    classes = keymap.head_width(state, config)
    arrays = check_and_convert(state, keymap.expected_torch_shapes(config, classes), what="writing Darknet weights")
    return header.to_bytes() + b"".join(arrays[k].astype(FLOAT32).tobytes() for k, _ in _unit_orders(config, classes))


def write_darknet_weights(
    dst: str | os.PathLike,
    state: CanonicalStateDict,
    *,
    config: DarknetConfig = DARKNET53,
    header: DarknetHeader = DEFAULT_HEADER,
    force: bool = False,
) -> None:
    """Write a canonical state dict as a .weights file (20-byte header by default), atomically."""
    atomic.write_bytes({os.fspath(dst): darknet_bytes(state, config=config, header=header)}, force)
