"""darknet53-export on a weights file: both artefacts reproduce the Flax model in processes holding none of our
code, the sidecar round-trips, the bf16 variant reports its error, and bad input is exit 2 with nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from flax import traverse_util
from porting_helpers import (
    darknet_forward,
    darknet_layers,
    randomize_torch_state,
    torch_key_to_flax,
    write_weights_file,
)

import porting.export as export_mod
from darknet_arch import TINY
from porting import write_flax_file, write_torch_file
from porting.export import TARGETS, weights_sha256
from porting.export_cli import main
from porting.serve_predict import Artefact, ServingError, check_batch
from torch_ref import Darknet53 as TorchDarknet
from train.options import DEFAULT_IMAGE_SIZE

SIZE = 32
NUM_CLASSES = 5
CLASS_NAMES = ["mask, worn", "no mask", "incorrect", "ünïcode", "5"]  # commas, non-ASCII, digits must survive
AT_SIZE = json.dumps({"image_size": SIZE})  # --preprocessing: the file records no size
# Ours and the frameworks a serving process must not need (each script adds the other runtime).
OUR_PACKAGES = {"porting", "train", "flax_darknet", "torch_ref", "darknet_arch", "bench"}
FRAMEWORKS = {"torch", "flax", "optax", "orbax", "onnx"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # what the trainer normalises with
TOL = 1e-5  # of the reference's max |logit|, fp32

# Each script runs in `python -I` from an empty folder: it loads the artefact with its runtime alone, saves the
# outputs, and fails if anything of ours or another framework was imported.
JAX_SCRIPT = """
import sys
import numpy as np
import jax

program = jax.export.deserialize(bytearray(open(sys.argv[1], "rb").read()))
logits, probs = program.call(np.load(sys.argv[2]))
np.savez(sys.argv[3], logits=np.asarray(logits), probs=np.asarray(probs))
loaded = {name.split(".")[0] for name in sys.modules}
"""
ONNX_SCRIPT = """
import sys
import numpy as np
import onnxruntime

session = onnxruntime.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
logits, probs = session.run(["logits", "probabilities"], {"images": np.load(sys.argv[2])})
np.savez(sys.argv[3], logits=logits, probs=probs)
loaded = {name.split(".")[0] for name in sys.modules}
"""
CHECK_IMPORTS = """
forbidden = set({forbidden!r})
assert not loaded & forbidden, f"imported {{sorted(loaded & forbidden)}}"
assert {runtime!r} in loaded
"""


def run_isolated(target: str, artefact: Path, images: np.ndarray, workdir: Path) -> dict[str, np.ndarray]:
    """The artefact's outputs on `images` from a fresh `python -I` that imports only its runtime and numpy."""
    runtime = "onnxruntime" if target == "onnx" else "jax"
    other = "jax" if runtime == "onnxruntime" else "onnxruntime"
    body = (ONNX_SCRIPT if runtime == "onnxruntime" else JAX_SCRIPT) + CHECK_IMPORTS.format(
        forbidden=sorted(OUR_PACKAGES | FRAMEWORKS | {other}), runtime=runtime
    )
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "serve.py").write_text(textwrap.dedent(body))
    np.save(workdir / "images.npy", images)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-I", "serve.py", str(artefact), "images.npy", "out.npz"], cwd=workdir,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(workdir / "out.npz") as out:
        return {"logits": out["logits"], "probs": out["probs"]}


def flax_reference(variables: dict, images: np.ndarray, config=TINY, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   precision: str = "fp32") -> np.ndarray:  # fmt: skip
    """The Flax model's fp32 logits, its input normalised in float64 numpy (not the exporter's code)."""
    import jax.numpy as jnp

    from flax_darknet import Darknet53

    n = np.asarray(variables["params"]["fc"]["kernel"]).shape[1]
    dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[precision]
    model = Darknet53(num_classes=n, config=config, dtype=dtype, param_dtype=jnp.float32)
    x = ((images.astype(np.float64) / 255.0 - np.asarray(mean)) / np.asarray(std)).astype(np.float32)
    return np.asarray(model.apply(variables, x))


def flax_tree_from_torch(state_dict: dict) -> dict:
    """Flax variables from a torch_ref state_dict by the naming contract (tests/porting_helpers), not porting."""
    tree: dict = {}
    for key, tensor in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        path, transpose = torch_key_to_flax(key)
        value = tensor.numpy()
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value.transpose(transpose) if transpose else value
    return tree


