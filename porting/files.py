"""Reading and writing the container formats, chosen by path, with small metadata (writes: porting.atomic).

Formats: PyTorch `.pt`/`.pth` (torch.load with weights_only=True only) and `.safetensors`; Flax `.msgpack`
(flax.serialization bytes of {"params", "batch_stats", "meta"}) and orbax checkpoint directories; Darknet
`.weights` / `.conv.NN`. Metadata {"num_classes", "source_format", "preprocessing"} (the record of
porting.preprocessing) goes into the safetensors header, the msgpack `meta` entry, `porting_meta.json` inside an
orbax directory, and a `<file>.meta.json` sidecar next to a .pt/.pth (whose payload stays a plain state_dict that
`load_state_dict` takes). A train.torch checkpoint's own fields are read as metadata too (porting.runs).

Over 300 lines: the readers and writers of the five formats are kept side by side so that each pair stays symmetric.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from porting.atomic import atomic_write, remove_temporaries, write_bytes, write_file
from porting.errors import PortingError, failing_as, parse_json
from porting.hub import HUB_PYTORCH
from porting.preprocessing import Preprocessing, combine
from porting.runs import EMA, checked_val, trainer_meta
from porting.state import check_leaky_slope, check_num_classes

TORCH_SUFFIXES = (".pt", ".pth")
SAFETENSORS_SUFFIX = ".safetensors"
MSGPACK_SUFFIX = ".msgpack"
DARKNET_SUFFIX = ".weights"
DARKNET_PARTIAL = re.compile(r"\.conv\.\d+$")  # darknet53.conv.74, written by `darknet partial`
PT_SIDECAR_SUFFIX = ".meta.json"
ORBAX_META_FILE = "porting_meta.json"
ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt")
META_KEY = "meta"
VARIABLES = ("params", "batch_stats")  # the Flax collections a weights file holds
# What port-weights writes; files written before the preprocessing record held a top-level "leaky_slope" instead.
META_FIELDS = ("num_classes", "source_format", "preprocessing")
LEGACY_SLOPE = "leaky_slope"
# What a training checkpoint's metadata adds (porting.runs.trainer_meta); read, never written.
TRAINER_FIELDS = ("model_config", "run_config")
# The side (framework) each format belongs to; a direction such as torch2flax names two sides.
FORMAT_SIDES = {"torch": "torch", "safetensors": "torch", "msgpack": "flax", "orbax": "flax", "darknet": "darknet"}
SIDE_HELP = {
    "torch": ".pt, .pth or .safetensors",
    "flax": ".msgpack or an orbax directory",
    "darknet": ".weights or .conv.NN",
}

Meta = dict[str, Any]


def format_of(path: str | os.PathLike) -> str:
    """'torch', 'safetensors', 'msgpack', 'orbax' or 'darknet' from the path; PortingError otherwise."""
    p = Path(path)
    name = p.name.lower()
    if p.suffix.lower() in TORCH_SUFFIXES or name == HUB_PYTORCH:  # the Hub's name for a torch.save'd state_dict
        return "torch"
    if name.endswith(SAFETENSORS_SUFFIX):
        return "safetensors"
    if name.endswith(MSGPACK_SUFFIX):
        return "msgpack"
    if name.endswith(DARKNET_SUFFIX) or DARKNET_PARTIAL.search(name):
        return "darknet"
    if p.is_dir() or not p.suffix:
        return "orbax"
    expected = "; ".join(f"{names} ({side})" for side, names in SIDE_HELP.items())
    raise PortingError(f"cannot tell the format of {os.fspath(path)!r}: expected {expected}")


def check_side(path: str | os.PathLike, side: str, what: str) -> str:
    """format_of(path) if that format belongs to `side` ('torch', 'flax', 'darknet'), else PortingError."""
    fmt = format_of(path)
    if FORMAT_SIDES[fmt] != side:
        raise PortingError(f"{what} {os.fspath(path)!r} is a {fmt} path; expected {SIDE_HELP[side]}")
    return fmt


def clean_meta(raw: Any, where: str) -> Meta:
    """Validate a metadata mapping: known fields with the right types, unknown ones dropped.

    "preprocessing" is always present (the record's JSON form, {} when nothing is known); an old file's top-level
    "leaky_slope" is folded into it, and refused if the record says otherwise.
    """
    raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        raise PortingError(f"{where}: metadata must be a mapping, got {type(raw).__name__}")
    meta: Meta = {}
    classes, source = raw.get("num_classes"), raw.get("source_format")
    if classes is not None:
        meta["num_classes"] = check_num_classes(classes, f"{where}: metadata num_classes")
    if source is not None:
        meta["source_format"] = str(source)
    record, _ = Preprocessing.from_json(raw.get("preprocessing"), f"{where}: preprocessing", strict=False)
    legacy = Preprocessing(leaky_slope=check_leaky_slope(raw.get(LEGACY_SLOPE), f"{where}: metadata leaky_slope"))
    record = combine([(f"{where} preprocessing", record), (f"{where} {LEGACY_SLOPE}", legacy)], where)
    meta["preprocessing"] = record.to_json()
    for key in TRAINER_FIELDS:
        if isinstance(raw.get(key), Mapping):
            meta[key] = dict(raw[key])
    if (val := checked_val(raw.get("val"), where)) is not None:
        meta["val"] = val
    return meta


def _read_json_meta(path: str | os.PathLike) -> Meta:
    with failing_as(f"cannot read {os.fspath(path)!r}"):
        data = Path(path).read_bytes()
    return clean_meta(parse_json(data, os.fspath(path)), os.fspath(path))


def require_file(path: str | os.PathLike) -> str:
    """The path as a string if it names an existing file, else PortingError."""
    where = os.fspath(path)
    if not os.path.isfile(where):
        raise PortingError(f"{where!r} does not exist or is not a file")
    return where


def _written(meta: Meta, where: str) -> Meta:
    """The fields port-weights writes, validated."""
    meta = clean_meta(meta, where)
    return {k: meta[k] for k in META_FIELDS if k in meta}


def _strings_to_meta(raw: Mapping[str, str] | None, where: str) -> Meta:
    parsed = {}
    for k in (*META_FIELDS, LEGACY_SLOPE):
        if raw and k in raw:
            if not isinstance(raw[k], str | bytes):
                raise PortingError(f"{where}: metadata {k}={raw[k]!r} is not JSON")
            parsed[k] = parse_json(raw[k], f"{where}: metadata {k}")
    return clean_meta(parsed, where)


def _json_bytes(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, indent=1, sort_keys=True, allow_nan=False).encode("utf-8")


def _orbax_checkpointer() -> Any:
    """orbax's synchronous checkpointer. The asynchronous one (StandardCheckpointer) creates the directory in a
    background thread; when that fails (read-only or full disk) its writer threads wait 300 s for a signal that
    never comes, holding the process long after the error."""
    import orbax.checkpoint as ocp

    return ocp.Checkpointer(ocp.StandardCheckpointHandler())


@contextlib.contextmanager
def _orbax_failing_quietly(tmp: str) -> Iterator[None]:
    """On a failed orbax save into `tmp`, remove what it wrote while dropping the tracebacks it prints.

    orbax raises at the first failed write (ENOSPC) while its other writes are still in flight; each of those
    then prints a traceback ("Event loop is closed") on stderr, and may still create files, until its
    temporaries are gone. The error itself is reported once, by atomic_write. What a successful save prints
    is passed on.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        except BaseException:
            remove_temporaries(*os.path.split(tmp), settle=True)
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        os.write(2, log.read())


# ------------------------------------------------------------------------------------------------ PyTorch


def _unwrap_checkpoint(obj: Any, where: str) -> tuple[Mapping[str, Any], Meta | None]:
    """(state_dict, metadata or None) of a state_dict, a {"state_dict"/"model": ...} dict, or a train.torch payload."""
    if not isinstance(obj, Mapping):
        raise PortingError(f"{where}: expected a state_dict or a checkpoint dict, got {type(obj).__name__}")
    for key in ("state_dict", "model"):
        if isinstance(obj.get(key), Mapping):
            if key == "model" and any(k in obj for k in ("preprocessing", "class_names", "config")):
                # What train.torch saves; with --ema-decay the EMA was evaluated and chosen: those are its weights.
                weights = obj[EMA] if isinstance(obj.get(EMA), Mapping) else obj[key]
                return weights, clean_meta(trainer_meta(obj, where), where)
            return obj[key], None if obj.get(META_KEY) is None else clean_meta(obj.get(META_KEY), where)
    return obj, None


def read_torch_file(path: str | os.PathLike) -> tuple[Mapping[str, Any], Meta]:
    """A state_dict from .pt/.pth (weights_only=True, never anything else) or .safetensors, and its metadata."""
    import torch

    where = require_file(path)
    if format_of(where) == "safetensors":
        from safetensors import safe_open

        with failing_as(f"{where}: not a readable safetensors file"), safe_open(where, framework="pt") as f:
            state: Mapping[str, Any] = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
            return state, _strings_to_meta(f.metadata(), where)
    # The weights-only unpickler refuses any global it does not allow: no code from the file runs.
    with failing_as(f"{where}: refused by torch.load(weights_only=True) (a pickle payload or not a torch file)"):
        obj = torch.load(where, map_location="cpu", weights_only=True)
    state, meta = _unwrap_checkpoint(obj, where)
    sidecar = where + PT_SIDECAR_SUFFIX
    if meta is None:
        meta = _read_json_meta(sidecar) if os.path.isfile(sidecar) else clean_meta(None, where)
    return state, meta


def write_torch_file(dst: str | os.PathLike, state_dict: Mapping[str, Any], meta: Meta, force: bool = False) -> None:
    """Write a torch state_dict as .pt/.pth (plain state_dict + sidecar) or .safetensors (metadata in header)."""
    dst, meta = os.fspath(dst), _written(meta, os.fspath(dst))
    if check_side(dst, "torch", "PyTorch output") == "safetensors":
        from safetensors.torch import save

        header = {k: json.dumps(v) for k, v in meta.items()}  # safetensors metadata values are strings
        write_bytes({dst: save({k: v.contiguous() for k, v in state_dict.items()}, header)}, force)
        return
    import torch

    buffer = io.BytesIO()  # serialised here, so that every byte reaches the disk through write_file
    torch.save(dict(state_dict), buffer)
    write_bytes({dst: buffer.getvalue(), dst + PT_SIDECAR_SUFFIX: _json_bytes(meta)}, force)


# --------------------------------------------------------------------------------------------------- Flax


def _is_checkpoint(path: Path) -> bool:
    return any((path / m).exists() for m in ORBAX_MARKERS)


def is_orbax_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is an orbax checkpoint, a manager directory of steps, or holds one checkpoint item."""
    path = Path(path)
    return path.is_dir() and _is_checkpoint(_orbax_item_dir(path)[0])


def _orbax_item_dir(path: Path) -> tuple[Path, list[str]]:
    """The directory that holds the pytree: PATH itself, or the newest step (and single item) of a manager dir."""
    notes = []
    if not _is_checkpoint(path):
        steps = sorted((p for p in path.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
        if steps:
            path = steps[-1]
            notes.append(f"orbax: read the newest step {path.name} of a checkpoint manager directory")
        if not _is_checkpoint(path):
            items = [p for p in path.iterdir() if p.is_dir() and _is_checkpoint(p)]
            if len(items) == 1:
                path = items[0]
                notes.append(f"orbax: read item {path.name!r}")
    return path, notes


def _pick_variables(tree: Any, where: str) -> tuple[dict[str, Any], list[str]]:
    """{"params", "batch_stats"} out of a restored tree; other top-level entries (step, opt_state) are noted."""
    if isinstance(tree, Mapping) and "params" not in tree and len(tree) == 1:
        ((_, inner),) = tree.items()
        if isinstance(inner, Mapping) and "params" in inner:
            tree = inner
    if not isinstance(tree, Mapping) or "params" not in tree:
        keys = list(tree)[:10] if isinstance(tree, Mapping) else type(tree).__name__
        raise PortingError(f"{where}: expected a checkpoint holding 'params' and 'batch_stats', got {keys}")
    ignored = sorted(str(k) for k in tree if k not in (*VARIABLES, META_KEY))
    notes = [f"ignored checkpoint entries: {', '.join(ignored)}"] if ignored else []
    return {k: tree[k] for k in VARIABLES if k in tree}, notes


def read_flax_file(path: str | os.PathLike) -> tuple[dict[str, Any], Meta, list[str]]:
    """Flax variables, metadata and notes from a .msgpack file or an orbax checkpoint directory."""
    where = os.fspath(path)
    if format_of(where) == "msgpack":
        from flax import serialization

        with open(require_file(where), "rb") as f, failing_as(f"{where}: not a Flax msgpack file"):
            tree = serialization.msgpack_restore(f.read())
        if not isinstance(tree, Mapping):
            raise PortingError(f"{where}: expected a msgpack dict of params and batch_stats, got {type(tree).__name__}")
        meta = clean_meta(tree.get(META_KEY), where)
        unexpected = [k for k in tree if k not in (*VARIABLES, META_KEY)]
        if unexpected:
            raise PortingError(
                f"{where}: unexpected top-level entries {unexpected}; expected params, batch_stats, meta"
            )
        return {k: tree[k] for k in VARIABLES if k in tree}, meta, []
    directory = Path(where)
    if not directory.is_dir():
        raise PortingError(f"{where!r} is not an orbax checkpoint directory (or a .msgpack file)")
    item, notes = _orbax_item_dir(directory.absolute())
    with failing_as(f"{where}: not a readable orbax checkpoint"), _orbax_checkpointer() as checkpointer:
        tree = checkpointer.restore(item)
    variables, more = _pick_variables(tree, where)
    found = [p for p in (item / ORBAX_META_FILE, directory / ORBAX_META_FILE) if p.is_file()]
    return variables, _read_json_meta(found[0]) if found else clean_meta(None, where), notes + more


def write_flax_file(dst: str | os.PathLike, variables: Mapping[str, Any], meta: Meta, force: bool = False) -> None:
    """Write Flax variables as .msgpack (with a `meta` entry) or, for any other name, an orbax directory."""
    dst = os.fspath(dst)
    meta = _written(meta, dst)
    if check_side(dst, "flax", "Flax output") == "msgpack":
        from flax import serialization

        write_bytes({dst: serialization.msgpack_serialize({**variables, META_KEY: meta})}, force)
        return
    import jax
    import orbax.checkpoint as ocp

    def write_dir(tmp: str) -> None:
        with _orbax_failing_quietly(tmp), _orbax_checkpointer() as checkpointer:
            checkpointer.save(tmp, args=ocp.args.StandardSave(dict(variables)))
        write_file(os.path.join(tmp, ORBAX_META_FILE), _json_bytes(meta))

    atomic_write({dst: write_dir}, force, sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(dict(variables))))
