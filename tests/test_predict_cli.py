"""python -m train.predict: the submission keeps info.csv's rows and columns; image folders get class CSVs."""

from __future__ import annotations

import csv
import shutil

import jax
import numpy as np
import pytest

from porting.runs import Checkpointer, RunMeta
from tests.train_helpers import SIZE, TINY
from train.data import MASK_CLASS_NAMES, load_splits
from train.options import TrainConfig
from train.predict import Predictor, main
from train.state import create_model, create_train_state, make_optimizer, make_schedule, state_tree


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny (untrained) network saved the way train.loop saves it."""
    workdir = tmp_path_factory.mktemp("run")
    config = TrainConfig(data="demo", workdir=str(workdir), arch="tiny", image_size=SIZE, batch_size=8)
    tx = make_optimizer(config, make_schedule(config, 1, 1))
    state = create_train_state(jax.random.PRNGKey(0), create_model(TINY, 18, "fp32"), SIZE, tx)
    meta = RunMeta(config=config.to_json(), class_names=list(MASK_CLASS_NAMES), data_fingerprint="", preprocessing={},
                   model_config=TINY.to_dict(), data_state=None, loop={}, val=None)  # fmt: skip
    c = Checkpointer(workdir, keep=1)
    c.save(7, state_tree(state), meta, val={"macro_f1": 0.5})
    c.close()
    return workdir


@pytest.fixture(scope="module")
def eval_folder(tmp_path_factory):
    """A mask-layout eval/ folder: 9 demo images under hashed names, info.csv in a shuffled order."""
    root = tmp_path_factory.mktemp("eval")
    (root / "images").mkdir()
    paths = load_splits("demo").val.paths[:9]
    ids = [f"{i * 7919 % 1000:04d}abc.jpg" for i in range(len(paths))]
    for src, image_id in zip(paths, ids, strict=True):
        shutil.copy(src, root / "images" / image_id)
    order = np.random.default_rng(0).permutation(len(ids))
    with open(root / "info.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageID", "ans", "note"])
        for i in order:
            w.writerow([ids[i], 0, f"n{i}"])
    return root


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_writes_a_well_formed_submission_in_row_order(checkpoint, eval_folder, tmp_path):
    before = (eval_folder / "info.csv").read_bytes()
    out = tmp_path / "submission.csv"
    assert main(["--checkpoint", str(checkpoint), "--data", str(eval_folder), "--out", str(out)]) == 0
    assert (eval_folder / "info.csv").read_bytes() == before  # the input is never touched
    rows, original = _rows(out), _rows(eval_folder / "info.csv")
    assert [r["ImageID"] for r in rows] == [r["ImageID"] for r in original]
    assert [r["note"] for r in rows] == [r["note"] for r in original]
    assert all(0 <= int(r["ans"]) < 18 for r in rows)
    # Each row's answer is the prediction for that row's image (predicted one by one here).
    predictor = Predictor.from_checkpoint(checkpoint)
    from train.data import NO_LABEL, Records

    for r in rows:
        rec = Records((str(eval_folder / "images" / r["ImageID"]),), np.array([NO_LABEL]), ("x",))
        assert int(r["ans"]) == int(predictor.probabilities(rec).argmax())


def test_predict_refuses_to_overwrite_input_or_existing_output(checkpoint, eval_folder, tmp_path, capsys):
    info = eval_folder / "info.csv"
    assert main(["--checkpoint", str(checkpoint), "--data", str(eval_folder), "--out", str(info)]) == 2
    assert "is the input" in capsys.readouterr().err
    existing = tmp_path / "s.csv"
    existing.write_text("keep")
    assert main(["--checkpoint", str(checkpoint), "--data", str(eval_folder), "--out", str(existing)]) == 2
    assert existing.read_text() == "keep"
    assert main(["--checkpoint", str(tmp_path), "--data", str(eval_folder), "--out", str(tmp_path / "x.csv")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_predict_on_an_image_folder_writes_path_class_probability(checkpoint, eval_folder, tmp_path):
    out = tmp_path / "pred.csv"
    assert main(["--checkpoint", str(checkpoint), "--data", str(eval_folder / "images"), "--out", str(out)]) == 0
    rows = _rows(out)
    assert len(rows) == 9 and list(rows[0]) == ["path", "class", "probability"]
    assert all(r["class"] in MASK_CLASS_NAMES and 1 / 18 <= float(r["probability"]) <= 1 for r in rows)
