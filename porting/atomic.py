"""Atomic, all-or-nothing writes: temporaries beside each DST, renamed together, removed on every exit path.

Every byte porting writes goes through `write_file` (or a writer `atomic_write` calls with a temporary name),
so a full disk, a read-only destination or a signal leaves the tree as it was, and the error names the DST.
An existing DST is moved aside, not deleted, until the whole new set is in place; a stop signal during those
renames puts the old set back. Hidden names carry the writer's process id, so the next write of the same DST
repairs what a killed (-9) writer left: an old DST moved aside is put back, its temporaries removed.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from porting.errors import STOP_SIGNALS, PortingError, Stopped, failing_as, raise_if_stopped

# Hidden names beside a DST: `.<name><TAG><pid>-<random>`: a new file being written, or an old one moved aside.
TMP_TAG, OLD_TAG = ".porting-tmp-", ".porting-old-"
# A failed write's temporaries are removed until none reappeared for QUIET seconds, for GRACE at most (see
# remove_temporaries; QUIET suits a training checkpoint's many writer threads too).
CLEANUP_QUIET_S, CLEANUP_GRACE_S, CLEANUP_POLL_S = 1.0, 10.0, 0.05
NOT_WRITTEN = "; nothing was written (free space on that disk, or choose a writable DST)"


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:  # cleanup after a failure must not replace that failure's error with its own (as rmtree above)
        with contextlib.suppress(OSError):
            os.remove(path)


def remove_temporaries(directory: str | os.PathLike, marker: str, settle: bool) -> None:
    """Remove every entry of `directory` whose name holds `marker` (a temporary's name: also what a writer put beside
    it, orbax's `<tmp>.orbax-checkpoint-tmp`).

    After a failure (`settle`), keep removing until nothing has reappeared for CLEANUP_QUIET_S: orbax raises at
    its first failed write while its other writer threads are still finishing (and creating) theirs.
    """
    start = quiet_since = time.monotonic()
    while True:
        try:
            left = [os.path.join(directory, e) for e in os.listdir(directory) if marker in e]
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


def _hidden(dst: str, tag: str) -> str:
    return os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}{tag}{os.getpid()}-{uuid.uuid4().hex}")


def _writer_alive(name: str, tag: str) -> bool:
    """Whether the process whose id a hidden name carries still runs (a name not ours to parse counts as alive)."""
    try:
        os.kill(int(name.rsplit(tag, 1)[1].split("-", 1)[0]), 0)
    except ProcessLookupError:
        return False
    except (ValueError, IndexError, OverflowError, PermissionError):  # not our name; another user's process
        pass
    return True


def repair_stale(dst: str) -> None:
    """Undo what a killed writer of `dst` left: its old DST put back if no new one arrived, its temporaries removed."""
    directory, prefix = os.path.dirname(dst), f".{os.path.basename(dst)}"
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in sorted(names, key=lambda n: OLD_TAG not in n):  # the old DSTs first: put back before cleaning
        for tag in (OLD_TAG, TMP_TAG):
            if name.startswith(prefix + tag) and not _writer_alive(name, tag):
                path = os.path.join(directory, name)
                if tag == OLD_TAG and not os.path.lexists(dst):
                    os.replace(path, dst)
                else:
                    _remove(path)


@contextlib.contextmanager
def _stops_recorded(received: list[int]) -> Iterator[None]:
    """Within the block a stop signal is only recorded, so that the renames and their undoing are never cut."""
    main = threading.current_thread() is threading.main_thread()  # only the main thread gets Python's signals
    previous = {s: signal.signal(s, lambda signum, _frame: received.append(signum)) for s in STOP_SIGNALS if main}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def _commit(temps: Mapping[str, str]) -> None:
    """Rename each temporary onto its DST, an existing DST moved aside first; any failure or stop signal meanwhile
    puts every old DST back (the set is never mixed); the moved-aside DSTs go once all new ones are in place."""
    placed: list[str] = []
    aside: dict[str, str] = {}
    received: list[int] = []
    with _stops_recorded(received):
        try:
            for dst, tmp in temps.items():
                with failing_as(f"cannot write {dst!r}", NOT_WRITTEN):
                    if os.path.lexists(dst):
                        aside[dst] = _hidden(dst, OLD_TAG)
                        os.replace(dst, aside[dst])
                    os.replace(tmp, dst)
                    placed.append(dst)
                if received:
                    raise Stopped(received[0])
        except BaseException:
            for dst in placed:
                _remove(dst)
            for dst, old in aside.items():
                os.replace(old, dst)
            raise
    for old in aside.values():
        _remove(old)


def atomic_write(writes: Mapping[str | os.PathLike, Callable[[str], None]], force: bool, need_bytes: int = 0) -> None:
    """Call each write(tmp) for a temporary name beside its DST, then rename every temporary onto its DST.

    The DSTs appear together or not at all (a .pt and its sidecar): after any failure or signal, no temporary is
    left and every DST is as it was. A failed write is one PortingError naming its DST and the OS error.
    `need_bytes` (all DSTs together) is checked against the free space first.
    """
    targets = {os.path.abspath(os.fspath(dst)): write for dst, write in writes.items()}
    for dst in targets:
        repair_stale(dst)
    for dst in targets:
        check_destination(dst, force, need_bytes)
    temps = {dst: _hidden(dst, TMP_TAG) for dst in targets}
    try:
        for dst, write in targets.items():
            with failing_as(f"cannot write {dst!r}", NOT_WRITTEN):
                write(temps[dst])
        raise_if_stopped()  # the commit point: a stop whose exception was swallowed must not let the DSTs appear
        _commit(temps)
    finally:
        for tmp in temps.values():
            remove_temporaries(*os.path.split(tmp), settle=False)


def write_file(path: str, data: bytes) -> None:
    """Create `path` (never over an existing file) holding `data`, on disk before it is renamed into place."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_bytes(outputs: Mapping[str, bytes] | Mapping[Path, bytes], force: bool = False) -> None:
    """Write each DST's bytes atomically, all of them or none."""
    writes: dict[str | os.PathLike, Callable[[str], None]] = {
        dst: functools.partial(write_file, data=data) for dst, data in outputs.items()
    }
    atomic_write(writes, force, sum(len(data) for data in outputs.values()))
