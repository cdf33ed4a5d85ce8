"""The Flax training loop: data -> sharded jitted steps -> metrics, checkpoints, plots; exact resume."""

from __future__ import annotations

import dataclasses
import functools
import json
import signal
import time
from typing import Any

import jax
import numpy as np

from darknet_arch import DarknetConfig
from train import checkpointing as ckpt
from train import distributed
from train import metrics as metrics_lib
from train.data import DataSplits
from train.inputs import load_run_splits, make_run_iterators
from train.logging_utils import Progress, RunLogger, atomic_write_text
from train.options import TrainConfig, dumps
from train.run_setup import (
    check_resume,
    check_same_tree,
    load_init_variables,
    prepare_workdir,
    resolve_image_size,
    setup_compilation_cache,
)
from train.sharding import Topology, check_batch_size, make_topology, place_batch, replicate, to_host
from train.state import TrainState, create_model, create_train_state, make_optimizer, make_schedule
from train.steps import eval_step, train_step

CONFIG_FILE = "config.json"
DATA_SUMMARY_FILE = "data_summary.json"
SUMMARY_FILE = "summary.json"


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row; a checkpoint was saved first."""


class Interrupted(RuntimeError):
    """SIGTERM/SIGINT: the current step finished and a checkpoint was saved."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved")
        self.signum, self.step = signum, step


@dataclasses.dataclass
class LoopState:
    """Host-side counters saved in every checkpoint's meta."""

    step: int = 0
    nonfinite_total: int = 0
    nonfinite_run: int = 0
    best_f1: float = -1.0
    best_step: int | None = None