def assert_close(got: np.ndarray, want: np.ndarray, tol: float = TOL) -> None:
    scale = float(np.max(np.abs(want)))
    assert got.shape == want.shape and got.dtype == np.float32
    assert float(np.max(np.abs(got.astype(np.float64) - want))) <= tol * scale, (np.max(np.abs(got - want)), scale)


def uint8_images(n: int, seed: int, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def export_tiny(root: Path) -> dict:
    """A TINY torch_ref file (BN statistics far from their defaults), its Flax twin, and all three artefacts."""
    net = TorchDarknet(num_classes=NUM_CLASSES, config=TINY)
    randomize_torch_state(net, seed=3)
    pt = root / "tiny.pt"
    write_torch_file(pt, net.state_dict(), {"num_classes": NUM_CLASSES, "leaky_slope": TINY.leaky_slope})
    out = root / "out"
    names = root / "classes.txt"
    names.write_text("\n".join(CLASS_NAMES) + "\n", encoding="utf-8")
    argv = [str(pt), str(out), "--preprocessing", AT_SIZE, "--class-names", str(names)]  # the architecture: inferred
    assert main([*argv, "--targets", *TARGETS]) == 0
    return {"root": root, "pt": pt, "out": out, "argv": argv, "variables": flax_tree_from_torch(net.state_dict())}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict:
    return export_tiny(tmp_path_factory.mktemp("export"))


@pytest.mark.parametrize("target", [pytest.param("jax", marks=pytest.mark.slow), "onnx"])  # jax: ~40 s
def test_artefact_reproduces_flax_logits_in_a_process_with_only_its_runtime(source, target, tmp_path) -> None:
    artefact = source["out"] / TARGETS[target][0]
    for batch in (1, 7):
        images = uint8_images(batch, seed=batch)
        out = run_isolated(target, artefact, images, tmp_path / str(batch))
        assert_close(out["logits"], flax_reference(source["variables"], images))
        assert out["logits"].shape == (batch, NUM_CLASSES)
        e = np.exp(out["logits"] - out["logits"].max(-1, keepdims=True))
        np.testing.assert_allclose(out["probs"], e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)


def test_sidecar_round_trips_class_names_spec_and_provenance(source) -> None:
    for target, (name, runtime, precision) in TARGETS.items():
        meta = json.loads((source["out"] / f"{name}.json").read_text(encoding="utf-8"))
        assert meta["class_names"] == CLASS_NAMES and meta["target"] == target and meta["runtime"] == runtime
        assert meta["input"] == {"name": "images", "dtype": "uint8", "layout": "NHWC", "color": "RGB",
                                 "shape": [None, SIZE, SIZE, 3]}  # fmt: skip
        assert [o["shape"] for o in meta["outputs"]] == [[None, NUM_CLASSES]] * 2
        pre = meta["preprocessing"]
        assert (pre["mean"], pre["std"], pre["image_size"]) == (list(IMAGENET_MEAN), list(IMAGENET_STD), SIZE)
        assert pre["scale"] == 1 / 255 and pre["interpolation"] == "bilinear"
        assert meta["precision"] == precision and meta["check"]["ok"]
        assert meta["weights_sha256"] == weights_sha256(source["variables"])
        assert meta["written_by"]["jax"] and meta["written_by"]["darknet53-jax"]
        assert ("torch" in meta["written_by"]) == (runtime == "onnxruntime")
        assert meta.get("platforms", ["cpu", "cuda"]) == ["cpu", "cuda"]
        assert Artefact(source["out"] / name).class_names == CLASS_NAMES


def test_a_file_recording_no_size_exports_at_the_trainers_default_size(source, tmp_path) -> None:
    out = tmp_path / "default"
    assert main([str(source["pt"]), str(out), "--targets", "onnx"]) == 0
    meta = json.loads((out / f"{TARGETS['onnx'][0]}.json").read_text(encoding="utf-8"))
    assert meta["preprocessing"]["image_size"] == DEFAULT_IMAGE_SIZE == 256
    assert meta["input"]["shape"] == [None, DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE, 3] and meta["check"]["ok"]


def test_an_export_into_a_read_only_folder_is_refused_before_any_work(source, tmp_path, monkeypatch, capsys) -> None:
    from porting import atomic

    read_only = tmp_path / "mount"
    read_only.mkdir()
    real_access = os.access

    def access(path, mode) -> bool:  # a read-only mount, as root sees it: not writable
        return False if os.fspath(path) == str(read_only) else real_access(path, mode)

    monkeypatch.setattr(atomic.os, "access", access)

    def no_work(*args, **kwargs):
        raise AssertionError("the weights were read before the destination was checked")

    monkeypatch.setattr(export_mod, "read_weights", no_work)
    assert main([str(source["pt"]), str(read_only / "out"), "--preprocessing", AT_SIZE]) == 2
    assert "read-only" in capsys.readouterr().err and not (read_only / "out").exists()


def test_weights_checksum_is_the_same_from_any_format_and_changes_with_any_weight(source, tmp_path) -> None:
    msgpack = tmp_path / "same.msgpack"
    write_flax_file(msgpack, source["variables"], {"num_classes": NUM_CLASSES, "leaky_slope": TINY.leaky_slope})
    reread = export_mod.read_weights(msgpack)
    assert weights_sha256(reread.variables) == weights_sha256(source["variables"])
    flat = traverse_util.flatten_dict(source["variables"])
    for path in [("batch_stats", "conv1", "bn", "var"), ("params", "fc", "bias")]:
        leaf = flat[path].copy()
        leaf.flat[0] = np.nextafter(leaf.flat[0], np.float32(np.inf))  # one ulp of one number
        changed = traverse_util.unflatten_dict({**flat, path: leaf})
        assert weights_sha256(changed) != weights_sha256(source["variables"]), path


@pytest.mark.slow  # a fresh jax process compiling the program: ~35 s
def test_bf16_variant_reports_its_error_and_top1_agreement_against_fp32(source, tmp_path) -> None:
    meta = json.loads((source["out"] / "darknet53-bf16.jax.json").read_text())
    check = meta["check"]
    assert meta["precision"] == "bf16" and check["reference"] == "Flax model, fp32"
    # Recompute what it reports on the export's check images (seeded noise, batches of 1 then 3).
    images = export_mod.check_images(meta["preprocessing"], 3, None)
    got = run_isolated("jax-bf16", source["out"] / "darknet53-bf16.jax", images, tmp_path)["logits"]
    want = flax_reference(source["variables"], images)
    diff, scale = float(np.max(np.abs(got.astype(np.float64) - want))), float(np.max(np.abs(want)))
    # Two fp32 references (the export's and this float64-normalised one) agree to TOL of the max, no closer.
    assert check["max_abs_diff"] == pytest.approx(diff, abs=TOL * scale)
    assert check["max_abs_reference"] == pytest.approx(scale, abs=TOL * scale)
    assert check["top1_agreement"] == float(np.mean(got.argmax(-1) == want.argmax(-1)))
    assert check["batch_sizes"] == [1, 3]
    # It really computes in bf16 (8 mantissa bits): off by far more than fp32 rounding, yet close to fp32.
    assert 1e-4 < check["relative_diff"] < 0.1
    assert_close(got, flax_reference(source["variables"], images, precision="bf16"), tol=1e-2)


@pytest.mark.parametrize("target", ["jax", "onnx"])
def test_a_batch_of_another_dtype_layout_or_size_is_refused_naming_the_spec(source, target) -> None:
    model = Artefact(source["out"] / TARGETS[target][0])
    good = uint8_images(2, seed=0)
    assert model(good)[0].shape == (2, NUM_CLASSES)
    spec = f"uint8 NHWC RGB (N, {SIZE}, {SIZE}, 3)"
    bad = {
        "dtype float32": (good.astype(np.float32) / 255, "pass the raw 0..255 pixels"),
        "it looks NCHW": (good.transpose(0, 3, 1, 2), "transpose it"),
        "shape (2, 64, 64, 3)": (uint8_images(2, seed=0, size=64), f"resize the images to {SIZE}x{SIZE}"),
        "rank 3": (good[0], "x[None]"),
        "a list": (good.tolist(), "numpy array"),
    }
    for what, (batch, hint) in bad.items():
        with pytest.raises(ServingError) as info:
            model(batch)
        assert spec in str(info.value) and hint in str(info.value), (what, str(info.value))
    check_batch(good, model.spec)  # the same check passes the good batch


def test_cli_writes_what_it_reports_and_refuses_an_existing_output_without_force(source, capsys) -> None:
    out = source["out"]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main([*source["argv"], "--targets", "jax"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main([*source["argv"], "--targets", "jax", "--platforms", "cpu", "--force"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'darknet53.jax'}" in printed and "top-1 agreement 1.000" in printed
    assert json.loads((out / "darknet53.jax.json").read_text())["platforms"] == ["cpu"]
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # no temporaries left


def test_bad_input_exits_2_with_a_message_and_writes_nothing(source, tmp_path, capsys) -> None:
    headless = TorchDarknet(num_classes=None, config=TINY)
    write_torch_file(tmp_path / "headless.pt", headless.state_dict(), {"leaky_slope": TINY.leaky_slope})
    (tmp_path / "four.txt").write_text("a\nb\nc\nd\n")
    (tmp_path / "twice.txt").write_text("a\nb\nc\nd\na\n")
    pt, out = str(source["pt"]), str(tmp_path / "out")
    four, twice = str(tmp_path / "four.txt"), str(tmp_path / "twice.txt")
    cases = {
        "has no classifier head": [str(tmp_path / "headless.pt"), out, "--preprocessing", AT_SIZE],
        "image size 48 is not a multiple of 32": [pt, out, "--preprocessing", '{"image_size": 48}'],
        "4 class names for a 5-class head": [pt, out, "--preprocessing", AT_SIZE, "--class-names", four],
        "class names repeat": [pt, out, "--preprocessing", AT_SIZE, "--class-names", twice],
        "mean has 2 values for 3 input channels": [pt, out, "--preprocessing", '{"image_size": 32, "mean": [0, 0]}'],
        "std must be a non-empty list of positive numbers": [pt, out, "--preprocessing", '{"std": [1, 0, 1]}'],
        "contradicts what the weights record": [pt, out, "--preprocessing", AT_SIZE, "--leaky-slope", "0.2"],
        "not valid JSON": [pt, out, "--preprocessing", '{"image_size": '],
        "does not exist": [pt, str(tmp_path / "missing" / "out"), "--preprocessing", AT_SIZE],
    }
    for message, argv in cases.items():
        assert main(argv) == 2, message
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (message, err)
    for flag, value in (("--targets", "tflite"), ("--platforms", "tpu")):
        with pytest.raises(SystemExit) as info:
            main([pt, out, flag, value])
        assert info.value.code == 2 and f"invalid choice: '{value}'" in capsys.readouterr().err
    with pytest.raises(export_mod.ExportError, match="unknown, repeated or no targets"):
        export_mod.export(pt, out, targets=("jax", "jax"))
    assert sorted(os.listdir(tmp_path)) == ["four.txt", "headless.pt", "headless.pt.meta.json", "twice.txt"]


@pytest.mark.parametrize("target", ["jax", "onnx"])
def test_an_artefact_disagreeing_with_its_reference_fails_the_export_and_nothing_is_kept(
    source, target, tmp_path, monkeypatch, capsys
) -> None:
    if target == "onnx":  # onnxruntime off by 1e-4 of a logit: over the 1e-5 gate of the max
        real = export_mod.onnx_run
        monkeypatch.setattr(export_mod, "onnx_run", lambda s, x: [y + 1e-4 * np.abs(y).max() for y in real(s, x)])
    else:
        real = export_mod.flax_logits
        monkeypatch.setattr(export_mod, "flax_logits", lambda *a: lambda x: (lambda y: y - 1e-4 * np.abs(y).max())(
            real(*a)(x)))  # fmt: skip
    out = tmp_path / "out"
    argv = [str(source["pt"]), str(out), "--preprocessing", AT_SIZE, "--targets", "jax", "onnx"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{target}: the exported model failed its check" in err and "nothing was written" in err
    assert not out.exists()
    assert os.listdir(tmp_path) == []


def test_a_subprocess_cli_error_is_one_line_without_a_traceback(source, tmp_path) -> None:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "porting.export_cli", str(source["pt"]), str(source["out"]),
                           "--preprocessing", AT_SIZE], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "already exists; pass force=True (--force)" in proc.stderr


def test_a_darknet_file_is_served_on_the_input_its_format_implies_as_darknets_own_float64_forward(tmp_path) -> None:
    layers = darknet_layers(TINY, NUM_CLASSES, seed=1)
    write_weights_file(tmp_path / "tiny.weights", layers)
    out = tmp_path / "out"
    assert main([str(tmp_path / "tiny.weights"), str(out), "--preprocessing", AT_SIZE, "--targets", "onnx"]) == 0
    meta = json.loads((out / "darknet53.onnx.json").read_text())
    assert (meta["preprocessing"]["mean"], meta["preprocessing"]["std"]) == ([0.0] * 3, [1.0] * 3)  # x / 255 alone
    assert meta["source"]["format"] == "darknet" and meta["model"]["config"]["leaky_slope"] == 0.1
    images = uint8_images(7, seed=2)
    got = run_isolated("onnx", out / "darknet53.onnx", images, tmp_path / "run")["logits"]
    want, _ = darknet_forward(layers, images.transpose(0, 3, 1, 2) / 255.0, ())
    assert_close(got, want)
