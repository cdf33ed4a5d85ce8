"""`darknet53-serve-predict ARTEFACT IMAGES`: class predictions from an exported model (darknet53-export).

The artefact's JSON sidecar (ARTEFACT.json) is the serving contract: the input spec, the class names in label
order, and the preprocessing the artefact already does inside. This module needs only numpy and pillow, plus
jax for a .jax artefact or onnxruntime for a .onnx one (tests/test_export_serve.py checks what it imports);
porting.export imports its contract constants and checks, so both sides read one definition.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from porting.atomic import write_bytes
from porting.errors import EXIT_BAD_INPUT, EXIT_OK, PortingError, failing_as, parse_json, shown
from porting.preprocessing import RESIZE_FIELDS, Preprocessing, to_rgb

# The contract every artefact's sidecar follows (written by porting.export).
SIDECAR_SUFFIX = ".json"
SERVING_FORMAT, SERVING_FORMAT_VERSION = "darknet53-serving", 1
INPUT_NAME, OUTPUT_NAMES = "images", ("logits", "probabilities")
INPUT_DTYPE, INPUT_LAYOUT, INPUT_COLOR, OUTPUT_DTYPE = "uint8", "NHWC", "RGB", "float32"
RUNTIMES = ("jax", "onnxruntime")
SIDECAR_FIELDS = ("format", "format_version", "runtime", "input", "outputs", "class_names", "preprocessing")
DEFAULT_BATCH_SIZE = 8

# The evaluation decode of train.data.decode (decode_image without augmentation), restated here because
# train.data imports grain on import: its mode conversion and resize are porting.preprocessing's (to_rgb,
# Preprocessing.resize), its reduced-size JPEG decode for the trainers' whole-image resize is below.
# tests/test_export_serve.py checks it against train.data.
WHOLE_IMAGE = ("squash", 1.0)  # (crop_mode, crop_pct): what the trainers record
# A cell starting with one of these is a formula in a spreadsheet (CSV injection): written with a ' before it.
FORMULA_STARTS = ("=", "+", "-", "@")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ServingError(PortingError):
    """An artefact, sidecar, batch or image folder the runner cannot use; the message names what and why."""


def input_spec(image_size: int, channels: int) -> dict[str, Any]:
    """The input every artefact takes: uint8 RGB NHWC at the model's size, any batch size (None)."""
    return {"name": INPUT_NAME, "dtype": INPUT_DTYPE, "layout": INPUT_LAYOUT, "color": INPUT_COLOR,
            "shape": [None, image_size, image_size, channels]}  # fmt: skip


def output_specs(num_classes: int) -> list[dict[str, Any]]:
    """(logits, probabilities): float32 (N, num_classes) each."""
    return [{"name": name, "dtype": OUTPUT_DTYPE, "shape": [None, num_classes]} for name in OUTPUT_NAMES]


def describe_spec(spec: dict[str, Any]) -> str:
    """'uint8 NHWC RGB (N, 64, 64, 3)', the form every error message names the expected input in."""
    dims = ", ".join("N" if d is None else str(d) for d in spec["shape"])
    return f"{spec['dtype']} {spec['layout']} {spec['color']} ({dims})"


def check_batch(batch: Any, spec: dict[str, Any]) -> None:
    """Raise ServingError naming the expected spec unless `batch` is a numpy array the artefact takes."""
    expected = f"expected a batch of {describe_spec(spec)}"
    if not isinstance(batch, np.ndarray):
        raise ServingError(f"{expected}, got a {type(batch).__name__}; pass a numpy array")
    shape, want = tuple(batch.shape), tuple(spec["shape"])
    if batch.ndim != len(want):
        raise ServingError(f"{expected}, got shape {shape} (rank {batch.ndim}); stack single images with x[None]")
    if shape[1:] != want[1:]:
        hint = ""
        if sorted(shape[1:]) == sorted(want[1:]) and shape[1] == want[3]:
            hint = "; it looks NCHW: transpose it with x.transpose(0, 2, 3, 1)"
        elif shape[3] == want[3]:
            hint = f"; resize the images to {want[1]}x{want[2]} first (serve-predict does)"
        raise ServingError(f"{expected}, got shape {shape}{hint}")
    if shape[0] < 1:
        raise ServingError(f"{expected}, got an empty batch")
    if batch.dtype != np.dtype(spec["dtype"]):
        hint = "; pass the raw 0..255 pixels: the artefact scales and normalises them itself"
        raise ServingError(f"{expected}, got dtype {batch.dtype}{hint}")


def sidecar_path(artefact: str | os.PathLike) -> Path:
    """ARTEFACT.json, beside the artefact."""
    return Path(f"{os.fspath(artefact)}{SIDECAR_SUFFIX}")


