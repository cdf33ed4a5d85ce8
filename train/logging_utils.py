"""Run outputs: metrics.jsonl, TensorBoard events (tensorboardX), PNG plots and a progress line.

No jax or torch here, so train.flax and train.torch write identical files.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

if TYPE_CHECKING:  # matplotlib is imported only where a plot is drawn: it costs the trainers' start-up otherwise
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

METRICS_FILE = "metrics.jsonl"
CURVES_PNG = "curves.png"
CONFUSION_PNG = "confusion_matrix.png"
TENSORBOARD_DIR = "tensorboard"
PNG_DPI = 100
CONFUSION_MIN_INCHES = 5.0  # one confusion panel's side, at least
CONFUSION_INCHES_PER_CLASS = 0.45  # room for a tick label and a cell value per class
BAR_WIDTH = 30  # characters in the terminal progress bar
# A class name longer than this is cut (with an ellipsis) on the confusion plot's axes: a plot's size never
# grows with a name's length (a 15,000-character name once asked for a canvas beyond memory).
MAX_TICK_LABEL_CHARS = 32
MAX_WARNING_CHARS = 120  # of an exception's text in a one-line warning
# Redraw the PNGs at most this often during a run (the last epoch always redraws; a stopped run's PNGs may lag
# metrics.jsonl by this much). A redraw took 0.7 s on the 2-core CPU, where the demo's epochs take 6 s: drawn
# every epoch they were 9% of the README's main job.
PLOT_MIN_INTERVAL_S = 30.0


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temp name and rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write (full disk, read-only folder) leaves nothing behind


def _summary_writer_class() -> Any:
    """tensorboardX's SummaryWriter, imported without PyTorch where PyTorch is not loaded already.

    tensorboardX's writer module tries `import torch` only to accept torch tensors; the loggers pass floats.
    In train.flax that import was 2.8 s of a 13.5 s warm start on the 2-core CPU (bench/NOTES.md 6.3). A None
    in sys.modules makes it fail at once; it is removed right after, so a later `import torch` works.
    """
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
    else:
        # typeshed types sys.modules as modules only; None is the entry Python's import system documents as blocked
        sys.modules["torch"] = None  # type: ignore[assignment]
        try:
            from tensorboardX import SummaryWriter
        finally:
            if "torch" in sys.modules and sys.modules["torch"] is None:
                del sys.modules["torch"]
    return SummaryWriter


class RunLogger:
    """JSON lines + TensorBoard scalars + PNG plots for one workdir (a no-op on processes other than 0)."""

    def __init__(self, workdir: str | Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.workdir, self.enabled = Path(workdir), enabled
        self._plotted_at = time.monotonic()
        self._tb = _summary_writer_class()(str(self.workdir / TENSORBOARD_DIR)) if enabled and tensorboard else None

    def log(self, record: dict[str, Any]) -> None:
        """Append one record to metrics.jsonl and its scalars to TensorBoard (tagged kind/name)."""
        if not self.enabled:
            return
        with open(self.workdir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self._tb is not None:
            step, kind = int(record.get("step", 0)), record.get("kind", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "epoch"):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)
            self._tb.flush()

    def plot(self, class_names: list[str], force: bool = False) -> None:
        """Redraw curves.png and confusion_matrix.png from metrics.jsonl, at most every PLOT_MIN_INTERVAL_S."""
        if not self.enabled or not (force or time.monotonic() - self._plotted_at >= PLOT_MIN_INTERVAL_S):
            return
        self._plotted_at = time.monotonic()
        try:
            records = read_metrics(self.workdir)
            _save_fig(curves_figure(records), self.workdir / CURVES_PNG)
            if evals := [r for r in records if r.get("kind") == "val"]:
                plot_confusion(np.asarray(evals[-1]["confusion_matrix"]), class_names, self.workdir / CONFUSION_PNG)
        except Exception as e:  # MemoryError included: a picture must never cost the run its checkpoint
            cause = (str(e).splitlines() or [""])[0][:MAX_WARNING_CHARS]  # one short line, whatever e holds
            print(f"warning: plots not redrawn ({type(e).__name__}: {cause}); training goes on", file=sys.stderr)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    """All records of a workdir's metrics.jsonl (an empty list when there is none)."""
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _save_fig(fig: Figure, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=PNG_DPI, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def curves_figure(records: list[dict[str, Any]]) -> Figure:
    """Loss (log axis), accuracy and val macro F1 against the step: train per epoch, val per evaluation."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no backend to choose

    train = [r for r in records if r.get("kind") == "train_epoch"]
    val = [r for r in records if r.get("kind") == "val"]
    fig = Figure(figsize=(15, 4))
    loss_ax, acc_ax, f1_ax = fig.subplots(1, 3)
    any_positive_loss = False
    for name, rs in (("train", train), ("val", val)):
        if rs:
            losses = np.asarray([r["loss"] for r in rs], dtype=np.float64)
            # Non-positive or non-finite losses become gaps on the log axis instead of breaking its scale.
            losses = np.where(np.isfinite(losses) & (losses > 0), losses, np.nan)
            any_positive_loss |= bool(np.isfinite(losses).any())
            loss_ax.plot([r["step"] for r in rs], losses, marker="o", label=name)
            acc_ax.plot([r["step"] for r in rs], [r["accuracy"] for r in rs], marker="o", label=name)
    # A log axis: the first evaluation's loss can be 100x the later ones and would flatten them on a linear one.
    if any_positive_loss:
        loss_ax.set_yscale("log")
    for ax, title in ((loss_ax, "loss"), (acc_ax, "accuracy"), (f1_ax, "val macro F1")):
        ax.set(title=title, xlabel="step")
    if train or val:
        loss_ax.legend()
        acc_ax.legend()
    if val:
        f1_ax.plot([r["step"] for r in val], [r["macro_f1"] for r in val], marker="o", color="C2")
    return fig


def _heat_map(
    fig: Figure, ax: Axes, values: np.ndarray, class_names: list[str], title: str, fmt: str, vmax: float
) -> None:
    """One confusion panel: the matrix (NaN cells left blank), its non-zero values written in, and a colour bar."""
    n = values.shape[0]
    im = ax.imshow(np.ma.masked_invalid(values), cmap="Blues", vmin=0.0, vmax=vmax or None)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title)
    cut = MAX_TICK_LABEL_CHARS - 1  # and an ellipsis
    labels = [name if len(name) <= MAX_TICK_LABEL_CHARS else name[:cut] + "…" for name in class_names]
    ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i, j in zip(*np.nonzero(np.nan_to_num(values)), strict=True):
        color = "white" if values[i, j] > vmax / 2 else "black"  # readable on the dark half of the colour map
        ax.text(j, i, format(values[i, j], fmt), ha="center", va="center", fontsize=6, color=color)


def confusion_figure(cm: np.ndarray, class_names: list[str]) -> Figure:
    """Two heat maps, rows true class and columns predicted: counts, and rows normalised to sum 1 (recall)."""
    from matplotlib.figure import Figure

    cm = np.asarray(cm, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(class_names):
        raise ValueError(
            f"confusion matrix of shape {cm.shape} does not match {len(class_names)} class names: "
            "it must be square with one row per class"
        )
    size = max(CONFUSION_MIN_INCHES, CONFUSION_INCHES_PER_CLASS * cm.shape[0] + 2)
    fig = Figure(figsize=(2 * size + 2, size))
    counts_ax, recall_ax = fig.subplots(1, 2)
    _heat_map(fig, counts_ax, cm, class_names, "counts", ".0f", vmax=float(cm.max(initial=0.0)))
    totals = cm.sum(axis=1, keepdims=True)  # rows of classes with no true examples stay NaN (blank)
    recall = np.divide(cm, totals, out=np.full_like(cm, np.nan), where=totals > 0)
    # Fixed 0..1 scale, so a small class's diagonal reads as good or bad on its own, not against the big classes.
    _heat_map(fig, recall_ax, recall, class_names, "rows normalised (recall)", ".2f", vmax=1.0)
    return fig


def plot_confusion(cm: np.ndarray, class_names: list[str], path: Path) -> None:
    """Write confusion_figure(cm, class_names) to `path` as a PNG."""
    _save_fig(confusion_figure(cm, class_names), path)


def epoch_of(step: int, steps_per_epoch: int) -> int:
    """The 1-based epoch that step `step` (1-based, counted after it is done) belongs to."""
    return (step - 1) // steps_per_epoch + 1


class Progress:
    """A one-line progress bar with loss, img/s and ETA on a terminal; plain lines every `every` steps otherwise.

    The ETA is measured from the end of the first step reported: that step pays for compilation (XLA,
    torch.compile) and would otherwise inflate the early estimates several times over. Written here rather than
    with tqdm: tqdm writes carriage-return redraws into a file or pipe (a log full of partial lines), and the
    plain, complete lines a batch job's log needs are what this class prints there.
    """

    def __init__(
        self,
        total: int,
        every: int,
        *,
        steps_per_epoch: int,
        enabled: bool = True,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if steps_per_epoch < 1:
            raise ValueError(f"Progress: steps_per_epoch must be a positive integer, got {steps_per_epoch}")
        self.total, self.every, self.enabled, self.steps_per_epoch = total, every, enabled, steps_per_epoch
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self._clock = clock
        # Set by start_clock; None until the first step is reported (on a resumed run too, whatever its step).
        self._clock_step: int | None = None
        self._t0 = 0.0

    def start_clock(self, step: int) -> None:
        """Measure the ETA from now, with `step` steps done (update calls it after the first step it sees)."""
        self._t0, self._clock_step = self._clock(), step

    def eta(self, step: int) -> str:
        """Time left after `step` steps at the step time measured since start_clock: M:SS, H:MM:SS, or ? before any."""
        if step >= self.total:
            return "0:00"
        if self._clock_step is None or step <= self._clock_step:
            return "?"
        s = int((self._clock() - self._t0) / (step - self._clock_step) * (self.total - step))
        return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"

    def update(self, step: int, loss: float, images_per_s: float) -> None:
        """Report that `step` steps are done (epoch shown 1-based, as on validation lines)."""
        if self._clock_step is None:
            self.start_clock(step)
        if not self.enabled or not (self.tty or step % self.every == 0 or step == self.total):
            return
        epoch = epoch_of(step, self.steps_per_epoch)
        figures = f"loss {loss:.4f} {images_per_s:.1f} img/s ETA {self.eta(step)}"
        if self.tty:
            filled = int(BAR_WIDTH * step / max(self.total, 1))
            bar = "#" * filled + "." * (BAR_WIDTH - filled)
            self.stream.write(f"\r[{bar}] {step}/{self.total} ep {epoch} {figures}")
        else:  # bench.e2e parses these lines (PROGRESS_RE): keep "step N/T epoch E loss L R img/s".
            self.stream.write(f"step {step}/{self.total} epoch {epoch} {figures}\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line that does not get overwritten by the bar."""
        if self.enabled:
            self.stream.write(("\n" if self.tty else "") + text + "\n")
            self.stream.flush()
