"""The Flax training loop: data -> sharded jitted steps -> metrics, checkpoints, plots; exact resume.

Over 300 lines: the checks that must pass before the workdir is touched (plan_run) and the loop they feed
read as one story.
"""

from __future__ import annotations

import dataclasses
import functools
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from darknet_arch import DarknetConfig
from flax_darknet import remat_compiler_options
from porting import runs as ckpt
from train import distributed, run
from train.data import DataSplits
from train.distributed import Topology, check_batch_size, make_topology, place_batch, replicate, to_host
from train.finetune import frozen_modules
from train.logging_utils import RunLogger
from train.options import (
    COMPILE_CACHE_DEFAULT,
    COMPILE_CACHE_OFF,
    ConfigError,
    RunConfig,
    TrainConfig,
    config_differences,
    dumps,
    load_init_weights,
    resolve_from_weights,
    resolved_as_saved,
)
from train.state import (
    TrainState,
    create_model,
    create_train_state,
    eval_step,
    make_optimizer,
    make_schedule,
    state_donation,
    state_tree,
    train_step,
    variable_shapes,
)

DEFAULT_COMPILE_CACHE = Path.home() / ".cache" / "darknet53-jax" / "xla"
# Entries that compile faster than this are not worth a disk round trip.
COMPILE_CACHE_MIN_SECONDS = 0.5


def setup_compilation_cache(cache: str) -> None:
    """Turn on JAX's persistent compilation cache (start-up in seconds when warm)."""
    if cache == COMPILE_CACHE_OFF:
        return
    folder = DEFAULT_COMPILE_CACHE if cache == COMPILE_CACHE_DEFAULT else Path(cache)
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", COMPILE_CACHE_MIN_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


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


def check_resume(config: RunConfig, workdir: Path, splits: DataSplits) -> tuple[list[tuple[int, dict]], RunConfig]:
    """--resume: the readable checkpoints (step, meta), newest first, and the config; refuses another config/classes.

    A checkpoint whose meta cannot be read (a corrupt or truncated save) is skipped with a warning: the run goes
    on from the newest good one.
    """
    directory = workdir / ckpt.CHECKPOINT_DIR
    candidates = []
    for step in ckpt.all_steps(directory):
        try:
            candidates.append(ckpt.read_meta(directory, step))
        except ckpt.CheckpointError as e:
            print(f"warning: --resume skips checkpoint step {step}: {e}", file=sys.stderr)
    if not candidates:
        raise run.WorkdirError(f"--resume: no readable checkpoint in {directory}")
    meta = candidates[0][1]
    saved = TrainConfig.from_json(meta["config"])
    config = resolved_as_saved(config, saved)  # the slope and input norm it may have taken from --init-from
    if diffs := config_differences(saved, config):
        raise run.WorkdirError("--resume with another config than the saved run: " + "; ".join(diffs))
    run.check_same_data(meta, splits)
    return candidates, config


def restore_newest(directory: Path, candidates: list[tuple[int, dict]], target: TrainState) -> tuple[TrainState, dict]:
    """The newest candidate checkpoint whose arrays restore into `target` (a corrupt one is skipped, warned)."""
    errors = []
    for step, meta in candidates:
        try:
            return target.replace(**ckpt.restore_tree(directory, step, state_tree(target))), meta
        except ckpt.CheckpointError as e:
            errors.append(str(e))
            print(f"warning: --resume skips checkpoint step {step}: {e}", file=sys.stderr)
    raise ckpt.CheckpointError("--resume: no checkpoint could be restored: " + "; ".join(errors))


def evaluate(
    state: TrainState, eval_iter: Any, eval_fn: Any, topology: Topology, class_names: list[str]
) -> dict[str, Any]:
    """Loss, accuracy, macro F1, per-class F1 and confusion matrix over the whole eval split."""
    cm, loss_sum = None, None
    for batch in eval_iter:
        out = eval_fn(state, place_batch(batch, topology))
        cm = out["confusion"] if cm is None else cm + out["confusion"]  # summed on the device: one read at the end
        loss_sum = out["loss_sum"] if loss_sum is None else loss_sum + out["loss_sum"]
    n = len(class_names)
    cm = np.zeros((n, n), np.int64) if cm is None else to_host(cm).astype(np.int64)
    return run.summarize(cm, 0.0 if loss_sum is None else float(to_host(loss_sum)), class_names)


