"""Train and eval iterators on grain: uint8 NHWC batches of fixed shape, deterministic, resumable, sharded.

Batch k of the training stream is a pure function of (records, seed, k): epoch = k // steps_per_epoch picks a
permutation seeded by (seed, epoch); each process takes its own batch_size slice of the global batch; each
image's augmentation is seeded by (seed, epoch, record index). So the iterator state is just the step
counter: it restores exactly, on any worker count, and is the same on every process.

grain is used for what it does well (the parallel map, prefetching, worker processes), not for its own
shuffle/repeat/batch and iterator checkpoints: their state is a position in this process's shard under this
worker count, so a run resumed with another --num-workers (a flag that may change on --resume) or another number
of processes (docs/multihost.md: a 2-process checkpoint continues on 1 process) would not continue the same global
stream. The step counter keeps both guarantees (tests/test_data_pipeline.py, tests/test_train_multihost.py).

The decoded cache (cache_dir): every record decoded once to uint8 (S, S, 3) in one memory-mapped file. JPEG
decoding on a CPU cannot feed a fast GPU; reading a memory-mapped uint8 array can. The cache holds the
evaluation transform's output (the whole image resized to S x S). Train-time crops are cut from it with the
same normalised boxes as from the file (sample_crop's box, as fractions of width and height, does not depend
on the image's aspect), so the same seed gives the same crops, only resampled from S x S pixels.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grain
import numpy as np
from PIL import Image

from .checks import DataError
from .decode import NO_AUGMENT, RESAMPLE, AugmentConfig, crop_and_flip, decode_image, example_rng
from .records import Records

CACHE_VERSION = 1  # bump when the decoded pixels change (decode.py), so stale caches are not reused
_CACHE_CHUNK = 64  # records per decode task of a cache build
STATE_VERSION = 1
# Padding rows of an eval batch: zero image, label 0 (a valid index keeps per-example losses finite), mask False.
PAD_LABEL = 0
# Batches decoded ahead by threads in each process (PIL releases the GIL while decoding and resizing).
READ_THREADS = max(1, min(4, os.cpu_count() or 1))


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


def build_cache(records: Records, image_size: int, cache_dir: str | os.PathLike, num_workers: int) -> Path:
    """The decoded cache's file for `records`, decoding them first when it does not exist yet."""
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(records)
    path = folder / f"decoded-{cache_key(records, image_size)}-{n}x{image_size}.u8"
    if path.is_file() and path.stat().st_size == n * image_size * image_size * 3:
        return path
    fd, tmp = tempfile.mkstemp(prefix=".decoding-", dir=folder)
    os.close(fd)
    try:
        out = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(max(n, 1), image_size, image_size, 3))
        chunks = [list(records.paths[i : i + _CACHE_CHUNK]) for i in range(0, n, _CACHE_CHUNK)]
        pool_cls = ProcessPoolExecutor if num_workers > 0 else ThreadPoolExecutor
        with pool_cls(max(1, num_workers or os.cpu_count() or 1)) as pool:
            for i, block in enumerate(pool.map(_decode_chunk, chunks, [image_size] * len(chunks))):
                out[i * _CACHE_CHUNK : i * _CACHE_CHUNK + len(block)] = block
        out.flush()
        del out
        os.replace(tmp, path)  # complete caches only: a crash leaves a temporary file, never a short cache
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    (folder / f"{path.stem}.json").write_text(
        json.dumps({"records": n, "image_size": image_size, "version": CACHE_VERSION})
    )
    return path


