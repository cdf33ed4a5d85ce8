"""Fixture generators for the data tests: small images whose colour encodes their class."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# Distinct, well-separated colours; class c is drawn in CLASS_COLOURS[c] so a decoded pixel names its class.
CLASS_COLOURS = [
    (230, 25, 25), (25, 230, 25), (25, 25, 230), (230, 230, 25), (230, 25, 230), (25, 230, 230),
    (128, 25, 25), (25, 128, 25), (25, 25, 128), (128, 128, 25), (128, 25, 128), (25, 128, 128),
    (230, 128, 25), (25, 230, 128), (128, 25, 230), (230, 25, 128), (128, 230, 25), (25, 128, 230),
]  # fmt: skip
MASK_STEMS = ("mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal")


def write_image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (24, 32), fmt: str = "JPEG") -> Path:
    """A flat `colour` image (width, height) = size, with light noise so JPEG has content to code."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(str(path).encode()))
    arr = np.clip(np.array(colour, np.int16) + rng.integers(-3, 4, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr, "RGB").save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return path


def colour_class(image: np.ndarray) -> int:
    """The class whose colour is nearest to the mean colour of `image` (H, W, 3)."""
    mean = image.reshape(-1, 3).astype(np.float64).mean(0)
    return int(np.argmin([np.sum((mean - np.array(c)) ** 2) for c in CLASS_COLOURS]))


def make_folder_dataset(root: Path, counts: dict[str, int], size: tuple[int, int] = (24, 32)) -> Path:
    """root/<class>/<i>.jpg, class k (sorted order) drawn in CLASS_COLOURS[k]."""
    for k, name in enumerate(sorted(counts)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(counts[name]):
            write_image(root / name / f"{i:03d}.jpg", CLASS_COLOURS[k], size)
    return root


def make_mask_dataset(root: Path, persons: list[tuple[str, str, int]], *, colour_by_label: bool = True) -> Path:
    """root/images/<id>_<gender>_Asian_<age>/<stem>.jpg for each (id, gender, age)."""
    for pid, gender, age in persons:
        folder = root / "images" / f"{pid}_{gender}_Asian_{age}"
        for stem in MASK_STEMS:
            mask = 0 if stem.startswith("mask") else (1 if stem == "incorrect_mask" else 2)
            label = 6 * mask + 3 * (gender == "female") + (0 if age < 30 else 1 if age < 60 else 2)
            write_image(folder / f"{stem}.jpg", CLASS_COLOURS[label] if colour_by_label else (128, 128, 128))
    return root


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Cut a file to `keep` of its bytes."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path