@dataclasses.dataclass(frozen=True)
class RunStart:
    """What a run starts from, all read and checked before its workdir is touched."""

    config: RunConfig
    model_config: DarknetConfig
    splits: DataSplits
    resume_from: tuple[tuple[int, dict], ...] = ()  # readable checkpoints (step, meta), newest first
    init_variables: Any = None
    init_notes: tuple[str, ...] = ()


def plan_run(config: RunConfig) -> RunStart:
    """Read the data, the --resume checkpoint's meta and the --init-from weights; refuse what cannot work.

    Everything that can refuse the run happens here, before the workdir is touched: a bad --data or --init-from
    must not cost an --overwrite'd run. Nothing is written.
    """
    splits, base_config = run.load_run_splits(config), config.model_config
    class_names = list(splits.class_names)
    run.check_workdir(config, ckpt.CHECKPOINT_DIR)
    if config.resume:
        candidates, config = check_resume(config, Path(config.workdir), splits)
        return RunStart(config, base_config.with_slope(config.leaky_slope), splits, tuple(candidates))
    if not config.init_from:
        return RunStart(config, base_config.with_slope(config.leaky_slope), splits)
    loaded = load_init_weights(config, base_config, len(class_names))
    config, notes = resolve_from_weights(config, loaded)
    model_config = base_config.with_slope(config.leaky_slope)
    model = create_model(model_config, len(class_names), config.precision)
    variables = loaded.variables
    check_same_tree(variable_shapes(model, config.image_size), variables, f"--init-from {config.init_from}")
    return RunStart(config, model_config, splits, (), variables, tuple(notes))


def train(config: RunConfig) -> dict[str, Any]:
    """Run (or resume) training as `config` (already resolved and validated) says; returns the summary."""
    t_entry = time.perf_counter()
    setup_compilation_cache(config.compile_cache)
    topology = make_topology()
    check_batch_size(config.batch_size, topology)
    start = plan_run(config)
    lock = run.prepare_workdir(start.config, ckpt.CHECKPOINT_DIR, topology.is_main, sync=distributed.barrier)
    try:
        return _train(start, topology, t_entry)
    finally:
        if lock is not None:
            lock.release()


