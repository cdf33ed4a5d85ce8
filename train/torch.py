"""`python -m train.torch --data PATH ...`: the PyTorch reference trainer (no jax), same config, data and run files.

The same recipe as train.flax, step for step: uint8 batches normalised with ImageNet mean/std, SGD-Nesterov or
AdamW with weight decay off BatchNorm and biases, warm-up + cosine, zero-initialised residual branches,
non-finite steps skipped without a trace, the same StepTracker, stops and run files (train.run). Checkpoints are
torch files (torch_checkpoints/latest.pt, best.pt) holding only tensors and plain data (read weights_only).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from porting import runs
from porting.errors import EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_OK, SIGNAL_EXIT_BASE
from porting.preprocessing import IMAGENET_MEAN, IMAGENET_STD, PIXEL_SCALE
from train import run
from train.finetune import frozen_modules, module_multipliers, unit_multipliers
from train.logging_utils import RunLogger
from train.options import (
    ConfigError,
    RunConfig,
    TrainConfig,
    build_parser,
    config_differences,
    config_from_args,
    dumps,
    load_init_weights,
    resolve,
    resolve_from_weights,
    resolved_as_saved,
    validate,
)

if TYPE_CHECKING:
    from porting import Loaded

# The fine-tuning fields: checkpoints written before this trainer applied them (they have no model_config) recorded
# them without applying them.
FINE_TUNING = ("init_from", "freeze", "head_lr_mult", "layer_decay", "ema_decay")
LR_MULT = "lr_mult"  # the key of a param group's learning-rate multiplier


def set_flags(config: TrainConfig, names: tuple[str, ...]) -> list[str]:
    """The flags among `names` that `config` sets, as '--flag value'."""
    return [f"--{n.replace('_', '-')} {getattr(config, n)}" for n in names
            if getattr(config, n) != TrainConfig.__dataclass_fields__[n].default]  # fmt: skip


def lr_at(config: TrainConfig, steps_per_epoch: int, total_steps: int, step: int) -> float:
    """optax.warmup_cosine_decay_schedule(0, lr, warmup, total) at `step` (train.state.make_schedule's schedule)."""
    warmup = min(round(config.warmup_epochs * steps_per_epoch), max(total_steps - 1, 0))
    decay = max(total_steps, warmup + 1)
    if step < warmup:
        return config.lr * step / warmup
    t = min(step - warmup, decay - warmup) / (decay - warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * t))


def make_torch_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """train.state.make_optimizer's groups: each unit's learning-rate multiplier (train.finetune, --head-lr-mult,
    --layer-decay), weight decay on conv/linear weights only, frozen units (--freeze) left out.

    A frozen unit keeps requires_grad: its gradient counts in the global norm (the non-finite check, --grad-clip)
    as in train.flax, where frozen parameters are differentiated too and only their update is zero.
    """
    cfg = config.model_config
    mults = unit_multipliers(cfg, config.freeze, config.head_lr_mult, config.layer_decay)
    by_module = module_multipliers(cfg, mults)
    grouped: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        mult = by_module[name.split(".")[0]]
        if mult != 0:
            grouped.setdefault((mult, p.ndim > 1), []).append(p)
    groups = [{"params": ps, "weight_decay": config.weight_decay if decay else 0.0, LR_MULT: mult}
              for (mult, decay), ps in grouped.items()]  # fmt: skip
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=config.lr)


def freeze_statistics(model: nn.Module, config: TrainConfig) -> None:
    """The BatchNorm running statistics of frozen units never change (momentum 0); they still normalise with the
    batch's statistics in training, as train.flax's frozen modules do."""
    for name in frozen_modules(config.model_config, config.freeze):
        for module in getattr(model, name).modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = 0.0


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's rate: `lr` times the group's multiplier."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group[LR_MULT]


