"""Export Darknet-53 weights for serving: a serialised JAX program (jax.export) and ONNX (through torch_ref).

Over 300 lines: the one weights lookup, both exporters, their checks and the sidecar are one all-or-nothing
transaction (nothing is written unless every artefact reproduced its reference), easier to follow in one file.

Each artefact takes uint8 RGB NHWC images at the model's size with any batch size and returns float32
(logits, probabilities); the preprocessing the weights were trained with is inside it. Beside each, ARTEFACT.json
(porting.serve_predict's contract): input spec, class names in label order, preprocessing, the versions that
wrote it, the weights' checksum and the check the export ran. See docs/export.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import platform
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from darknet_arch import ARCHS
from porting.api import Loaded, load_flax_variables
from porting.atomic import check_destination, write_bytes
from porting.errors import PortingError
from porting.preprocessing import DEFAULT_IMAGE_SIZE, TRAINER_DEFAULTS, Preprocessing
from porting.serve_predict import (
    INPUT_NAME,
    OUTPUT_NAMES,
    SERVING_FORMAT,
    SERVING_FORMAT_VERSION,
    check_batch,
    input_spec,
    list_images,
    load_image,
    output_specs,
    sidecar_path,
)
from porting.state import weights_sha256

# Target -> (artefact file name, runtime, compute precision).
TARGETS = {
    "jax": ("darknet53.jax", "jax", "fp32"),
    "jax-bf16": ("darknet53-bf16.jax", "jax", "bf16"),
    "onnx": ("darknet53.onnx", "onnxruntime", "fp32"),
}
DEFAULT_TARGETS = ("jax", "onnx")
PLATFORMS = ("cpu", "cuda")  # jax.export lowers for each; the check runs on the one this process has
DEFAULT_PLATFORMS = PLATFORMS
# An fp32 artefact must reproduce its reference (Flax for JAX, torch_ref for ONNX) to this fraction of the
# reference's largest |logit|. The check images (seeded noise, or the first of --check-images) go in one
# batch of 1, then batches of CHECK_BATCH: two sizes, so the batch dimension really is symbolic.
GATE_REL = 1e-5
CHECK_BATCH, CHECK_NOISE_IMAGES, CHECK_MAX_IMAGES = 3, 4, 64
CHECK_SEED = 0
ONNX_OPSET = 17  # run by onnxruntime >= 1.14
BATCH_DIM = "batch"
# What a sidecar's written_by lists (those installed): the JAX side, plus the ONNX side for an ONNX artefact.
JAX_DISTRIBUTIONS = ("darknet53-jax", "numpy", "jax", "jaxlib", "flax")
ONNX_DISTRIBUTIONS = (*JAX_DISTRIBUTIONS, "torch", "onnx", "onnxruntime")


class ExportError(PortingError):
    """Weights, options or a destination the export cannot use, or an artefact that failed its check."""


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What export() wrote: artefact paths by target, each sidecar's content, and notes for the user."""

    artefacts: dict[str, Path]
    sidecars: dict[str, dict[str, Any]]
    notes: tuple[str, ...]


def read_weights(
    src: str | os.PathLike,
    *,
    arch: str | None = None,
    leaky_slope: float | None = None,
    class_names: Sequence[str] | None = None,
    preprocessing: Preprocessing | dict[str, Any] | None = None,
) -> Loaded:
    """THE weights lookup of the export: porting's shared reader (any of porting.locations.ACCEPTED), so the export
    reads exactly what port-weights reads. arch None: the one the location records or the tensors fit; the other
    options add to the weights' own record, and one that contradicts it is refused.
    """
    if arch is not None and arch not in ARCHS:
        raise ExportError(f"unknown --arch {arch!r}; choose one of {sorted(ARCHS)}")
    return load_flax_variables(src, config=None if arch is None else ARCHS[arch], leaky_slope=leaky_slope,
                               class_names=class_names, preprocessing=preprocessing)  # fmt: skip