class ImageSource:
    """Decodes record i to uint8 (S, S, 3), from its file or from the decoded cache."""

    def __init__(
        self, records: Records, image_size: int, cache_dir: str | os.PathLike | None = None, num_workers: int = 0
    ) -> None:
        self.paths, self.image_size = records.paths, image_size
        self.cache_path = None if cache_dir is None else build_cache(records, image_size, cache_dir, num_workers)
        self._cache: np.ndarray | None = None

    @property
    def cache(self) -> np.ndarray | None:
        """The cache's (N, S, S, 3) memory map, None without one (opened lazily: the source pickles cheaply)."""
        if self._cache is None and self.cache_path is not None:
            shape = (len(self.paths), self.image_size, self.image_size, 3)
            self._cache = np.memmap(self.cache_path, dtype=np.uint8, mode="r", shape=shape)
        return self._cache

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": None}

    def get(self, i: int, aug: AugmentConfig, rng: np.random.Generator | None) -> np.ndarray:
        """Record i's image, augmented by `aug` with `rng` (a crop from the cache is resampled back to S x S)."""
        if self.cache is None:
            return decode_image(self.paths[i], self.image_size, aug, rng)
        s = self.image_size
        box, flip = crop_and_flip(s, s, aug, rng)
        image = self.cache[i]
        if aug.random_crop:
            image = np.asarray(Image.fromarray(np.asarray(image)).resize((s, s), RESAMPLE, box=box))
        return np.array(image[:, ::-1] if flip else image)

    def get_batch(self, indices: np.ndarray, aug: AugmentConfig, rngs: list[np.random.Generator] | None) -> np.ndarray:
        """Records `indices` stacked to (len, S, S, 3); without crops, one gather from the cache."""
        if self.cache is not None and not aug.random_crop:
            images = self.cache[np.asarray(indices, dtype=np.int64)]
            if aug.hflip:  # the same draw as get / decode_image: one integer per image
                if rngs is None:
                    raise ValueError("augmentation needs an rng per image")
                flips = np.array([bool(rng.integers(2)) for rng in rngs], dtype=np.bool_)
                images[flips] = images[flips, :, ::-1]
            return images
        return np.stack([self.get(int(i), aug, rngs[j] if rngs else None) for j, i in enumerate(indices)])


def records_fingerprint(records: Records) -> str:
    """A short hash of the paths and labels: a saved state only restores onto the same records.

    Paths count relative to their common folder, so a moved copy of the data is the same data.
    """
    root = os.path.commonpath(records.paths) if records.paths else ""
    h = hashlib.sha1()
    for p, lbl in zip(records.paths, records.labels.tolist(), strict=True):
        # surrogateescape: a file name that is not UTF-8 hashes as its own bytes (a valid one as before)
        h.update(f"{os.path.relpath(p, root) if root else p}\0{lbl}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


@dataclasses.dataclass(eq=False)
class _Batches:
    """Batch b of this process: its slice of the global batch (picklable, for grain's worker processes)."""

    source: ImageSource
    labels: np.ndarray
    batch_size: int
    process_index: int
    process_count: int

    def start(self, b: int) -> int:
        """The first position of this process's slice of global batch b (processes take consecutive slices)."""
        return (b * self.process_count + self.process_index) * self.batch_size


@dataclasses.dataclass(eq=False)
class _TrainBatch(_Batches):
    """Step k -> this process's batch dict: epoch k // steps_per_epoch, its permutation, each image's rng."""

    seed: int
    aug: AugmentConfig
    steps_per_epoch: int
    _perm: tuple[int, np.ndarray] | None = dataclasses.field(default=None, init=False)

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        epoch, b = divmod(step, self.steps_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.labels)))
        idx = self._perm[1][self.start(b) : self.start(b) + self.batch_size]
        rngs = [example_rng(self.seed, epoch, int(i)) for i in idx] if self.aug.enabled else None
        return {"image": self.source.get_batch(idx, self.aug, rngs), "label": self.labels[idx].astype(np.int32)}


