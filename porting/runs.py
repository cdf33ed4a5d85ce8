"""The training-run format: folder names, checkpoint items, the meta schema, the readers and the writer.

A train.flax run keeps orbax steps under <workdir>/checkpoints: each step folder holds "state" (step, params,
opt_state, batch_stats, the EMA when kept), "meta" (JSON: the config, class names, preprocessing record, loop
counters, data-iterator state, validation metrics, the weights' checksum) and, for evaluated steps, orbax's own
"metrics" item, which its BestN policy and `best_step()` rank by. A train.torch run keeps torch files holding the
same meta fields beside "model" and "optimizer" under <workdir>/torch_checkpoints. Both trainers write through this
module and keep only their policy (when to save, how many to keep); every reader (porting.locate, --init-from,
predict, export) reads through it, so the `porting` extra alone reads any run.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import logging
import math
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from darknet_arch import ARCHS, DarknetConfig
from porting.atomic import remove_temporaries
from porting.errors import PortingError, failing_as, shown
from porting.preprocessing import TRAINER_DEFAULTS, Preprocessing, combine
from porting.state import weights_sha256

if TYPE_CHECKING:
    import orbax.checkpoint as ocp

# jax and orbax are imported where used: the names and trainer_meta serve PyTorch-only readers (a train.torch
# run, port-weights between torch files) that must not load jax.

CHECKPOINT_DIR = "checkpoints"  # train.flax
TORCH_CHECKPOINT_DIR = "torch_checkpoints"  # train.torch
TORCH_LATEST, TORCH_BEST = "latest.pt", "best.pt"
STATE, META = "state", "meta"  # the items of a train.flax step
RUN_CONFIG = "config.json"  # a run's TrainConfig; a Hub directory's config.json has "architecture" instead
RUN_CONFIG_KEYS = ("data", "arch", "workdir")  # fields every trainer's config.json records
# Orbax writes into "<step>.orbax-checkpoint-tmp*" and renames when done; a crash can leave these behind.
TMP_MARKER = ".orbax-checkpoint-tmp"
UNREADABLE_SUFFIX = ".unreadable"  # step folders a --resume could not read, kept beside the good ones
BEST_METRIC = "macro_f1"  # the competition metric; higher is better
EMA = "ema"  # the averaged weights (--ema-decay) in both trainers' checkpoints: evaluated, so read as the run's
WEIGHTS = ("params", "batch_stats", EMA)  # the parts of a state tree that are weights (the EMA when kept)
VAL_FIELDS = ("loss", "accuracy", "macro_f1")  # the validation figures a checkpoint records


class CheckpointError(PortingError):
    """A checkpoint that is missing, unreadable, damaged, or failed to save."""


@dataclasses.dataclass(frozen=True)
class RunMeta:
    """What every checkpoint of both trainers records beside its arrays (the "meta" item; a torch file's keys)."""

    config: dict[str, Any]  # the run's TrainConfig JSON
    class_names: list[str]
    data_fingerprint: str
    preprocessing: dict[str, Any]  # porting.preprocessing.Preprocessing JSON
    model_config: dict[str, Any]  # DarknetConfig.to_dict()
    data_state: Any  # the data iterator's state (JSON-safe: see encode_data_state)
    loop: dict[str, Any]  # the loop's counters
    val: dict[str, float] | None  # VAL_FIELDS of the evaluation at this step, if one ran

    def to_json(self) -> dict[str, Any]:
        """The meta item's JSON."""
        return {**dataclasses.asdict(self), "data_state": encode_data_state(self.data_state)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RunMeta:
        """The fields of a meta item this version wrote (read_meta's second value), the data-iterator state decoded.

        Older items may lack fields (model_config): readers of any run use trainer_meta, which fills them in."""
        fields = {f.name: d[f.name] for f in dataclasses.fields(cls)}
        return cls(**{**fields, "data_state": decode_data_state(fields["data_state"])})


def checked_val(raw: Any, where: str) -> dict[str, float] | None:
    """A checkpoint's recorded validation metrics (VAL_FIELDS, finite numbers), None when it records none."""
    if raw is None:
        return None
    val: dict[str, float] = {}
    for key in VAL_FIELDS:
        value = raw.get(key) if isinstance(raw, Mapping) else None
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            fields = ", ".join(VAL_FIELDS)
            raise PortingError(f"{where}: metadata val must map {fields} to finite numbers, got {shown(raw)}")
        val[key] = float(value)
    return val


def val_record(val: Mapping[str, Any] | None) -> dict[str, float] | None:
    """The VAL_FIELDS of an evaluation's metrics, as a checkpoint records them."""
    return None if val is None else {k: val[k] for k in VAL_FIELDS}


def encode_data_state(data_state: Any) -> Any:
    """Make a data-iterator state JSON-safe (grain gives bytes)."""
    if isinstance(data_state, bytes):
        return {"__bytes__": base64.b64encode(data_state).decode("ascii")}
    return data_state


def decode_data_state(value: Any) -> Any:
    """Inverse of encode_data_state."""
    if isinstance(value, dict) and set(value) == {"__bytes__"}:
        return base64.b64decode(value["__bytes__"])
    return value


def trainer_preprocessing(
    mean_std: tuple[tuple[float, ...], tuple[float, ...]], image_size: int, class_names: list[str], leaky_slope: float
) -> dict[str, Any]:
    """The preprocessing record both trainers write into every checkpoint: TRAINER_DEFAULTS with the run's values."""
    mean, std = mean_std
    record = TRAINER_DEFAULTS.replace(
        mean=mean, std=std, image_size=image_size, class_names=tuple(class_names), leaky_slope=leaky_slope
    )
    return record.to_json()


def trainer_meta(payload: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Porting metadata (files.clean_meta's form) of a train.flax meta item or a train.torch checkpoint payload.

    Their preprocessing record, checked against the class names, image size and slope they record elsewhere, with the
    fields older records lack filled from what the trainers have always done (preprocessing.TRAINER_DEFAULTS).
    """
    record, _ = Preprocessing.from_json(payload.get("preprocessing"), f"{where} preprocessing", strict=False)
    raw_run = payload.get("config")
    run: Mapping[str, Any] = raw_run if isinstance(raw_run, Mapping) else {}
    config: DarknetConfig | None
    try:
        if isinstance(payload.get("model_config"), Mapping):
            config = DarknetConfig.from_dict(payload["model_config"])
        else:
            config = ARCHS[run["arch"]].with_slope(run.get("leaky_slope")) if run.get("arch") in ARCHS else None
        recorded = Preprocessing(
            class_names=payload.get("class_names"),
            image_size=run.get("image_size"),
            leaky_slope=None if config is None else config.leaky_slope,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise PortingError(f"{where}: not a training checkpoint's meta ({type(exc).__name__}: {exc})") from exc
    record = combine([(f"{where} preprocessing", record), (f"{where} meta", recorded)], where)
    return {
        "preprocessing": record.filled(TRAINER_DEFAULTS).to_json(),
        "model_config": None if config is None else config.to_dict(),
        "run_config": dict(run),
        "val": checked_val(payload.get("val"), where),
    }


def weights_checksum(tree: Mapping[str, Any]) -> str | None:
    """porting's weights_sha256 of a state tree's WEIGHTS, on one device's copy; None when an array is sharded
    rather than replicated (no single copy holds it)."""
    import jax

    weights = {k: tree[k] for k in WEIGHTS if tree.get(k) is not None}
    leaves = jax.tree_util.tree_leaves(weights)
    if any(isinstance(a, jax.Array) and not a.sharding.is_fully_replicated for a in leaves):
        return None

    def host(a: Any) -> np.ndarray:
        return np.asarray(a.addressable_data(0) if isinstance(a, jax.Array) else a)

    return weights_sha256(jax.tree_util.tree_map(host, weights))


def _step_name(directory: str | Path, step: int) -> str:
    return f"checkpoint step {step} ({Path(directory) / str(step)})"


@contextlib.contextmanager
def _step_failing(directory: str | Path, step: int, what: str) -> Iterator[None]:
    """Whatever orbax raises reading `step` as ONE CheckpointError naming the step, `what` went wrong, and why."""
    try:
        yield
    except Exception as e:
        raise CheckpointError(f"{_step_name(directory, step)} {what}: {e}") from e


def _manager(directory: Path, keep: int | None = None, async_save: bool = False) -> ocp.CheckpointManager:
    """A manager ranking by BEST_METRIC; with `keep` it writes and keeps the latest `keep` plus the best."""
    import orbax.checkpoint as ocp

    policy = None
    if keep is not None:
        best = ocp.checkpoint_managers.BestN(
            get_metric_fn=lambda m: m[BEST_METRIC], n=1, keep_checkpoints_without_metrics=False
        )
        policy = ocp.checkpoint_managers.AnyPreservationPolicy([ocp.checkpoint_managers.LatestN(n=keep), best])
    options = ocp.CheckpointManagerOptions(
        best_fn=lambda m: m[BEST_METRIC],
        best_mode="max",
        preservation_policy=policy,
        create=keep is not None,
        cleanup_tmp_directories=keep is not None,
        enable_async_checkpointing=async_save,
    )
    handlers = {STATE: ocp.StandardCheckpointHandler(), META: ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(directory.absolute(), options=options, item_handlers=handlers)


class Checkpointer:
    """A train.flax run's checkpoint writer: saves run in the background; failures surface as CheckpointError."""

    def __init__(self, workdir: str | Path, keep: int, async_save: bool = True) -> None:
        # orbax refuses relative paths (e.g. the default runs/<time>); it also removes leftover tmp folders.
        self.directory = Path(workdir).absolute() / CHECKPOINT_DIR
        self.manager = _manager(self.directory, keep=keep, async_save=async_save)

    def save(self, step: int, tree: Mapping[str, Any], meta: RunMeta, val: Mapping[str, Any] | None = None) -> None:
        """Save `step`'s state tree; with an evaluation `val` (holding BEST_METRIC) it may become the best."""
        import jax
        import orbax.checkpoint as ocp

        # (a TrainState fresh from TrainState.create has a plain int step: 8 bytes)
        need = sum(getattr(x, "nbytes", 8) for x in jax.tree_util.tree_leaves(tree))
        free = shutil.disk_usage(self.directory).free
        if free < need:  # refuse up front: orbax failing mid-write leaves its writer threads printing tracebacks
            raise CheckpointError(
                f"saving checkpoint step {step}: it needs about {need / 2**20:.1f} MiB, {self.directory} has "
                f"{free / 2**20:.1f} MiB free. Free disk space, then continue with --resume"
            )
        metrics = None if val is None else {BEST_METRIC: val[BEST_METRIC]}
        try:
            self.manager.check_for_errors()  # a failed earlier background save surfaces here, not silently
            record = {**meta.to_json(), "weights_sha256": weights_checksum(tree)}
            items = {STATE: ocp.args.StandardSave(dict(tree)), META: ocp.args.JsonSave(record)}
            self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
        except Exception as e:
            raise CheckpointError(f"saving checkpoint step {step} in {self.directory} failed: {e}") from e

    def reached_preemption(self, step: int) -> bool:
        """Whether JAX's preemption service agreed that every process stops after `step`."""
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        """Block until background saves finish; raise CheckpointError if one failed."""
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:
            raise CheckpointError(
                f"background checkpoint save in {self.directory} failed: {e}. Free disk space or fix the folder's "
                "permissions, then continue with --resume (the last finished checkpoint is intact)"
            ) from e

    def close(self) -> None:
        """Finish background saves and close; after a failed save, remove its temporary folders (process 0)."""
        import jax

        try:
            self.wait()
        except CheckpointError:
            # orbax raises at the first failed write while its other writes are still in flight; closing the
            # manager then would tear their event loop down under them (a page of "Event loop is closed"
            # tracebacks). Leave them to finish or fail, and remove what they write until nothing reappears.
            if jax.process_index() == 0:
                remove_temporaries(self.directory, TMP_MARKER, settle=True)
            raise
        self.manager.close()


def save_torch_checkpoint(
    path: Path, model: Mapping[str, Any], optimizer: Mapping[str, Any], meta: RunMeta, **extra: Any
) -> None:
    """A train.torch checkpoint: the model and optimizer state dicts beside the meta fields, written whole or not at
    all (a temporary, then a rename), readable with weights_only=True."""
    import torch

    payload = {"model": model, "optimizer": optimizer, **dataclasses.asdict(meta), **extra}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _reading(directory: str | Path) -> Iterator[ocp.CheckpointManager]:
    """A manager over an existing checkpoint folder, with orbax's informational warnings kept quiet."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # "Given directory is read only"-style notes are not the user's business
    try:
        path = Path(directory)
        if not path.is_dir():
            raise CheckpointError(f"{path} is not a checkpoint folder")
        with failing_as(f"{path}: not a readable training checkpoint folder"), _manager(path) as m:
            yield m
    finally:
        absl.setLevel(level)


def ranked_steps(directory: str | Path) -> tuple[int | None, int | None, bool]:
    """(latest, best, whether the best was ranked by a score): while no checkpoint has a validation score (a run
    stopped before its first evaluation), orbax ranks none and the best is the latest."""
    with _reading(directory) as m:
        latest = m.latest_step()
        best = m.best_step() if latest is not None else None
    return latest, latest if best is None else best, best is not None


def checkpoint_steps(directory: str | Path) -> tuple[int | None, int | None]:
    """(latest step, best step by macro F1) of a checkpoint folder; the best falls back to the latest."""
    return ranked_steps(directory)[:2]


def all_steps(directory: str | Path) -> list[int]:
    """Every finished step of a checkpoint folder, newest first."""
    with _reading(directory) as m:
        return sorted(m.all_steps(), reverse=True)


def set_aside_after(directory: str | Path, step: int) -> list[Path]:
    """Rename the step folders newer than `step` (unreadable ones a resume skipped) to `<step>.unreadable`.

    The run continues from `step` and will save those step numbers again; the old folders are kept, not deleted.
    """
    moved = []
    for p in Path(directory).iterdir():
        if p.name.isdigit() and int(p.name) > step:
            target = p.with_name(f"{p.name}{UNREADABLE_SUFFIX}")
            p.rename(target)
            moved.append(target)
    return moved


def read_meta(directory: str | Path, step: int | None = None) -> tuple[int, dict]:
    """(step, meta) of a checkpoint folder's latest (or given) step, without restoring arrays."""
    import orbax.checkpoint as ocp

    with _reading(directory) as m:
        step = m.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {directory}")
        with _step_failing(directory, step, "has no readable meta"):
            restored = m.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
    return step, restored[META]


def _restore(
    m: ocp.CheckpointManager, directory: str | Path, step: int, abstract: Any, failure: str
) -> tuple[Any, Any]:
    """(state tree, meta) of `step` restored into `abstract`, unless its weights differ from the checksum recorded
    when they were saved (bit rot on disk); CheckpointError naming the step otherwise."""
    import orbax.checkpoint as ocp

    with _step_failing(directory, step, failure):
        items = {STATE: ocp.args.StandardRestore(abstract), META: ocp.args.JsonRestore()}
        both = m.restore(step, args=ocp.args.Composite(**items))
    recorded = both[META].get("weights_sha256")  # checkpoints saved before the checksum was recorded have none
    if recorded is not None and weights_checksum(both[STATE]) != recorded:
        raise CheckpointError(
            f"{_step_name(directory, step)} is damaged: its weights differ from the checksum recorded when it was "
            "saved (a byte changed on disk); read another step (<run>/latest or checkpoints/<step>) or a backup"
        )
    return both[STATE], both[META]


def restore_tree(directory: str | Path, step: int, target: Any) -> dict[str, Any]:
    """A step's state tree in the structure, dtypes and shardings of `target` (a state tree); strict about shapes."""
    import jax
    import orbax.checkpoint as ocp

    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    with _reading(directory) as m:
        tree, _ = _restore(m, directory, step, abstract, "does not match this network/optimizer")
    return tree


def restore_variables(directory: str | Path, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """({"params", "batch_stats"} as numpy trees, meta) of a step, with no target: the EMA when the run kept one."""
    import jax

    with _reading(directory) as m:
        # The saved shardings name the saving run's devices (other processes, other hosts): read every array
        # onto this process's first device instead.
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        with _step_failing(directory, step, "could not be read"):
            saved = m.item_metadata(step)[STATE]
        abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), saved)
        restored, meta = _restore(m, directory, step, abstract, "could not be read")
    # A run with --ema-decay evaluated (and picked its best step by) the EMA: those are its weights.
    source = restored.get(EMA) or restored
    variables = {"params": source["params"], "batch_stats": source["batch_stats"]}
    return jax.tree_util.tree_map(np.asarray, variables), meta


def read_train_step(step_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(Flax variables, porting metadata) of a train.flax step folder (the EMA weights if the run kept them)."""
    step_dir = Path(step_dir)
    variables, meta = restore_variables(step_dir.parent, int(step_dir.name))
    return variables, trainer_meta(meta, str(step_dir))
