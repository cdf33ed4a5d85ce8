"""Hostile and careless input to the trainers and train.predict: refused with exit 2 and a message naming the
input, nothing deleted or half-written, no code from a file run (issue 12's rows, one test each)."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from porting.runs import CHECKPOINT_DIR, TMP_MARKER, UNREADABLE_SUFFIX, read_meta
from tests.train_helpers import TINY_RUN_FLAGS, run_module, tiny_cli_args
from train import flax as train_flax
from train import predict as predict_cli
from train import run
from train.logging_utils import METRICS_FILE, read_metrics

RUN = TINY_RUN_FLAGS  # conftest's tiny_run was trained with these: a resume must repeat them


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its content (None for folders): compared before and after."""
    return {
        str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def finished(tiny_run) -> Path:
    """A tiny 2-step run with a checkpoint at each step (conftest's, shared: read it, never change it)."""
    return tiny_run


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished, copy, ignore=shutil.ignore_patterns(run.WorkdirLock.FILE))
    return copy


def image_folder(root: Path, classes: int = 2, per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


def test_overwrite_with_a_mistyped_data_path_deletes_nothing(run_copy, capsys):
    before = tree(run_copy)
    code = train_flax.main(["--data", str(run_copy.parent / "no-such-data"), "--workdir", str(run_copy), "--overwrite"])
    assert code == 2 and "no-such-data" in capsys.readouterr().err
    assert tree(run_copy) == before


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    data = image_folder(tmp_path / "data")
    (data / "notes.txt").write_text("mine")
    before = tree(data)
    code = train_flax.main(["--data", str(data), "--arch", "tiny", "--workdir", str(data), "--overwrite"])
    assert code == 2 and "is not a training run folder" in capsys.readouterr().err
    assert tree(data) == before


def test_overwrite_refuses_a_run_folder_holding_the_data(run_copy, capsys):
    data = image_folder(run_copy / "data")
    before = tree(run_copy)
    code = train_flax.main(["--data", str(data), "--arch", "tiny", "--workdir", str(run_copy), "--overwrite"])
    assert code == 2 and "would delete --data" in capsys.readouterr().err
    assert tree(run_copy) == before


def test_a_second_run_on_a_workdir_in_use_is_refused_naming_the_holder(run_copy, capsys):
    lock = run.WorkdirLock(run_copy)
    lock.acquire()
    try:
        before = tree(run_copy)
        assert train_flax.main(tiny_cli_args(run_copy, *RUN, "--resume")) == 2
        err = capsys.readouterr().err
        assert f"in use by another run (pid {os.getpid()})" in err
        assert tree(run_copy) == before
    finally:
        lock.release()


@pytest.mark.parametrize("spelling", ["./{rel}", "{rel}/", "{abs}"])
def test_resume_accepts_any_spelling_of_the_same_workdir(run_copy, monkeypatch, capsys, spelling):
    monkeypatch.chdir(run_copy.parent)
    workdir = spelling.format(rel=run_copy.name, abs=run_copy)
    args = ["--data", "demo", "--arch", "tiny", "--workdir", workdir, "--compile-cache", "none", *RUN, "--resume"]
    assert train_flax.main(args) == 0, capsys.readouterr().err


def test_resuming_a_finished_run_keeps_its_final_evaluation(run_copy):
    summary = json.loads((run_copy / run.SUMMARY_FILE).read_text())
    assert train_flax.main(tiny_cli_args(run_copy, *RUN, "--resume")) == 0
    again = json.loads((run_copy / run.SUMMARY_FILE).read_text())
    assert again["final_val"] == summary["final_val"] and again["final_val"] is not None


@pytest.mark.slow
def test_a_fine_tuning_run_resumes_with_its_own_command(finished, tmp_path, capsys):
    # The first run resolves --leaky-slope and --input-norm from the --init-from weights' record; the same command
    # with --resume must resolve them alike, not compare the unset flags with the saved values.
    args = tiny_cli_args(tmp_path / "ft", *RUN, "--init-from", str(finished))
    assert train_flax.main(args) == 0, capsys.readouterr().err
    assert train_flax.main([*args, "--resume"]) == 0, capsys.readouterr().err
    saved = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert (saved["input_norm"], saved["leaky_slope"]) == ("imagenet", 0.1)


@pytest.mark.slow
def test_resume_falls_back_from_a_corrupt_latest_checkpoint(run_copy, capsys):
    latest = run_copy / CHECKPOINT_DIR / "2"
    for f in (latest / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\0" * 7)  # truncated, garbage
    assert train_flax.main(tiny_cli_args(run_copy, *RUN, "--resume")) == 0
    err = capsys.readouterr().err
    assert "skips checkpoint step 2" in err
    assert (run_copy / CHECKPOINT_DIR / f"2{UNREADABLE_SUFFIX}").is_dir()  # kept for inspection, not deleted
    assert read_meta(run_copy / CHECKPOINT_DIR)[0] == 2  # step 2 trained again from step 1


def test_a_flipped_byte_in_a_checkpoint_is_an_error_naming_the_step_never_other_weights(run_copy, finished, capsys):
    import porting
    from porting.runs import restore_variables

    want = restore_variables(finished / CHECKPOINT_DIR, 2)[0]
    data = max((p for p in (run_copy / CHECKPOINT_DIR / "2" / "state").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)  # fmt: skip
    raw = bytearray(data.read_bytes())
    for offset in (len(raw) // 4, len(raw) // 2, 3 * len(raw) // 4):
        flipped = bytearray(raw)
        flipped[offset] ^= 0xFF
        data.write_bytes(bytes(flipped))
        try:
            got = porting.load_flax_variables(run_copy / CHECKPOINT_DIR / "2").variables
        except porting.PortingError as e:
            assert "checkpoint step 2" in str(e), e
            continue
        same = jax.tree.map(np.array_equal, got, want)  # a read that succeeds must give the saved weights
        assert all(jax.tree.leaves(same)), f"offset {offset}: other weights, read without an error"
    data.write_bytes(bytes(raw))


def test_resume_drops_metrics_after_the_checkpoint_and_a_half_written_line(run_copy):
    path = run_copy / METRICS_FILE
    records = read_metrics(run_copy)
    later = {"kind": "val", "step": 99, "accuracy": 0.5}
    path.write_text(path.read_text() + json.dumps(later) + "\n" + '{"kind": "train_ep')
    run.trim_metrics(run_copy, 2)
    assert read_metrics(run_copy) == records


def test_nan_leaky_slope_is_refused(tmp_path, capsys):
    assert train_flax.main(tiny_cli_args(tmp_path / "w", "--leaky-slope", "nan")) == 2
    assert "--leaky-slope must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


class _Payload:
    """Unpickling this runs a shell command (what a hostile checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_train_torch_resume_never_runs_code_from_a_checkpoint(tmp_path):
    workdir, marker = tmp_path / "w", tmp_path / "pwned"
    (workdir / "torch_checkpoints").mkdir(parents=True)
    (workdir / "config.json").write_text("{}")
    with open(workdir / "torch_checkpoints" / "latest.pt", "wb") as f:
        pickle.dump({"model": _Payload(marker)}, f)
    proc = run_module("train.torch", tiny_cli_args(workdir, *RUN, "--resume", "--threads", "1"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "is not a checkpoint this trainer wrote" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


@pytest.fixture
def images(tmp_path) -> Path:
    return image_folder(tmp_path / "images", classes=1, per_class=3)


def test_predict_to_a_folder_is_refused_even_with_force(finished, images, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert predict_cli.main(["--checkpoint", str(finished), "--data", str(images), "--out", str(out), "--force"]) == 2
    assert "is a folder" in capsys.readouterr().err and not list(out.iterdir())


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_predict_write_failure_exits_2_and_leaves_no_temporary(finished, images, tmp_path, monkeypatch, capsys, err):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    real_write = Path.write_text

    def failing(self, *a, **k):
        if self.parent == out_dir:
            real_write(self, "partial")  # the disk filled up half way
            raise OSError(err, os.strerror(err))
        return real_write(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", failing)
    code = predict_cli.main(["--checkpoint", str(finished), "--data", str(images), "--out", str(out_dir / "p.csv")])
    assert code == 2 and os.strerror(err) in capsys.readouterr().err
    assert not list(out_dir.iterdir())


@pytest.mark.parametrize("damage", ["no meta", "meta not JSON", "meta of something else", "truncated state"])
def test_predict_on_a_damaged_checkpoint_exits_2_naming_it(run_copy, images, tmp_path, capsys, damage):
    step = run_copy / CHECKPOINT_DIR / "2"
    meta_files = [f for f in (step / "meta").rglob("*") if f.is_file()]
    if damage == "no meta":
        shutil.rmtree(step / "meta")
    elif damage == "meta not JSON":
        for f in meta_files:
            f.write_text("{not json")
    elif damage == "meta of something else":
        for f in meta_files:
            f.write_text(json.dumps({"hello": 1}))
    else:
        for f in (step / "state").rglob("*"):
            if f.is_file():
                f.write_bytes(f.read_bytes()[:5])
    args = ["--checkpoint", str(step), "--data", str(images), "--out", str(tmp_path / "p.csv")]
    assert predict_cli.main(args) == 2
    err = capsys.readouterr().err
    assert str(step) in err and "Traceback" not in err  # the message names the damaged step folder
    assert not (tmp_path / "p.csv").exists()


def test_resume_accepts_a_moved_copy_of_the_data_and_refuses_other_data(tmp_path, capsys):
    data, workdir = image_folder(tmp_path / "data", per_class=8), tmp_path / "w"
    args = ["--arch", "tiny", "--workdir", str(workdir), "--compile-cache", "none", *RUN, "--val-fraction", "0.25"]
    assert train_flax.main(["--data", str(data), *args]) == 0
    moved = tmp_path / "elsewhere" / "data"
    shutil.copytree(data, moved)
    assert train_flax.main(["--data", f"{moved}/", *args, "--resume"]) == 0, capsys.readouterr().err
    (moved / "class1" / "0.png").rename(moved / "class0" / "extra.png")  # a relabelled image: other data
    assert train_flax.main(["--data", str(moved), *args, "--resume"]) == 2
    assert "other images or labels" in capsys.readouterr().err


@pytest.fixture
def small_disk(tmp_path):
    """A 400 KiB tmpfs (when this process may mount one): room for the run files, not for a checkpoint."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_exits_4_and_leaves_no_temporary(small_disk):
    workdir = small_disk / "run"
    proc = run_module("train.flax", tiny_cli_args(workdir, *RUN))
    assert proc.returncode == 4, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "saving checkpoint step 1" in proc.stderr and "then continue with --resume" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not [p for p in workdir.rglob("*") if TMP_MARKER in p.name or ".tmp" in p.name]


@pytest.mark.slow
def test_a_file_name_that_is_not_utf8_trains_and_a_failed_start_never_blocks_its_rerun(tmp_path, capsys):
    from data_helpers import make_folder_dataset

    data = make_folder_dataset(tmp_path / "data", {"a": 6, "b": 6})
    shutil.copy(data / "a" / "000.jpg", os.fsencode(data / "a") + b"/caf\xe9.jpg")  # Latin-1 bytes: not UTF-8
    workdir = tmp_path / "w"
    (workdir / CHECKPOINT_DIR).mkdir(parents=True)  # what a start that failed after taking the workdir left
    (workdir / run.WorkdirLock.FILE).touch()
    args = ["--data", str(data), "--arch", "tiny", "--workdir", str(workdir), "--steps", "1", "--batch-size", "4",
            "--image-size", "32", "--compile-cache", "none", "--num-workers", "0"]  # fmt: skip
    assert train_flax.main(args) == 0, capsys.readouterr().err
    assert read_meta(workdir / CHECKPOINT_DIR)[0] == 1
