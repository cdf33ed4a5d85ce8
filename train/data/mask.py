"""The mask competition's layout: train images/<person>/ folders and the eval/ folder (info.csv + images)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import DataError
from .formats import (
    GENDERS,
    MASK_CLASS_NAMES,
    MASK_FILE_STEMS,
    PERSON_FOLDER_RE,
    Loaded,
    _finish,
    _read_csv,
    _rows_message,
    age_band,
    list_dir,
    mask_class,
)
from .records import NO_LABEL, Records
from .scan import check_image_files, is_image_name

TRAIN_CSV = "train.csv"
EVAL_CSV = "info.csv"


def _parse_gender(text: str) -> int | None:
    text = text.strip().lower()
    return GENDERS.index(text) if text in GENDERS else None


def _persons_from_folders(images: Path) -> list[tuple[str, int, int]]:
    """(folder name, gender, age) for every person folder; DataError listing the names that do not parse."""
    persons, unparsed = [], []
    for entry in list_dir(images):
        if not entry.is_dir():
            continue
        m = PERSON_FOLDER_RE.match(entry.name)
        gender = _parse_gender(m["gender"]) if m else None
        if m is None or gender is None:
            unparsed.append(entry.name)
        else:
            persons.append((entry.name, gender, int(m["age"])))
    if unparsed:
        shown = ", ".join(unparsed[:20]) + (f" (+{len(unparsed) - 20} more)" if len(unparsed) > 20 else "")
        raise DataError(f"{images}: person folder names must be <id>_<male|female>_<race>_<age>; cannot parse: {shown}")
    return persons


def _persons_from_csv(csv_path: Path, images: Path) -> tuple[list[tuple[str, int, int]], list[tuple[str, str]]]:
    """Persons listed in train.csv (its gender and age win), and the folders it does not list."""
    rows = _read_csv(csv_path, ("gender", "age", "path"))
    persons, bad_gender, bad_age, missing, seen, dupes = [], [], [], [], set(), []
    for i, row in enumerate(rows, start=2):
        gender = _parse_gender(row["gender"])
        if gender is None:
            bad_gender.append(i)
        if not row["age"].isdigit():
            bad_age.append(i)
        if not (images / row["path"]).is_dir():
            missing.append(i)
        if row["path"] in seen:
            dupes.append(i)
        seen.add(row["path"])
        if gender is not None and row["age"].isdigit():
            persons.append((row["path"], gender, int(row["age"])))
    for rows_, what in (
        (bad_gender, "gender not male/female"),
        (bad_age, "age not a whole number"),
        (missing, f"no such folder in {images}"),
        (dupes, "duplicate path"),
    ):
        if rows_:
            raise DataError(_rows_message(rows_, what, csv_path))
    unlisted = [
        (e.path, f"person folder not listed in {TRAIN_CSV}")
        for e in list_dir(images)
        if e.is_dir() and e.name not in seen
    ]
    return persons, unlisted


def load_mask_layout(root: Path, *, allow_empty_classes: bool = False) -> Loaded:
    """images/<person>/ folders labelled by the 18-class formula; train.csv used when present."""
    images = root / "images"
    if not images.is_dir():
        raise DataError(f"{root}: no images/ folder")
    csv_path = root / TRAIN_CSV
    if csv_path.is_file():
        persons, skipped = _persons_from_csv(csv_path, images)
    else:
        persons, skipped = _persons_from_folders(images), []
    found = []
    for name, gender, age in persons:
        folder = images / name
        stems: dict[str, str] = {}
        for entry in list_dir(folder):
            stem, _ = os.path.splitext(entry.name)
            if not entry.is_file():
                skipped.append((entry.path, "not a file"))
            elif not is_image_name(entry.name):
                skipped.append((entry.path, "not an image file extension"))
            elif stem.lower() not in MASK_FILE_STEMS:
                skipped.append((entry.path, f"unexpected name (expected {', '.join(MASK_FILE_STEMS)})"))
            elif stem.lower() in stems:
                raise DataError(f"{folder}: two images for {stem.lower()}: {stems[stem.lower()]} and {entry.name}")
            else:
                stems[stem.lower()] = entry.name
                label = mask_class(MASK_FILE_STEMS[stem.lower()], gender, age_band(age))
                found.append((entry.path, label, name))
    return _finish("mask", MASK_CLASS_NAMES, found, skipped, root, allow_empty_classes=allow_empty_classes)


def load_eval_folder(path: str | os.PathLike) -> Records:
    """The competition's eval/ folder: records (label -1) in info.csv row order, one per ImageID.

    Every row must name a readable image: the predictor has to fill each row's `ans`.
    """
    root = Path(path)
    csv_path = root / EVAL_CSV
    if not csv_path.is_file():
        raise DataError(f"{root}: no {EVAL_CSV} (an eval folder holds {EVAL_CSV} and images/)")
    rows = _read_csv(csv_path, ("ImageID",))
    if not rows:
        raise DataError(f"{csv_path}: no rows")
    paths = [str(root / "images" / r["ImageID"]) for r in rows]
    seen: dict[str, int] = {}
    dupes = [i for i, r in enumerate(rows, start=2) if seen.setdefault(r["ImageID"], i) != i]
    if dupes:
        raise DataError(_rows_message(dupes, "duplicate ImageID", csv_path))
    reasons = check_image_files(paths)
    bad = [f"row {i + 2} {p}: {r}" for i, (p, r) in enumerate(zip(paths, reasons, strict=True)) if r is not None]
    if bad:
        raise DataError(f"{csv_path}: {len(bad)} unusable image(s): " + "; ".join(bad[:20]))
    return Records(tuple(paths), [NO_LABEL] * len(paths), tuple(r["ImageID"] for r in rows))
