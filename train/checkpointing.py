"""Orbax checkpoints: the latest N under <workdir>/checkpoints and the best by val macro F1 under <workdir>/best.

Each checkpoint holds two items: "state" (step, params, opt_state, batch_stats) and "meta" (JSON: the config,
class names, loop step, data-iterator state, RNG key, counters and the validation metrics).
"""

from __future__ import annotations

import base64
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from train.state import TrainState

LATEST_DIR = "checkpoints"
BEST_DIR = "best"
# Orbax writes into "<step>.orbax-checkpoint-tmp-*" and renames when done; a crash can leave these behind.
TMP_MARKER = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or failed to save."""


def state_tree(state: TrainState) -> dict[str, Any]:
    """The array part of a TrainState (apply_fn and tx are code, rebuilt from the config)."""
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "batch_stats": state.batch_stats}


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


def clean_tmp_dirs(workdir: str | Path) -> list[Path]:
    """Delete leftover temporary checkpoint folders from an interrupted save; returns what was removed."""
    removed = []
    for sub in (LATEST_DIR, BEST_DIR):
        root = Path(workdir) / sub
        if not root.is_dir():
            continue
        for p in root.iterdir():
            if TMP_MARKER in p.name:
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


class Checkpointer:
    """Latest-N plus best-by-metric checkpoints for one workdir; saves run in the background."""

    def __init__(self, workdir: str | Path, keep: int, async_save: bool = True) -> None:
        self.workdir = Path(workdir).absolute()  # orbax refuses relative paths (e.g. the default runs/<time>)
        # Process 0 alone tidies up: the others may already be creating their managers on the same folder.
        self.removed_tmp = clean_tmp_dirs(self.workdir) if jax.process_index() == 0 else []

        def manager(sub: str, max_to_keep: int) -> ocp.CheckpointManager:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                create=True,
                cleanup_tmp_directories=True,
                enable_async_checkpointing=async_save,
                # Two managers save at the same step; distinct barrier names keep their multi-process syncs apart.
                multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=sub),
            )
            return ocp.CheckpointManager(self.workdir / sub, options=options, item_names=("state", "meta"))

        self.latest = manager(LATEST_DIR, keep)
        self.best = manager(BEST_DIR, 1)

    def _save(self, manager: ocp.CheckpointManager, step: int, state: TrainState, meta: dict) -> None:
        try:
            manager.check_for_errors()  # a failed earlier background save surfaces here, not silently
            manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state_tree(state)), meta=ocp.args.JsonSave(meta)),
                force=True,
            )
        except Exception as e:
            raise CheckpointError(f"saving checkpoint step {step} in {manager.directory} failed: {e}") from e

    def save(self, step: int, state: TrainState, meta: dict, is_best: bool = False) -> None:
        """Save to the latest set (and the best slot when `is_best`)."""
        self._save(self.latest, step, state, meta)
        if is_best:
            self._save(self.best, step, state, meta)

    def wait(self) -> None:
        """Block until background saves finish; raise CheckpointError if one failed."""
        for m in (self.latest, self.best):
            try:
                m.wait_until_finished()
                m.check_for_errors()
            except Exception as e:
                raise CheckpointError(f"background checkpoint save in {m.directory} failed: {e}") from e

    def close(self) -> None:
        self.wait()
        self.latest.close()
        self.best.close()

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def best_step(self) -> int | None:
        return self.best.latest_step()


def read_meta(directory: str | Path, step: int | None = None) -> tuple[int, dict]:
    """(step, meta) of a checkpoint folder's latest (or given) step, without restoring arrays."""
    directory = Path(directory).absolute()
    with ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False), item_names=("state", "meta")
    ) as m:
        step = m.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {directory}")
        restored = m.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return step, restored["meta"]


def restore_state(directory: str | Path, step: int, target: TrainState) -> TrainState:
    """Restore arrays into the structure, dtypes and shardings of `target`; strict about shapes."""
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state_tree(target))
    with ocp.CheckpointManager(
        Path(directory).absolute(),
        options=ocp.CheckpointManagerOptions(read_only=True, create=False),
        item_names=("state", "meta"),
    ) as m:
        try:
            restored = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
        except Exception as e:
            raise CheckpointError(
                f"checkpoint step {step} in {directory} does not match this network/optimizer: {e}"
            ) from e
    return target.replace(**restored)


def restore_variables(directory: str | Path, step: int) -> dict[str, Any]:
    """{"params", "batch_stats"} as numpy trees, with no target (for predict and --init-from)."""
    with ocp.CheckpointManager(
        Path(directory).absolute(),
        options=ocp.CheckpointManagerOptions(read_only=True, create=False),
        item_handlers={"state": ocp.StandardCheckpointHandler()},
    ) as m:
        # The saved shardings name the saving run's devices (other processes, other hosts): read every array
        # onto this process's first device instead.
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), m.item_metadata(step)["state"]
        )
        restored = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    return jax.tree_util.tree_map(np.asarray, {"params": restored["params"], "batch_stats": restored["batch_stats"]})
