"""Photo-like JPEGs in the competition's layout, for the real-loop cases and the pipeline benchmark.

Smooth shading, shapes and sensor noise (not flat colour, not pure noise): about 40 KB at 384x512, near the
competition's photos. Every person folder holds the 7 mask images, and the persons cycle through every
gender and age band, so all 18 classes are present.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from bench.common import DATA_SEED

# The competition's photos are 384 wide and 512 high.
PHOTO_WIDTH, PHOTO_HEIGHT = 384, 512
JPEG_QUALITY = 90
SHAPES_PER_IMAGE = 12
NOISE_STD = 4.0
MASK_STEMS = ("mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal")
PERSON_KINDS = tuple((g, age) for g in ("male", "female") for age in (25, 45, 70))  # every gender x age band


def _write_person(args: tuple[Path, int, int, int]) -> list[str]:
    from PIL import Image, ImageDraw

    root, person, height, width = args
    gender, age = PERSON_KINDS[person % len(PERSON_KINDS)]
    folder = root / "images" / f"{person:06d}_{gender}_Asian_{age}"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng((DATA_SEED, person))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    paths = []
    for stem in MASK_STEMS:
        path = folder / f"{stem}.jpg"
        paths.append(str(path))
        a, b, c = rng.uniform(0.2, 1.0, 3)
        base = np.dstack([a * 255 * xx / width, b * 255 * yy / height, c * 128 * (1 + np.sin(xx / 37 + yy / 53))])
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(SHAPES_PER_IMAGE):
            x0, y0, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(10, width / 4)
            draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        pixels = np.asarray(img, np.float32) + rng.normal(0, NOISE_STD, (height, width, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=JPEG_QUALITY)
    return paths


def write_dataset(root: Path, num_images: int, height: int = PHOTO_HEIGHT, width: int = PHOTO_WIDTH) -> list[str]:
    """At least `num_images` JPEGs under `root`/images/<person>/ (one process per core); returns their paths."""
    persons = max(len(PERSON_KINDS) * 2, math.ceil(num_images / len(MASK_STEMS)))
    jobs = [(Path(root), p, height, width) for p in range(persons)]
    # spawn, not fork: the parent may hold JAX's threads, and a forked copy of them can deadlock.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1, mp_context=context) as pool:
        return [path for paths in pool.map(_write_person, jobs, chunksize=4) for path in paths]
