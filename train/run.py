"""What train.flax and train.torch both do around their steps: the workdir (one writer, what --overwrite may
delete, --resume's clean-up), the data, step accounting, metrics from the confusion matrix, stops.

No jax or torch here: each trainer brings its own steps and writes checkpoints through porting.runs; both write the
same run files and report identical numbers.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from darknet_arch import DarknetConfig
from porting.runs import RUN_CONFIG, RunMeta, trainer_preprocessing, val_record  # RUN_CONFIG: marks a run
from train.data import DataSplits, load_splits, make_eval_iter, make_train_iter
from train.data.pipeline import records_fingerprint
from train.logging_utils import METRICS_FILE, Progress, RunLogger, atomic_write_text, epoch_of
from train.options import DEMO_DATA, RunConfig, dumps, path_fields

DATA_SUMMARY_FILE = "data_summary.json"
SUMMARY_FILE = "summary.json"


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row; a checkpoint was saved first."""


class Interrupted(RuntimeError):
    """SIGTERM/SIGINT: the current step finished and a checkpoint was saved."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved")
        self.signum, self.step = signum, step


def data_fingerprint(splits: DataSplits) -> str:
    """The run's records (paths relative to their folder, labels) of both splits: the same after a move."""
    return f"{records_fingerprint(splits.train)}:{records_fingerprint(splits.val)}"


def meta_writer(
    config: RunConfig, model_config: DarknetConfig, splits: DataSplits
) -> Callable[[Any, LoopState, dict | None], RunMeta]:
    """(data-iterator state, loop counters, evaluation) -> the meta a checkpoint of this run records; what does not
    change during the run (config, classes, data fingerprint, preprocessing record) is worked out once, here."""
    config_json, class_names, fingerprint = config.to_json(), list(splits.class_names), data_fingerprint(splits)
    record = trainer_preprocessing(config.mean_std, config.image_size, class_names, model_config.leaky_slope)
    model = model_config.to_dict()

    def meta(data_state: Any, loop: LoopState, val: dict | None) -> RunMeta:
        return RunMeta(config=config_json, class_names=class_names, data_fingerprint=fingerprint, preprocessing=record,
                       model_config=model, data_state=data_state, loop=dataclasses.asdict(loop),
                       val=val_record(val))  # fmt: skip

    return meta


def check_same_data(saved: dict[str, Any], splits: DataSplits) -> None:
    """Refuse a --resume whose data differ (classes or records) from the run's."""
    class_names = list(splits.class_names)
    if saved["class_names"] != class_names:
        raise WorkdirError(f"--resume: the data's classes {class_names} differ from the run's {saved['class_names']}")
    if saved.get("data_fingerprint") != data_fingerprint(splits):
        raise WorkdirError(
            "--resume: --data holds other images or labels than the run was trained on (the records' fingerprint "
            "differs); resume with the run's data, or start a new run"
        )


def load_run_splits(config: RunConfig) -> DataSplits:
    """The run's train/val splits; a demo is generated at twice the run's (resolved) image size."""
    return load_splits(
        config.data,
        val_fraction=config.val_fraction,
        seed=config.seed,
        val_path=config.val_path,
        demo_image_size=config.image_size,
    )


def make_run_iterators(
    config: RunConfig, splits: DataSplits, *, batch_size: int, process_index: int = 0, process_count: int = 1
) -> tuple[Any, Any]:
    """(infinite train iterator, one-pass eval iterable) of `batch_size` rows per process."""
    common: dict[str, Any] = {
        "batch_size": batch_size,
        "image_size": config.image_size,
        "num_workers": config.num_workers,
        "process_index": process_index,
        "process_count": process_count,
        "cache_dir": config.cache_dir,
    }
    train_iter = make_train_iter(splits.train, seed=config.seed, augment=config.augment, **common)
    return train_iter, make_eval_iter(splits.val, **common)


def write_run_files(workdir: Path, config: RunConfig, splits: DataSplits) -> None:
    """config.json (the resolved config) and data_summary.json (what was found in --data)."""
    atomic_write_text(workdir / RUN_CONFIG, dumps(config) + "\n")
    atomic_write_text(workdir / DATA_SUMMARY_FILE, json.dumps(splits.summary(), indent=2) + "\n")


