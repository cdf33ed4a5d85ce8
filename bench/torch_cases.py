"""PyTorch reference cases: eager fp32, eager AMP bf16 + channels_last, torch.compile (AMP bf16 + channels_last).

Same synthetic uint8 batch on the device, normalised inside the step as on the Flax side, same loss and
optimizer. cuDNN's autotuner is on (`cudnn.benchmark`), the usual setting for fixed shapes; its search
happens in the warm-up, which is reported.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import (
    DATA_SEED,
    LEARNING_RATE,
    MOMENTUM,
    NUM_CLASSES,
    RGB_MEAN,
    RGB_STD,
    CaseSpec,
    arch_config,
    result_record,
    time_windows,
)
from torch_ref import Darknet53


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
    torch.manual_seed(DATA_SEED)
    amp = spec.variant != "eager_fp32"  # both bf16 variants also run channels_last
    fmt = torch.channels_last if amp else torch.contiguous_format
    config = arch_config(spec.arch)

    t0 = time.perf_counter()
    model = Darknet53(num_classes=NUM_CLASSES, config=config).to(device, memory_format=fmt)
    init_s = time.perf_counter() - t0
    net = torch.compile(model) if spec.variant == "compile_amp_bf16_cl" else model

    gen = torch.Generator(device="cpu").manual_seed(DATA_SEED)
    shape = (spec.batch, config.in_channels, spec.image_size, spec.image_size)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen).to(device, memory_format=fmt)
    labels = torch.randint(0, NUM_CLASSES, (spec.batch,), generator=gen).to(device)
    mean = torch.tensor(RGB_MEAN, device=device).view(1, -1, 1, 1)
    inv_std = 1.0 / torch.tensor(RGB_STD, device=device).view(1, -1, 1, 1)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def forward() -> torch.Tensor:
        x = ((images.float() - mean) * inv_std).contiguous(memory_format=fmt)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            return net(x)

    holder: dict[str, torch.Tensor] = {}
    if spec.mode == "train":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)

        def run_steps(n: int) -> None:
            for _ in range(n):
                loss = F.cross_entropy(forward().float(), labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                holder["loss"] = loss.detach()
    else:
        model.eval()

        def run_steps(n: int) -> None:
            with torch.no_grad():
                for _ in range(n):
                    holder["out"] = forward()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    # The first step holds torch.compile's compilation (forward and backward) or cuDNN's first search.
    t0 = time.perf_counter()
    run_steps(1)
    sync()
    first_step_s = time.perf_counter() - t0
    startup_s = time.time() - spawn_time if spawn_time is not None else None
    timing = time_windows(run_steps, sync, spec)
    extra: dict[str, Any] = {}
    if spec.mode == "train":
        loss = float(holder["loss"])
        if not torch.isfinite(torch.tensor(loss)):
            return result_record(spec, "failed", reason=f"non-finite loss {loss}", **timing)
        extra["final_loss"] = loss
    return result_record(
        spec,
        "ok",
        device=torch.cuda.get_device_name(device) if cuda else "cpu",
        platform=device.type,
        init_s=init_s,
        compile_s=first_step_s if spec.variant == "compile_amp_bf16_cl" else None,
        first_step_s=first_step_s,
        startup_s=startup_s,
        peak_mem_bytes=torch.cuda.max_memory_allocated(device) if cuda else None,
        peak_reserved_bytes=torch.cuda.max_memory_reserved(device) if cuda else None,
        tf32=tf32_state(),
        **timing,
        **extra,
    )
