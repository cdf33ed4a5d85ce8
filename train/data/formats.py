"""Dataset formats: detection from a path, and the class list, labels and groups each one defines.

Formats (detected in this order):
- ``mask``: the mask competition's layout, ``PATH/images/<id>_<gender>_<race>_<age>/{mask1..5,incorrect_mask,
  normal}.<ext>`` with optional ``PATH/train.csv`` (id, gender, race, age, path). PATH may also be the
  ``images`` folder itself. The competition's eval/ folder (info.csv + images/) is read by load_eval_folder.
- ``csv``: a CSV file with a ``path,label`` header (optional ``group`` column); paths relative to the file.
  See csvformat.py.
- ``folder``: one subfolder per class; classes in sorted folder-name order (torchvision ImageFolder's order).

Hostile input (checks.py): symlinks back into or above the data root are not followed, and a file reached twice
through symlinks is counted once.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import numpy as np

from .checks import (
    LINKS_BACK_REASON,
    SHOWN_NAMES,
    DataError,
    check_row_files,
    links_back,
    names_list,
    printable,
    read_csv_rows,
    resolve_inside,
    rows_error,
)
from .records import NO_LABEL, Records
from .scan import IMAGE_EXTENSIONS, check_image_files, is_image_name

# The 18-class formula: class = 6 * mask + 3 * gender + age_band.
MASK_FILE_STEMS = {"mask1": 0, "mask2": 0, "mask3": 0, "mask4": 0, "mask5": 0, "incorrect_mask": 1, "normal": 2}
MASK_STATES = ("wear", "incorrect", "not_wear")
GENDERS = ("male", "female")
AGE_BANDS = (0, 30, 60)  # lower bounds: < 30, 30..59, >= 60
AGE_BAND_NAMES = ("<30", "30-59", ">=60")
MASK_CLASS_NAMES = tuple(f"{m}_{g}_{a}" for m in MASK_STATES for g in GENDERS for a in AGE_BAND_NAMES)
# An age above this is a typo (the oldest recorded person reached 122), not a person: refused, not banded >= 60.
MAX_AGE = 150
# ASCII digits only: int() also reads other scripts' digits, which would make two spellings of one folder.
PERSON_FOLDER_RE = re.compile(r"(?P<id>[^_]+)_(?P<gender>[A-Za-z]+)_(?P<race>.+)_(?P<age>[0-9]+)", re.ASCII | re.DOTALL)
PERSON_FOLDER_FORM = f"<id>_<male|female>_<race>_<age 0..{MAX_AGE}>"
TRAIN_CSV = "train.csv"
EVAL_CSV = "info.csv"


def age_band(age: int) -> int:
    """0 for age < 30, 1 for 30 <= age < 60, 2 for age >= 60."""
    return sum(age >= lo for lo in AGE_BANDS) - 1


def mask_class(mask_state: int, gender: int, band: int) -> int:
    """The competition's class index: 6 * mask_state + 3 * gender + age band."""
    return 6 * mask_state + 3 * gender + band


def parse_gender(text: str) -> int | None:
    """0 for male, 1 for female (any case, surrounding spaces ignored); None for anything else."""
    text = text.strip().lower()
    return GENDERS.index(text) if text in GENDERS else None


def parse_age(text: str) -> int | None:
    """A whole number of ASCII digits in 0..MAX_AGE, else None (never builds an int from a long digit string)."""
    text = text.strip()
    digits = text.lstrip("0") or "0"
    valid = text.isascii() and text.isdigit() and len(digits) <= len(str(MAX_AGE)) and int(digits) <= MAX_AGE
    return int(digits) if valid else None


def parse_person_folder(name: str) -> tuple[int, int] | None:
    """(gender, age) from a mask-layout folder name <id>_<male|female>_<race>_<age>; None when it does not parse."""
    m = PERSON_FOLDER_RE.fullmatch(name)
    if m is None:
        return None
    gender, age = parse_gender(m["gender"]), parse_age(m["age"])
    return None if gender is None or age is None else (gender, age)