def read_sidecar(artefact: str | os.PathLike) -> dict[str, Any]:
    """The artefact's sidecar, checked to be a serving sidecar of a version this runner reads."""
    path = sidecar_path(artefact)
    if not Path(artefact).is_file():
        raise ServingError(f"artefact {os.fspath(artefact)!r} is not a file (a .jax or .onnx from darknet53-export)")
    try:
        meta = parse_json(path.read_bytes(), f"the sidecar {str(path)!r}")
    except FileNotFoundError as e:
        raise ServingError(f"{os.fspath(artefact)!r} has no sidecar {str(path)!r}; export with darknet53-export") from e
    except (OSError, PortingError) as e:
        raise ServingError(f"cannot read the sidecar {str(path)!r}: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != SERVING_FORMAT:
        raise ServingError(f"{str(path)!r} is not a {SERVING_FORMAT} sidecar")
    if meta.get("format_version") != SERVING_FORMAT_VERSION:
        raise ServingError(f"{str(path)!r} has format_version {meta.get('format_version')!r}; this runner reads "
                           f"{SERVING_FORMAT_VERSION}")  # fmt: skip
    missing = [f for f in SIDECAR_FIELDS if f not in meta]
    if missing or meta["runtime"] not in RUNTIMES:
        raise ServingError(f"{str(path)!r} lacks {missing} or names an unknown runtime {meta.get('runtime')!r}")
    spec, names, pre = meta["input"], meta["class_names"], meta["preprocessing"]
    shape = spec.get("shape") if isinstance(spec, dict) else None
    if not (isinstance(shape, list) and len(shape) == len(INPUT_LAYOUT)
            and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape[1:])):  # fmt: skip
        raise ServingError(f"{str(path)!r}: input must hold a shape [null, height, width, channels], got {shown(spec)}")
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise ServingError(f"{str(path)!r}: class_names must be a non-empty list of strings")
    size = resize_record(pre, repr(str(path))).image_size
    if size != shape[1]:  # the resize would make images the artefact refuses, after decoding them all
        raise ServingError(f"{str(path)!r}: preprocessing image_size {size} is not the input's side "
                           f"{shape[1]}: the sidecar contradicts itself; export again")  # fmt: skip
    return meta


class Artefact:
    """An exported model loaded into its runtime; `__call__(batch)` gives (logits, probabilities) as numpy."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self.meta = read_sidecar(path)
        self.spec = self.meta["input"]
        self.class_names = list(self.meta["class_names"])  # strings: read_sidecar checked
        data = Path(self.path).read_bytes()
        digest, recorded = hashlib.sha256(data).hexdigest(), self.meta.get("artefact_sha256")
        if digest != recorded:  # only the bytes the sidecar was written for
            raise ServingError(
                f"{self.path!r} does not match its sidecar {str(sidecar_path(self.path))!r}: its sha256 is "
                f"{digest[:16]}..., the sidecar records {str(recorded)[:16]}...: the artefact was replaced or damaged; "
                "keep each artefact with the sidecar darknet53-export wrote for it"
            )
        self._run = self._load_jax(data) if self.meta["runtime"] == "jax" else self._load_onnx(data)

    def _check_shapes(self, inputs: Sequence[Any], logits: Sequence[Any]) -> None:
        """Refuse a sidecar whose input spec or class names disagree with the model's own input and logits."""
        want = list(self.spec["shape"][1:])
        if [int(d) if str(d).isdigit() else d for d in inputs[1:]] != want:
            dims = ", ".join(str(d) for d in inputs[1:])
            raise ServingError(f"{self.path!r} takes (N, {dims}), but its sidecar says {describe_spec(self.spec)}: "
                               "the sidecar is not this artefact's; export again")  # fmt: skip
        classes = logits[-1]
        if not str(classes).isdigit() or int(classes) != len(self.class_names):
            raise ServingError(f"{self.path!r} has {classes} outputs per image, but its sidecar names "
                               f"{len(self.class_names)} class names: the sidecar is not this artefact's; export "
                               "again")  # fmt: skip

    def _load_jax(self, data: bytes) -> Any:
        import jax

        with failing_as(f"{self.path!r} is not a serialised jax.export program", error=ServingError):
            exported = jax.export.deserialize(bytearray(data))  # flatbuffer, version errors
        self._check_shapes(exported.in_avals[0].shape, exported.out_avals[0].shape)
        backend = jax.export.default_export_platform()  # 'cuda', not jax's 'gpu'
        if backend not in exported.platforms:
            # Running on the CPU helps only if the program has a CPU lowering and jax is not on the CPU already.
            cpu = ", or set JAX_PLATFORMS=cpu" if "cpu" in exported.platforms and backend != "cpu" else ""
            raise ServingError(
                f"{self.path!r} was lowered for {list(exported.platforms)}, this jax runs on {backend!r}: export "
                f"again with --platforms {backend}{cpu}"
            )
        return lambda batch: tuple(np.asarray(out) for out in exported.call(batch))

    def _load_onnx(self, data: bytes) -> Any:
        import onnxruntime as ort

        # onnxruntime raises its own pybind error types
        with failing_as(f"{self.path!r} is not an ONNX model onnxruntime can load", error=ServingError):
            session = ort.InferenceSession(data, providers=ort.get_available_providers())
        self._check_shapes(session.get_inputs()[0].shape, session.get_outputs()[0].shape)
        return lambda batch: tuple(session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch}))

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits, probabilities) of a batch checked against the sidecar's spec first."""
        check_batch(batch, self.spec)
        return self._run(batch)


