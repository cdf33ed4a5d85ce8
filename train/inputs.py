"""The train and eval iterators of a run, built from its TrainConfig the same way by train.flax and train.torch."""

from __future__ import annotations

from typing import Any

from train.data import DataSplits, load_splits, make_eval_iter, make_train_iter
from train.options import TrainConfig


def load_run_splits(config: TrainConfig) -> DataSplits:
    """The run's train/val splits; a demo is generated at twice the run's (resolved) image size."""
    return load_splits(
        config.data,
        val_fraction=config.val_fraction,
        seed=config.seed,
        val_path=config.val_path,
        demo_image_size=config.image_size,
    )


def make_run_iterators(
    config: TrainConfig,
    splits: DataSplits,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> tuple[Any, Any]:
    """(infinite train iterator, one-pass eval iterable) of `batch_size` rows per process."""
    train_iter = make_train_iter(
        splits.train,
        batch_size=batch_size,
        image_size=config.image_size,
        seed=config.seed,
        augment=config.augment,
        num_workers=config.num_workers,
        process_index=process_index,
        process_count=process_count,
        cache_dir=config.cache_dir,
    )
    eval_iter = make_eval_iter(
        splits.val,
        batch_size=batch_size,
        image_size=config.image_size,
        num_workers=config.num_workers,
        process_index=process_index,
        process_count=process_count,
        cache_dir=config.cache_dir,
    )
    return train_iter, eval_iter
