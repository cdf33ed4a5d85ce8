"""`python -m train.torch --data PATH ...`: the PyTorch reference trainer (no jax), same data, flags and metrics.

Same recipe as train.flax: uint8 batches normalised with ImageNet mean/std, SGD-Nesterov or AdamW with weight
decay off BatchNorm and biases, warm-up + cosine, zero-initialised residual branches, non-finite steps skipped.
Writes config.json, metrics.jsonl, TensorBoard events, PNG plots and torch checkpoints (latest.pt, best.pt).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from train import metrics as metrics_lib
from train.logging_utils import Progress, RunLogger, atomic_write_text, ensure_writable_dir
from train.options import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ConfigError,
    TrainConfig,
    build_parser,
    config_differences,
    config_from_args,
    dumps,
    fill_image_size,
    validate,
)

CHECKPOINT_DIR = "torch_checkpoints"
EXIT_BAD_INPUT, EXIT_NONFINITE = 2, 3
SIGNAL_EXIT_BASE = 128


class NonFinite(RuntimeError):
    """Too many non-finite steps in a row."""


def lr_at(config: TrainConfig, steps_per_epoch: int, total_steps: int, step: int) -> float:
    """optax.warmup_cosine_decay_schedule(0, lr, warmup, total) at `step` (the same schedule as train.flax)."""
    warmup = min(round(config.warmup_epochs * steps_per_epoch), max(total_steps - 1, 0))
    decay = max(total_steps, warmup + 1)
    if step < warmup:
        return config.lr * step / warmup
    t = min(step - warmup, decay - warmup) / (decay - warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * t))


def make_torch_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Weight decay on conv/linear weights only (not BatchNorm parameters, not biases)."""
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=config.lr)


def zero_init_residual(model: nn.Module) -> None:
    """Zero the last BN weight of every residual block (as train.state.zero_init_residual)."""
    for name, module in model.named_modules():
        if name.endswith("layer2") and isinstance(module, nn.Sequential):
            nn.init.zeros_(module[1].weight)


def to_tensor(images: np.ndarray, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 NHWC numpy -> normalised float NCHW tensor."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def evaluate(
    model: nn.Module, eval_iter: Any, device: torch.device, amp: bool, channels_last: bool, class_names: list[str]
) -> dict[str, Any]:
    """Loss, accuracy, macro F1, per-class F1 and confusion matrix (metrics shared with train.flax)."""
    n = len(class_names)
    cm = np.zeros((n, n), np.int64)
    loss_sum = 0.0
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        for batch in eval_iter:
            mask = batch["mask"].astype(bool)
            logits = model(to_tensor(batch["image"], device, channels_last)).float()
            labels = torch.from_numpy(batch["label"].astype(np.int64)).to(device)
            losses = F.cross_entropy(logits, labels, reduction="none").cpu().numpy()
            loss_sum += float(losses[mask].sum())
            preds = logits.argmax(-1).cpu().numpy()
            cm += metrics_lib.confusion_matrix(batch["label"][mask], preds[mask], n)
    model.train()
    return metrics_lib.summarize(cm, loss_sum, class_names)


