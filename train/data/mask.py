"""The mask competition's layout: train images/<person>/ folders and the eval/ folder (info.csv + images)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .checks import LINKS_BACK_REASON, links_back, names_list, printable, read_csv_rows, resolve_inside, rows_message
from .errors import DataError
from .formats import (
    MASK_CLASS_NAMES,
    MASK_FILE_STEMS,
    MAX_AGE,
    PERSON_FOLDER_FORM,
    Loaded,
    age_band,
    finish_loading,
    list_dir,
    mask_class,
    mask_slot,
    parse_age,
    parse_gender,
    parse_person_folder,
)
from .records import NO_LABEL, Records
from .scan import check_image_files, is_image_name

TRAIN_CSV = "train.csv"
EVAL_CSV = "info.csv"


def _persons_from_folders(images: Path) -> list[tuple[str, int, int]]:
    """(folder name, gender, age) for every person folder; DataError listing the names that do not parse."""
    persons, unparsed = [], []
    for entry in list_dir(images):
        if not entry.is_dir():
            continue
        parsed = parse_person_folder(entry.name)
        if parsed is None:
            unparsed.append(repr(entry.name))
        else:
            persons.append((entry.name, *parsed))
    if unparsed:
        raise DataError(
            f"{images}: person folder names must be {PERSON_FOLDER_FORM}; cannot parse: {names_list(unparsed)}. "
            f"Rename them, or list the persons in {TRAIN_CSV} (id,gender,race,age,path)."
        )
    if not persons:
        raise DataError(f"{images}: no person folders ({PERSON_FOLDER_FORM}, each holding its 7 images)")
    return persons


def _persons_from_csv(csv_path: Path, images: Path) -> tuple[list[tuple[str, int, int]], list[tuple[str, str]]]:
    """Persons listed in train.csv (its gender and age win), and the folders it does not list."""
    rows = read_csv_rows(csv_path, ("gender", "age", "path"))
    if not rows:
        raise DataError(f"{csv_path}: no data rows, only the header; add one gender,age,path row per person")
    persons, bad_gender, bad_age, outside, missing, dupes = [], [], [], [], [], []
    seen: set[str] = set()
    for line, row in rows:
        gender, age, folder = parse_gender(row["gender"]), parse_age(row["age"]), resolve_inside(images, row["path"])
        if gender is None:
            bad_gender.append((line, row["gender"]))
        if age is None:
            bad_age.append((line, row["age"]))
        if folder is None:
            outside.append((line, row["path"]))
        elif not os.path.isdir(folder):
            missing.append((line, row["path"]))
        elif folder in seen:
            dupes.append((line, row["path"]))
        else:
            seen.add(folder)
            if gender is not None and age is not None:
                persons.append((row["path"], gender, age))
    for rows_, what in (
        (bad_gender, "gender not male/female"),
        (bad_age, f"age not a whole number 0..{MAX_AGE}"),
        (outside, f"path not a folder inside {images} (a '..' escape, an absolute path elsewhere, or empty)"),
        (missing, f"no such folder in {images}"),
        (dupes, "duplicate path"),
    ):
        if rows_:
            raise DataError(rows_message(csv_path, what, rows_, f"Fix these rows of {TRAIN_CSV}."))
    unlisted = [
        (e.path, f"person folder not listed in {TRAIN_CSV}")
        for e in list_dir(images)
        if e.is_dir() and os.path.abspath(e.path) not in seen
    ]
    return persons, unlisted


def load_mask_layout(root: Path, *, allow_empty_classes: bool = False) -> Loaded:
    """images/<person>/ folders labelled by the 18-class formula; train.csv used when present.

    A person folder that is a symlink into (or above) images/ is not followed (a double count, or a loop).
    """
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
        if links_back(str(folder), images):
            skipped.append((str(folder), LINKS_BACK_REASON))
            continue
        stems: dict[str, str] = {}
        for entry in list_dir(folder):
            stem = os.path.splitext(entry.name)[0].lower()
            state = mask_slot(entry.name)
            if not entry.is_file():
                skipped.append((entry.path, "not a file"))
            elif not is_image_name(entry.name):
                skipped.append((entry.path, "not an image file extension"))
            elif state is None:
                skipped.append((entry.path, f"unexpected name (expected {', '.join(MASK_FILE_STEMS)})"))
            elif stem in stems:
                raise DataError(
                    f"{printable(str(folder))}: two images for {stem}: {names_list([stems[stem], entry.name])}; "
                    "keep one of them."
                )
            else:
                stems[stem] = entry.name
                found.append((entry.path, mask_class(state, gender, age_band(age)), name))
    return finish_loading("mask", MASK_CLASS_NAMES, found, skipped, root, allow_empty_classes=allow_empty_classes)


def load_eval_folder(path: str | os.PathLike) -> Records:
    """The competition's eval/ folder: records (label -1) in info.csv row order, one per ImageID.

    Every row must name a readable image inside eval/images/: the predictor has to fill each row's `ans`.
    """
    root = Path(path)
    csv_path = root / EVAL_CSV
    if not csv_path.is_file():
        raise DataError(f"{root}: no {EVAL_CSV} (an eval folder holds {EVAL_CSV} and images/)")
    rows = read_csv_rows(csv_path, ("ImageID",))
    if not rows:
        raise DataError(f"{csv_path}: no rows")
    images = root / "images"
    resolved = [resolve_inside(images, r["ImageID"]) for _, r in rows]
    outside = [(line, r["ImageID"]) for (line, r), full in zip(rows, resolved, strict=True) if full is None]
    if outside:
        what = f"ImageID not a file inside {images} (a '..' escape, an absolute path elsewhere, or empty)"
        raise DataError(rows_message(csv_path, what, outside, f"Fix these rows of {EVAL_CSV}."))
    inside = [full for full in resolved if full is not None]  # every row's, checked above
    paths = [str(images / r["ImageID"]) for _, r in rows]
    seen: dict[str, int] = {}
    dupes = [
        (line, r["ImageID"])
        for (line, r), full in zip(rows, inside, strict=True)
        if seen.setdefault(full, line) != line
    ]
    if dupes:
        raise DataError(rows_message(csv_path, "duplicate ImageID", dupes, "Each ImageID must appear once."))
    reasons = check_image_files(paths)
    checked = zip(rows, paths, reasons, strict=True)
    bad = [f"row {line} {printable(p)}: {r}" for (line, _), p, r in checked if r is not None]
    if bad:
        raise DataError(f"{csv_path}: {len(bad)} unusable image(s): " + "; ".join(bad[:20]))
    return Records(tuple(paths), np.full(len(paths), NO_LABEL, np.int32), tuple(r["ImageID"] for _, r in rows))
