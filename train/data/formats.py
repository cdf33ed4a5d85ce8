"""Dataset formats: detection from a path, and the class list, labels and groups each one defines.

Formats (detected in this order):
- ``mask``: the mask competition's layout, ``PATH/images/<id>_<gender>_<race>_<age>/{mask1..5,incorrect_mask,
  normal}.<ext>`` with optional ``PATH/train.csv`` (id, gender, race, age, path). PATH may also be the
  ``images`` folder itself. See mask.py.
- ``csv``: a CSV file with a ``path,label`` header (optional ``group`` column); paths relative to the file.
- ``folder``: one subfolder per class; classes in sorted folder-name order (torchvision ImageFolder's order).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
from pathlib import Path

from .errors import DataError
from .records import Records
from .scan import check_image_files, is_image_name

# The 18-class formula: class = 6 * mask + 3 * gender + age_band.
MASK_FILE_STEMS = {"mask1": 0, "mask2": 0, "mask3": 0, "mask4": 0, "mask5": 0, "incorrect_mask": 1, "normal": 2}
MASK_STATES = ("wear", "incorrect", "not_wear")
GENDERS = ("male", "female")
AGE_BANDS = (0, 30, 60)  # lower bounds: < 30, 30..59, >= 60
AGE_BAND_NAMES = ("<30", "30-59", ">=60")
MASK_CLASS_NAMES = tuple(f"{m}_{g}_{a}" for m in MASK_STATES for g in GENDERS for a in AGE_BAND_NAMES)
PERSON_FOLDER_RE = re.compile(r"^(?P<id>[^_]+)_(?P<gender>[A-Za-z]+)_(?P<race>.+)_(?P<age>\d+)$")
CLASSES_FILE = "classes.txt"  # optional class list beside a CSV dataset, one name per line


def age_band(age: int) -> int:
    """0 for age < 30, 1 for 30 <= age < 60, 2 for age >= 60."""
    return sum(age >= lo for lo in AGE_BANDS) - 1


def mask_class(mask_state: int, gender: int, band: int) -> int:
    """The competition's class index: 6 * mask_state + 3 * gender + age band."""
    return 6 * mask_state + 3 * gender + band


@dataclasses.dataclass
class Loaded:
    """One dataset folder or file read into records, before splitting."""

    format: str
    class_names: tuple[str, ...]
    records: Records
    skipped: list[tuple[str, str]]  # every file left out, with the reason
    bad: int  # how many of `skipped` are unreadable image files (the max_bad_fraction count)
    root: str


def list_dir(path: Path) -> list[os.DirEntry]:
    """Non-hidden entries of `path`, sorted by name; DataError when unreadable."""
    try:
        with os.scandir(path) as it:
            return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as e:
        raise DataError(f"{path}: cannot read folder: {e}") from e


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
    if path.name == "images" and subdirs and any(PERSON_FOLDER_RE.match(e.name) for e in subdirs):
        return "mask", path.parent
    if not subdirs:
        raise DataError(f"{path}: no class subfolders, no images/ folder and not a CSV: no dataset found")
    return "folder", path


