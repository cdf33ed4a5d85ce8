"""The CSV format: path,label[,group] rows, paths relative to the CSV's folder, optional classes.txt beside it.

Hostile input: paths must stay inside the CSV's folder; integer labels are bounded by the number of rows (never
a class list sized by a number in the file); every refusal names the rows (file line numbers) and values.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .checks import DataError, Rows, check_row_files, names_list, read_csv_rows, rows_error
from .formats import Loaded, finish_loading

CLASSES_FILE = "classes.txt"  # optional class list beside a CSV dataset, one name per line
_INT_LABEL_RE = re.compile(r"-?[0-9]+", re.ASCII)
# Digits beyond this can never be a valid label (labels are bounded by the row count); such text is not
# converted to int at all (Python refuses over 4300 digits, and a huge int would be pointless work).
_MAX_LABEL_DIGITS = 18


def _read_classes_file(path: Path) -> tuple[str, ...]:
    """The class names in classes.txt, one per non-blank line, in label order; DataError if none or repeated."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read the class list: {e}") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: the class list must be UTF-8 text: {e}") from e
    names = [(i, line.strip()) for i, line in enumerate(lines, start=1) if line.strip()]
    if not names:
        raise DataError(f"{path}: no class names (write one class name per line, in label order)")
    first: dict[str, int] = {}
    repeated = [(i, n) for i, n in names if first.setdefault(n, i) != i]
    if repeated:
        raise rows_error(path, "class name listed twice", repeated, "Each class must appear once.")
    return tuple(n for _, n in names)


def _int_label(text: str) -> int:
    """The integer `text` spells; past _MAX_LABEL_DIGITS digits, a stand-in that is out of every label range."""
    digits = text.lstrip("-").lstrip("0") or "0"
    return int(text) if len(digits) <= _MAX_LABEL_DIGITS else -1


def _labels(path: Path, rows: Rows, declared: tuple[str, ...] | None) -> tuple[list[int], tuple[str, ...]]:
    """Each row's label index and the class names; DataError naming the rows whose label is not a class.

    With classes.txt, labels index it (integers) or are names in it. Without, names are sorted, and integer labels
    must be 0..K-1 with every value used, K the number of distinct labels: the class list is bounded by the row
    count, never sized by a number in the file.
    """
    text = [r["label"] for _, r in rows]
    integers = all(_INT_LABEL_RE.fullmatch(t) for t in text)
    if integers:
        labels = [_int_label(t) for t in text]
        names = declared if declared is not None else tuple(str(i) for i in range(len(set(labels))))
    else:
        names = declared if declared is not None else tuple(sorted(set(text)))
        index = {n: i for i, n in enumerate(names)}
        labels = [index.get(t, -1) for t in text]
    bad = [(line, t) for (line, _), t, lbl in zip(rows, text, labels, strict=True) if not 0 <= lbl < len(names)]
    if not bad:
        return labels, names
    if declared is not None:
        what = f"label out of range 0..{len(names) - 1}" if integers else f"label not in {CLASSES_FILE}"
        fix = f"{CLASSES_FILE} lists {len(names)} classes: fix the labels or add the classes to it."
        raise rows_error(path, what, bad, fix)
    k, present = len(names), set(labels)
    unused = [str(i) for i in range(k) if i not in present]
    note = f"; no row has label {names_list(unused)}" if unused else ""
    raise rows_error(
        path,
        f"integer label not in 0..{k - 1}",
        bad,
        f"Without {CLASSES_FILE}, integer labels must be 0..K-1 with every one used, K being the number of "
        f"distinct labels ({k} here{note}). Fix the mistyped labels, or write {path.parent / CLASSES_FILE} "
        "(one class name per line, in label order) to declare the classes.",
    )


def load_csv(path: Path, *, allow_empty_classes: bool = False) -> Loaded:
    """A CSV of path,label[,group] rows (rows are numbered by file line; the header is row 1).

    Paths are relative to the CSV's folder (absolute paths are fine when inside it) and must not leave it.
    Labels are integers or class names. The class list comes from classes.txt beside the CSV when present
    (labels must then be in range / known); else sorted names, or 0..K-1 for integer labels (see _labels).
    """
    rows = read_csv_rows(path, ("path", "label"), per="image")
    empty_rows = [(line, r["path"] or r["label"]) for line, r in rows if not r["path"] or not r["label"]]
    if empty_rows:
        raise rows_error(path, "empty path or label", empty_rows, "Every row needs a path and a label.")
    base = path.parent
    fix = (
        "Paths are relative to the CSV's folder and must stay inside it (no '..' out of it, no absolute "
        "path elsewhere): move the CSV into a folder that holds the images, or fix the paths."
    )
    check_row_files(path, rows, "path", base, f"path outside the data root {os.path.abspath(base)}", fix)
    classes_file = base / CLASSES_FILE
    declared = _read_classes_file(classes_file) if classes_file.is_file() else None
    labels, names = _labels(path, rows, declared)
    stored = [os.path.normpath(os.path.join(base, r["path"])) for _, r in rows]
    groups = [r.get("group") or p for (_, r), p in zip(rows, stored, strict=True)]
    found = list(zip(stored, labels, groups, strict=True))
    return finish_loading("csv", names, found, [], path, allow_empty_classes=allow_empty_classes)