class SignalFlag:
    """Remembers SIGTERM/SIGINT so the loop can finish the step, save and stop."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = signals
        self.signum: int | None = None

    def __enter__(self) -> SignalFlag:
        self._old = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


@dataclasses.dataclass
class LoopState:
    """Host-side counters saved in every checkpoint's meta."""

    step: int = 0
    nonfinite_total: int = 0
    nonfinite_run: int = 0
    best_f1: float = -1.0
    best_step: int | None = None


class StepTracker:
    """Per-step host bookkeeping of both trainers: non-finite counts, epoch loss/accuracy, progress, evaluations."""

    def __init__(
        self,
        loop: LoopState,
        config: RunConfig,
        steps_per_epoch: int,
        total_steps: int,
        logger: RunLogger,
        verbose: bool = True,
    ) -> None:
        self.loop, self.config, self.logger = loop, config, logger
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.progress = Progress(total_steps, config.log_every, steps_per_epoch=steps_per_epoch, enabled=verbose)
        self.loss_sum, self.correct, self.seen = 0.0, 0, 0
        self.lr = float("nan")
        self._t, self._n = time.perf_counter(), 0  # the img/s window of the progress line
        self._started = False

    def record(self, step: int, m: dict[str, Any]) -> bool:
        """Account for step `step`'s metrics (a host sync); True when the non-finite limit is reached."""
        loop, batch = self.loop, self.config.batch_size
        loss = float(m["loss"])
        self.lr = float(m["lr"])
        if bool(m["finite"]):
            loop.nonfinite_run = 0
            self.loss_sum += loss * batch
            self.correct += int(m["correct"])
            self.seen += batch
        else:
            loop.nonfinite_total += 1
            loop.nonfinite_run += 1
            self.progress.message(
                f"step {step}: non-finite loss or gradient, step skipped "
                f"({loop.nonfinite_run} in a row, {loop.nonfinite_total} in total)"
            )
            self.logger.log(
                {"kind": "nonfinite", "step": step, "in_a_row": loop.nonfinite_run, "total": loop.nonfinite_total}
            )
        self._n += batch
        now = time.perf_counter()
        self.progress.update(step, loss, self._n / max(now - self._t, 1e-9))
        if step % self.config.log_every == 0 or not self._started:  # the first window holds the compilation
            self._t, self._n, self._started = now, 0, True
        return loop.nonfinite_run >= self.config.max_nonfinite

    def nonfinite_error(self, workdir: Path) -> NonFiniteError:
        """The error that stops a run after too many non-finite steps (raised once the checkpoint is saved)."""
        return NonFiniteError(
            f"{self.loop.nonfinite_run} non-finite steps in a row (limit --max-nonfinite {self.config.max_nonfinite})"
            f" at step {self.loop.step}; checkpoint saved in {workdir}. Lower --lr, add --grad-clip, or check the data"
        )

    def end_epoch(self, val: dict[str, Any], class_names: list[str]) -> bool:
        """Log the epoch's training figures (finite steps only) and its evaluation; True when it is the best."""
        loop, epoch = self.loop, epoch_of(self.loop.step, self.steps_per_epoch)
        if self.seen:
            train = {"loss": self.loss_sum / self.seen, "accuracy": self.correct / self.seen, "lr": self.lr}
            self.logger.log({"kind": "train_epoch", "step": loop.step, "epoch": epoch, **train})
        self.loss_sum, self.correct, self.seen = 0.0, 0, 0
        # Ties go to the later step, as orbax's best-checkpoint ranking does.
        if is_best := val["macro_f1"] >= loop.best_f1:
            loop.best_f1, loop.best_step = val["macro_f1"], loop.step
        self.logger.log({"kind": "val", "step": loop.step, "epoch": epoch, **val})
        self.logger.plot(class_names, force=loop.step >= self.total_steps)
        self.progress.message(
            f"epoch {epoch} step {loop.step}: val loss {val['loss']:.4f} acc {val['accuracy']:.4f} "
            f"macro F1 {val['macro_f1']:.4f}" + (" (best)" if is_best else "")
        )
        return is_best


