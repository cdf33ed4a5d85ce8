"""`python -m train.predict --checkpoint DIR --data PATH [--out FILE]`: class predictions from a trained run.

--data is either the mask layout's eval/ folder (info.csv + images/): the output is info.csv with `ans` filled,
rows in the original order (the submission file); or any folder of images: the output is `path,class,probability`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import io
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from darknet_arch import DarknetConfig
from porting.errors import EXIT_BAD_INPUT, EXIT_OK
from porting.runs import CheckpointError
from porting.serve_predict import predictions_csv
from train.data import NO_LABEL, DataError, Records, load_eval_folder, make_eval_iter
from train.data.formats import EVAL_CSV
from train.data.scan import is_image_name
from train.logging_utils import atomic_write_text


@dataclasses.dataclass
class Predictor:
    """A restored network with its class names and input size; `probabilities(records)` runs it."""

    variables: Any
    model_config: DarknetConfig
    class_names: list[str]
    image_size: int
    precision: str
    batch_size: int
    source: str  # the checkpoint folder and step it was restored from
    mean_std: tuple[tuple[float, ...], tuple[float, ...]]

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> Predictor:
        """Any weights location porting reads (a run folder or step, a Hub-layout directory, any weights file), with
        the class names, image size and slope its preprocessing record gives; refused if the record lacks one, or
        asks for other input than train.state.normalize makes."""
        import porting
        from porting.preprocessing import TRAINER_DEFAULTS, contradictions  # what normalize and make_eval_iter do
        from train.options import TrainConfig

        try:
            result = porting.load_flax_variables(path)
        except porting.PortingError as e:
            raise CheckpointError(f"--checkpoint {e}") from e
        pre, where = result.preprocessing, result.location.describe()
        names, size, mean, std = pre.class_names, pre.image_size, pre.mean, pre.std
        if names is None or size is None or mean is None or std is None or pre.leaky_slope is None or pre.scale is None:
            needed = ("class_names", "image_size", "leaky_slope", "scale", "mean", "std")
            raise CheckpointError(f"--checkpoint {pre.missing(needed, f'predicting with {where}')}: record it with "
                                  "port-weights (--class-names, --leaky-slope, --preprocessing)")  # fmt: skip
        resizing = ("interpolation", "crop_pct", "crop_mode")
        # Mean and std follow the record (normalize takes them); the scale and resize are train.predict's own.
        given = TRAINER_DEFAULTS.without(*resizing, "mean", "std")
        if problems := contradictions([(where, pre), ("train.predict gives", given)]):
            raise CheckpointError(f"--checkpoint {where}: the weights expect other input than train.predict gives "
                                  "(uint8 RGB / 255):\n  " + "\n  ".join(problems))  # fmt: skip
        if resize := contradictions([(where, pre), ("train.predict resizes", TRAINER_DEFAULTS.only(*resizing))]):
            warnings.warn(f"{where} was trained with another resize than train.predict's: {'; '.join(resize)}",
                          stacklevel=2)  # fmt: skip
        run, defaults = result.run_config or {}, TrainConfig()
        return cls(
            variables=result.variables,
            model_config=result.config,
            class_names=list(names),
            image_size=size,
            precision=str(run.get("precision", defaults.precision)),
            batch_size=int(run.get("batch_size", defaults.batch_size)),
            source=where,
            mean_std=(tuple(mean), tuple(std)),
        )

    def probabilities(self, records: Records) -> np.ndarray:
        """(len(records), num_classes) softmax probabilities, in record order."""
        probs, variables = self._probs_fn
        out = []
        for batch in make_eval_iter(records, batch_size=self.batch_size, image_size=self.image_size):
            p = np.asarray(probs(variables, batch["image"]))
            out.append(p[batch["mask"]])
        return np.concatenate(out) if out else np.zeros((0, len(self.class_names)), np.float32)

    @functools.cached_property
    def _probs_fn(self) -> tuple[Any, Any]:
        """The jitted softmax(model(normalize(uint8))) and its variables, BatchNorm folded (built once)."""
        import jax

        from flax_darknet import fold_for_inference
        from train.state import create_model, normalize

        # Folded: one fewer per-channel pass per conv and no statistics (equal to 1e-6, tests/test_fold_bn.py).
        unfolded = create_model(self.model_config, len(self.class_names), self.precision)
        model, variables = fold_for_inference(unfolded, self.variables)
        mean, std = self.mean_std
        fn = jax.jit(lambda v, images: jax.nn.softmax(model.apply(v, normalize(images, mean=mean, std=std)), axis=-1))
        return fn, variables


def list_images(folder: Path) -> Records:
    """Every image file under `folder` (recursive, sorted), unlabelled."""
    paths = sorted(str(p) for p in folder.rglob("*") if p.is_file() and is_image_name(p.name))
    if not paths:
        raise DataError(f"{folder}: no image files found")
    return Records(tuple(paths), np.full(len(paths), NO_LABEL, np.int32), tuple(paths))


def submission_csv(eval_folder: Path, preds: np.ndarray) -> str:
    """info.csv with the `ans` column set to `preds`, rows and other columns unchanged."""
    with open(eval_folder / EVAL_CSV, newline="") as f:
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or [])
        rows = list(reader)
    if "ans" not in fields:
        fields.append("ans")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows({**row, "ans": int(p)} for row, p in zip(rows, preds, strict=True))
    return buf.getvalue()


def predict(checkpoint: str, data: str, out: str | None, force: bool = False) -> tuple[Path, int]:
    """Write predictions for `data` to `out`; returns (output path, number of images)."""
    folder = Path(data)
    if not folder.is_dir():
        raise DataError(f"--data {folder} is not a folder")
    is_eval = (folder / EVAL_CSV).is_file()
    out_path = Path(out) if out else Path("submission.csv" if is_eval else "predictions.csv")
    if is_eval and out_path.resolve() == (folder / EVAL_CSV).resolve():
        raise DataError(f"--out {out_path} is the input {EVAL_CSV}; write the submission to another file")
    if out_path.exists() and not force:
        raise DataError(f"--out {out_path} already exists; pass --force to replace it")
    if out_path.is_dir():
        raise DataError(f"--out {out_path} is a folder; give a file name such as {out_path / out_path.name}.csv")
    if not out_path.parent.is_dir():
        raise DataError(f"--out {out_path}: folder {out_path.parent} does not exist")
    if not os.access(out_path.parent, os.W_OK):
        raise DataError(f"--out {out_path}: folder {out_path.parent} is not writable; choose another --out")
    predictor = Predictor.from_checkpoint(checkpoint)
    print(f"using checkpoint {predictor.source}")
    records = load_eval_folder(folder) if is_eval else list_images(folder)
    probs = predictor.probabilities(records)
    if is_eval:
        text = submission_csv(folder, probs.argmax(-1))
    else:
        text = predictions_csv(folder, records.paths, probs, predictor.class_names)
    try:
        atomic_write_text(out_path, text)
    except OSError as e:
        raise DataError(f"--out {out_path}: writing failed ({e.strerror or e}); nothing was written") from e
    return out_path, len(records)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.predict", description=__doc__.splitlines()[0])
    p.add_argument(
        "--checkpoint",
        required=True,
        help="weights to predict with: a training run (its best step), a step folder, <run>/best|latest, a Hub-layout "
        "folder or Hub id, or a weights file",
    )
    p.add_argument("--data", required=True, help="eval/ folder with info.csv, or a folder of images")
    p.add_argument("--out", default=None, help="output CSV (default: submission.csv or predictions.csv here)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    try:
        out, n = predict(args.checkpoint, args.data, args.out, force=args.force)
    except (DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:  # a path the OS refuses to look at (a name over 255 bytes, no permission): one line
        print(f"error: {e.filename!r}: {e.strerror or e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"wrote {n} predictions to {out}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
