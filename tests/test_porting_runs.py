"""Weights where the trainers leave them (issue 13): a few demo steps, then `port-weights flax2torch runs/<run> x.pt`
with no other flags gives a .pt on which torch_ref reproduces the run's logits; every spelling of a run is read the
same way by port-weights, load_flax_variables, --init-from and train.predict; a path that names no weights gets the
same message from all four; contradicting flags and class names are refused with nothing written.

The references are the run format's own readers (porting.runs) with the trainer's model and normalisation (train.state),
not porting's locator and converters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

import porting
import torch_ref
from porting import runs as ckpt
from porting.cli import main as port_weights
from tests.train_helpers import SIZE, TINY, run_module, tiny_cli_args
from train.data import MASK_CLASS_NAMES, load_splits
from train.data.decode import decode_image
from train.options import IMAGENET_MEAN, IMAGENET_STD, ConfigError, TrainConfig, load_init_weights
from train.predict import Predictor
from train.predict import main as predict_main
from train.state import create_model, create_train_state, make_optimizer, make_schedule, normalize, state_tree

pytestmark = pytest.mark.slow  # each module trains a tiny demo run first (about a minute on 2 cores)

CLASSES = len(MASK_CLASS_NAMES)
REL_TOL = 1e-5  # fp32 torch vs Flax on the same weights (docs/porting.md, "Tolerances")


@pytest.fixture
def run(tiny_run):
    """A few demo steps of train.flax with the tiny network, as a user would run them (conftest's shared run)."""
    return tiny_run


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Four demo validation images as the trainer's evaluation decodes them (uint8, SIZE x SIZE)."""
    return np.stack([decode_image(p, SIZE) for p in load_splits("demo").val.paths[:4]])


def _run_logits(run, images: np.ndarray, step: int | None = None) -> np.ndarray:
    """The run's eval logits, computed by the trainer's own restore, model and normalisation."""
    directory = run / ckpt.CHECKPOINT_DIR
    step = ckpt.checkpoint_steps(directory)[1] if step is None else step
    model = create_model(TINY, CLASSES, "fp32")
    return np.asarray(model.apply(ckpt.restore_variables(directory, step)[0], normalize(images)))


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def test_flax2torch_of_a_run_folder_with_no_flags_reproduces_the_runs_logits(run, images, tmp_path, capsys):
    pt = tmp_path / "x.pt"
    assert port_weights(["flax2torch", str(run), str(pt)]) == 0
    assert "leaky_slope: 0.1" in capsys.readouterr().out
    record = json.loads((tmp_path / "x.pt.meta.json").read_text())["preprocessing"]
    assert record["leaky_slope"] == 0.1 and record["class_names"] == list(MASK_CLASS_NAMES)
    assert (record["image_size"], record["mean"], record["std"]) == (SIZE, list(IMAGENET_MEAN), list(IMAGENET_STD))
    # A PyTorch user: torch_ref with what the file records, the input made by the record.
    pretrained = porting.torch_from_pretrained(pt)
    x = torch.from_numpy(pretrained.preprocessing.normalize(images).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        got = pretrained.model(x).numpy()
    want = _run_logits(run, images)
    assert _rel(got, want) <= REL_TOL
    # The slope the README's example used to pass (0.01) changes the function: the comparison above can fail.
    wrong = torch_ref.Darknet53(CLASSES, leaky_slope=0.01, config=TINY).eval()
    wrong.load_state_dict(pretrained.model.state_dict())
    with torch.no_grad():
        assert _rel(wrong(x).numpy(), want) > 100 * REL_TOL


def test_every_spelling_of_a_run_is_read_the_same_way_by_every_reader(run, tmp_path):
    directory = run / ckpt.CHECKPOINT_DIR
    latest, best = ckpt.checkpoint_steps(directory)
    want = ckpt.restore_variables(directory, best)[0]
    spellings = [run, directory, directory / str(best), run / "best", run / "latest", directory / "latest"]
    for i, where in enumerate(spellings):
        step = latest if where.name == "latest" else best
        result = porting.load_flax_variables(where)
        assert (result.location.step, result.source_format, result.config) == (step, "train_flax", TINY), where
        for got, ref in zip(jax.tree.leaves(result.variables), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(got, ref)
        assert result.preprocessing.class_names == tuple(MASK_CLASS_NAMES)
        assert port_weights(["flax2torch", str(where), str(tmp_path / f"{i}.safetensors")]) == 0, where
        assert Predictor.from_checkpoint(where).class_names == list(MASK_CLASS_NAMES)
        config = TrainConfig(data="demo", workdir="unused", arch="tiny", init_from=str(where))
        loaded = load_init_weights(config, TINY, CLASSES)
        variables, slope = loaded.variables, loaded.leaky_slope
        assert slope == 0.1 and variables["params"]["fc"]["kernel"].shape == (TINY.width, CLASSES)


def test_a_path_naming_no_weights_gets_the_same_message_from_every_reader(tmp_path, capsys):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("no weights here")
    for where in (junk, tmp_path / "missing", junk / "best", tmp_path / ("a" * 300)):  # the last: over NAME_MAX
        before = sorted(os.listdir(tmp_path))
        with pytest.raises(porting.PortingError) as info:
            porting.load_flax_variables(where)
        message = str(info.value)
        assert message.endswith(f"expected {porting.ACCEPTED}")
        assert port_weights(["flax2torch", str(where), str(tmp_path / "x.pt")]) == 2
        assert message in capsys.readouterr().err
        with pytest.raises(ConfigError) as init_error:
            load_init_weights(TrainConfig(data="demo", workdir="unused", init_from=str(where)), TINY, CLASSES)
        assert message in str(init_error.value)
        assert predict_main(["--checkpoint", str(where), "--data", str(junk), "--out", str(tmp_path / "p.csv")]) == 2
        assert message in capsys.readouterr().err
        assert sorted(os.listdir(tmp_path)) == before
    long = str(tmp_path / ("b" * 300))  # --data over NAME_MAX: one line, exit 2
    assert predict_main(["--checkpoint", str(junk), "--data", long, "--out", str(tmp_path / "p.csv")]) == 2
    assert "File name too long" in capsys.readouterr().err


def test_the_porting_layer_alone_reads_a_run_with_the_trainers_packages_unimportable(run, tmp_path):
    """The run format is porting's: a user with only the porting extra (no train, optax or grain) reads a run."""
    code = (
        "import sys\n"
        "for name in ('train', 'optax', 'grain'):\n"
        "    sys.modules[name] = None  # `import name` now raises ImportError\n"
        "import numpy as np, porting\n"
        f"result = porting.load_flax_variables({str(run)!r})\n"
        f"np.save({str(tmp_path / 'bias.npy')!r}, result.variables['params']['fc']['bias'])\n"
        "print(result.location.step, result.preprocessing.image_size, sorted(m for m in sys.modules if m.split('.')[0] "
        "in ('train', 'optax', 'grain') and sys.modules[m] is not None))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    directory = run / ckpt.CHECKPOINT_DIR
    best = ckpt.checkpoint_steps(directory)[1]
    assert proc.stdout.split() == [str(best), str(SIZE), "[]"]
    want = ckpt.restore_variables(directory, best)[0]["params"]["fc"]["bias"]
    np.testing.assert_array_equal(np.load(tmp_path / "bias.npy"), want)


def test_best_and_latest_are_the_steps_the_run_format_ranks(run, tmp_path):
    """Two steps written by the trainer's own Checkpointer: step 1 the best by macro F1, step 2 the latest."""
    _, meta = ckpt.read_meta(run / ckpt.CHECKPOINT_DIR)
    config = TrainConfig(data="demo", workdir=str(tmp_path), arch="tiny")
    state = create_train_state(jax.random.PRNGKey(0), create_model(TINY, CLASSES, "fp32"), SIZE,
                               make_optimizer(config, make_schedule(config, 1, 1)))  # fmt: skip
    saver = ckpt.Checkpointer(tmp_path, keep=2, async_save=False)
    for step, f1 in ((1, 0.9), (2, 0.1)):
        params = jax.tree.map(lambda p, s=step: p + s, state.params)
        saved = state.replace(step=jax.numpy.int32(step), params=params)
        saver.save(step, state_tree(saved), ckpt.RunMeta.from_json(meta), val={"macro_f1": f1})
    saver.close()
    directory = tmp_path / ckpt.CHECKPOINT_DIR
    for where, step in ((tmp_path, 1), (directory, 1), (tmp_path / "best", 1), (tmp_path / "latest", 2)):
        result = porting.load_flax_variables(where)
        assert result.location.step == step, where
        want = ckpt.restore_variables(directory, step)[0]
        np.testing.assert_array_equal(result.variables["params"]["fc"]["bias"], want["params"]["fc"]["bias"])


def test_a_run_stopped_before_its_first_evaluation_is_read_at_its_newest_step_with_a_note(run, tmp_path, capsys):
    """No checkpoint has a validation score yet (SIGTERM before the first evaluation): best falls back to latest."""
    _, meta = ckpt.read_meta(run / ckpt.CHECKPOINT_DIR)
    config = TrainConfig(data="demo", workdir=str(tmp_path), arch="tiny")
    state = create_train_state(jax.random.PRNGKey(0), create_model(TINY, CLASSES, "fp32"), SIZE,
                               make_optimizer(config, make_schedule(config, 1, 1)))  # fmt: skip
    saver = ckpt.Checkpointer(tmp_path, keep=2, async_save=False)
    saver.save(3, state_tree(state.replace(step=jax.numpy.int32(3))), ckpt.RunMeta.from_json(meta))  # not scored
    saver.close()
    assert ckpt.checkpoint_steps(tmp_path / ckpt.CHECKPOINT_DIR) == (3, 3)
    for where in (tmp_path, tmp_path / "best"):
        result = porting.load_flax_variables(where)
        assert result.location.step == 3, where
        assert any("no checkpoint has a validation score yet" in note for note in result.notes), result.notes
    assert port_weights(["flax2torch", str(tmp_path), str(tmp_path / "x.pt")]) == 0
    assert "no checkpoint has a validation score yet" in capsys.readouterr().out
    assert Predictor.from_checkpoint(tmp_path).class_names == list(MASK_CLASS_NAMES)


def test_contradicting_flags_and_wrong_class_names_are_refused_with_nothing_written(run, tmp_path, capsys):
    names = tmp_path / "names.txt"

    def refused(*flags: str, dst: str = "x.pt") -> str:
        before = sorted(os.listdir(tmp_path))
        direction = "flax2darknet" if dst.endswith(".weights") else "flax2torch"
        assert port_weights([direction, str(run), str(tmp_path / dst), *flags]) == 2
        assert sorted(os.listdir(tmp_path)) == before
        return capsys.readouterr().err

    err = refused("--leaky-slope", "0.01")
    assert "contradicts what the weights record" in err and "leaky_slope: 0.1 (" in err
    assert "vs 0.01 (leaky_slope (--leaky-slope))" in err
    assert "mean: [0.485, 0.456, 0.406]" in refused("--preprocessing", '{"mean": [0, 0, 0]}')
    names.write_text("\n".join(MASK_CLASS_NAMES[:-1]))
    assert f"{CLASSES - 1} class names for a {CLASSES}-class head" in refused("--class-names", str(names))
    names.write_text("\n".join(reversed(MASK_CLASS_NAMES)))
    assert "class_names: [18 names: 'wear_male_<30'" in refused("--class-names", str(names))
    assert "records a tiny network, not the darknet53 asked for" in refused("--arch", "darknet53")
    # A Darknet file would be read back as RGB in [0, 1]: these ImageNet-normalised weights are refused.
    err = refused(dst="x.weights")
    assert "a Darknet .weights file records no preprocessing" in err and "std: [0.229, 0.224, 0.225]" in err
    # With a new head the run's names no longer apply; names for the new head are recorded.
    names.write_text("a\nb\nc\n")
    assert port_weights(["flax2torch", str(run), str(tmp_path / "y.pt"), "--num-classes", "3", "--reset-head",
                         "--class-names", str(names)]) == 0  # fmt: skip
    assert "belonged to the replaced head: dropped" in capsys.readouterr().out
    assert json.loads((tmp_path / "y.pt.meta.json").read_text())["preprocessing"]["class_names"] == ["a", "b", "c"]


def test_a_train_torch_run_is_read_with_its_record(tmp_path, images):
    workdir = tmp_path / "torch_run"
    proc = run_module("train.torch", tiny_cli_args(workdir, "--steps", "2", "--batch-size", "8"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    payload = torch.load(workdir / "torch_checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    msgpack = tmp_path / "from_torch.msgpack"
    assert port_weights(["torch2flax", str(workdir), str(msgpack)]) == 0
    result = porting.load_flax_variables(msgpack)
    saved = porting.Preprocessing.from_json(payload["preprocessing"], "payload")[0]
    assert result.preprocessing == saved  # the trainers now record the crop (whole image, squashed) themselves
    model = torch_ref.Darknet53(CLASSES, config=TINY).eval()
    model.load_state_dict(payload["model"])
    with torch.no_grad():
        want = model(torch.from_numpy(np.asarray(normalize(images)).transpose(0, 3, 1, 2).copy())).numpy()
    flax_model = create_model(result.config, CLASSES, "fp32")
    assert _rel(np.asarray(flax_model.apply(result.variables, normalize(images))), want) <= REL_TOL
