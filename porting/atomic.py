"""Atomic, all-or-nothing writes: temporaries beside each DST, renamed together, removed on every exit path.

Every byte porting writes goes through `write_file` (or a writer `atomic_write` calls with a temporary name),
so a full disk, a read-only destination or a signal leaves the tree as it was, and the error names the DST.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping

from porting.errors import PortingError, failing_as, raise_if_stopped

TMP_TAG = ".porting-tmp-"
# A failed write's temporaries are removed until none reappeared for QUIET seconds, for GRACE at most (see
# remove_temporaries).
CLEANUP_QUIET_S, CLEANUP_GRACE_S, CLEANUP_POLL_S = 0.5, 10.0, 0.05
NOT_WRITTEN = "; nothing was written (free space on that disk, or choose a writable DST)"


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def remove_temporaries(tmp: str, settle: bool) -> None:
    """Remove `tmp` and all a writer put beside it under its name (orbax's `<tmp>.orbax-checkpoint-tmp`).

    After a failure (`settle`), keep removing until nothing has reappeared for CLEANUP_QUIET_S: orbax raises at
    its first failed write while its other writer threads are still finishing (and creating) theirs.
    """
    directory, name = os.path.split(tmp)
    start = quiet_since = time.monotonic()
    while True:
        try:
            left = [os.path.join(directory, e) for e in os.listdir(directory) if e.startswith(name)]
        except OSError:
            return
        for path in left:
            _remove(path)
        now = time.monotonic()
        quiet_since = now if left else quiet_since
        if not settle or now - quiet_since >= CLEANUP_QUIET_S or now - start >= CLEANUP_GRACE_S:
            return
        time.sleep(CLEANUP_POLL_S)


def check_destination(dst: str | os.PathLike, force: bool, need_bytes: int = 0) -> None:
    """Refuse an existing DST unless `force`, and a DST whose directory does not exist, is not writable or has
    less than `need_bytes` free."""
    dst = os.fspath(dst)
    if os.path.lexists(dst) and not force:
        raise PortingError(f"{dst!r} already exists; pass force=True (--force) to overwrite it")
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise PortingError(f"cannot write {dst!r}: directory {parent!r} does not exist")
    if not os.access(parent, os.W_OK):  # also false for root on a read-only file system
        raise PortingError(f"cannot write {dst!r}: directory {parent!r} is read-only or not yours; choose another DST")
    free = shutil.disk_usage(parent).free
    if free < need_bytes:
        raise PortingError(
            f"cannot write {dst!r}: it needs {need_bytes:,} bytes and {parent!r} has {free:,} free; free space there "
            "or choose another DST"
        )


def atomic_write(
    writes: Mapping[str | os.PathLike, Callable[[str], None]], force: bool, need_bytes: int = 0
) -> None:
    """Call each write(tmp) for a temporary name beside its DST, then rename every temporary onto its DST.

    The DSTs appear together or not at all (a .pt and its sidecar): after any failure or signal, no temporary is
    left and no DST of this call exists. A failed write is one PortingError naming its DST and the OS error.
    `need_bytes` (all DSTs together) is checked against the free space first.
    """
    targets = {os.path.abspath(os.fspath(dst)): write for dst, write in writes.items()}
    for dst in targets:
        check_destination(dst, force, need_bytes)
    temps = {dst: os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}{TMP_TAG}{uuid.uuid4().hex}")
             for dst in targets}  # fmt: skip
    renamed = []
    try:
        for dst, write in targets.items():
            with failing_as(f"cannot write {dst!r}", NOT_WRITTEN):
                write(temps[dst])
        raise_if_stopped()  # the commit point: a stop whose exception was swallowed must not let the DSTs appear
        for dst, tmp in temps.items():
            with failing_as(f"cannot write {dst!r}", NOT_WRITTEN):
                if os.path.isdir(tmp) and os.path.lexists(dst):
                    os.replace(dst, tmp + ".old")  # a directory cannot replace a non-empty one; removed below
                os.replace(tmp, dst)
                renamed.append(dst)
    except BaseException:
        for dst in targets if renamed else ():
            _remove(dst)
        raise
    finally:
        for tmp in temps.values():
            remove_temporaries(tmp, settle=False)


def write_file(path: str, data: bytes) -> None:
    """Create `path` (never over an existing file) holding `data`, on disk before it is renamed into place."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_bytes(outputs: Mapping[str | os.PathLike, bytes], force: bool = False) -> None:
    """Write each DST's bytes atomically, all of them or none."""
    writes = {dst: functools.partial(write_file, data=data) for dst, data in outputs.items()}
    atomic_write(writes, force, sum(len(data) for data in outputs.values()))