def train_torch(config: TrainConfig, *, compile_model: bool = False, verbose: bool = True) -> dict[str, Any]:
    """The PyTorch training loop; returns the summary also written to summary.json."""
    from torch_ref import Darknet53
    from train.inputs import load_run_splits, make_run_iterators

    config = fill_image_size(config, accelerator=torch.cuda.is_available())
    if config.init_from:
        raise ConfigError("--init-from is supported by train.flax only; convert with port-weights and use train.flax")
    say = print if verbose else (lambda *a, **k: None)
    workdir = Path(config.workdir)
    ckpt_dir = workdir / CHECKPOINT_DIR
    if config.resume:
        if not (ckpt_dir / "latest.pt").is_file():
            raise ConfigError(f"--resume: {ckpt_dir / 'latest.pt'} does not exist")
    elif workdir.exists() and any(workdir.iterdir()):
        if not config.overwrite:
            raise ConfigError(f"--workdir {workdir} already exists and is not empty; pass --resume or --overwrite")
        import shutil

        shutil.rmtree(workdir)
    try:
        ensure_writable_dir(ckpt_dir, probe_in=workdir)
    except OSError as e:
        raise ConfigError(f"--workdir {workdir} is not writable: {e}") from e

    torch.manual_seed(config.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    channels_last = device.type == "cuda"
    splits = load_run_splits(config)
    class_names = list(splits.class_names)
    train_iter, eval_iter = make_run_iterators(config, splits, batch_size=config.batch_size)
    spe = train_iter.steps_per_epoch
    total = config.total_steps(spe)

    model = Darknet53(num_classes=len(class_names), config=config.model_config)
    if config.zero_init_residual:
        zero_init_residual(model)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_torch_optimizer(model, config)
    step, best_f1, best_step, nonfinite_total, nonfinite_run = 0, -1.0, None, 0, 0
    if config.resume:
        saved = torch.load(ckpt_dir / "latest.pt", map_location=device, weights_only=False)
        diffs = config_differences(TrainConfig.from_json(saved["config"]), config)
        if diffs or saved["class_names"] != class_names:
            raise ConfigError("--resume with another config or class list: " + "; ".join(diffs or ["class names"]))
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        train_iter.set_state(saved["data_state"])
        torch.set_rng_state(saved["torch_rng"])
        step, best_f1, best_step = saved["step"], saved["best_f1"], saved["best_step"]
        nonfinite_total = saved["nonfinite_total"]
        say(f"resumed from step {step}")
    forward = torch.compile(model) if compile_model else model
    atomic_write_text(workdir / "config.json", dumps(config) + "\n")
    say(dumps(config))
    say(
        f"data: {len(splits.train)} train / {len(splits.val)} val, {spe} steps per epoch, {total} steps; "
        f"device {device}, {'bf16 autocast' if amp else 'fp32'}"
    )

    def save(name: str) -> None:
        payload = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "config": config.to_json(),
            "class_names": class_names,
            "data_state": train_iter.get_state(),
            "torch_rng": torch.get_rng_state(),
            "step": step,
            "best_f1": best_f1,
            "best_step": best_step,
            "nonfinite_total": nonfinite_total,
        }
        tmp = ckpt_dir / f".{name}.tmp{os.getpid()}"
        torch.save(payload, tmp)
        os.replace(tmp, ckpt_dir / name)

    logger = RunLogger(workdir)
    progress = Progress(total, step, config.log_every, enabled=verbose)
    stop: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: stop.append(signum)) for s in (signal.SIGTERM, signal.SIGINT)}
    epoch_loss, epoch_correct, epoch_seen = 0.0, 0, 0
    last_val = None
    t0 = t_last = time.perf_counter()
    n_last = 0
    model.train()
    try:
        while step < total:
            batch = next(train_iter)
            for g in optimizer.param_groups:
                g["lr"] = lr_at(config, spe, total, step)
            x = to_tensor(batch["image"], device, channels_last)
            y = torch.from_numpy(batch["label"].astype(np.int64)).to(device)
            # BN running statistics change in the forward pass: keep a copy so a skipped step leaves no trace.
            buffers = {k: v.clone() for k, v in model.named_buffers()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = forward(x).float()
            loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(g).all()) for g in grads)
            step += 1
            if finite:
                if config.grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                nonfinite_run = 0
                epoch_loss += float(loss) * len(y)
                epoch_correct += int((logits.argmax(-1) == y).sum())
                epoch_seen += len(y)
            else:
                with torch.no_grad():
                    for k, v in model.named_buffers():
                        v.copy_(buffers[k])
                nonfinite_total += 1
                nonfinite_run += 1
                progress.message(f"step {step}: non-finite loss or gradient, skipped ({nonfinite_run} in a row)")
                logger.log({"kind": "nonfinite", "step": step, "in_a_row": nonfinite_run, "total": nonfinite_total})
                if nonfinite_run >= config.max_nonfinite:
                    save("latest.pt")
                    raise NonFinite(f"{nonfinite_run} non-finite steps in a row at step {step}; checkpoint saved")
            n_last += len(y)
            now = time.perf_counter()
            progress.update(step, float(loss), n_last / max(now - t_last, 1e-9), step // spe)
            if step % config.log_every == 0:
                t_last, n_last = now, 0
            end_of_epoch = step % spe == 0 or step == total
            periodic = config.checkpoint_every is not None and step % config.checkpoint_every == 0
            if end_of_epoch:
                epoch = (step - 1) // spe + 1
                if epoch_seen:
                    logger.log(
                        {
                            "kind": "train_epoch",
                            "step": step,
                            "epoch": epoch,
                            "loss": epoch_loss / epoch_seen,
                            "accuracy": epoch_correct / epoch_seen,
                            "lr": lr_at(config, spe, total, step - 1),
                        }
                    )
                epoch_loss, epoch_correct, epoch_seen = 0.0, 0, 0
                last_val = evaluate(model, eval_iter, device, amp, channels_last, class_names)
                is_best = last_val["macro_f1"] > best_f1
                if is_best:
                    best_f1, best_step = last_val["macro_f1"], step
                logger.log({"kind": "val", "step": step, "epoch": epoch, **last_val})
                logger.plot(class_names)
                progress.message(
                    f"epoch {epoch} step {step}: val loss {last_val['loss']:.4f} acc "
                    f"{last_val['accuracy']:.4f} macro F1 {last_val['macro_f1']:.4f}"
                )
                save("latest.pt")
                if is_best:
                    save("best.pt")
            elif periodic or stop:
                save("latest.pt")
            if stop:
                raise InterruptedError(stop[0])
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        logger.close()
        train_iter.close()
    summary = {
        "steps": step,
        "train_seconds": time.perf_counter() - t0,
        "best_macro_f1": best_f1,
        "best_step": best_step,
        "nonfinite_steps": nonfinite_total,
        "workdir": str(workdir),
        "final_val": None if last_val is None else {k: last_val[k] for k in ("loss", "accuracy", "macro_f1")},
    }
    atomic_write_text(workdir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser("python -m train.torch")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (slow start, faster steps)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    from train.data import DataError

    try:
        config = config_from_args(args)
        validate(config)
        if args.threads:
            torch.set_num_threads(args.threads)
        summary = train_torch(config, compile_model=args.compile)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NonFinite as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except InterruptedError as e:
        signum = int(e.args[0])
        print(f"stopped by {signal.Signals(signum).name}; checkpoint saved", file=sys.stderr)
        return SIGNAL_EXIT_BASE + signum
    final = summary["final_val"] or {}
    print(
        f"done: {summary['steps']} steps in {summary['train_seconds']:.1f} s; final val accuracy "
        f"{final.get('accuracy', float('nan')):.4f}, macro F1 {final.get('macro_f1', float('nan')):.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
