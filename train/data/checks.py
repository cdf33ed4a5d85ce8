"""DataError, and the guards for hostile or careless input: CSV rows with their line numbers, values quoted safely
in messages, paths kept inside the data root, symlinks that lead back into (or above) it.

Every guard raises DataError (or reports a skipped file); nothing here follows a path or allocates in
proportion to a number read from the input.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

SHOWN_ROWS = 10  # rows named in one message; the rest are counted
SHOWN_CHARS = 60  # characters of one value quoted in a message
SHOWN_NAMES = 20  # names listed in one message; the rest are counted
Rows = list[tuple[int, dict[str, str]]]  # CSV data rows: (file line number, {column: stripped value})


class DataError(ValueError):
    """A data problem; the message names the file, folder or row and what is wrong."""


def show(value: str) -> str:
    """`value` quoted for a one-line message: repr (so newlines and control characters stay visible), cut short."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 4] + "...'"


def printable(text: str) -> str:
    """`text` itself when printable, else its repr: a name or path with a newline must not break the message."""
    return text if text.isprintable() else repr(text)


def names_list(names: Sequence[str]) -> str:
    """Up to SHOWN_NAMES names (printable), comma-separated, and how many more."""
    more = f" (+{len(names) - SHOWN_NAMES} more)" if len(names) > SHOWN_NAMES else ""
    return ", ".join(printable(n) for n in names[:SHOWN_NAMES]) + more


def rows_error(path: Path | str, what: str, rows: Sequence[tuple[int, str]], fix: str) -> DataError:
    """DataError('{path}: {what} on row(s) 3 ('value'), 7 ('value') (+N more). {fix}'); rows are file line numbers."""
    shown = ", ".join(f"{line} ({show(value)})" for line, value in rows[:SHOWN_ROWS])
    more = f" (+{len(rows) - SHOWN_ROWS} more)" if len(rows) > SHOWN_ROWS else ""
    return DataError(f"{path}: {what} on row(s) {shown}{more}. {fix}")


def read_csv_rows(path: Path, required: tuple[str, ...], per: str) -> Rows:
    """(line number, {column: stripped value}) for each non-blank data row; the header is line 1.

    DataError for an unreadable or malformed file, a missing or repeated column, no data rows (one is needed
    `per` image or person), or a row with more fields than the header (an unquoted comma shifts every later
    column: guessing which field is the path would be wrong).
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            repeated = sorted(h for h, n in Counter(header).items() if h and n > 1)
            if repeated:
                raise DataError(f"{path}: column(s) {', '.join(map(show, repeated))} appear twice in the header")
            missing = [c for c in required if c not in header]
            if missing:
                raise DataError(
                    f"{path}: missing column(s) {', '.join(missing)}; the header (line 1) is "
                    f"{show(','.join(header))}, expected one naming {', '.join(required)}"
                )
            rows, too_long = [], []
            for fields in reader:
                if not any(field.strip() for field in fields):
                    continue  # a blank line
                if len(fields) > len(header):
                    too_long.append((reader.line_num, ",".join(fields)))
                values = [field.strip() for field in fields] + [""] * (len(header) - len(fields))
                # zip drops the fields past the header: such rows are refused below, after all are read.
                rows.append((reader.line_num, dict(zip(header, values, strict=False))))
    except OSError as e:
        raise DataError(f"{path}: cannot read CSV: {e}") from e
    except (csv.Error, UnicodeDecodeError) as e:
        raise DataError(f'{path}: malformed CSV (it must be UTF-8 text, fields quoted with "): {e}') from e
    if too_long:
        what = f"more fields than the {len(header)} header columns"
        raise rows_error(path, what, too_long, 'Quote a field that holds a comma ("a,b.jpg").')
    if not rows:
        raise DataError(f"{path}: no data rows, only the header; add one {','.join(required)} row per {per}")
    return rows


def is_within(root: str, path: str) -> bool:
    """Whether absolute, normalised `path` is `root` or below it (lexical: no symlink is resolved)."""
    return os.path.commonpath([root, path]) == root


def resolve_inside(root: Path | str, relative: str) -> str | None:
    """`root / relative` normalised, or None when it is not strictly inside `root` (`..` escapes, absolute paths
    elsewhere, the root itself). Lexical, so a path is judged by what the file says, not by where links lead."""
    if "\0" in relative:
        return None
    base = os.path.abspath(root)
    full = os.path.normpath(os.path.join(base, relative))
    return full if full != base and is_within(base, full) else None


def check_row_files(path: Path, rows: Rows, column: str, root: Path, outside_what: str, outside_fix: str) -> None:
    """DataError naming the rows whose `column` is not a path inside `root` (resolve_inside; the message is
    rows_error's with `outside_what` and `outside_fix`), else those naming an earlier row's file again."""
    resolved = [resolve_inside(root, r[column]) for _, r in rows]
    outside = [(line, r[column]) for (line, r), full in zip(rows, resolved, strict=True) if full is None]
    if outside:
        raise rows_error(path, outside_what, outside, outside_fix)
    first: dict[str | None, int] = {}
    dupes = [
        f"{show(r[column])} (rows {first[full]} and {line})"
        for (line, r), full in zip(rows, resolved, strict=True)
        if first.setdefault(full, line) != line
    ]
    if dupes:
        raise DataError(f"{path}: duplicate {column}s: {names_list(dupes)}. List each image once.")


def links_back(path: str, root: Path | str) -> bool:
    """Whether `path` is a symlink to the data root, into it or above it: following it would count the same
    images twice or loop."""
    if not os.path.islink(path):
        return False
    target, real_root = os.path.realpath(path), os.path.realpath(root)
    return is_within(real_root, target) or is_within(target, real_root)


LINKS_BACK_REASON = "symlink into (or above) the data root: not followed (its images would be counted twice)"