def resize_record(pre: Any, where: str) -> Preprocessing:
    """A sidecar's preprocessing as a record: every field's type and range checked (porting.preprocessing's bounds:
    a file's number never sizes an allocation unchecked), and refused unless it names the whole resize."""
    fields = {k: pre.get(k) for k in RESIZE_FIELDS} if isinstance(pre, dict) else pre  # the resize's fields only
    try:
        record = Preprocessing.from_json(fields, where, strict=False)[0]
    except PortingError as exc:
        raise ServingError(str(exc)) from None
    missing = [k for k in RESIZE_FIELDS if getattr(record, k) is None]
    if missing:
        raise ServingError(f"{where}: preprocessing {shown(pre)} gives no {', '.join(missing)}, which the resize needs")
    return record


def load_image(path: str | os.PathLike, pre: dict[str, Any]) -> np.ndarray:
    """uint8 (image_size, image_size, 3): upright (EXIF), RGB, resized as `pre` (a sidecar's preprocessing) says."""
    record = resize_record(pre, "load_image")
    try:
        with Image.open(path) as img:
            if img.format == "JPEG" and (record.crop_mode, record.crop_pct) == WHOLE_IMAGE:
                scale = pre["image_size"] / min(img.size)  # a reduced-size DCT decode that still covers the size,
                if scale < 1:  # as the trainers' decode does
                    img.draft(None, (math.ceil(img.width * scale), math.ceil(img.height * scale)))
            out = record.resize(to_rgb(ImageOps.exif_transpose(img)))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ServingError(f"{os.fspath(path)}: cannot decode image: {e}") from e
    return np.asarray(out, dtype=np.uint8)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Every image file under `folder`, recursive and sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise ServingError(f"IMAGES {os.fspath(folder)!r} is not a folder")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ServingError(f"IMAGES {os.fspath(folder)!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return paths


def predict_folder(
    artefact: str | os.PathLike, folder: str | os.PathLike, batch_size: int = DEFAULT_BATCH_SIZE
) -> tuple[list[Path], np.ndarray, np.ndarray, list[str]]:
    """(image paths, logits, probabilities, class names) for every image under `folder`."""
    if batch_size < 1:
        raise ServingError(f"--batch-size must be at least 1, got {batch_size}")
    model = Artefact(artefact)
    pre = model.meta["preprocessing"]  # checked with the sidecar (read_sidecar)
    paths = list_images(folder)
    batches = (paths[i : i + batch_size] for i in range(0, len(paths), batch_size))
    outs = [model(np.stack([load_image(p, pre) for p in batch])) for batch in batches]
    return paths, np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs]), model.class_names


def csv_cell(text: str) -> str:
    """A text cell safe in a spreadsheet and in UTF-8: a leading = + - @ (a formula there) gets a ' before it, as
    OWASP advises against CSV injection, and a file name's bytes that are not UTF-8 become \\x escapes."""
    if any("\udc80" <= c <= "\udcff" for c in text):  # os.fsdecode's stand-ins for bytes that are not UTF-8
        text = os.fsencode(text).decode("utf-8", "backslashreplace")
    return f"'{text}" if text.startswith(FORMULA_STARTS) else text


def predictions_csv(
    folder: Path, paths: Sequence[str | os.PathLike[str]], probs: np.ndarray, class_names: Sequence[str]
) -> str:
    """`path,class,probability` rows (paths relative to `folder`): what darknet53-predict and serve-predict write
    for a folder of images."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "class", "probability"])
    for path, p in zip(paths, probs, strict=True):
        k = int(np.argmax(p))
        writer.writerow([csv_cell(os.path.relpath(path, folder)), csv_cell(class_names[k]), f"{p[k]:.6f}"])
    return buf.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `darknet53-serve-predict`; returns the exit status."""
    p = argparse.ArgumentParser(prog="darknet53-serve-predict", description=__doc__.splitlines()[0])
    p.add_argument("artefact", metavar="ARTEFACT", help="a .jax or .onnx file written by darknet53-export")
    p.add_argument("images", metavar="IMAGES", help="folder of images (searched recursively)")
    p.add_argument("--out", default="predictions.csv", help="output CSV: path,class,probability")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="images per call of the artefact")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    try:
        if os.path.lexists(args.out) and not args.force:
            raise ServingError(f"--out {args.out!r} already exists; pass --force to replace it")
        paths, _, probs, names = predict_folder(args.artefact, args.images, args.batch_size)
        write_bytes({args.out: predictions_csv(Path(args.images), paths, probs, names).encode()}, force=args.force)
    except PortingError as e:
        print(f"darknet53-serve-predict: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:  # a path the OS refuses to look at (a name over 255 bytes, no permission): one line
        print(f"darknet53-serve-predict: error: {e.filename!r}: {e.strerror or e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote {len(paths)} predictions to {args.out}")
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
