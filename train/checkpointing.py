"""Orbax checkpoints under <workdir>/checkpoints: one manager keeps the latest N plus the best by val macro F1.

Each step folder holds "state" (step, params, opt_state, batch_stats), "meta" (JSON: the config, class names,
preprocessing, loop counters, data-iterator state, validation metrics) and, for evaluated steps, orbax's own
"metrics" item, which its BestN preservation policy and `best_step()` rank by.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from porting.state import weights_sha256
from train.state import TrainState

CHECKPOINT_DIR = "checkpoints"
# Orbax writes into "<step>.orbax-checkpoint-tmp*" and renames when done; a crash can leave these behind.
TMP_MARKER = ".orbax-checkpoint-tmp"
STATE, META = "state", "meta"
UNREADABLE_SUFFIX = ".unreadable"  # step folders a --resume could not read, kept beside the good ones
# After a failed save: how long to keep removing the temporaries of orbax's writes still in flight.
CLEANUP_GRACE_S, CLEANUP_QUIET_S, CLEANUP_POLL_S = 10.0, 1.0, 0.1
BEST_METRIC = "macro_f1"  # the competition metric; higher is better
WEIGHTS_SHA256 = "weights_sha256"  # the meta field holding the saved weights' checksum


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or failed to save."""


def weights_checksum(tree: dict[str, Any]) -> str | None:
    """porting's weights_sha256 of a state tree's weights (params, batch_stats and the EMA when kept), on one
    device's copy; None when an array is sharded rather than replicated (no single copy holds it)."""
    weights = {k: tree[k] for k in ("params", "batch_stats", "ema") if tree.get(k) is not None}
    leaves = jax.tree_util.tree_leaves(weights)
    if any(isinstance(a, jax.Array) and not a.sharding.is_fully_replicated for a in leaves):
        return None
    host = jax.tree_util.tree_map(lambda a: np.asarray(a.addressable_data(0) if isinstance(a, jax.Array) else a),
                                  weights)  # fmt: skip
    return weights_sha256(host)


def _verified(tree: dict[str, Any], meta: dict, step: int, directory: str | Path) -> dict[str, Any]:
    """`tree`, unless its weights differ from the checksum recorded when they were saved (bit rot on disk)."""
    recorded = meta.get(WEIGHTS_SHA256)  # checkpoints saved before the checksum was recorded have none
    if recorded is not None and weights_checksum(tree) != recorded:
        raise CheckpointError(
            f"checkpoint step {step} in {directory} is damaged: its weights differ from the checksum recorded when "
            "it was saved (a byte changed on disk); read another step (<run>/latest or checkpoints/<step>) or a "
            "backup"
        )
    return tree


def state_tree(state: TrainState) -> dict[str, Any]:
    """The array part of a TrainState (apply_fn and tx are code, rebuilt from the config)."""
    tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state, "batch_stats": state.batch_stats}
    return tree if state.ema is None else {**tree, "ema": state.ema}


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


def _registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
        registry.add(STATE, args, ocp.StandardCheckpointHandler)
    for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
        registry.add(META, args, ocp.JsonCheckpointHandler)
    return registry


def _manager(directory: Path, keep: int | None = None, async_save: bool = False) -> ocp.CheckpointManager:
    """A manager ranking by BEST_METRIC; with `keep` it writes and keeps the latest `keep` plus the best."""
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
    return ocp.CheckpointManager(directory.absolute(), options=options, handler_registry=_registry())