@dataclasses.dataclass
class Loaded:
    """One dataset folder or file read into records, before splitting."""

    format: str
    class_names: tuple[str, ...]
    records: Records
    skipped: list[tuple[str, str]]  # every file left out, with the reason
    bad: int  # how many of `skipped` are unreadable image files (the max_bad_fraction count)
    root: str


def list_dir(path: Path | str) -> list[os.DirEntry]:
    """Non-hidden entries of `path`, sorted by name; DataError when unreadable."""
    try:
        with os.scandir(path) as it:
            return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as e:
        raise DataError(f"{printable(str(path))}: cannot read folder: {e.strerror or e}") from e


def detect_format(path: Path) -> tuple[str, Path]:
    """(format name, dataset root) for `path`; DataError when the path is missing or matches no format."""
    if not path.exists():
        raise DataError(f"{path}: data path does not exist")
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return "csv", path
        raise DataError(f"{path}: a data file must be a .csv of path,label rows")
    if (path / "images").is_dir():
        return "mask", path
    subdirs = [e for e in list_dir(path) if e.is_dir()]
    if path.name == "images" and any(parse_person_folder(e.name) for e in subdirs):
        return "mask", path.parent
    if not subdirs:
        raise DataError(f"{path}: no class subfolders, no images/ folder and not a CSV: no dataset found")
    return "folder", path


def finish_loading(
    fmt: str,
    class_names: tuple[str, ...],
    found: list[tuple[str, int, str]],
    skipped: list,
    root: Path,
    *,
    allow_empty_classes: bool,
) -> Loaded:
    """Drop files reached again through a symlink (the first path wins) and unreadable ones (keeping every other
    label in place), then check that each class kept an image."""
    if not found:
        raise DataError(f"{root}: no images found (image files end in {', '.join(sorted(IMAGE_EXTENSIONS))})")
    first: dict[str, str] = {}
    candidates, repeats = [], []
    for item in found:
        real = os.path.realpath(item[0])
        if real in first:
            repeats.append((item[0], f"the same file as {first[real]} (reached again through a symlink)"))
        else:
            first[real] = item[0]
            candidates.append(item)
    reasons = check_image_files([p for p, _, _ in candidates])
    good = [item for item, reason in zip(candidates, reasons, strict=True) if reason is None]
    bad = [(p, reason) for (p, _, _), reason in zip(candidates, reasons, strict=True) if reason is not None]
    labels = np.asarray([lbl for _, lbl, _ in good], np.int32)
    counts = np.bincount(labels, minlength=len(class_names))
    empty = [name for name, count in zip(class_names, counts, strict=True) if count == 0]
    if empty and not allow_empty_classes:
        unreadable = f" ({len(bad)} file(s) could not be read, e.g. {printable(bad[0][0])}: {bad[0][1]})" if bad else ""
        raise DataError(
            f"{root}: classes with no usable images: {names_list(empty)}{unreadable}. Add images to them, or "
            "pass allow_empty_classes=True (--allow-empty-classes) to keep them as classes without images."
        )
    records = Records(tuple(p for p, _, _ in good), labels, tuple(g for _, _, g in good))
    return Loaded(fmt, class_names, records, skipped + repeats + bad, len(bad), str(root))