def _finish(
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
        raise DataError(f"{root}: no images found")
    reasons = check_image_files([p for p, _, _ in found])
    good = [item for item, reason in zip(found, reasons, strict=True) if reason is None]
    bad = [(p, reason) for (p, _, _), reason in zip(found, reasons, strict=True) if reason is not None]
    counts = [0] * len(class_names)
    for _, label, _ in good:
        counts[label] += 1
    empty = [name for name, count in zip(class_names, counts, strict=True) if count == 0]
    if empty and not allow_empty_classes:
        raise DataError(f"{root}: classes with no usable images: {', '.join(empty)} (allow_empty_classes=True allows)")
    records = Records(tuple(p for p, _, _ in good), [lbl for _, lbl, _ in good], tuple(g for _, _, g in good))
    return Loaded(fmt, class_names, records, skipped + bad, len(bad), str(root))


def load_image_folder(root: Path, *, allow_empty_classes: bool = False) -> Loaded:
    """One subfolder per class (sorted names), images found recursively inside each."""
    classes = [e for e in list_dir(root) if e.is_dir()]
    skipped = [(e.path, "file outside a class folder") for e in list_dir(root) if e.is_file()]
    found = []
    for label, entry in enumerate(classes):
        files = []
        for dirpath, dirnames, filenames in os.walk(entry.path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                full = os.path.join(dirpath, name)
                if is_image_name(name):
                    files.append(full)
                else:
                    skipped.append((full, "not an image file extension"))
        if not files and not allow_empty_classes:
            raise DataError(f"{entry.path}: empty class folder (no image files; allow_empty_classes=True allows)")
        found += [(p, label, p) for p in files]
    names = tuple(e.name for e in classes)
    return _finish("folder", names, found, skipped, root, allow_empty_classes=allow_empty_classes)


def _read_csv(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in required if c not in header]
            if missing:
                raise DataError(f"{path}: missing column(s) {', '.join(missing)}; header is {header}")
            return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except OSError as e:
        raise DataError(f"{path}: cannot read CSV: {e}") from e
    except (csv.Error, UnicodeDecodeError) as e:
        raise DataError(f"{path}: malformed CSV: {e}") from e


def _rows_message(rows: list[int], what: str, path: Path) -> str:
    shown = ", ".join(str(r) for r in rows[:10]) + (f" (+{len(rows) - 10} more)" if len(rows) > 10 else "")
    return f"{path}: {what} on row(s) {shown}"


def load_csv(path: Path, *, allow_empty_classes: bool = False) -> Loaded:
    """A CSV of path,label[,group] rows (row 2 is the first data row).

    Labels are integers 0..K-1 or class names. The class list comes from classes.txt beside the CSV when
    present (labels must then be in range / known); else sorted names, or 0..max for integer labels.
    """
    rows = _read_csv(path, ("path", "label"))
    base = path.parent
    resolved = [os.path.normpath(base / r["path"]) for r in rows]
    empty_rows = [i + 2 for i, r in enumerate(rows) if not r["path"] or not r["label"]]
    if empty_rows:
        raise DataError(_rows_message(empty_rows, "empty path or label", path))
    first_row: dict[str, int] = {}
    dupes = []
    for i, p in enumerate(resolved):
        if p in first_row:
            dupes.append(f"{rows[i]['path']} (rows {first_row[p]} and {i + 2})")
        first_row.setdefault(p, i + 2)
    if dupes:
        raise DataError(f"{path}: duplicate paths: {'; '.join(dupes[:10])}")
    labels_text = [r["label"] for r in rows]
    numeric = all(re.fullmatch(r"-?\d+", t) for t in labels_text)
    classes_file = base / CLASSES_FILE
    if classes_file.is_file():
        names = tuple(n.strip() for n in classes_file.read_text(encoding="utf-8").splitlines() if n.strip())
    elif numeric:
        names = tuple(str(i) for i in range(max(int(t) for t in labels_text) + 1))
    else:
        names = tuple(sorted(set(labels_text)))
    index = {n: i for i, n in enumerate(names)}
    if numeric:
        labels = [int(t) for t in labels_text]
        bad_rows = [i + 2 for i, lbl in enumerate(labels) if not 0 <= lbl < len(names)]
        if bad_rows:
            raise DataError(_rows_message(bad_rows, f"label out of range 0..{len(names) - 1}", path))
    else:
        bad_rows = [i + 2 for i, t in enumerate(labels_text) if t not in index]
        if bad_rows:
            raise DataError(_rows_message(bad_rows, f"label not in {classes_file.name} ({len(names)} classes)", path))
        labels = [index[t] for t in labels_text]
    groups = [r.get("group") or p for r, p in zip(rows, resolved, strict=True)]
    found = list(zip(resolved, labels, groups, strict=True))
    return _finish("csv", names, found, [], path, allow_empty_classes=allow_empty_classes)