def _train(start: RunStart, topology: Topology, t_entry: float) -> dict[str, Any]:
    """The loop of train(), in a held workdir; only the main process prints."""
    config, model_config, splits = start.config, start.model_config, start.splits
    class_names, num_classes, is_main = list(splits.class_names), len(splits.class_names), topology.is_main
    workdir = Path(config.workdir)
    say = print if is_main else (lambda *a, **k: None)

    local_batch = topology.local_batch_size(config.batch_size)
    train_iter, eval_iter = run.make_run_iterators(
        config,
        splits,
        batch_size=local_batch,
        process_index=topology.process_index,
        process_count=topology.process_count,
    )
    steps_per_epoch = train_iter.steps_per_epoch
    total_steps = config.total_steps(steps_per_epoch)

    model = create_model(model_config, num_classes, config.precision, config.remat)
    tx = make_optimizer(config, make_schedule(config, steps_per_epoch, total_steps))
    init_variables = start.init_variables
    if init_variables is not None:
        for note in start.init_notes:
            say(f"init-from: {note}")
        say(f"init-from: loaded {config.init_from} (leaky slope {model_config.leaky_slope})")
    init_rng = jax.random.split(jax.random.key(config.seed))[0]
    state = create_train_state(
        init_rng, model, config.image_size, tx, init_variables, config.zero_init_residual, config.ema_decay is not None
    )
    state = replicate(state, topology)

    loop, last_val = run.LoopState(), None
    if start.resume_from:
        state, resume_meta = restore_newest(workdir / ckpt.CHECKPOINT_DIR, list(start.resume_from), state)
        if is_main:  # the steps after it will be saved again: keep the unreadable folders aside
            ckpt.set_aside_after(workdir / ckpt.CHECKPOINT_DIR, int(state.step))
        distributed.barrier("resume-set-aside")
        data_state = ckpt.decode_data_state(resume_meta["data_state"])
        # Saved by another number of processes? The same global position (see docs/multihost.md).
        data_state = distributed.data_state_for_topology(data_state, local_batch, topology.process_count)
        train_iter.set_state(data_state)
        loop = run.LoopState(**resume_meta["loop"])
        if is_main:
            run.trim_metrics(workdir, loop.step)
        last_val = resume_meta["val"]  # a finished run resumed keeps its final evaluation in summary.json
        say(f"resumed from step {loop.step} in {workdir}")
    # Every process takes part in saving (orbax writes each process's shards and synchronises them).
    checkpointer = ckpt.Checkpointer(workdir, keep=config.keep_checkpoints)

    if is_main:
        run.write_run_files(workdir, config, splits)
    say(dumps(config))
    say(
        f"data: {splits.format}, {len(splits.train)} train / {len(splits.val)} val images, {num_classes} classes; "
        f"{steps_per_epoch} steps per epoch, {total_steps} steps; devices: {topology.num_devices} "
        f"({jax.default_backend()}), compute {np.dtype(model.dtype).name}"
    )

    step = functools.partial(
        train_step,
        mean_std=config.mean_std,
        label_smoothing=config.label_smoothing,
        frozen=frozen_modules(model_config, config.freeze),
        ema_decay=config.ema_decay,
    )
    train_fn = jax.jit(step, donate_argnums=state_donation(), compiler_options=remat_compiler_options(config.remat))
    eval_fn = jax.jit(functools.partial(eval_step, mean_std=config.mean_std))
    logger = RunLogger(workdir, enabled=is_main)
    tracker = run.StepTracker(loop, config, steps_per_epoch, total_steps, logger, verbose=is_main)
    run_meta = run.meta_writer(config, model_config, splits)

    def save(val: dict | None = None) -> None:
        checkpointer.save(loop.step, state_tree(state), run_meta(train_iter.get_state(), loop, val), val)

    # Multi-process runs leave SIGTERM to JAX's preemption service, which agrees on one step for every process
    # (orbax's reached_preemption); SIGINT there is a failure of the one process, which stops the others.
    multi = jax.process_count() > 1
    t_start = time.perf_counter()
    first_step_seconds = None
    pending = None  # the previous step's metrics: read after the next step is dispatched, so the device never idles
    try:
        with run.SignalFlag(() if multi else (signal.SIGTERM, signal.SIGINT)) as flag:
            while loop.step < total_steps:
                batch = next(train_iter)
                state, m = train_fn(state, place_batch(batch, topology))
                loop.step += 1
                preempted = multi and checkpointer.reached_preemption(loop.step)
                signum = signal.SIGTERM if preempted else flag.signum
                stop = tracker.record(*pending) if pending is not None else False
                pending = (loop.step, m)
                if first_step_seconds is None:
                    jax.block_until_ready(m)
                    first_step_seconds = time.perf_counter() - t_entry
                    tracker.progress.start_clock(loop.step)  # the ETA counts steady steps, not the compilation
                    say(f"first step done {first_step_seconds:.1f} s after start (compilation included)")
                end_of_epoch = loop.step % steps_per_epoch == 0 or loop.step == total_steps
                periodic = config.checkpoint_every is not None and loop.step % config.checkpoint_every == 0
                if end_of_epoch or periodic or stop or signum is not None:
                    stop = tracker.record(*pending) or stop
                    pending = None
                if stop:
                    save()
                    checkpointer.wait()
                    raise tracker.nonfinite_error(workdir)
                saved = False
                if end_of_epoch:
                    last_val = evaluate(state, eval_iter, eval_fn, topology, class_names)
                    is_best = tracker.end_epoch(last_val, class_names)
                    saved = config.checkpoint_every is None or periodic or loop.step == total_steps or is_best
                    if saved:
                        save(last_val)
                elif periodic:
                    save()
                    saved = True
                if signum is not None:
                    if not saved:  # an epoch end between periodic checkpoints saves nothing by itself
                        save(last_val if end_of_epoch else None)
                    checkpointer.wait()
                    raise run.Interrupted(signum, loop.step)
    except (run.Interrupted, run.NonFiniteError):
        raise  # every process stops at the same step for these: nothing to tell the others
    except BaseException as e:
        # Tell the other processes now: the cleanup below waits for them (checkpoint barriers) and they for us.
        distributed.announce_failure(f"process {topology.process_index}: {type(e).__name__}: {e}")
        raise
    finally:
        checkpointer.close()
        logger.close()
        train_iter.close()

    summary = run.finish(workdir, loop, time.perf_counter() - t_start, last_val, first_step_seconds=first_step_seconds)
    if is_main:
        run.write_summary(workdir, summary)
    return summary