def load_image_folder(root: Path, *, allow_empty_classes: bool = False) -> Loaded:
    """One subfolder per class (sorted names), images found recursively inside each.

    A class folder that is a symlink into (or above) `root` is not followed: it would count images twice, or
    (above the root) every class again. Symlinked folders inside a class folder are not followed either.
    Both are reported in `skipped`, as are folders that cannot be read.
    """
    classes, skipped = [], []
    for entry in list_dir(root):
        if links_back(entry.path, root):
            skipped.append((entry.path, LINKS_BACK_REASON))
        elif entry.is_dir():
            classes.append(entry)
        elif entry.is_file():
            skipped.append((entry.path, "file outside a class folder"))
        else:
            skipped.append((entry.path, "not a file or folder (a broken symlink?)"))
    if not classes:
        links = names_list([p for p, reason in skipped if reason == LINKS_BACK_REASON])
        raise DataError(f"{root}: no class folders to read: every subfolder is a symlink into or above it ({links})")

    def unreadable(e: OSError) -> None:
        skipped.append((str(e.filename), f"cannot read folder: {e.strerror}"))

    found: list[tuple[str, int, str]] = []  # (path, label, group): each file is its own group
    empty: list[str] = []
    for label, entry in enumerate(classes):
        before = len(found)
        for dirpath, dirnames, filenames in os.walk(entry.path, onerror=unreadable):
            linked = sorted(d for d in dirnames if os.path.islink(os.path.join(dirpath, d)))
            skipped += [(os.path.join(dirpath, d), "symlinked folder in a class folder: not followed") for d in linked]
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in linked)
            for name in sorted(n for n in filenames if not n.startswith(".")):
                full = os.path.join(dirpath, name)
                if is_image_name(name):
                    found.append((full, label, full))
                else:
                    skipped.append((full, "not an image file extension"))
        if len(found) == before:
            empty.append(entry.path)
    if empty and not allow_empty_classes:
        raise DataError(
            f"{root}: empty class folder(s) (no image files): {names_list(empty)}. Add images, remove the "
            "folder, or pass allow_empty_classes=True (--allow-empty-classes) to keep it as a class without images."
        )
    names = tuple(e.name for e in classes)
    return finish_loading("folder", names, found, skipped, root, allow_empty_classes=allow_empty_classes)


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
    rows = read_csv_rows(csv_path, ("gender", "age", "path"), per="person")
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
            raise rows_error(csv_path, what, rows_, f"Fix these rows of {TRAIN_CSV}.")
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
            if not entry.is_file():
                skipped.append((entry.path, "not a file"))
            elif not is_image_name(entry.name):
                skipped.append((entry.path, "not an image file extension"))
            elif stem not in MASK_FILE_STEMS:
                skipped.append((entry.path, f"unexpected name (expected {', '.join(MASK_FILE_STEMS)})"))
            elif stem in stems:
                raise DataError(
                    f"{printable(str(folder))}: two images for {stem}: {names_list([stems[stem], entry.name])}; "
                    "keep one of them."
                )
            else:
                stems[stem] = entry.name
                found.append((entry.path, mask_class(MASK_FILE_STEMS[stem], gender, age_band(age)), name))
    return finish_loading("mask", MASK_CLASS_NAMES, found, skipped, root, allow_empty_classes=allow_empty_classes)


def load_eval_folder(path: str | os.PathLike) -> Records:
    """The competition's eval/ folder: records (label -1) in info.csv row order, one per ImageID.

    Every row must name a readable image inside eval/images/: the predictor has to fill each row's `ans`.
    """
    root = Path(path)
    csv_path = root / EVAL_CSV
    if not csv_path.is_file():
        raise DataError(f"{root}: no {EVAL_CSV} (an eval folder holds {EVAL_CSV} and images/)")
    rows = read_csv_rows(csv_path, ("ImageID",), per="image")
    images = root / "images"
    what = f"ImageID not a file inside {images} (a '..' escape, an absolute path elsewhere, or empty)"
    check_row_files(csv_path, rows, "ImageID", images, what, f"Fix these rows of {EVAL_CSV}.")
    paths = [str(images / r["ImageID"]) for _, r in rows]
    checked = zip(rows, paths, check_image_files(paths), strict=True)
    bad = [f"row {line} {printable(p)}: {r}" for (line, _), p, r in checked if r is not None]
    if bad:
        raise DataError(f"{csv_path}: {len(bad)} unusable image(s): " + "; ".join(bad[:SHOWN_NAMES]))
    return Records(tuple(paths), np.full(len(paths), NO_LABEL, np.int32), tuple(r["ImageID"] for _, r in rows))