class StepTracker:
    """Per-step host bookkeeping: non-finite counts, epoch loss/accuracy, the progress line."""

    def __init__(
        self, loop: LoopState, config: TrainConfig, steps_per_epoch: int, progress: Progress, logger: RunLogger
    ) -> None:
        self.loop, self.config, self.steps_per_epoch = loop, config, steps_per_epoch
        self.progress, self.logger = progress, logger
        self.loss_sum, self.correct, self.seen = 0.0, 0, 0
        self._t, self._n = time.perf_counter(), 0

    def record(self, step: int, m: dict[str, Any]) -> bool:
        """Account for step `step`'s metrics (a host sync); True when the non-finite limit is reached."""
        loop, batch = self.loop, self.config.batch_size
        loss = float(m["loss"])
        if bool(m["finite"]):
            loop.nonfinite_run = 0
            self.loss_sum += loss * batch
            self.correct += int(m["correct"])
            self.seen += batch
        else:
            loop.nonfinite_total += 1
            loop.nonfinite_run += 1
            self.progress.message(
                f"step {step}: non-finite loss or gradient, step skipped "
                f"({loop.nonfinite_run} in a row, {loop.nonfinite_total} in total)"
            )
            self.logger.log(
                {"kind": "nonfinite", "step": step, "in_a_row": loop.nonfinite_run, "total": loop.nonfinite_total}
            )
        self._n += batch
        now = time.perf_counter()
        self.progress.update(step, loss, self._n / max(now - self._t, 1e-9), step // self.steps_per_epoch)
        if step % self.config.log_every == 0:
            self._t, self._n = now, 0
        return loop.nonfinite_run >= self.config.max_nonfinite

    def end_epoch(self, epoch: int, lr: float) -> None:
        """Log the epoch's training loss and accuracy (finite steps only) and reset."""
        if self.seen:
            self.logger.log(
                {
                    "kind": "train_epoch",
                    "step": self.loop.step,
                    "epoch": epoch,
                    "loss": self.loss_sum / self.seen,
                    "accuracy": self.correct / self.seen,
                    "lr": lr,
                }
            )
        self.loss_sum, self.correct, self.seen = 0.0, 0, 0


def evaluate(
    state: TrainState, eval_iter: Any, eval_fn: Any, topology: Topology, num_classes: int, class_names: list[str]
) -> dict[str, Any]:
    """Loss, accuracy, macro F1, per-class F1 and confusion matrix over the whole eval split."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    loss_sum = 0.0
    for batch in eval_iter:
        out = eval_fn(state, place_batch(batch, topology))
        preds = to_host(out["pred"])
        labels = to_host(place_batch({"l": batch["label"]}, topology)["l"])
        mask = to_host(place_batch({"m": batch["mask"]}, topology)["m"]).astype(bool)
        cm += metrics_lib.confusion_matrix(labels[mask], preds[mask], num_classes)
        loss_sum += float(out["loss_sum"])
    return metrics_lib.summarize(cm, loss_sum, class_names)


class _SignalFlag:
    """Remembers SIGTERM/SIGINT so the loop can finish the step, save and stop."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _SignalFlag:
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def train(
    config: TrainConfig,
    *,
    model_config: DarknetConfig | None = None,
    splits: DataSplits | None = None,
    topology: Topology | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Run (or resume) training as `config` says; returns the summary also written to summary.json."""
    t_entry = time.perf_counter()
    setup_compilation_cache(config.compile_cache)
    config = resolve_image_size(config)
    topology = topology or make_topology()
    check_batch_size(config.batch_size, topology)
    base_config = model_config or config.model_config
    is_main = topology.is_main
    say = print if (verbose and is_main) else (lambda *a, **k: None)
    workdir = prepare_workdir(config, is_main)

    if splits is None:
        splits = load_run_splits(config)
    class_names = list(splits.class_names)
    num_classes = len(class_names)

    resume_step, resume_meta = None, None
    if config.resume:
        resume_step, resume_meta, config = check_resume(config, workdir, class_names)

    init_variables, init_notes = None, []
    if config.init_from and not config.resume:
        init_variables, slope, init_notes = load_init_variables(config, base_config, num_classes)
        if config.leaky_slope is None and slope is not None:
            # Keep the slope the weights were trained with, and record it so --resume rebuilds the same net.
            config = dataclasses.replace(config, leaky_slope=float(slope))
    model_config = base_config.with_slope(config.leaky_slope)

    local_batch = topology.local_batch_size(config.batch_size)
    train_iter, eval_iter = make_run_iterators(
        config,
        splits,
        batch_size=local_batch,
        process_index=topology.process_index,
        process_count=topology.process_count,
    )
    steps_per_epoch = train_iter.steps_per_epoch
    total_steps = config.total_steps(steps_per_epoch)

    model = create_model(model_config, num_classes, config.precision)
    tx = make_optimizer(config, make_schedule(config, steps_per_epoch, total_steps))
    rng = jax.random.PRNGKey(config.seed)
    init_rng, _ = jax.random.split(rng)
    state = create_train_state(init_rng, model, config.image_size, tx, zero_residual=config.zero_init_residual)
    if init_variables is not None:
        check_same_tree(
            {"params": state.params, "batch_stats": state.batch_stats},
            init_variables,
            f"--init-from {config.init_from}",
        )
        state = create_train_state(init_rng, model, config.image_size, tx, variables=init_variables)
        for note in init_notes:
            say(f"init-from: {note}")
        say(f"init-from: loaded {config.init_from} (leaky slope {model_config.leaky_slope})")
    state = replicate(state, topology)

    loop = LoopState()
    # Every process takes part in saving (orbax writes each process's shards and synchronises them).
    checkpointer = ckpt.Checkpointer(workdir, keep=config.keep_checkpoints)
    if checkpointer is not None and checkpointer.removed_tmp:
        say(f"removed {len(checkpointer.removed_tmp)} leftover temporary checkpoint folder(s)")
    if resume_meta is not None:
        state = ckpt.restore_state(workdir / ckpt.LATEST_DIR, resume_step, state)
        data_state = ckpt.decode_data_state(resume_meta["data_state"])
        # Saved by another number of processes? The same global position (see docs/multihost.md).
        data_state = distributed.data_state_for_topology(data_state, local_batch, topology.process_count)
        train_iter.set_state(data_state)
        loop = LoopState(**resume_meta["loop"])
        say(f"resumed from step {loop.step} in {workdir}")

    if is_main:
        atomic_write_text(workdir / CONFIG_FILE, dumps(config) + "\n")
        atomic_write_text(workdir / DATA_SUMMARY_FILE, json.dumps(splits.summary(), indent=2) + "\n")
    say(dumps(config))
    say(
        f"data: {splits.format}, {len(splits.train)} train / {len(splits.val)} val images, {num_classes} classes; "
        f"{steps_per_epoch} steps per epoch, {total_steps} steps; devices: {topology.num_devices} "
        f"({jax.default_backend()}), compute {np.dtype(model.dtype).name}"
    )

    train_fn = jax.jit(functools.partial(train_step, label_smoothing=config.label_smoothing), donate_argnums=0)
    eval_fn = jax.jit(eval_step)
    logger = RunLogger(workdir, enabled=is_main)
    progress = Progress(total_steps, loop.step, config.log_every, enabled=verbose and is_main)

    def meta(val: dict | None) -> dict:
        return {
            "config": config.to_json(),
            "class_names": class_names,
            "data_state": ckpt.encode_data_state(train_iter.get_state()),
            "rng": np.asarray(jax.random.key_data(rng)).tolist(),
            "loop": dataclasses.asdict(loop),
            "val": None if val is None else {k: val[k] for k in ("loss", "accuracy", "macro_f1")},
            "image_size": config.image_size,
            "model_config": dataclasses.asdict(model_config),
        }

    def save(val: dict | None = None, is_best: bool = False) -> None:
        if checkpointer is not None:
            checkpointer.save(loop.step, state, meta(val), is_best=is_best)

    tracker = StepTracker(loop, config, steps_per_epoch, progress, logger)
    stops = distributed.StopAgreement()  # a signal seen by one process stops all of them at the same step
    last_val: dict | None = None
    t_start = time.perf_counter()
    first_step_seconds = None
    pending = None  # the previous step's metrics: read after the next step is dispatched, so the device never idles
    try:
        with _SignalFlag() as flag:
            while loop.step < total_steps:
                batch = next(train_iter)
                state, m = train_fn(state, place_batch(batch, topology))
                loop.step += 1
                signum = stops.check(flag.signum, loop.step)
                stop = tracker.record(*pending) if pending is not None else False
                pending = (loop.step, m)
                if first_step_seconds is None:
                    jax.block_until_ready(m)
                    first_step_seconds = time.perf_counter() - t_entry
                    say(f"first step done {first_step_seconds:.1f} s after start (compilation included)")
                end_of_epoch = loop.step % steps_per_epoch == 0 or loop.step == total_steps
                periodic = config.checkpoint_every is not None and loop.step % config.checkpoint_every == 0
                if end_of_epoch or periodic or stop or signum is not None:
                    stop = tracker.record(*pending) or stop
                    pending = None
                if stop:
                    save()
                    if checkpointer is not None:
                        checkpointer.wait()
                    raise NonFiniteError(
                        f"{loop.nonfinite_run} non-finite steps in a row (limit --max-nonfinite "
                        f"{config.max_nonfinite}) at step {loop.step}; checkpoint saved in {workdir}. "
                        "Lower --lr, add --grad-clip, or check the data"
                    )
                if end_of_epoch:
                    epoch = (loop.step - 1) // steps_per_epoch + 1
                    tracker.end_epoch(epoch, float(tx_lr(config, steps_per_epoch, total_steps, loop.step)))
                    last_val = evaluate(state, eval_iter, eval_fn, topology, num_classes, class_names)
                    is_best = last_val["macro_f1"] > loop.best_f1
                    if is_best:
                        loop.best_f1, loop.best_step = last_val["macro_f1"], loop.step
                    logger.log({"kind": "val", "step": loop.step, "epoch": epoch, **last_val})
                    logger.plot(class_names)
                    progress.message(
                        f"epoch {epoch} step {loop.step}: val loss {last_val['loss']:.4f} "
                        f"acc {last_val['accuracy']:.4f} macro F1 {last_val['macro_f1']:.4f}"
                        + (" (best)" if is_best else "")
                    )
                    if config.checkpoint_every is None or periodic or loop.step == total_steps or is_best:
                        save(last_val, is_best=is_best)
                elif periodic:
                    save()
                if signum is not None:
                    if not (end_of_epoch or periodic):
                        save()
                    if checkpointer is not None:
                        checkpointer.wait()
                    raise Interrupted(signum, loop.step)
    except (Interrupted, NonFiniteError):
        raise  # every process stops at the same step for these: nothing to tell the others
    except BaseException as e:
        # Tell the other processes now: the cleanup below waits for them (checkpoint barriers) and they for us.
        distributed.announce_failure(f"process {topology.process_index}: {type(e).__name__}: {e}")
        raise
    finally:
        if checkpointer is not None:
            checkpointer.close()
        logger.close()
        train_iter.close()

    summary = {
        "steps": loop.step,
        "train_seconds": time.perf_counter() - t_start,
        "first_step_seconds": first_step_seconds,
        "best_macro_f1": loop.best_f1,
        "best_step": loop.best_step,
        "nonfinite_steps": loop.nonfinite_total,
        "final_val": None if last_val is None else {k: last_val[k] for k in ("loss", "accuracy", "macro_f1")},
        "workdir": str(workdir),
    }
    if is_main:
        atomic_write_text(workdir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return summary


def tx_lr(config: TrainConfig, steps_per_epoch: int, total_steps: int, step: int) -> float:
    """The learning rate the schedule gave the last step (for the logs)."""
    return float(make_schedule(config, steps_per_epoch, total_steps)(max(step - 1, 0)))
