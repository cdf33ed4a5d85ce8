"""What every benchmark case shares: its specification, its result record, and the timing loop."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

from darknet_arch import DARKNET53, TINY, DarknetConfig

FRAMEWORKS = ("flax", "torch", "e2e")
MODES = ("train", "infer")
# Flax: compute dtype with f32 params and statistics. Torch: the reference's three ways to run.
# "trainer_bf16" is the product's own step (train.steps.train_step with train.state's optimizer), timed the
# same way: the figure the real loop is compared with.
FLAX_VARIANTS = ("fp32", "bf16", "trainer_bf16")
TORCH_VARIANTS = ("eager_fp32", "eager_amp_bf16_cl", "compile_amp_bf16_cl")
# The real loop, `python -m train.flax`, over JPEG files or over the decoded cache (see bench/e2e.py).
E2E_VARIANTS = ("jpeg", "cache")
ARCHS = ("darknet53", "tiny")

NUM_CLASSES = 18
# The same optimizer on both sides: plain SGD with heavy-ball momentum, no weight decay.
LEARNING_RATE = 0.01
MOMENTUM = 0.9
# uint8 RGB -> float: the ImageNet statistics (scaled to 0..255) the trainer normalises with on device.
RGB_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
RGB_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
DATA_SEED = 0


def arch_config(arch: str) -> DarknetConfig:
    """The DarknetConfig a case names ('darknet53' or 'tiny')."""
    if arch == "darknet53":
        return DARKNET53
    if arch == "tiny":
        return TINY
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


@dataclasses.dataclass(frozen=True)
class CaseSpec:
    """One measurement: framework, mode, variant, shapes and how long to time it."""

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

    def __post_init__(self) -> None:
        if self.framework not in FRAMEWORKS:
            raise ValueError(f"framework must be one of {FRAMEWORKS}, got {self.framework!r}")
        variants = {"flax": FLAX_VARIANTS, "torch": TORCH_VARIANTS, "e2e": E2E_VARIANTS}[self.framework]
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.variant not in variants:
            raise ValueError(f"{self.framework} variant must be one of {variants}, got {self.variant!r}")
        if (self.variant.startswith("trainer") or self.framework == "e2e") and self.mode != "train":
            raise ValueError(f"variant {self.variant!r} is a train step; mode must be 'train', got {self.mode!r}")
        arch_config(self.arch)
        for name in ("batch", "image_size", "steps", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")

    @property
    def name(self) -> str:
        """Stable id: framework/mode/variant/bBATCH[/label]."""
        base = f"{self.framework}/{self.mode}/{self.variant}/b{self.batch}"
        return f"{base}/{self.label}" if self.label else base


def result_record(spec: CaseSpec, status: str, **fields: Any) -> dict[str, Any]:
    """A case's JSON record: the spec, a status ('ok', 'skipped', 'failed') and whatever was measured."""
    record: dict[str, Any] = {"name": spec.name, "status": status, **dataclasses.asdict(spec)}
    record.update(fields)
    return record


def time_windows(run_steps: Callable[[int], None], sync: Callable[[], None], spec: CaseSpec) -> dict[str, Any]:
    """Warm up, then time `spec.repeats` windows of `spec.steps` steps; each window ends with a device sync."""
    if spec.warmup:
        run_steps(spec.warmup)
        sync()
    per_step = []
    for _ in range(spec.repeats):
        sync()
        t0 = time.perf_counter()
        run_steps(spec.steps)
        sync()
        per_step.append((time.perf_counter() - t0) / spec.steps)
    median = statistics.median(per_step)
    return {
        "step_ms_median": 1e3 * median,
        "step_ms_windows": [1e3 * t for t in per_step],
        "img_per_s": spec.batch / median,
    }
