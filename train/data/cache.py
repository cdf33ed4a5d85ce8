"""A decoded cache: every record decoded once to uint8 (S, S, 3) in one memory-mapped file.

JPEG decoding on a CPU cannot feed a fast GPU; reading a memory-mapped uint8 array can. The cache holds the
evaluation transform's output (the whole image resized to S x S). Train-time crops are cut from it with the
same normalised boxes as from the file (sample_crop's box, as fractions of width and height, does not depend
on the image's aspect), so the same seed gives the same crops, only resampled from S x S pixels.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from .checks import DataError
from .decode import NO_AUGMENT, RESAMPLE, AugmentConfig, crop_and_flip, decode_image
from .records import Records

CACHE_VERSION = 1  # bump when the decoded pixels change (decode.py), so stale caches are not reused
_CHUNK = 64  # records per decode task


def cache_key(records: Records, image_size: int) -> str:
    """Hash of the files (path, size, mtime) and the output size: a changed file means a new cache."""
    h = hashlib.sha1(f"v{CACHE_VERSION} s{image_size}\n".encode())
    for p in records.paths:
        try:
            st = os.stat(p)
        except OSError as e:
            raise DataError(f"{p}: cannot stat for the decoded cache: {e}") from e
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _decode_chunk(paths: list[str], image_size: int) -> np.ndarray:
    return np.stack([decode_image(p, image_size) for p in paths])


class DecodedCache:
    """Records decoded to one (N, S, S, 3) uint8 file; opened read-only (memory-mapped) after the build."""

    def __init__(self, path: Path, num_records: int, image_size: int) -> None:
        self.path, self.num_records, self.image_size = Path(path), num_records, image_size
        self._array: np.ndarray | None = None

    @property
    def array(self) -> np.ndarray:
        """The (N, S, S, 3) memory map (opened lazily, so the object pickles cheaply into workers)."""
        if self._array is None:
            shape = (self.num_records, self.image_size, self.image_size, 3)
            self._array = np.memmap(self.path, dtype=np.uint8, mode="r", shape=shape)
        return self._array

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}

    @classmethod
    def build(
        cls, records: Records, image_size: int, cache_dir: str | os.PathLike, *, num_workers: int = 0
    ) -> DecodedCache:
        """Open the cache for `records`, decoding them first when it does not exist yet."""
        folder = Path(cache_dir)
        folder.mkdir(parents=True, exist_ok=True)
        n = len(records)
        path = folder / f"decoded-{cache_key(records, image_size)}-{n}x{image_size}.u8"
        expected = n * image_size * image_size * 3
        if path.is_file() and path.stat().st_size == expected:
            return cls(path, n, image_size)
        fd, tmp = tempfile.mkstemp(prefix=".decoding-", dir=folder)
        os.close(fd)
        try:
            out = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(max(n, 1), image_size, image_size, 3))
            chunks = [list(records.paths[i : i + _CHUNK]) for i in range(0, n, _CHUNK)]
            pool_cls = ProcessPoolExecutor if num_workers > 0 else ThreadPoolExecutor
            with pool_cls(max(1, num_workers or os.cpu_count() or 1)) as pool:
                for i, block in enumerate(pool.map(_decode_chunk, chunks, [image_size] * len(chunks))):
                    out[i * _CHUNK : i * _CHUNK + len(block)] = block
            out.flush()
            del out
            os.replace(tmp, path)  # complete caches only: a crash leaves a temporary file, never a short cache
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        (folder / f"{path.stem}.json").write_text(
            json.dumps({"records": n, "image_size": image_size, "version": CACHE_VERSION})
        )
        return cls(path, n, image_size)

    def get(self, i: int, aug: AugmentConfig = NO_AUGMENT, rng: np.random.Generator | None = None) -> np.ndarray:
        """Record i, optionally cropped (resampled back to S x S) and flipped."""
        image = self.array[i]
        if not aug.enabled:
            return np.array(image)
        s = self.image_size
        box, flip = crop_and_flip(s, s, aug, rng)
        if aug.random_crop:
            image = np.asarray(Image.fromarray(np.asarray(image)).resize((s, s), RESAMPLE, box=box))
        return np.array(image[:, ::-1] if flip else image)
