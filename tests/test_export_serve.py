"""darknet53-serve-predict: predictions on a folder equal the Flax model's on training's own decode, it imports
no framework but the artefact's runtime, and its decode gives the pixels train.data's evaluation decode gives."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_export import CLASS_NAMES, FRAMEWORKS, OUR_PACKAGES, SIZE, export_tiny, flax_reference

from porting.export import TARGETS
from porting.preprocessing import Preprocessing, to_rgb
from porting.serve_predict import load_image, predict_folder
from train.data import decode_image

ORIENTATION_TAG = 0x0112
# What the runner may load of ours: the porting package (its __init__ loads darknet_arch and numpy-only code).
SERVING_OURS = {"porting", "darknet_arch"}
# Neither may a serving process need these (the trainers' and the porting's other dependencies).
NOT_FOR_SERVING = {"grain", "safetensors", "tensorboardX", "matplotlib", "huggingface_hub", "timm"}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict:
    return export_tiny(tmp_path_factory.mktemp("export"))


def write_images(folder: Path) -> list[Path]:
    """Every kind of file evaluation decodes differently: JPEG (draft, EXIF turn), alpha, 16-bit, palette, tiny."""
    rng = np.random.default_rng(7)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "nested").mkdir(exist_ok=True)
    smooth = np.clip(np.cumsum(rng.normal(0, 6, (300, 220, 3)), axis=0) + 128, 0, 255).astype(np.uint8)
    Image.fromarray(smooth).save(folder / "large.jpg", quality=90)  # 220 px wide: decoded at reduced size
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = 6  # stored sideways
    Image.fromarray(smooth[:200]).save(folder / "nested" / "turned.jpg", quality=90, exif=exif.tobytes())
    rgba = rng.integers(0, 256, (40, 50, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    Image.fromarray(rng.integers(0, 256, (45, 45, 2), dtype=np.uint8)[..., 0], "L").convert("LA").save(
        folder / "gray_alpha.png"
    )
    Image.fromarray(rng.integers(0, 65536, (30, 40), dtype=np.uint16)).save(folder / "sixteen.png")
    palette = Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).quantize(16)
    palette.info["transparency"] = 3
    palette.save(folder / "palette.png", transparency=3)
    Image.fromarray(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)).save(folder / "nested" / "tiny.bmp")
    (folder / "notes.txt").write_text("not an image")
    return sorted(p for p in folder.rglob("*") if p.suffix != ".txt" and p.is_file())


def test_the_runner_decodes_every_image_as_training_evaluates_it(tmp_path) -> None:
    for path in write_images(tmp_path):
        for size in (SIZE, 64):
            pre = {"image_size": size, "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "squash"}
            np.testing.assert_array_equal(load_image(path, pre), decode_image(str(path), size), path.name)


def test_a_recorded_centre_crop_is_done_as_the_preprocessing_record_prepares_it(tmp_path) -> None:
    paths = [p for p in write_images(tmp_path) if p.name in ("large.jpg", "alpha.png", "sixteen.png", "tiny.bmp")]
    for crop_mode, crop_pct, interpolation in (("center", 0.875, "bicubic"), ("squash", 0.9, "bilinear")):
        pre = {"image_size": SIZE, "interpolation": interpolation, "crop_pct": crop_pct, "crop_mode": crop_mode}
        record = Preprocessing(scale=1.0, mean=(0.0,) * 3, std=(1.0,) * 3, **pre)  # prepare() then gives pixels
        for path in paths:
            with Image.open(path) as img:
                want = record.prepare(to_rgb(img))
            np.testing.assert_array_equal(load_image(path, pre).astype(np.float32), want, (path.name, crop_mode))


@pytest.mark.parametrize("target", ["jax", "onnx"])
def test_serve_predict_on_a_folder_gives_the_flax_model_predictions_and_imports_only_its_runtime(
    source,
    target,
    tmp_path,
) -> None:
    images = tmp_path / "images"
    paths = write_images(images)
    artefact, out = source["out"] / TARGETS[target][0], tmp_path / "predictions.csv"
    forbidden = OUR_PACKAGES - SERVING_OURS | FRAMEWORKS | NOT_FOR_SERVING
    forbidden |= {"jax", "jaxlib"} if target == "onnx" else {"onnxruntime"}
    code = (
        "import sys\nfrom porting.serve_predict import main\nrc = main(sys.argv[1:])\n"
        f"bad = {{m.split('.')[0] for m in sys.modules}} & set({sorted(forbidden)!r})\n"
        "print('imported', sorted(bad))\nsys.exit(rc or (3 if bad else 0))\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    argv = [str(artefact), str(images), "--out", str(out), "--batch-size", "3"]  # 8 images: a batch of 2 at the end
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "imported []" in proc.stdout and f"wrote {len(paths)} predictions to {out}" in proc.stdout
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [os.path.relpath(p, images) for p in paths]
    batch = np.stack([decode_image(str(p), SIZE) for p in paths])
    logits = flax_reference(source["variables"], batch)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    probs = e / e.sum(-1, keepdims=True)
    assert [r["class"] for r in rows] == [CLASS_NAMES[k] for k in probs.argmax(-1)]
    np.testing.assert_allclose([float(r["probability"]) for r in rows], probs.max(-1), atol=2e-6)
    _, got_logits, got_probs, _ = predict_folder(artefact, images, batch_size=8)  # one batch of all 8
    assert float(np.max(np.abs(got_logits - logits))) <= 1e-5 * float(np.max(np.abs(logits)))
    np.testing.assert_allclose(got_probs, probs, atol=2e-6)


def test_serve_predict_refuses_what_it_cannot_use_with_exit_2(source, tmp_path, capsys) -> None:
    from porting.serve_predict import main

    images = tmp_path / "images"
    write_images(images)
    artefact = source["out"] / "darknet53.jax"
    (tmp_path / "exists.csv").write_text("keep")
    lonely = tmp_path / "lonely.jax"
    lonely.write_bytes(artefact.read_bytes())
    cases = {
        "already exists; pass --force": [str(artefact), str(images), "--out", str(tmp_path / "exists.csv")],
        "is not a folder": [str(artefact), str(tmp_path / "nope"), "--out", str(tmp_path / "a.csv")],
        "holds no image files": [str(artefact), str(images / "nested" / "x"), "--out", str(tmp_path / "b.csv")],
        "has no sidecar": [str(lonely), str(images), "--out", str(tmp_path / "c.csv")],
        "is not a file": [str(tmp_path / "missing.jax"), str(images), "--out", str(tmp_path / "d.csv")],
        "--batch-size must be at least 1": [str(artefact), str(images), "--out", "e.csv", "--batch-size", "0"],
        "File name too long": [str(tmp_path / ("a" * 300 + ".jax")), str(images), "--out", str(tmp_path / "f.csv")],
    }
    (tmp_path / "images" / "nested" / "x").mkdir()
    for message, argv in cases.items():
        assert main(argv) == 2, message
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (message, err)
    assert (tmp_path / "exists.csv").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.glob("*.csv")) == ["exists.csv"]


@pytest.mark.parametrize("name", ["darknet53.jax", "darknet53.onnx"])
def test_an_artefact_that_does_not_match_its_sidecar_is_refused_naming_the_mismatch(source, tmp_path, capsys, name):
    import json

    from porting.serve_predict import main

    images = tmp_path / "images"
    write_images(images)
    artefact, sidecar = tmp_path / name, tmp_path / f"{name}.json"
    meta = json.loads((source["out"] / f"{name}.json").read_text(encoding="utf-8"))

    def refused(data: bytes, meta: dict, *needles: str) -> None:
        artefact.write_bytes(data)
        sidecar.write_text(json.dumps(meta), encoding="utf-8")
        assert main([str(artefact), str(images), "--out", str(tmp_path / "p.csv")]) == 2
        err = capsys.readouterr().err
        assert all(n in err for n in needles) and "Traceback" not in err, err
        assert not (tmp_path / "p.csv").exists()

    real = (source["out"] / name).read_bytes()
    other = (source["out"] / ("darknet53.onnx" if name.endswith(".jax") else "darknet53-bf16.jax")).read_bytes()
    refused(other, meta, "does not match its sidecar", "sha256")  # another artefact under this sidecar
    # A sidecar edited to fewer class names (its hash still right): the model's outputs name the mismatch.
    refused(real, {**meta, "class_names": meta["class_names"][:2]}, "2 class names", "5 outputs")
    refused(real, {**meta, "input": {**meta["input"], "shape": [None, 64, 64, 3]}}, "image_size 32", "side 64")
    # A size that would decode every image at 20,000 px before anything refused it: refused first, by its bound.
    refused(real, {**meta, "preprocessing": {**meta["preprocessing"], "image_size": 20000}}, "image_size must be")
    refused(real, {**meta, "input": "uint8"}, "input must hold a shape")


def test_prediction_csvs_are_safe_to_open_in_a_spreadsheet_and_take_any_file_name(tmp_path) -> None:
    import csv
    import io

    from porting.serve_predict import predictions_csv

    folder = tmp_path
    names = ["=HYPERLINK(\"http://x\")", "+1", "-2", "@SUM(A1)", "plain"]
    paths = [folder / "a.png", folder / os.fsdecode(b"caf\xe9.png"), folder / "=cmd.png"]  # Latin-1 bytes: not UTF-8
    probs = np.eye(5, dtype=np.float32)[[0, 3, 4]]
    text = predictions_csv(folder, paths, probs, names)
    text.encode("utf-8")  # writable as UTF-8 whatever the file names were
    rows = list(csv.reader(io.StringIO(text)))[1:]
    assert [r[1] for r in rows] == ["'=HYPERLINK(\"http://x\")", "'@SUM(A1)", "plain"]
    assert [r[0] for r in rows] == ["a.png", "caf\\xe9.png", "'=cmd.png"]


def test_a_program_for_another_platform_is_refused_advising_only_what_helps(source, monkeypatch) -> None:
    import jax

    from porting.serve_predict import Artefact, ServingError

    real = jax.export.deserialize

    def lowered_for(platforms):
        class Other:  # the real program, claiming other lowering platforms
            def __init__(self, exported):
                self._exported = exported

            def __getattr__(self, name):
                return platforms if name == "platforms" else getattr(self._exported, name)

        monkeypatch.setattr(jax.export, "deserialize", lambda data: Other(real(data)))

    lowered_for(("cuda",))  # this jax runs on the CPU already: JAX_PLATFORMS=cpu cannot help
    with pytest.raises(ServingError) as info:
        Artefact(source["out"] / "darknet53.jax")
    assert "--platforms cpu" in str(info.value) and "JAX_PLATFORMS" not in str(info.value)
    lowered_for(("cpu", "rocm"))
    monkeypatch.setattr(jax.export, "default_export_platform", lambda: "cuda")  # as on a GPU machine
    with pytest.raises(ServingError, match="or set JAX_PLATFORMS=cpu"):
        Artefact(source["out"] / "darknet53.jax")


def test_a_broken_program_or_resize_record_is_a_serving_error_naming_what(source, monkeypatch) -> None:
    """What the runner cannot use is a ServingError (its callers catch that), and a sidecar's field is named as the
    sidecar's preprocessing; a resize needs only the resize's fields."""
    import jax

    from porting.serve_predict import Artefact, ServingError, resize_record

    monkeypatch.setattr(jax.export, "deserialize", lambda data: (_ for _ in ()).throw(ValueError("not a flatbuffer")))
    with pytest.raises(ServingError, match=re.escape("is not a serialised jax.export program: ValueError: not a")):
        Artefact(source["out"] / "darknet53.jax")
    resize = {"image_size": 8, "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"}
    with pytest.raises(ServingError, match=re.escape("'m.json': preprocessing: crop_pct must be a finite number")):
        resize_record({**resize, "crop_pct": float("nan")}, "'m.json'")
    assert resize_record({**resize, "mean": "checked by the sidecar's reader"}, "'m.json'").image_size == 8
