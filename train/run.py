"""What train.flax and train.torch both do around their steps: the workdir, the data, step accounting, stops.

No jax or torch here: each trainer brings its own steps and checkpoints, and both write the same run files.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from pathlib import Path
from typing import Any

from train.data import DataSplits, load_splits, make_eval_iter, make_train_iter
from train.data.pipeline import records_fingerprint
from train.logging_utils import Progress, RunLogger, atomic_write_text, epoch_of
from train.options import TrainConfig, dumps
from train.workdir import CONFIG_FILE, WorkdirError

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


def load_run_splits(config: TrainConfig) -> DataSplits:
    """The run's train/val splits; a demo is generated at twice the run's (resolved) image size."""
    return load_splits(
        config.data,
        val_fraction=config.val_fraction,
        seed=config.seed,
        val_path=config.val_path,
        demo_image_size=config.image_size,
    )


def make_run_iterators(
    config: TrainConfig, splits: DataSplits, *, batch_size: int, process_index: int = 0, process_count: int = 1
) -> tuple[Any, Any]:
    """(infinite train iterator, one-pass eval iterable) of `batch_size` rows per process."""
    common = {
        "batch_size": batch_size,
        "image_size": config.image_size,
        "num_workers": config.num_workers,
        "process_index": process_index,
        "process_count": process_count,
        "cache_dir": config.cache_dir,
    }
    train_iter = make_train_iter(splits.train, seed=config.seed, augment=config.augment, **common)
    return train_iter, make_eval_iter(splits.val, **common)


def write_run_files(workdir: Path, config: TrainConfig, splits: DataSplits) -> None:
    """config.json (the resolved config) and data_summary.json (what was found in --data)."""
    atomic_write_text(workdir / CONFIG_FILE, dumps(config) + "\n")
    atomic_write_text(workdir / DATA_SUMMARY_FILE, json.dumps(splits.summary(), indent=2) + "\n")


class SignalFlag:
    """Remembers SIGTERM/SIGINT so the loop can finish the step, save and stop."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = signals
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> SignalFlag:
        for s in self.signals:
            self._old[s] = signal.signal(s, self._handle)
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
        config: TrainConfig,
        steps_per_epoch: int,
        total_steps: int,
        logger: RunLogger,
        verbose: bool = True,
    ) -> None:
        self.loop, self.config, self.steps_per_epoch, self.logger = loop, config, steps_per_epoch, logger
        self.total_steps = total_steps
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
        is_best = val["macro_f1"] >= loop.best_f1
        if is_best:
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