def serving_preprocessing(weights: Loaded) -> tuple[dict[str, Any], list[str], list[str]]:
    """(preprocessing without class names, class names, notes): the weights' record, its gaps filled.

    What the record does not say is taken from the trainers' preprocessing (porting.preprocessing.TRAINER_DEFAULTS:
    x/255, ImageNet mean and std, the whole image resized bilinearly; 256 px), class names 0, 1, ..., each with a
    note; the record's leaky slope is the model's.
    """
    n, record = weights.num_classes, weights.preprocessing
    if n is None:
        raise ExportError(f"{weights.location.given} has no classifier head: an exported model returns logits and "
                          "probabilities, so it needs trained head weights (port-weights --num-classes would add a "
                          "random head); export a run or a file with its head")  # fmt: skip
    defaults = TRAINER_DEFAULTS.replace(image_size=DEFAULT_IMAGE_SIZE, leaky_slope=weights.config.leaky_slope,
                                        class_names=tuple(str(i) for i in range(n)))  # fmt: skip
    assumed = [k for k in defaults.known() if k not in record.known()]
    pre = record.filled(defaults).to_json()
    names = list(pre.pop("class_names"))  # strings: the record checked
    shown = [f"{k} {pre[k]}" if k != "class_names" else f"class names 0..{n - 1}" for k in assumed]
    notes = [f"{os.path.basename(os.path.normpath(weights.location.given))} records no {', '.join(assumed)}: "
             f"exported with {', '.join(shown)} (--preprocessing, --class-names and --leaky-slope say otherwise)"
             ] if assumed else []  # fmt: skip
    if len(set(names)) != len(names):
        raise ExportError(f"class names repeat: {names}; give each class its own name (--class-names)")
    size, stride = pre["image_size"], weights.config.total_stride
    if size < stride or size % stride:
        raise ExportError(f"image size {size} is not a multiple of {stride} (the network's stride); pass "
                          f"--preprocessing '{{\"image_size\": N}}' with N a multiple of {stride}")  # fmt: skip
    return pre, names, notes


def versions(distributions: Sequence[str]) -> dict[str, str]:
    """Python's and each installed distribution's version."""
    found = {"python": platform.python_version()}
    for name in distributions:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


def check_images(pre: dict[str, Any], channels: int, folder: str | os.PathLike | None) -> np.ndarray:
    """The check images: the first CHECK_MAX_IMAGES of `folder` (as serve-predict decodes them), else noise."""
    size = pre["image_size"]
    if folder is None:
        shape = (CHECK_NOISE_IMAGES, size, size, channels)
        return np.random.default_rng(CHECK_SEED).integers(0, 256, shape, dtype=np.uint8)
    paths = list_images(folder)[:CHECK_MAX_IMAGES]
    if len(paths) < 2:
        raise ExportError(f"--check-images {os.fspath(folder)!r} holds {len(paths)} image; the check needs at least "
                          "2 (two batch sizes)")  # fmt: skip
    return np.stack([load_image(p, pre) for p in paths])


def compare(got: Callable[[np.ndarray], np.ndarray], want: Callable[[np.ndarray], np.ndarray],
            images: np.ndarray, reference: str, backend: str, gated: bool) -> dict[str, Any]:  # fmt: skip
    """Logits of `got` against `want` on every image (batch sizes 1, then CHECK_BATCH) on `backend`: differences,
    agreement; not ok if `gated` and they differ by more than GATE_REL of the reference's max."""
    batches = [images[:1]] + [images[i : i + CHECK_BATCH] for i in range(1, len(images), CHECK_BATCH)]
    diff, scale, agree = 0.0, 0.0, 0
    for batch in batches:
        a, r = np.asarray(got(batch), np.float64), np.asarray(want(batch), np.float64)
        if a.shape != r.shape or not np.all(np.isfinite(a)):
            return {"reference": reference, "platform": backend, "ok": False, "reason": f"logits of shape "
                    f"{a.shape}, finite: {bool(np.all(np.isfinite(a)))}; the reference's are {r.shape}"}  # fmt: skip
        diff, scale = max(diff, float(np.max(np.abs(a - r)))), max(scale, float(np.max(np.abs(r))))
        agree += int(np.sum(a.argmax(-1) == r.argmax(-1)))
    relative = diff / scale if scale else diff
    check = {"reference": reference, "batch_sizes": [len(b) for b in batches], "max_abs_diff": diff,
             "max_abs_reference": scale, "relative_diff": relative, "top1_agreement": agree / len(images),
             "ok": not gated or relative <= GATE_REL, "platform": backend}  # fmt: skip
    if not check["ok"]:
        check["reason"] = f"differs from its reference ({reference}) by {relative:.2e} of its max"
    return check


def flax_forward(weights: Loaded, pre: dict[str, Any], precision: str = "fp32") -> Callable[[Any, Any], Any]:
    """(variables, uint8 NHWC images) -> the Flax model's logits, the recorded preprocessing in front."""
    import jax.numpy as jnp

    from flax_darknet import Darknet53

    dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[precision]
    model = Darknet53(num_classes=weights.num_classes, config=weights.config, dtype=dtype, param_dtype=jnp.float32)
    scale, mean, std = (np.asarray(pre[k], np.float32) for k in ("scale", "mean", "std"))
    return lambda variables, images: model.apply(variables, (images.astype(jnp.float32) * scale - mean) / std)