class Checkpointer:
    """The run's checkpoint writer: saves run in the background; failures surface as CheckpointError."""

    def __init__(self, workdir: str | Path, keep: int, async_save: bool = True) -> None:
        # orbax refuses relative paths (e.g. the default runs/<time>); it also removes leftover tmp folders.
        self.directory = Path(workdir).absolute() / CHECKPOINT_DIR
        self.manager = _manager(self.directory, keep=keep, async_save=async_save)

    def save(self, step: int, state: TrainState, meta: dict, metrics: dict | None = None) -> None:
        """Save `step`; `metrics` (with BEST_METRIC) make it a candidate for the best checkpoint."""
        # (a TrainState fresh from TrainState.create has a plain int step: 8 bytes)
        need = sum(getattr(x, "nbytes", 8) for x in jax.tree_util.tree_leaves(state_tree(state)))
        free = shutil.disk_usage(self.directory).free
        if free < need:  # refuse up front: orbax failing mid-write leaves its writer threads printing tracebacks
            raise CheckpointError(
                f"saving checkpoint step {step}: it needs about {need / 2**20:.1f} MiB, {self.directory} has "
                f"{free / 2**20:.1f} MiB free. Free disk space, then continue with --resume"
            )
        try:
            self.manager.check_for_errors()  # a failed earlier background save surfaces here, not silently
            tree = state_tree(state)
            meta = {**meta, WEIGHTS_SHA256: weights_checksum(tree)}
            items = {STATE: ocp.args.StandardSave(tree), META: ocp.args.JsonSave(meta)}
            args = ocp.args.Composite(**items)
            self.manager.save(step, args=args, metrics=metrics, force=True)
        except Exception as e:
            raise CheckpointError(f"saving checkpoint step {step} in {self.directory} failed: {e}") from e

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
        try:
            self.wait()
        except CheckpointError:
            # orbax raises at the first failed write while its other writes are still in flight; closing the
            # manager then would tear their event loop down under them (a page of "Event loop is closed"
            # tracebacks). Leave them to finish or fail, and remove what they write until nothing reappears.
            if jax.process_index() == 0:
                deadline, quiet_since = time.monotonic() + CLEANUP_GRACE_S, time.monotonic()
                while time.monotonic() < deadline and time.monotonic() - quiet_since < CLEANUP_QUIET_S:
                    for p in self.directory.glob(f"*{TMP_MARKER}*"):
                        shutil.rmtree(p, ignore_errors=True)
                        quiet_since = time.monotonic()
                    time.sleep(CLEANUP_POLL_S)
            raise
        self.manager.close()


@contextlib.contextmanager
def _reading(directory: str | Path) -> Any:
    """A manager over an existing checkpoint folder, with orbax's informational warnings kept quiet."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # "Given directory is read only"-style notes are not the user's business
    try:
        path = Path(directory)
        if not path.is_dir():
            raise CheckpointError(f"{path} is not a checkpoint folder")
        with _manager(path) as m:
            yield m
    finally:
        absl.setLevel(level)


def checkpoint_steps(directory: str | Path) -> tuple[int | None, int | None]:
    """(latest step, best step by macro F1) of a checkpoint folder; the best falls back to the latest."""
    latest, best, _ = ranked_steps(directory)
    return latest, best


def ranked_steps(directory: str | Path) -> tuple[int | None, int | None, bool]:
    """(latest, best, whether the best was ranked by a score): while no checkpoint has a validation score (a run
    stopped before its first evaluation), orbax ranks none and the best is the latest."""
    with _reading(directory) as m:
        latest = m.latest_step()
        best = m.best_step() if latest is not None else None
    return latest, latest if best is None else best, best is not None


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
    with _reading(directory) as m:
        step = m.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {directory}")
        try:
            restored = m.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
        except Exception as e:
            raise CheckpointError(f"checkpoint step {step} in {directory} has no readable meta: {e}") from e
    return step, restored[META]


def restore_state(directory: str | Path, step: int, target: TrainState) -> TrainState:
    """Restore arrays into the structure, dtypes and shardings of `target`; strict about shapes."""
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state_tree(target))
    with _reading(directory) as m:
        try:
            items = {STATE: ocp.args.StandardRestore(abstract), META: ocp.args.JsonRestore()}
            restored = m.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            raise CheckpointError(
                f"checkpoint step {step} in {directory} does not match this network/optimizer: {e}"
            ) from e
    return target.replace(**_verified(restored[STATE], restored[META], step, directory))


def restore_variables(directory: str | Path, step: int) -> dict[str, Any]:
    """{"params", "batch_stats"} as numpy trees, with no target (for predict and --init-from)."""
    with _reading(directory) as m:
        # The saved shardings name the saving run's devices (other processes, other hosts): read every array
        # onto this process's first device instead.
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        try:
            abstract = jax.tree_util.tree_map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), m.item_metadata(step)[STATE]
            )
            items = {STATE: ocp.args.StandardRestore(abstract), META: ocp.args.JsonRestore()}
            both = m.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            raise CheckpointError(f"checkpoint step {step} in {directory} could not be read: {e}") from e
    restored = _verified(both[STATE], both[META], step, directory)
    # A run with --ema-decay evaluated (and picked its best step by) the EMA: those are its weights.
    source = restored.get("ema") or restored
    return jax.tree_util.tree_map(np.asarray, {"params": source["params"], "batch_stats": source["batch_stats"]})
