"""Which cases a run measures, in priority order, so a time budget cuts the least important ones."""

from __future__ import annotations

import dataclasses
import fnmatch
import itertools
from pathlib import Path

from bench.common import E2E_VARIANTS, FLAX_VARIANTS, MODES, TORCH_VARIANTS, CaseSpec

WARM_CACHE_LABEL = "warm-cache"
# The goal figures first: bf16 train at every batch size (Flax, PyTorch AMP), bf16 inference and the
# product's own step at the first, the warm-cache start, the real loop; then torch.compile (its baselines
# are known: 76 s to compile), the fp32 baselines, and every remaining combination.
_EVERY_BATCH = (("flax", "train", "bf16"), ("torch", "train", "eager_amp_bf16_cl"))
_FIRST_BATCH = (
    ("flax", "infer", "bf16"),
    ("torch", "infer", "eager_amp_bf16_cl"),
    ("flax", "train", "trainer_bf16"),
)
_FIRST_BATCH_COMPILE = (
    ("torch", "train", "compile_amp_bf16_cl"),
    ("torch", "infer", "compile_amp_bf16_cl"),
)
_FIRST_BATCH_FP32 = (
    ("flax", "train", "fp32"),
    ("flax", "infer", "fp32"),
    ("torch", "train", "eager_fp32"),
    ("torch", "infer", "eager_fp32"),
)


@dataclasses.dataclass(frozen=True)
class PlanSettings:
    """Shapes and timing shared by every case of a run."""

    batch_sizes: tuple[int, ...]
    image_size: int
    arch: str
    warmup: int
    steps: int
    repeats: int


def all_combinations() -> list[tuple[str, str, str]]:
    """Every (framework, mode, variant) the benchmark knows."""
    flax = [("flax", m, v) for m, v in itertools.product(MODES, FLAX_VARIANTS) if m == "train" or "trainer" not in v]
    torch = [("torch", m, v) for m, v in itertools.product(MODES, TORCH_VARIANTS)]
    return flax + torch


def build_plan(
    settings: PlanSettings,
    work_dir: str,
    only: list[str] | None = None,
    skip: list[str] | None = None,
    e2e: bool = True,
) -> tuple[list[CaseSpec], list[str]]:
    """(cases to run in order, 'name: skipped: reason' lines for the ones `only`/`skip` removed).

    The first batch size's bf16 Flax train step runs with a fresh persistent compilation cache in
    `work_dir`/jax-cache (its compile time is the cold one), and a second process reruns it with that cache
    warm. The real-loop cases (`e2e`) compile into `work_dir`/trainer-cache: the JPEG run cold, then the
    decoded-cache run warm.
    """
    cache_dir = str(Path(work_dir) / "jax-cache")
    trainer_cache = str(Path(work_dir) / "trainer-cache")
    first, *rest = settings.batch_sizes
    keys: list[tuple[str, str, str, int]] = []
    for combo in _EVERY_BATCH:
        keys += [(*combo, b) for b in settings.batch_sizes]
    keys += [(*combo, first) for combo in _FIRST_BATCH]
    keys.append(("warm", "", "", first))
    if e2e:
        keys += [("e2e", "train", v, first) for v in E2E_VARIANTS]
    keys += [(*combo, first) for combo in _FIRST_BATCH_COMPILE]
    keys += [(*combo, first) for combo in _FIRST_BATCH_FP32]
    keys += [(*combo, b) for b in rest for combo in all_combinations() if (*combo, b) not in keys]

    common = dict(image_size=settings.image_size, arch=settings.arch, warmup=settings.warmup)
    timing = dict(steps=settings.steps, repeats=settings.repeats)
    specs: list[CaseSpec] = []
    for framework, mode, variant, batch in keys:
        if framework == "warm":
            # Start-up is the figure here: one short window is enough.
            specs.append(
                CaseSpec(
                    "flax", "train", "bf16", batch, cache_dir=cache_dir, label=WARM_CACHE_LABEL, steps=settings.steps,
                    repeats=1, **common,
                )
            )  # fmt: skip
            continue
        if framework == "e2e":
            cache = trainer_cache
        elif (framework, mode, variant, batch) == ("flax", "train", "bf16", first):
            cache = cache_dir
        else:
            cache = None
        specs.append(CaseSpec(framework, mode, variant, batch, cache_dir=cache, **common, **timing))

    skipped: list[str] = []
    kept: list[CaseSpec] = []
    for spec in specs:
        if only and not any(fnmatch.fnmatch(spec.name, p) for p in only):
            skipped.append(f"{spec.name}: skipped: not selected by --only {' '.join(only)}")
        elif skip and any(fnmatch.fnmatch(spec.name, p) for p in skip):
            skipped.append(f"{spec.name}: skipped: excluded by --skip {' '.join(skip)}")
        else:
            kept.append(spec)
    return kept, skipped
