"""Records (what an iterator reads) and DataSplits (what load_splits returns)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import numpy as np

# Label of a record whose class is unknown (prediction on the competition's eval/ images).
NO_LABEL = -1


@dataclasses.dataclass(frozen=True, eq=False)
class Records:
    """Image files with their int32 labels and split groups (one person, or one CSV group)."""

    paths: tuple[str, ...]
    labels: np.ndarray
    groups: tuple[str, ...]

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels, dtype=np.int32)
        labels.setflags(write=False)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "paths", tuple(str(p) for p in self.paths))
        object.__setattr__(self, "groups", tuple(str(g) for g in self.groups))
        if not (len(self.paths) == len(labels) == len(self.groups)) or labels.ndim != 1:
            raise ValueError(
                f"Records: paths ({len(self.paths)}), labels {labels.shape} and groups ({len(self.groups)}) differ"
            )

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: np.ndarray | list[int]) -> Records:
        """The records at `indices`, in that order."""
        idx = [int(i) for i in indices]
        return Records(tuple(self.paths[i] for i in idx), self.labels[idx], tuple(self.groups[i] for i in idx))


@dataclasses.dataclass(frozen=True, eq=False)
class DataSplits:
    """A loaded dataset: its detected format, class names, train/val records and the files skipped."""

    format: str
    class_names: tuple[str, ...]
    train: Records
    val: Records
    skipped: tuple[tuple[str, str], ...] = ()
    root: str = ""

    @property
    def num_classes(self) -> int:
        """Number of classes (the classifier head's width)."""
        return len(self.class_names)

    def summary(self) -> dict[str, Any]:
        """A JSON-able summary: format, per-class counts per split, groups, split sizes, skipped files."""
        per_split = {
            name: Counter(int(x) for x in rec.labels) for name, rec in (("train", self.train), ("val", self.val))
        }
        classes = [
            {"index": i, "name": name, "train": per_split["train"].get(i, 0), "val": per_split["val"].get(i, 0)}
            for i, name in enumerate(self.class_names)
        ]
        return {
            "format": self.format,
            "root": self.root,
            "num_classes": self.num_classes,
            "classes": classes,
            "groups": {"train": len(set(self.train.groups)), "val": len(set(self.val.groups))},
            "split_sizes": {"train": len(self.train), "val": len(self.val)},
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
        }