class _EvalBatch(_Batches):
    """Batch b -> this process's batch padded to batch_size, with its mask."""

    def __call__(self, b: int) -> dict[str, np.ndarray]:
        idx = np.arange(self.start(b), min(self.start(b) + self.batch_size, len(self.labels)))
        s = self.source.image_size
        image = np.zeros((self.batch_size, s, s, 3), np.uint8)
        label = np.full((self.batch_size,), PAD_LABEL, np.int32)
        if len(idx):
            image[: len(idx)] = self.source.get_batch(idx, NO_AUGMENT, None)
        label[: len(idx)] = self.labels[idx]
        return {"image": image, "label": label, "mask": np.arange(self.batch_size) < len(idx)}


def _grain_iter(ds: grain.MapDataset, num_workers: int) -> Iterator[dict[str, np.ndarray]]:
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=2 * READ_THREADS))
    if num_workers > 0:
        # grain's worker processes read absl flags; outside an absl app nobody parsed them, so take the defaults.
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS(sys.argv[:1], known_only=True)
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(it_ds)


def _check_process(process_index: int, process_count: int) -> None:
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index must be in [0, {process_count}), got {process_index}")


class TrainIterator:
    """Infinite training batches {"image": uint8 (B, S, S, 3), "label": int32 (B,)}, B per process; resumable."""

    def __init__(
        self,
        records: Records,
        *,
        batch_size: int,
        image_size: int,
        seed: int,
        augment: bool | AugmentConfig = True,
        num_workers: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        _check_process(process_index, process_count)
        if batch_size < 1 or len(records) < batch_size * process_count:
            raise DataError(
                f"need at least one full batch: {len(records)} training records < batch_size {batch_size} x "
                f"{process_count} process(es)"
            )
        self.steps_per_epoch = len(records) // (batch_size * process_count)  # each epoch's remainder is dropped
        self.num_workers, self._fingerprint = num_workers, records_fingerprint(records)
        source = ImageSource(records, image_size, cache_dir, num_workers)
        aug = augment if isinstance(augment, AugmentConfig) else AugmentConfig(random_crop=augment, hflip=augment)
        self._fn = _TrainBatch(
            source, records.labels, batch_size, process_index, process_count, seed, aug, self.steps_per_epoch
        )
        self._step = 0
        self._it: Iterator | None = None

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._it = _grain_iter(grain.MapDataset.range(self._step, sys.maxsize).map(self._fn), self.num_workers)
        batch = next(self._it)
        self._step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        """JSON-able state; identical on every process (restore any process from any one's state)."""
        fn = self._fn
        return {
            "version": STATE_VERSION,
            "step": self._step,
            "seed": fn.seed,
            "batch_size": fn.batch_size,
            "process_count": fn.process_count,
            "records": self._fingerprint,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from a get_state() dict: the next batch is the one that followed it."""
        mine = self.get_state()
        for key in ("version", "seed", "batch_size", "process_count", "records"):
            if state.get(key) != mine[key]:
                raise DataError(
                    f"iterator state does not match this iterator: {key} {state.get(key)!r} != {mine[key]!r}"
                )
        step = state.get("step")
        if not isinstance(step, int) or step < 0:
            raise DataError(f"iterator state: step must be a non-negative int, got {step!r}")
        self.close()
        self._step = step

    def close(self) -> None:
        """Stop prefetching (and worker processes)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            it.close()


class EvalIterable:
    """Every record once over all processes: {"image", "label", "mask"}, padding rows mask False; re-iterable."""

    def __init__(
        self,
        records: Records,
        *,
        batch_size: int,
        image_size: int,
        num_workers: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        _check_process(process_index, process_count)
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self.num_batches = math.ceil(len(records) / (batch_size * process_count))  # the same on every process
        self.num_workers = num_workers
        source = ImageSource(records, image_size, cache_dir, num_workers)
        self._fn = _EvalBatch(source, records.labels, batch_size, process_index, process_count)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        if self.num_batches == 0:
            return iter(())
        return _grain_iter(grain.MapDataset.range(self.num_batches).map(self._fn), self.num_workers)


# The iterators' constructors are the factories: make_train_iter(records, batch_size=..., image_size=..., seed=...).
make_train_iter = TrainIterator
make_eval_iter = EvalIterable