def flax_logits(weights: Loaded, pre: dict[str, Any]) -> Callable[[np.ndarray], np.ndarray]:
    """images -> the fp32 Flax model's logits (jitted; the whole batch at once): the JAX artefacts' reference."""
    import jax

    fn = jax.jit(flax_forward(weights, pre))
    return lambda images: np.asarray(fn(weights.variables, images))


def export_jax(
    weights: Loaded, pre: dict[str, Any], precision: str, platforms: Sequence[str], images: np.ndarray
) -> tuple[bytes, dict[str, Any]]:
    """(serialised jax.export program of uint8 (batch, S, S, C) -> (logits, probabilities), the weights as
    constants; check): the deserialised program against the fp32 Flax model, gated when fp32."""
    import jax
    import jax.numpy as jnp

    forward, variables = flax_forward(weights, pre, precision), weights.variables

    def serve(images: jax.Array) -> tuple[jax.Array, jax.Array]:
        # The model checks its input's shape with Python ints, which a symbolic batch size is not: it sees one
        # image of concrete shape and vmap carries the batch (the same convolutions over the whole batch).
        logits = jax.vmap(lambda image: forward(variables, image[None])[0])(images)
        return logits, jax.nn.softmax(logits, axis=-1)

    (batch,) = jax.export.symbolic_shape(BATCH_DIM)
    size, c = pre["image_size"], weights.config.in_channels
    exported = jax.export.export(jax.jit(serve), platforms=tuple(platforms))(
        jax.ShapeDtypeStruct((batch, size, size, c), jnp.uint8)
    )
    data = bytes(exported.serialize())
    backend = jax.export.default_export_platform()  # 'cuda', not jax's 'gpu'
    if backend not in exported.platforms:
        return data, {"ok": True, "skipped": f"lowered for {list(platforms)}; this process runs jax on {backend}"}
    program, reference = jax.export.deserialize(bytearray(data)), flax_logits(weights, pre)
    gated = precision == "fp32"  # bf16 only records its error against fp32
    return data, compare(lambda x: program.call(x)[0], reference, images, "Flax model, fp32", backend, gated)


def torch_serving_module(weights: Loaded, pre: dict[str, Any]) -> Any:
    """torch_ref wrapped to take uint8 NHWC images and return (logits, probabilities), preprocessing inside."""
    import torch

    from porting.torch_flax import flax_to_torch_state_dict
    from torch_ref import Darknet53

    net = Darknet53(num_classes=weights.num_classes, config=weights.config)
    net.load_state_dict(flax_to_torch_state_dict(weights.variables, config=weights.config), strict=True)
    scale = torch.tensor(pre["scale"], dtype=torch.float32)  # constants of the traced graph
    mean, std = (torch.tensor(pre[k], dtype=torch.float32).view(1, -1, 1, 1) for k in ("mean", "std"))

    class Serving(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = (images.permute(0, 3, 1, 2).to(torch.float32) * scale - mean) / std
            logits = self.net(x)
            return logits, torch.softmax(logits, dim=-1)

    return Serving().eval()


def export_onnx(weights: Loaded, pre: dict[str, Any], images: np.ndarray) -> tuple[bytes, dict[str, Any]]:
    """(ONNX bytes with a dynamic batch dimension, check): onnxruntime on the model against torch_ref's logits, gated.

    The TorchScript-based exporter (see docs/export.md): torch.export (dynamo=True) specialises the batch size to
    the example's, as torch_ref's input check reads the shape as Python ints. Tracing records that check as
    constants, and dynamic_axes keeps the batch symbolic.
    """
    import onnx
    import onnxruntime as ort
    import torch

    module = torch_serving_module(weights, pre)
    dynamic = {name: {0: BATCH_DIM} for name in (INPUT_NAME, *OUTPUT_NAMES)}
    with warnings.catch_warnings(), torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the shape check's int() calls, as above
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript-based exporter"
        path = Path(tmp) / "model.onnx"  # the exporter writes to a path
        torch.onnx.export(module, (torch.from_numpy(images[:1]),), path, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), dynamic_axes=dynamic)  # fmt: skip
        data = path.read_bytes()
    onnx.checker.check_model(onnx.load_from_string(data))
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])

    def torch_logits(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(batch))[0].numpy()

    return data, compare(lambda x: onnx_run(session, x)[0], torch_logits, images, "torch_ref, fp32", "cpu", gated=True)


