"""Run outputs (train.logging_utils): the loss curve's log axis, the two confusion panels, the progress line."""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from train import logging_utils
from train.logging_utils import (
    CONFUSION_PNG,
    CURVES_PNG,
    PLOT_MIN_INTERVAL_S,
    Progress,
    RunLogger,
    confusion_figure,
    curves_figure,
    epoch_of,
)

# The numbers of issue 11: the first validation loss dwarfs every later one.
VAL_LOSSES = [27.9, 1.2, 0.45, 0.31]
TRAIN_LOSSES = [2.8, 0.9, 0.5, 0.3]


def _records(train_losses: list[float], val_losses: list[float]) -> list[dict]:
    train = [
        {"kind": "train_epoch", "step": 10 * (i + 1), "epoch": i + 1, "loss": v, "accuracy": 0.1 * (i + 1)}
        for i, v in enumerate(train_losses)
    ]
    val = [
        {"kind": "val", "step": 10 * (i + 1), "epoch": i + 1, "loss": v, "accuracy": 0.1 * i, "macro_f1": 0.05 * i}
        for i, v in enumerate(val_losses)
    ]
    return train + val


def _axis(fig, title: str):
    (ax,) = [ax for ax in fig.axes if ax.get_title() == title]
    return ax


def test_loss_axis_is_logarithmic_so_a_huge_first_val_loss_does_not_flatten_the_rest() -> None:
    fig = curves_figure(_records(TRAIN_LOSSES, VAL_LOSSES))
    loss_ax = _axis(fig, "loss")
    assert loss_ax.get_yscale() == "log"
    assert _axis(fig, "accuracy").get_yscale() == "linear"
    # On the log axis the later losses spread over a useful part of the height: 0.31..1.2 spans well over a tenth
    # of log10(27.9 / 0.3), where on a linear axis from 0 to 27.9 it would be 3 %.
    bottom, top = loss_ax.get_ylim()
    share = (np.log10(1.2) - np.log10(0.31)) / (np.log10(top) - np.log10(bottom))
    assert share > 0.25
    plotted = {line.get_label(): list(line.get_ydata()) for line in loss_ax.get_lines()}
    assert plotted == {"train": TRAIN_LOSSES, "val": VAL_LOSSES}


def test_non_positive_and_non_finite_losses_are_gaps_on_the_log_axis() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = curves_figure(_records([2.0, 0.0, -1.0, 0.5], [3.0, float("nan"), 1.0, float("inf")]))
        fig.canvas.draw()  # a clipped non-positive value would warn or blow the axis down to 1e-300 here
    loss_ax = _axis(fig, "loss")
    assert loss_ax.get_yscale() == "log"
    ydata = {line.get_label(): np.asarray(line.get_ydata(), dtype=float) for line in loss_ax.get_lines()}
    np.testing.assert_array_equal(ydata["train"], [2.0, np.nan, np.nan, 0.5])
    np.testing.assert_array_equal(ydata["val"], [3.0, np.nan, 1.0, np.nan])
    bottom, top = loss_ax.get_ylim()
    assert 0.1 < bottom < 0.5 and 3.0 < top < 10.0


def test_loss_axis_stays_linear_when_no_loss_is_positive() -> None:
    fig = curves_figure(_records([0.0], [float("nan")]))
    assert _axis(fig, "loss").get_yscale() == "linear"


