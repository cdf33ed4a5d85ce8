"""Train/validation splits: deterministic by seed, stratified by class, grouped (no group on both sides)."""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from .checks import DataError, names_list, printable
from .csvformat import load_csv
from .demo import DEMO_IMAGE_SIZE, default_cache_dir, demo_file_height, generate_demo_dataset
from .formats import Loaded, detect_format, load_image_folder, load_mask_layout
from .records import DataSplits, Records

DEMO = "demo"


def split_indices(records: Records, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) record indices; whole groups move together, stratified by each group's majority class.

    Per stratum the validation share is val_fraction of its groups, rounded so that the total is
    round(val_fraction * number of groups) (largest remainders first); groups are drawn by `seed`.
    """
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if seed < 0:
        raise DataError(f"the split seed must be a whole number >= 0, got {seed}")
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(records.groups):
        members[g].append(i)
    strata: dict[int, list[str]] = defaultdict(list)
    for g, idx in members.items():
        counts = Counter(int(records.labels[i]) for i in idx)
        strata[min(counts, key=lambda c: (-counts[c], c))].append(g)
    keys = sorted(strata)
    exact = np.array([val_fraction * len(strata[k]) for k in keys])
    quota = np.floor(exact).astype(int)
    extra = round(val_fraction * len(members)) - int(quota.sum())
    for j in sorted(range(len(keys)), key=lambda j: (-(exact[j] - quota[j]), j))[: max(extra, 0)]:
        quota[j] += 1
    rng = np.random.default_rng(seed)
    val_groups: set[str] = set()
    for k, q in zip(keys, quota, strict=True):
        order = rng.permutation(len(strata[k]))
        val_groups.update(strata[k][j] for j in order[:q])
    is_val = np.array([g in val_groups for g in records.groups], dtype=bool)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def load_path(
    path: str | os.PathLike, *, allow_empty_classes: bool = False, demo_image_size: int = DEMO_IMAGE_SIZE
) -> Loaded:
    """Detect the format of `path` (or generate the demo, for training at `demo_image_size`) and read it."""
    if str(path) == DEMO:
        path = generate_demo_dataset(default_cache_dir() / "demo", image_size=demo_file_height(demo_image_size))
    fmt, root = detect_format(Path(path))
    loader = {"mask": load_mask_layout, "csv": load_csv, "folder": load_image_folder}[fmt]
    return loader(root, allow_empty_classes=allow_empty_classes)


def _check_bad(parts: list[Loaded], max_bad_fraction: float) -> None:
    bad = sum(p.bad for p in parts)
    total = sum(len(p.records) + p.bad for p in parts)
    if bad and bad > max_bad_fraction * total:
        lines = "\n".join(f"  {printable(path)}: {reason}" for p in parts for path, reason in p.skipped)
        raise DataError(
            f"{bad} of {total} image files are unreadable ({bad / total:.1%} > max_bad_fraction "
            f"{max_bad_fraction:.1%}); skipped files:\n{lines}"
        )


def _align_val(train: Loaded, val: Loaded) -> Records:
    """Val labels re-indexed onto the training class list by class name."""
    index = {n: i for i, n in enumerate(train.class_names)}
    unknown = [n for n in val.class_names if n not in index]
    if unknown:
        raise DataError(f"{val.root}: classes not in the training data: {names_list(unknown)}")
    overlap = set(train.records.paths) & set(val.records.paths)
    if overlap:
        example = printable(sorted(overlap)[0])
        raise DataError(f"{val.root}: {len(overlap)} file(s) in both train and val, e.g. {example}")
    remap = np.array([index[n] for n in val.class_names], dtype=np.int32)
    return Records(val.records.paths, remap[val.records.labels], val.records.groups)


def load_splits(
    path: str | os.PathLike,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    val_path: str | os.PathLike | None = None,
    allow_empty_classes: bool = False,
    max_bad_fraction: float = 0.01,
    demo_image_size: int = DEMO_IMAGE_SIZE,
) -> DataSplits:
    """Load a dataset (format detected from `path`; "demo" generates one) and split it into train and val.

    `demo_image_size` is the training size a generated demo is drawn for (see demo.demo_file_height).
    """
    loaded = load_path(path, allow_empty_classes=allow_empty_classes, demo_image_size=demo_image_size)
    if val_path is not None:
        val_loaded = load_path(val_path, allow_empty_classes=True)
        _check_bad([loaded, val_loaded], max_bad_fraction)
        train, val = loaded.records, _align_val(loaded, val_loaded)
        skipped = loaded.skipped + val_loaded.skipped
    else:
        _check_bad([loaded], max_bad_fraction)
        train_idx, val_idx = split_indices(loaded.records, val_fraction, seed)
        train, val = loaded.records.subset(train_idx), loaded.records.subset(val_idx)
        skipped = loaded.skipped
    if len(train) == 0:
        raise DataError(f"{loaded.root}: the training split is empty")
    return DataSplits(loaded.format, loaded.class_names, train, val, tuple(skipped), loaded.root)
