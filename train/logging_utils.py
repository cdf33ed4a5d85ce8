"""Run outputs: metrics.jsonl, TensorBoard events (tensorboardX), PNG plots and a progress line.

No jax or torch here, so train.flax and train.torch write identical files.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np

METRICS_FILE = "metrics.jsonl"
CURVES_PNG = "curves.png"
CONFUSION_PNG = "confusion_matrix.png"
TENSORBOARD_DIR = "tensorboard"


def ensure_writable_dir(folder: str | Path, probe_in: str | Path | None = None) -> None:
    """Create `folder` (with parents) and prove `probe_in` (default: the folder) writable; OSError otherwise."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    probe = Path(probe_in if probe_in is not None else folder) / f".write-test-{os.getpid()}"
    probe.write_text("ok")
    probe.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temp name and rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunLogger:
    """JSON lines + TensorBoard scalars + PNG plots for one workdir (a no-op on processes other than 0)."""

    def __init__(self, workdir: str | Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.workdir = Path(workdir)
        self.enabled = enabled
        self._tb = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter  # heavy import, only where events are written

            self._tb = SummaryWriter(str(self.workdir / TENSORBOARD_DIR))

    def log(self, record: dict[str, Any]) -> None:
        """Append one record to metrics.jsonl and its scalars to TensorBoard (tagged kind/name)."""
        if not self.enabled:
            return
        with open(self.workdir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self._tb is not None:
            step = int(record.get("step", 0))
            kind = record.get("kind", "train")
            for key, value in record.items():
                if key in ("step", "kind", "epoch") or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                self._tb.add_scalar(f"{kind}/{key}", value, step)
            self._tb.flush()

    def plot(self, class_names: list[str]) -> None:
        """Redraw curves.png and confusion_matrix.png from metrics.jsonl."""
        if not self.enabled:
            return
        records = read_metrics(self.workdir)
        plot_curves(records, self.workdir / CURVES_PNG)
        evals = [r for r in records if r.get("kind") == "val"]
        if evals:
            plot_confusion(np.asarray(evals[-1]["confusion_matrix"]), class_names, self.workdir / CONFUSION_PNG)

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


def _save_fig(fig: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    os.replace(tmp, path)


def plot_curves(records: list[dict[str, Any]], path: Path) -> None:
    """Loss and accuracy (train per epoch, val per evaluation) and val macro F1 against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train_epoch"]
    val = [r for r in records if r.get("kind") == "val"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key in zip(axes[:2], ("loss", "accuracy"), strict=True):
        for name, rs in (("train", train), ("val", val)):
            if rs:
                ax.plot([r["step"] for r in rs], [r[key] for r in rs], marker="o", label=name)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.legend()
    if val:
        axes[2].plot([r["step"] for r in val], [r["macro_f1"] for r in val], marker="o", color="C2")
    axes[2].set_title("val macro F1")
    axes[2].set_xlabel("step")
    _save_fig(fig, path)
    plt.close(fig)


def plot_confusion(cm: np.ndarray, class_names: list[str], path: Path) -> None:
    """The confusion matrix as a heat map with counts (rows: true class, columns: predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = cm.shape[0]
    size = max(5.0, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = cm.max() if cm.size else 0
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                ax.text(
                    j,
                    i,
                    str(cm[i, j]),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if cm[i, j] > top / 2 else "black",
                )
    _save_fig(fig, path)
    plt.close(fig)


def format_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """A one-line progress bar with loss, img/s and ETA on a terminal; plain lines every `every` steps otherwise."""

    def __init__(self, total: int, start: int, every: int, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.total, self.every, self.enabled = total, every, enabled
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self._t0 = time.perf_counter()
        self._start = start

    def update(self, step: int, loss: float, images_per_s: float, epoch: int) -> None:
        """Report that `step` steps are done."""
        if not self.enabled:
            return
        done = step - self._start
        elapsed = time.perf_counter() - self._t0
        eta = elapsed / done * (self.total - step) if done else float("nan")
        if self.tty:
            width = 30
            filled = int(width * step / max(self.total, 1))
            bar = "#" * filled + "." * (width - filled)
            line = (
                f"\r[{bar}] {step}/{self.total} ep {epoch} loss {loss:.4f} "
                f"{images_per_s:.1f} img/s ETA {format_seconds(eta)}"
            )
            self.stream.write(line)
            self.stream.flush()
        elif step % self.every == 0 or step == self.total:
            self.stream.write(
                f"step {step}/{self.total} epoch {epoch} loss {loss:.4f} "
                f"{images_per_s:.1f} img/s ETA {format_seconds(eta)}\n"
            )
            self.stream.flush()

    def message(self, text: str) -> None:
        """A line that does not get overwritten by the bar."""
        if self.enabled:
            self.stream.write(("\n" if self.tty else "") + text + "\n")
            self.stream.flush()