def test_confusion_plot_has_a_count_panel_and_a_row_normalised_panel_each_with_a_colour_bar() -> None:
    # Class b has no true examples: its recall row is empty (masked), not NaN text or a RuntimeWarning.
    cm = np.array([[3, 1, 0], [0, 0, 0], [2, 2, 4]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = confusion_figure(cm, ["a", "b", "c"])
        fig.canvas.draw()
    counts_ax, recall_ax = _axis(fig, "counts"), _axis(fig, "rows normalised (recall)")
    assert len(fig.axes) == 4  # two panels and their two colour bars
    for ax in (counts_ax, recall_ax):
        (image,) = ax.get_images()
        assert image.colorbar is not None and image.colorbar.ax in fig.axes
    np.testing.assert_array_equal(counts_ax.get_images()[0].get_array(), cm)
    recall = recall_ax.get_images()[0].get_array()
    # By hand: row a is 3/4, 1/4, 0; row c is 2/8, 2/8, 4/8.
    np.testing.assert_allclose(recall[[0, 2]].filled(-1), [[0.75, 0.25, 0.0], [0.25, 0.25, 0.5]])
    assert recall.mask[1].all() and not recall.mask[[0, 2]].any()
    assert recall_ax.get_images()[0].get_clim() == (0.0, 1.0)
    texts = sorted(t.get_text() for t in recall_ax.texts)
    assert texts == sorted(["0.75", "0.25", "0.25", "0.25", "0.50"])
    assert sorted(t.get_text() for t in counts_ax.texts) == sorted(["3", "1", "2", "2", "4"])


def test_confusion_matrix_not_matching_the_class_names_is_refused() -> None:
    with pytest.raises(ValueError, match="one row per class"):
        confusion_figure(np.zeros((3, 3), int), ["a", "b"])


def test_run_logger_writes_both_pngs_from_metrics_jsonl(tmp_path: Path) -> None:
    logger = RunLogger(tmp_path, tensorboard=False)
    names = [f"class{i}" for i in range(6)]
    rng = np.random.default_rng(0)
    cm = rng.integers(0, 30, size=(6, 6)) + np.diag([200, 5, 90, 3, 40, 0])
    cm[5] = 0  # a class absent from the validation split
    for record in _records(TRAIN_LOSSES, VAL_LOSSES):
        if record["kind"] == "val":
            record = {**record, "confusion_matrix": cm.tolist()}
        logger.log(record)
    logger.plot(names, force=True)
    logger.close()
    for name in (CURVES_PNG, CONFUSION_PNG):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp*"))  # the atomic write left no temp file


def test_run_logger_redraws_at_most_every_interval_and_always_when_forced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    monkeypatch.setattr(logging_utils.time, "monotonic", clock)
    logger = RunLogger(tmp_path, tensorboard=False)
    for record in _records(TRAIN_LOSSES, VAL_LOSSES):
        logger.log(record if record["kind"] != "val" else {**record, "confusion_matrix": [[1, 0], [0, 1]]})
    curves = tmp_path / CURVES_PNG
    logger.plot(["a", "b"])  # right after the start: skipped
    assert not curves.exists()
    clock.now += PLOT_MIN_INTERVAL_S
    logger.plot(["a", "b"])
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves.write_bytes(b"stale")
    logger.plot(["a", "b"])  # within the interval again: skipped
    assert curves.read_bytes() == b"stale"
    logger.plot(["a", "b"], force=True)  # the last epoch
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class FakeClock:
    """A clock the test advances by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _eta_seconds(line: str) -> int:
    minutes, seconds = re.search(r"ETA (\d+):(\d\d)$", line).groups()
    return 60 * int(minutes) + int(seconds)


def test_eta_excludes_the_first_step_which_pays_for_compilation() -> None:
    clock, stream = FakeClock(), io.StringIO()
    progress = Progress(100, 1, steps_per_epoch=10, stream=stream, clock=clock)
    clock.now += 60.0  # step 1: compilation plus one step
    progress.update(1, 2.0, 10.0)
    for step in range(2, 11):
        clock.now += 0.5  # steady state
        progress.update(step, 2.0, 10.0)
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith("ETA ?")  # one step says nothing about the steady-state rate
    # After step 10: 9 steps in 4.5 s since step 1 ended, 90 steps left at 0.5 s each = 45 s.
    # Counting the compile (64.5 s for 10 steps) would have said 580 s.
    assert _eta_seconds(lines[9]) == 45
    assert _eta_seconds(lines[1]) == 49  # after step 2: 0.5 s per step, 98 steps left


def test_eta_clock_restarts_at_the_first_step_of_a_resumed_run_and_on_request() -> None:
    clock, stream = FakeClock(), io.StringIO()
    progress = Progress(200, 1, steps_per_epoch=10, stream=stream, clock=clock)
    clock.now += 30.0
    progress.update(151, 1.0, 10.0)  # resumed at step 150: step 151 compiles
    clock.now += 2.0
    progress.update(152, 1.0, 10.0)
    assert _eta_seconds(stream.getvalue().splitlines()[-1]) == 2 * 48
    clock.now += 20.0  # e.g. the first validation compiles; the caller restarts the clock after it
    progress.start_clock(152)
    clock.now += 1.0
    progress.update(153, 1.0, 10.0)
    assert _eta_seconds(stream.getvalue().splitlines()[-1]) == 47


def test_progress_epoch_is_one_based_like_the_validation_lines() -> None:
    stream = io.StringIO()
    progress = Progress(25, 1, steps_per_epoch=10, stream=stream, clock=FakeClock())
    for step in range(1, 26):
        progress.update(step, 1.0, 10.0)
    epochs = [int(m) for m in re.findall(r"^step \d+/25 epoch (\d+) ", stream.getvalue(), re.MULTILINE)]
    # Steps 1..10 are epoch 1 and step 10 ends it (the validation line of epoch 1 follows step 10).
    assert epochs == [1] * 10 + [2] * 10 + [3] * 5
    assert [epoch_of(s, 10) for s in (1, 10, 11, 20, 21)] == [1, 1, 2, 2, 3]


def test_progress_line_keeps_the_format_bench_e2e_parses() -> None:
    stream = io.StringIO()
    progress = Progress(20, 10, steps_per_epoch=4, stream=stream, clock=FakeClock())
    for step in range(1, 21):
        progress.update(step, 0.25, 123.4)
    assert stream.getvalue().splitlines()[0].startswith("step 10/20 epoch 3 loss 0.2500 123.4 img/s ETA ")
    assert len(stream.getvalue().splitlines()) == 2


def test_progress_refuses_a_non_positive_steps_per_epoch() -> None:
    with pytest.raises(ValueError, match="steps_per_epoch"):
        Progress(10, 1, steps_per_epoch=0)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR width, height


def test_a_class_name_of_any_length_draws_a_confusion_plot_of_the_same_size(tmp_path: Path) -> None:
    cm = np.arange(9).reshape(3, 3)
    logging_utils.plot_confusion(cm, ["a", "b", "c"], tmp_path / "short.png")
    logging_utils.plot_confusion(cm, ["a", "x" * 15_000, "c"], tmp_path / "long.png")
    (w_short, h_short), (w_long, h_long) = _png_size(tmp_path / "short.png"), _png_size(tmp_path / "long.png")
    # The long name is cut to a tick label of bounded length: the canvas grows by that label at most.
    assert w_long <= 1.5 * w_short and h_long <= 1.5 * h_short, ((w_short, h_short), (w_long, h_long))


def test_a_plot_that_fails_is_reported_in_one_line_and_the_run_goes_on(tmp_path: Path, monkeypatch, capsys) -> None:
    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(logging_utils, "plot_confusion", out_of_memory)
    logger = RunLogger(tmp_path, tensorboard=False)
    for record in _records(TRAIN_LOSSES, VAL_LOSSES):
        logger.log({**record, "confusion_matrix": np.eye(3, dtype=int).tolist()} if record["kind"] == "val" else record)
    logger.plot(["a", "b", "c"], force=True)  # no exception: a plot never stops training
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "plots not redrawn" in err and "MemoryError" in err, err
    assert (tmp_path / CURVES_PNG).is_file() and not list(tmp_path.glob(".*.tmp*"))