def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """--ema-decay: every float tensor of `ema` (parameters and BatchNorm statistics) moves (1 - decay) of the way to
    `model`'s, as train.state's optax.incremental_update; a frozen unit's EMA stays bitwise (lerp to itself)."""
    with torch.no_grad():
        for average, current in zip(ema.state_dict().values(), model.state_dict().values(), strict=True):
            if average.is_floating_point():
                average.lerp_(current, 1.0 - decay)


def zero_init_residual(model: nn.Module) -> None:
    """Zero the last BN weight of every residual block (as train.state.zero_init_residual)."""
    for name, module in model.named_modules():
        if name.endswith("layer2") and isinstance(module, nn.Sequential):
            bn = module[1]  # the unit's (conv, BatchNorm, activation)
            if not isinstance(bn, nn.BatchNorm2d):
                raise TypeError(f"{name}[1] is a {type(bn).__name__}, not the unit's BatchNorm2d")
            nn.init.zeros_(bn.weight)


def normalize(
    images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """uint8 (or float 0..255) RGB NCHW -> (x / 255 - mean) / std in float32 (train.state.normalize's numbers)."""
    mean_t = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() * PIXEL_SCALE - mean_t) / std_t


def to_tensor(
    images: np.ndarray,
    device: torch.device,
    channels_last: bool,
    mean_std: tuple[Sequence[float], Sequence[float]] = (IMAGENET_MEAN, IMAGENET_STD),
) -> torch.Tensor:
    """uint8 NHWC numpy -> normalised float NCHW tensor."""
    x = normalize(torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2), *mean_std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@dataclasses.dataclass
class Device:
    """Where and how the reference trainer computes."""

    device: torch.device
    amp: bool
    channels_last: bool
    mean_std: tuple[Sequence[float], Sequence[float]] = (IMAGENET_MEAN, IMAGENET_STD)

    @classmethod
    def pick(cls, config: TrainConfig) -> Device:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        amp = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
        return cls(device, amp, channels_last=device.type == "cuda", mean_std=config.mean_std)

    def inputs(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        x = to_tensor(batch["image"], self.device, self.channels_last, self.mean_std)
        return x, torch.from_numpy(batch["label"].astype(np.int64)).to(self.device)

    def autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)


def train_step(
    model: nn.Module,
    forward: Any,
    optimizer: torch.optim.Optimizer,
    dev: Device,
    batch: dict,
    config: TrainConfig,
    ema: nn.Module | None = None,
) -> dict[str, Any]:
    """One step (and the EMA's, when kept); a non-finite loss or gradient leaves parameters, optimizer, EMA and BN
    statistics unchanged."""
    x, y = dev.inputs(batch)
    buffers = {k: v.clone() for k, v in model.named_buffers()}  # BN statistics change in the forward pass
    with dev.autocast():
        logits = forward(x).float()
    loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    # The global norm is inf or NaN whenever any element is: one reduction and one host read decide the step.
    finite = bool(torch.isfinite(loss + torch.nn.utils.get_total_norm(grads)))
    if finite:
        if config.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        if ema is not None and config.ema_decay is not None:
            update_ema(ema, model, config.ema_decay)
    else:
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(buffers[k])
    return {"loss": loss.detach(), "correct": (logits.argmax(-1) == y).sum(), "finite": finite}


def evaluate(model: nn.Module, eval_iter: Any, dev: Device, class_names: list[str]) -> dict[str, Any]:
    """Loss, accuracy, macro F1, per-class F1 and confusion matrix (metrics shared with train.flax)."""
    n = len(class_names)
    cm = torch.zeros(n * n, dtype=torch.int64, device=dev.device)
    loss_sum = torch.zeros((), device=dev.device)
    model.eval()
    with torch.no_grad(), dev.autocast():
        for batch in eval_iter:
            x, y = dev.inputs(batch)
            mask = torch.from_numpy(batch["mask"]).to(dev.device)
            logits = model(x).float()
            loss_sum += (F.cross_entropy(logits, y, reduction="none") * mask).sum()
            cm += torch.bincount((y * n + logits.argmax(-1))[mask], minlength=n * n)
    model.train()
    return run.summarize(cm.view(n, n).cpu().numpy(), float(loss_sum), class_names)


