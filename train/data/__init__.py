"""Datasets (mask layout, image folder, CSV, demo), splits, and grain input pipelines for training.

splits = load_splits("demo")
it = make_train_iter(splits.train, batch_size=32, image_size=DEMO_IMAGE_SIZE, seed=0)
batch = next(it)  # {"image": uint8 (32, 32, 32, 3), "label": int32 (32,)}
"""

from .checks import DataError
from .decode import BACKGROUND_RGB, AugmentConfig, decode_image
from .demo import DEMO_IMAGE_SIZE, default_cache_dir, demo_file_height, generate_demo_dataset
from .formats import MASK_CLASS_NAMES, age_band, load_eval_folder, mask_class
from .pipeline import PAD_LABEL, EvalIterable, TrainIterator, make_eval_iter, make_train_iter
from .records import NO_LABEL, DataSplits, Records
from .splits import load_splits, split_indices

__all__ = [
    "BACKGROUND_RGB",
    "DEMO_IMAGE_SIZE",
    "MASK_CLASS_NAMES",
    "NO_LABEL",
    "PAD_LABEL",
    "AugmentConfig",
    "DataError",
    "DataSplits",
    "EvalIterable",
    "Records",
    "TrainIterator",
    "age_band",
    "decode_image",
    "default_cache_dir",
    "demo_file_height",
    "generate_demo_dataset",
    "load_eval_folder",
    "load_splits",
    "make_eval_iter",
    "make_train_iter",
    "mask_class",
    "split_indices",
]
