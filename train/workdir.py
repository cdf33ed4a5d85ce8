"""The workdir of a run: one writer (an advisory lock), what --overwrite may delete, --resume's metrics clean-up.

No jax or torch here: train.flax and train.torch use the same rules.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from train.logging_utils import METRICS_FILE, atomic_write_text, ensure_writable_dir
from train.options import DEMO_DATA, TrainConfig, path_fields

CONFIG_FILE = "config.json"  # what marks a folder as a training run


class WorkdirError(ValueError):
    """A workdir that exists without --resume/--overwrite, cannot be written, or has nothing to resume."""


class WorkdirLock:
    """One writer per workdir: an advisory lock on <workdir>/.lock, held for the whole run (released on exit)."""

    FILE = ".lock"

    def __init__(self, workdir: Path) -> None:
        self.path = workdir / self.FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise WorkdirError(
                f"--workdir {self.path.parent} is in use by another run (pid {holder}); wait for it to finish, "
                "or choose another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock; the file stays (unlinking it would race a new writer)
            self._fd = None


def _contents(workdir: Path, checkpoint_dir: str | None = None) -> list[Path]:
    """What a workdir holds, less what prepare_workdir itself makes first (the lock file and an empty checkpoint
    folder): a run that failed before writing anything else must not block its own rerun."""
    if not workdir.is_dir():
        return []
    skeleton = {WorkdirLock.FILE}
    if checkpoint_dir and _is_empty_dir(workdir / checkpoint_dir):
        skeleton.add(checkpoint_dir)
    return [p for p in workdir.iterdir() if p.name not in skeleton]


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def check_workdir(config: TrainConfig, checkpoint_dir: str) -> None:
    """Refuse (WorkdirError) a workdir this run may not use; changes nothing."""
    workdir = Path(config.workdir)
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"--workdir {workdir} exists and is not a folder")
    used = bool(_contents(workdir, checkpoint_dir))
    if config.resume:
        if not (workdir / checkpoint_dir).is_dir():
            raise WorkdirError(f"--resume: {workdir} holds no checkpoints ({workdir / checkpoint_dir} is missing)")
    elif used and not config.overwrite:
        raise WorkdirError(
            f"--workdir {workdir} already exists and is not empty; pass --resume to continue it, "
            "--overwrite to replace it, or choose another folder"
        )
    elif used and not (workdir / CONFIG_FILE).is_file():
        raise WorkdirError(
            f"--overwrite: {workdir} is not a training run folder (it has no {CONFIG_FILE}); "
            "refusing to delete it. Choose another --workdir"
        )
    for name in path_fields():
        value = getattr(config, name)
        if (
            name != "workdir"
            and used
            and config.overwrite
            and value
            and value != DEMO_DATA
            and _inside(Path(value), workdir)
        ):
            flag = "--" + name.replace("_", "-")
            raise WorkdirError(f"--overwrite would delete {flag} {value}, which is inside {workdir}; choose another")


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def prepare_workdir(
    config: TrainConfig, checkpoint_dir: str, is_main: bool = True, sync: Callable[[str], None] | None = None
) -> WorkdirLock | None:
    """Check that the workdir may be used, take its lock (process 0), clear it for --overwrite, make it writable.

    `sync(name)` is a barrier between processes (multi-host), called before and after process 0 changes anything.
    Returns the held lock (None on other processes), to be released when the run ends.
    """
    sync = sync or (lambda name: None)
    workdir = Path(config.workdir)
    check_workdir(config, checkpoint_dir)
    sync("workdir-checked")  # every process has looked before process 0 clears or creates it
    lock = None
    if is_main:
        lock = WorkdirLock(workdir)
        try:
            lock.acquire()
        except OSError as e:
            raise WorkdirError(f"--workdir {workdir} is not writable: {e}") from e
        try:
            check_workdir(config, checkpoint_dir)  # again under the lock: another run may have started meanwhile
            if config.overwrite:
                for p in _contents(workdir):
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            ensure_writable_dir(workdir / checkpoint_dir, probe_in=workdir)
        except OSError as e:
            lock.release()
            raise WorkdirError(f"--workdir {workdir} is not writable: {e}") from e
        except BaseException:
            lock.release()
            raise
    sync("workdir-ready")
    return lock


def trim_metrics(workdir: Path, step: int) -> None:
    """On --resume: drop metrics.jsonl records after `step` and a half-written last line (a kill -9 leaves both)."""
    path = workdir / METRICS_FILE
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        if record.get("step", 0) <= step:
            kept.append(line)
    atomic_write_text(path, "".join(k + "\n" for k in kept))
