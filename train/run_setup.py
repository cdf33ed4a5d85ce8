"""Before the training loop: compilation cache, image size, workdir, --resume checks and --init-from weights."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from darknet_arch import DarknetConfig
from train import checkpointing as ckpt
from train import distributed
from train.logging_utils import ensure_writable_dir
from train.options import ConfigError, TrainConfig, config_differences, fill_image_size

DEFAULT_COMPILE_CACHE = Path.home() / ".cache" / "darknet53-jax" / "xla"


class WorkdirError(ValueError):
    """A workdir that exists without --resume/--overwrite, cannot be written, or has nothing to resume."""


def setup_compilation_cache(cache: str | None) -> str | None:
    """Turn on JAX's persistent compilation cache (start-up in seconds when warm); returns the folder."""
    if cache is None:
        return None
    folder = DEFAULT_COMPILE_CACHE if cache == "default" else Path(cache)
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return str(folder)


def resolve_image_size(config: TrainConfig) -> TrainConfig:
    """Fill in the default image size for JAX's backend: 256, or the demo's small size for --data demo on a CPU."""
    return fill_image_size(config, accelerator=jax.default_backend() != "cpu")


def prepare_workdir(config: TrainConfig, is_main: bool) -> Path:
    """Check (before any work) that the workdir may be used and written; clear it for --overwrite."""
    workdir = Path(config.workdir)
    exists = workdir.exists() and any(workdir.iterdir()) if workdir.is_dir() else workdir.exists()
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"--workdir {workdir} exists and is not a folder")
    if config.resume:
        if not (workdir / ckpt.LATEST_DIR).is_dir():
            raise WorkdirError(f"--resume: {workdir} holds no checkpoints ({workdir / ckpt.LATEST_DIR} is missing)")
    elif exists and not config.overwrite:
        raise WorkdirError(
            f"--workdir {workdir} already exists and is not empty; pass --resume to continue it, "
            "--overwrite to replace it, or choose another folder"
        )
    distributed.barrier("workdir-checked")  # every process has looked before process 0 clears or creates it
    if is_main:
        if exists and config.overwrite:
            shutil.rmtree(workdir)
        try:
            ensure_writable_dir(workdir)
        except OSError as e:
            raise WorkdirError(f"--workdir {workdir} is not writable: {e}") from e
    distributed.barrier("workdir-ready")
    return workdir


def load_init_variables(
    config: TrainConfig, model_config: DarknetConfig, num_classes: int
) -> tuple[Any, float | None, list[str]]:
    """--init-from: (variables, the file's or --leaky-slope's slope, notes); a head of another width is replaced."""
    import porting  # only needed here; keeps the plain training path free of the porting package

    try:
        result = porting.load_flax_variables(
            config.init_from,
            num_classes=num_classes,
            leaky_slope=config.leaky_slope,
            seed=config.seed,
            config=model_config,
        )
    except porting.PortingError as e:
        raise ConfigError(f"--init-from {config.init_from}: {e}") from e
    return jax.tree_util.tree_map(np.asarray, result.variables), result.leaky_slope, list(result.notes)


def check_same_tree(expected: Any, got: Any, what: str) -> None:
    """Strict structure and shape check (like load_state_dict(strict=True))."""
    e = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    g = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(got)}
    missing, extra = sorted(set(e) - set(g)), sorted(set(g) - set(e))
    wrong = [f"{k}: {g[k]} != {e[k]}" for k in sorted(set(e) & set(g)) if e[k] != g[k]]
    if missing or extra or wrong:
        raise ConfigError(
            f"{what} does not fit this network: missing {missing[:5]}, unexpected {extra[:5]}, wrong shapes {wrong[:5]}"
        )


def check_resume(config: TrainConfig, workdir: Path, class_names: list[str]) -> tuple[int, dict, TrainConfig]:
    """--resume: (step, meta, config) of the latest checkpoint; refuses another config or class list."""
    try:
        step, meta = ckpt.read_meta(workdir / ckpt.LATEST_DIR)
    except ckpt.CheckpointError as e:
        raise WorkdirError(f"--resume: {e}") from e
    saved = resolve_image_size(TrainConfig.from_json(meta["config"]))
    if config.leaky_slope is None:  # the run may have taken its slope from an --init-from file
        config = dataclasses.replace(config, leaky_slope=saved.leaky_slope)
    diffs = config_differences(saved, config)
    if diffs:
        raise WorkdirError("--resume with another config than the saved run: " + "; ".join(diffs))
    if meta["class_names"] != class_names:
        raise WorkdirError(f"--resume: the data's classes {class_names} differ from the run's {meta['class_names']}")
    return step, meta, config