def finish(workdir: Path, loop: LoopState, train_seconds: float, last_val: dict | None, **extra: Any) -> dict:
    """The run's summary (written to summary.json by the caller's main process)."""
    return {
        "steps": loop.step,
        "train_seconds": train_seconds,
        "best_macro_f1": loop.best_f1,
        "best_step": loop.best_step,
        "nonfinite_steps": loop.nonfinite_total,
        "final_val": None if last_val is None else {k: last_val[k] for k in ("loss", "accuracy", "macro_f1")},
        "workdir": str(workdir),
        **extra,
    }


def write_summary(workdir: Path, summary: dict) -> None:
    """summary.json."""
    atomic_write_text(workdir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")


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
    folder = workdir / checkpoint_dir if checkpoint_dir else None
    if folder and folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
        skeleton.add(folder.name)
    return [p for p in workdir.iterdir() if p.name not in skeleton]


def check_workdir(config: RunConfig, checkpoint_dir: str) -> None:
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
    elif used and not (workdir / RUN_CONFIG).is_file():
        raise WorkdirError(
            f"--overwrite: {workdir} is not a training run folder (it has no {RUN_CONFIG}); "
            "refusing to delete it. Choose another --workdir"
        )
    if not (used and config.overwrite):
        return
    for name in path_fields():
        value = getattr(config, name)
        inside = value and value != DEMO_DATA and Path(value).resolve().is_relative_to(workdir.resolve())
        if name != "workdir" and inside:
            flag = "--" + name.replace("_", "-")
            raise WorkdirError(f"--overwrite would delete {flag} {value}, which is inside {workdir}; choose another")


def prepare_workdir(
    config: RunConfig, checkpoint_dir: str, is_main: bool = True, sync: Callable[[str], None] | None = None
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
            try:
                check_workdir(config, checkpoint_dir)  # again under the lock: another run may have started meanwhile
                if config.overwrite:
                    for p in _contents(workdir):
                        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                (workdir / checkpoint_dir).mkdir(parents=True, exist_ok=True)
                probe = workdir / f".write-test-{os.getpid()}"  # a read-only folder fails here, not at the first save
                probe.write_text("ok")
                probe.unlink()
            except BaseException:
                lock.release()
                raise
        except OSError as e:
            raise WorkdirError(f"--workdir {workdir} is not writable: {e}") from e
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


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts; row = true class, column = predicted class."""
    labels = np.asarray(labels, dtype=np.int64).ravel()
    preds = np.asarray(preds, dtype=np.int64).ravel()
    if labels.shape != preds.shape:
        raise ValueError(f"labels and preds must have the same length, got {labels.shape} and {preds.shape}")
    for name, arr in (("labels", labels), ("preds", preds)):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(f"{name} must be in [0, {num_classes}), got range [{arr.min()}, {arr.max()}]")
    return np.bincount(labels * num_classes + preds, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_f1(cm: np.ndarray) -> np.ndarray:
    """F1 of each class; 0 where the class is neither present nor predicted (sklearn's zero_division=0)."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    denom = cm.sum(axis=0) + cm.sum(axis=1)  # 2 TP + FP + FN: the predicted plus the true count of each class
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def summarize(cm: np.ndarray, loss_sum: float, class_names: list[str] | None = None) -> dict:
    """Accuracy, mean loss, macro F1, per-class F1 and the matrix as a JSON-ready dict."""
    cm = np.asarray(cm)
    n = int(cm.sum())
    f1 = per_class_f1(cm)
    # sklearn's f1_score(average="macro"): the mean over classes that occur in the labels or the predictions.
    seen = (cm.sum(axis=0) + cm.sum(axis=1)) > 0
    names = class_names or [str(i) for i in range(cm.shape[0])]
    return {
        "loss": float(loss_sum) / max(n, 1),
        "accuracy": float(np.trace(cm)) / max(n, 1),
        "macro_f1": float(f1[seen].mean()) if seen.any() else 0.0,
        "per_class_f1": {name: float(v) for name, v in zip(names, f1, strict=True)},
        "confusion_matrix": cm.astype(int).tolist(),
        "count": n,
    }
