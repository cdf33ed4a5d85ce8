"""The decoded cache: the same pixels as decoding the files, built once, reused, invalidated by changes."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
from data_helpers import make_folder_dataset

from train.data import AugmentConfig, load_splits, make_eval_iter, make_train_iter


def test_cache_gives_the_file_pipelines_eval_pixels_and_is_reused(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "d", {"a": 5, "b": 6}, size=(30, 40))
    records = load_splits(root, val_fraction=0.0).train
    plain = np.concatenate([b["image"] for b in make_eval_iter(records, batch_size=4, image_size=16)])
    cached = np.concatenate(
        [b["image"] for b in make_eval_iter(records, batch_size=4, image_size=16, cache_dir=tmp_path / "c")]
    )
    assert np.array_equal(plain, cached)
    files = sorted((tmp_path / "c").glob("*.u8"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    make_eval_iter(records, batch_size=4, image_size=16, cache_dir=tmp_path / "c")
    assert files[0].stat().st_mtime_ns == mtime  # reused
    first = records.paths[0]
    os.utime(first, ns=(os.stat(first).st_atime_ns, os.stat(first).st_mtime_ns + 10**9))
    make_eval_iter(records, batch_size=4, image_size=16, cache_dir=tmp_path / "c")
    assert len(list((tmp_path / "c").glob("*.u8"))) == 2  # a changed file makes a new cache


def test_cached_training_batches_are_deterministic_and_labelled(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "d", {"a": 5, "b": 6}, size=(30, 40))
    records = load_splits(root, val_fraction=0.0).train

    def run() -> list:
        it = make_train_iter(records, batch_size=4, image_size=16, seed=2, cache_dir=tmp_path / "c")
        return [b for b in itertools.islice(it, 5)]

    a, b = run(), run()
    assert all(
        np.array_equal(x["image"], y["image"]) and np.array_equal(x["label"], y["label"])
        for x, y in zip(a, b, strict=True)
    )
    assert a[0]["image"].shape == (4, 16, 16, 3) and a[0]["image"].dtype == np.uint8


def test_flip_only_batches_from_the_cache_equal_those_from_the_files(tmp_path: Path) -> None:
    root = make_folder_dataset(tmp_path / "d", {"a": 5, "b": 6}, size=(30, 40))
    records = load_splits(root, val_fraction=0.0).train
    flip_only = AugmentConfig(random_crop=False)

    def run(cache_dir) -> list:
        it = make_train_iter(records, batch_size=4, image_size=16, seed=2, augment=flip_only, cache_dir=cache_dir)
        return [b["image"] for b in itertools.islice(it, 4)]

    from_files, from_cache = run(None), run(tmp_path / "c")
    assert all(np.array_equal(x, y) for x, y in zip(from_files, from_cache, strict=True))