def onnx_run(session: Any, images: np.ndarray) -> list[np.ndarray]:
    """onnxruntime's (logits, probabilities) for a uint8 batch."""
    return session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})


def sidecar(target: str, weights: Loaded, pre: dict[str, Any], names: list[str], platforms: Sequence[str],
            check: dict[str, Any], artefact: bytes) -> dict[str, Any]:  # fmt: skip
    """The JSON written beside an artefact (porting.serve_predict reads it)."""
    file_name, runtime, precision = TARGETS[target]
    spec = input_spec(pre["image_size"], weights.config.in_channels)
    meta = {"format": SERVING_FORMAT, "format_version": SERVING_FORMAT_VERSION, "target": target,
            "artefact": file_name, "runtime": runtime, "precision": precision, "input": spec,
            "outputs": output_specs(len(names)), "class_names": names, "preprocessing": pre,
            "model": {"num_classes": weights.num_classes, "config": weights.config.to_dict()},
            "source": {"path": weights.location.given, "format": weights.source_format,
                       "step": weights.location.step},
            "weights_sha256": weights_sha256(weights.variables),
            "artefact_sha256": hashlib.sha256(artefact).hexdigest(), "check": check}  # fmt: skip
    meta.update({"platforms": list(platforms)} if runtime == "jax" else {"opset": ONNX_OPSET})
    meta["written_by"] = versions(JAX_DISTRIBUTIONS if runtime == "jax" else ONNX_DISTRIBUTIONS)
    return meta


def export(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    targets: Sequence[str] = DEFAULT_TARGETS,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
    force: bool = False,
    check_folder: str | os.PathLike | None = None,
    arch: str | None = None,
    leaky_slope: float | None = None,
    class_names: Sequence[str] | None = None,
    preprocessing: Preprocessing | dict[str, Any] | None = None,
) -> ExportResult:
    """Export `src` (any weights location) to `out_dir`: every artefact checked, then all written at once.

    arch, leaky_slope, class_names and preprocessing (record fields) say what the weights' own record does not;
    one that contradicts it is refused. Nothing is written when any check fails or any output exists without `force`.
    """
    for what, given, choices in (("target", targets, tuple(TARGETS)), ("platform", platforms, PLATFORMS)):
        if not given or len(set(given)) != len(given) or any(x not in choices for x in given):
            raise ExportError(f"unknown, repeated or no {what}s {list(given)}; choose from {list(choices)}")
    out = Path(out_dir)
    paths = {t: out / TARGETS[t][0] for t in targets}
    if out.exists() and not out.is_dir():
        raise ExportError(f"OUT {os.fspath(out)!r} is a file; give a folder")
    # Before any work: an existing output without --force, a read-only folder, or (OUT to create) a missing parent.
    for dst in [p for t in targets for p in (paths[t], sidecar_path(paths[t]))] if out.is_dir() else [out]:
        check_destination(dst, force)
    weights = read_weights(src, arch=arch, leaky_slope=leaky_slope, class_names=class_names,
                           preprocessing=preprocessing)  # fmt: skip
    pre, names, notes = serving_preprocessing(weights)
    images = check_images(pre, weights.config.in_channels, check_folder)
    check_batch(images, input_spec(pre["image_size"], weights.config.in_channels))
    outputs, sidecars = {}, {}
    for target in targets:
        _, runtime, precision = TARGETS[target]
        if runtime == "jax":
            data, check = export_jax(weights, pre, precision, platforms, images)
        else:
            data, check = export_onnx(weights, pre, images)
        if not check["ok"]:
            raise ExportError(f"{target}: the exported model failed its check ({check['reason']}); nothing was "
                              "written")  # fmt: skip
        sidecars[target] = sidecar(target, weights, pre, names, platforms, check, data)
        outputs[paths[target]] = data
        outputs[sidecar_path(paths[target])] = (json.dumps(sidecars[target], indent=2) + "\n").encode()
    created = not out.exists()
    out.mkdir(exist_ok=True)
    try:
        write_bytes(outputs, force=force)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if nothing else appeared in it meanwhile
        raise
    skipped = [f"{t}: not checked ({m['check']['skipped']})" for t, m in sidecars.items() if "skipped" in m["check"]]
    return ExportResult(paths, sidecars, (*weights.notes, *notes, *skipped))