def train_torch(config: RunConfig, *, compile_model: bool = False, verbose: bool = True) -> dict[str, Any]:
    """The PyTorch training loop for a resolved, validated config; returns the summary also in summary.json."""

    splits = run.load_run_splits(config)  # before the workdir is touched
    init: Loaded | None = None
    notes: list[str] = []
    if config.init_from and not config.resume:  # read (or refused) before the workdir is touched, as in train.flax
        init = load_init_weights(config, config.model_config, len(splits.class_names))
        config, notes = resolve_from_weights(config, init)
    lock = run.prepare_workdir(config, runs.TORCH_CHECKPOINT_DIR)
    try:
        return _train_torch(config, splits, compile_model, verbose, init, notes)
    finally:
        if lock is not None:
            lock.release()


def read_resume(config: RunConfig, ckpt_dir: Path, splits: Any) -> tuple[dict[str, Any], RunConfig]:
    """--resume: the latest checkpoint (on the CPU) and the config with what the run resolved from its weights;
    WorkdirError for a file this trainer did not write, another config, other data, or flags never applied."""
    try:  # weights_only: tensors and plain data only, so no code in the file ever runs
        saved = torch.load(ckpt_dir / runs.TORCH_LATEST, map_location="cpu", weights_only=True)
        saved_config = TrainConfig.from_json(saved["config"])
    except Exception as e:
        raise run.WorkdirError(
            f"--resume: {ckpt_dir / runs.TORCH_LATEST} is not a checkpoint this trainer wrote "
            f"({type(e).__name__}: {e}); nothing in it was run. Start a new run, or --overwrite this one"
        ) from e
    if "model_config" not in saved and (never_applied := set_flags(saved_config, FINE_TUNING)):
        raise run.WorkdirError(
            f"--resume: this run recorded {', '.join(never_applied)}, which train.torch never applied; it cannot "
            "be continued as recorded. Start a new run without them, or train with train.flax"
        )
    config = resolved_as_saved(config, saved_config)
    diffs = config_differences(saved_config, config)
    if diffs:
        raise run.WorkdirError("--resume with another config than the saved run: " + "; ".join(diffs))
    run.check_same_data(saved, splits)
    return saved, config


