"""PyTorch cases: eager fp32, eager AMP bf16 + channels_last, torch.compile (AMP bf16 + channels_last).

The same work as the Flax cases: a synthetic uint8 batch on the device, normalised inside the step with the
trainer's statistics ((x / 255 - mean) / std, train.options), cross-entropy on integer labels, the same
optimizer (bench.common.TRAIN_CONFIG).
cuDNN's autotuner is on (`cudnn.benchmark`, the usual setting for fixed shapes); it searches in the first
step and the warm-up. This module imports no jax: JAX would claim device memory in a PyTorch process.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import DATA_SEED, NUM_CLASSES, TRAIN_CONFIG, CaseSpec, measure
from darknet_arch import ARCHS
from torch_ref import Darknet53
from train.torch import make_torch_optimizer, normalize, zero_init_residual


def tf32_state() -> dict[str, Any]:
    """Whether PyTorch lets convs and matmuls use TF32 (the defaults: convs yes, matmuls no)."""
    return {
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }


def run_torch_case(spec: CaseSpec, spawn_time: float | None = None) -> dict[str, Any]:
    """Measure one PyTorch case; returns its result record."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    torch.manual_seed(DATA_SEED)
    amp = spec.variant != "eager_fp32"
    fmt = torch.channels_last if amp else torch.contiguous_format
    config = ARCHS[spec.arch]

    t0 = time.perf_counter()
    model = Darknet53(num_classes=NUM_CLASSES, config=config)
    if TRAIN_CONFIG.zero_init_residual:
        zero_init_residual(model)
    model = model.to(device, memory_format=fmt)
    init_s = time.perf_counter() - t0
    compiled = spec.variant.startswith("compile")
    net = torch.compile(model) if compiled else model

    gen = torch.Generator(device="cpu").manual_seed(DATA_SEED)
    shape = (spec.batch, config.in_channels, spec.image_size, spec.image_size)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen).to(device, memory_format=fmt)
    labels = torch.randint(0, NUM_CLASSES, (spec.batch,), generator=gen).to(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def forward() -> torch.Tensor:
        x = normalize(images).contiguous(memory_format=fmt)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            return net(x)

    holder: dict[str, torch.Tensor] = {}
    train = spec.mode == "train"
    model.train(train)
    opt = make_torch_optimizer(model, TRAIN_CONFIG)

    def run_steps(n: int) -> None:
        for _ in range(n):
            if train:
                loss = F.cross_entropy(forward().float(), labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                holder["loss"] = loss.detach()
            else:
                with torch.no_grad():
                    holder["logits"] = forward()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    # The first step holds torch.compile's compilation (forward and backward) or cuDNN's first search.
    record = measure(spec, run_steps, sync, (lambda: float(holder["loss"])) if train else None, spawn_time)
    record.update(
        device=torch.cuda.get_device_name(device) if cuda else "cpu",
        platform=device.type,
        init_s=init_s,
        compile_s=record["first_step_s"] if compiled else None,
        peak_mem_bytes=torch.cuda.max_memory_allocated(device) if cuda else None,
        peak_reserved_bytes=torch.cuda.max_memory_reserved(device) if cuda else None,
        tf32=tf32_state(),
        torch_threads=torch.get_num_threads(),
    )
    return record
