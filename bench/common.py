"""What every benchmark case shares: its specification, its result record, the timing loop, the optimizer."""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from darknet_arch import ARCHS
from train.options import TrainConfig

MODES = ("train", "infer")
VARIANTS = {
    "flax": ("fp32", "bf16"),  # the `precision` of train.state.create_model
    "torch": ("eager_fp32", "eager_amp_bf16_cl", "compile_amp_bf16_cl"),  # AMP variants run channels_last
    "e2e": ("jpeg", "cache"),  # the real loop, python -m train.flax, over JPEG files or the decoded cache
}
# The competition's 18 classes (len(train.data.MASK_CLASS_NAMES); train.data is not imported: it needs grain).
NUM_CLASSES = 18
DATA_SEED = 0
TAIL_CHARS = 2000  # of a failed case's traceback or stderr, kept in its record
# Both sides train with the product's optimizer at TrainConfig's settings (train.state.make_optimizer,
# train.torch.make_torch_optimizer) and zero-initialised residual branches, at a constant rate: the loop's
# cosine schedule costs a scalar per step, and a constant rate keeps random data from diverging.
TRAIN_CONFIG = TrainConfig(data="synthetic", workdir="unused", optimizer="sgd", lr=0.01)
OPTIMIZER = (
    f"SGD, Nesterov momentum {TRAIN_CONFIG.momentum}, weight decay {TRAIN_CONFIG.weight_decay} on conv and dense "
    f"kernels, constant lr {TRAIN_CONFIG.lr}, zero-initialised residual branches: "
    "train.state.make_optimizer and train.torch.make_torch_optimizer"
)


@dataclasses.dataclass(frozen=True)
class CaseSpec:
    """One measurement: framework, mode, variant, shapes and how long to time it (sizes checked by the CLI)."""

    framework: str
    mode: str
    variant: str
    batch: int
    image_size: int
    arch: str = "darknet53"
    warmup: int = 3
    steps: int = 10  # steps per timed window (one device sync per window)
    repeats: int = 5  # timed windows; the figure is the median window
    cache_dir: str | None = None  # JAX persistent compilation cache (flax and e2e)
    label: str = ""  # distinguishes repeated runs of one spec, e.g. "warm-cache"
    threads: int | None = None  # PyTorch intra-op threads (torch.set_num_threads); None: torch's default

    def __post_init__(self) -> None:
        if self.framework not in VARIANTS:
            raise ValueError(f"framework must be one of {tuple(VARIANTS)}, got {self.framework!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.variant not in VARIANTS[self.framework]:
            raise ValueError(
                f"{self.framework} variant must be one of {VARIANTS[self.framework]}, got {self.variant!r}"
            )
        if self.framework == "e2e" and self.mode != "train":
            raise ValueError(f"the real loop is a train loop; mode must be 'train', got {self.mode!r}")
        if self.threads is not None and (self.framework != "torch" or self.threads < 1):
            raise ValueError(f"threads is a positive PyTorch thread count, got {self.threads} for {self.framework}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {tuple(ARCHS)}, got {self.arch!r}")

    @property
    def name(self) -> str:
        """Stable id: framework/mode/variant/bBATCH[/tTHREADS][/label]."""
        base = f"{self.framework}/{self.mode}/{self.variant}/b{self.batch}"
        base += f"/t{self.threads}" if self.threads is not None else ""
        return f"{base}/{self.label}" if self.label else base


def result_record(spec: CaseSpec, status: str, **fields: Any) -> dict[str, Any]:
    """A case's JSON record: the spec, a status ('ok', 'skipped', 'failed') and whatever was measured."""
    return {"name": spec.name, "status": status, **dataclasses.asdict(spec), **fields}


def time_windows(
    run_steps: Callable[[int], None], sync: Callable[[], None], warmup: int, steps: int, repeats: int
) -> list[float]:
    """Seconds per step in each of `repeats` windows of `steps` steps, after `warmup` untimed steps."""
    if warmup:
        run_steps(warmup)
    per_step = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        run_steps(steps)
        sync()
        per_step.append((time.perf_counter() - t0) / steps)
    return per_step


def measure(
    spec: CaseSpec,
    run_steps: Callable[[int], None],
    sync: Callable[[], None],
    final_loss: Callable[[], float] | None,
    spawn_time: float | None,
) -> dict[str, Any]:
    """Time the first step, then the windows; 'failed' when `final_loss` (train cases) is not finite."""
    t0 = time.perf_counter()
    run_steps(1)
    sync()
    first_step_s = time.perf_counter() - t0
    per_step = time_windows(run_steps, sync, spec.warmup, spec.steps, spec.repeats)
    median = statistics.median(per_step)
    fields: dict[str, Any] = {
        "first_step_s": first_step_s,
        "startup_s": None if spawn_time is None else time.time() - spawn_time,  # process spawn -> first step done
        "step_ms_median": 1e3 * median,
        "step_ms_windows": [1e3 * t for t in per_step],
        "img_per_s": spec.batch / median,
    }
    if final_loss is None:
        return result_record(spec, "ok", **fields)
    loss = final_loss()
    if not math.isfinite(loss):
        return result_record(spec, "failed", reason=f"non-finite loss {loss}", **fields)
    return result_record(spec, "ok", final_loss=loss, **fields)


def run_meta(command: str, distributions: tuple[str, ...]) -> dict[str, Any]:
    """When, how and where a benchmark ran: UTC date, command, host and CPU, Python's and packages' versions."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())
    versions = {"python": platform.python_version()}
    for name in distributions:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "host": f"{platform.node()}, {platform.platform()}, {os.cpu_count()} x {cpu}",
        "versions": versions,
    }