def _train_torch(
    config: RunConfig, splits: Any, compile_model: bool, verbose: bool, init: Loaded | None, notes: list[str]
) -> dict[str, Any]:
    """The loop of train_torch(), in a held workdir."""
    from porting import canonical_to_torch
    from torch_ref import Darknet53

    say = print if verbose else (lambda *a, **k: None)
    class_names = list(splits.class_names)
    workdir = Path(config.workdir)
    ckpt_dir = workdir / runs.TORCH_CHECKPOINT_DIR
    saved = None
    if config.resume:
        saved, config = read_resume(config, ckpt_dir, splits)
    torch.manual_seed(config.seed)
    dev = Device.pick(config)
    train_iter, eval_iter = run.make_run_iterators(config, splits, batch_size=config.batch_size)
    spe = train_iter.steps_per_epoch
    total = config.total_steps(spe)

    model = Darknet53(num_classes=len(class_names), config=config.model_config)
    if init is not None:  # as train.flax: the weights as they are, no zero-initialised residual branches
        model.load_state_dict(canonical_to_torch(init.state, init.config), strict=True)
        for note in notes:
            say(f"init-from: {note}")
        say(f"init-from: loaded {config.init_from} (leaky slope {config.model_config.leaky_slope})")
    elif config.zero_init_residual:
        zero_init_residual(model)
    model = model.to(dev.device).to(memory_format=torch.channels_last if dev.channels_last else torch.preserve_format)
    freeze_statistics(model, config)
    optimizer = make_torch_optimizer(model, config)
    # --ema-decay: the averaged weights start as the initial ones (train.state.create_train_state).
    ema = None if config.ema_decay is None else copy.deepcopy(model).eval()
    loop, last_val = run.LoopState(), None
    if saved is not None:
        model.load_state_dict(saved["model"])
        if ema is not None:
            ema.load_state_dict(saved[runs.EMA])
        optimizer.load_state_dict(saved["optimizer"])
        train_iter.set_state(saved["data_state"])
        torch.set_rng_state(saved["torch_rng"].cpu())
        loop, last_val = run.LoopState(**saved["loop"]), saved["val"]
        run.trim_metrics(workdir, loop.step)
        say(f"resumed from step {loop.step}")
    forward = torch.compile(model) if compile_model else model
    run.write_run_files(workdir, config, splits)
    say(dumps(config))
    say(f"data: {len(splits.train)} train / {len(splits.val)} val, {spe} steps per epoch, {total} steps; {dev}")

    run_meta = run.meta_writer(config, config.model_config, splits)

    def save(name: str, val: dict | None = None) -> None:
        meta = run_meta(train_iter.get_state(), loop, val)
        averages = {} if ema is None else {runs.EMA: ema.state_dict()}
        runs.save_torch_checkpoint(ckpt_dir / name, model.state_dict(), optimizer.state_dict(), meta,
                                   torch_rng=torch.get_rng_state(), **averages)  # fmt: skip

    logger = RunLogger(workdir)
    tracker = run.StepTracker(loop, config, spe, total, logger, verbose=verbose)
    t0 = time.perf_counter()
    model.train()
    try:
        with run.SignalFlag() as flag:
            while loop.step < total:
                lr = lr_at(config, spe, total, loop.step - loop.nonfinite_total)  # skipped steps do not advance it
                set_learning_rate(optimizer, lr)
                m = {**train_step(model, forward, optimizer, dev, next(train_iter), config, ema), "lr": lr}
                loop.step += 1
                if tracker.record(loop.step, m):
                    save(runs.TORCH_LATEST)
                    raise tracker.nonfinite_error(workdir)
                end_of_epoch = loop.step % spe == 0 or loop.step == total
                periodic = config.checkpoint_every is not None and loop.step % config.checkpoint_every == 0
                if end_of_epoch:
                    # With an EMA, it is what is evaluated and what the best checkpoint is chosen by (train.flax too).
                    last_val = evaluate(model if ema is None else ema, eval_iter, dev, class_names)
                    is_best = tracker.end_epoch(last_val, class_names)
                    save(runs.TORCH_LATEST, last_val)
                    if is_best:
                        save(runs.TORCH_BEST, last_val)
                elif periodic or flag.signum is not None:
                    save(runs.TORCH_LATEST)
                if flag.signum is not None:
                    raise run.Interrupted(flag.signum, loop.step)
    finally:
        logger.close()
        train_iter.close()
    summary = run.finish(workdir, loop, time.perf_counter() - t0, last_val)
    run.write_summary(workdir, summary)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, train, and map failures to a clear message and an exit code."""
    parser = build_parser("python -m train.torch")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (slow start, faster steps)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    from train.data import DataError

    try:
        config = resolve(config_from_args(args), accelerator=torch.cuda.is_available())
        validate(config)
        if args.threads:
            torch.set_num_threads(args.threads)
        summary = train_torch(config, compile_model=args.compile)
    except (ConfigError, DataError, run.WorkdirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except run.NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except run.Interrupted as e:
        print(str(e), file=sys.stderr)
        return SIGNAL_EXIT_BASE + e.signum
    final = summary["final_val"] or {}
    print(
        f"done: {summary['steps']} steps in {summary['train_seconds']:.1f} s; final val accuracy "
        f"{final.get('accuracy', float('nan')):.4f}, macro F1 {final.get('macro_f1', float('nan')):.4f}"
    )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
