"""Dataset formats: detection from a path, and the class list, labels and groups each one defines.

Formats (detected in this order):
- ``mask``: the mask competition's layout, ``PATH/images/<id>_<gender>_<race>_<age>/{mask1..5,incorrect_mask,
  normal}.<ext>`` with optional ``PATH/train.csv`` (id, gender, race, age, path). PATH may also be the
  ``images`` folder itself. See mask.py.
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

from .checks import LINKS_BACK_REASON, links_back, names_list, printable
from .errors import DataError
from .records import Records
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
    if not (text.isascii() and text.isdigit()):
        return None
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(MAX_AGE)) or int(digits) > MAX_AGE:
        return None
    return int(digits)


def parse_person_folder(name: str) -> tuple[int, int] | None:
    """(gender, age) from a mask-layout folder name <id>_<male|female>_<race>_<age>; None when it does not parse."""
    m = PERSON_FOLDER_RE.fullmatch(name)
    if m is None:
        return None
    gender, age = parse_gender(m["gender"]), parse_age(m["age"])
    return None if gender is None or age is None else (gender, age)


def mask_slot(file_name: str) -> int | None:
    """The mask state (0 wear, 1 incorrect, 2 not worn) a mask-layout image file name stands for, else None."""
    stem, _ = os.path.splitext(file_name)
    return MASK_FILE_STEMS.get(stem.lower()) if is_image_name(file_name) else None


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


def _drop_repeats(found: list[tuple[str, int, str]]) -> tuple[list[tuple[str, int, str]], list[tuple[str, str]]]:
    """`found` without files reached a second time through a symlink (the first path wins), and those skipped."""
    first: dict[str, str] = {}
    kept, repeats = [], []
    for item in found:
        real = os.path.realpath(item[0])
        if real in first:
            repeats.append((item[0], f"the same file as {first[real]} (reached again through a symlink)"))
        else:
            first[real] = item[0]
            kept.append(item)
    return kept, repeats


def finish_loading(
    fmt: str,
    class_names: tuple[str, ...],
    found: list[tuple[str, int, str]],
    skipped: list,
    root: Path,
    *,
    allow_empty_classes: bool,
) -> Loaded:
    """Check the candidate files, drop bad ones (keeping every other label in place), check classes."""
    if not found:
        raise DataError(f"{root}: no images found (image files end in {', '.join(sorted(IMAGE_EXTENSIONS))})")
    found, repeats = _drop_repeats(found)
    reasons = check_image_files([p for p, _, _ in found])
    good = [item for item, reason in zip(found, reasons, strict=True) if reason is None]
    bad = [(p, reason) for (p, _, _), reason in zip(found, reasons, strict=True) if reason is not None]
    counts = [0] * len(class_names)
    for _, label, _ in good:
        counts[label] += 1
    empty = [name for name, count in zip(class_names, counts, strict=True) if count == 0]
    if empty and not allow_empty_classes:
        unreadable = f" ({len(bad)} file(s) could not be read, e.g. {printable(bad[0][0])}: {bad[0][1]})" if bad else ""
        raise DataError(
            f"{root}: classes with no usable images: {names_list(empty)}{unreadable}. Add images to them, or "
            "pass allow_empty_classes=True (--allow-empty-classes) to keep them as classes without images."
        )
    labels = np.asarray([lbl for _, lbl, _ in good], np.int32)
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

    found: list[tuple[str, int, str]] = []
    empty: list[str] = []
    for label, entry in enumerate(classes):
        files: list[str] = []
        for dirpath, dirnames, filenames in os.walk(entry.path, onerror=unreadable):
            linked = sorted(d for d in dirnames if os.path.islink(os.path.join(dirpath, d)))
            skipped += [(os.path.join(dirpath, d), "symlinked folder in a class folder: not followed") for d in linked]
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in linked)
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                full = os.path.join(dirpath, name)
                if is_image_name(name):
                    files.append(full)
                else:
                    skipped.append((full, "not an image file extension"))
        if not files:
            empty.append(entry.path)
        found += [(p, label, p) for p in files]
    if empty and not allow_empty_classes:
        raise DataError(
            f"{root}: empty class folder(s) (no image files): {names_list(empty)}. Add images, remove the "
            "folder, or pass allow_empty_classes=True (--allow-empty-classes) to keep it as a class without images."
        )
    names = tuple(e.name for e in classes)
    return finish_loading("folder", names, found, skipped, root, allow_empty_classes=allow_empty_classes)
