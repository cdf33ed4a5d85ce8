"""Fine-tuning controls as parameter groups: frozen units, a head learning-rate multiplier, layer-wise decay.

The network is a sequence of units: the stem, the five stages (each a stride-2 conv and its residual blocks) and
the head. Every parameter belongs to the unit its top-level module names (the checkpoint names of
darknet_arch), and each unit gets a learning-rate multiplier (0: frozen).
"""

from __future__ import annotations

from typing import Any

from darknet_arch import DarknetConfig

FREEZE_NONE, FREEZE_BACKBONE = "none", "backbone"


def unit_names(config: DarknetConfig) -> list[tuple[str, ...]]:
    """The top-level module names of each unit, in order: stem, stage 1..N, head."""
    stages = [(config.down_name(i), config.blocks_name(i)) for i in range(len(config.stages))]
    return [(config.stem_name(),), *stages, (config.head_name(),)]


def freeze_choices(config: DarknetConfig) -> tuple[str, ...]:
    """Values of --freeze: none, stem, stage1..stageN (that unit and all before it), backbone (all but the head)."""
    return (FREEZE_NONE, "stem", *(f"stage{i + 1}" for i in range(len(config.stages))), FREEZE_BACKBONE)


def frozen_units(config: DarknetConfig, freeze: str) -> int:
    """How many leading units --freeze freezes (0 for none); ValueError naming the choices otherwise."""
    choices = freeze_choices(config)
    if freeze not in choices:
        raise ValueError(f"--freeze must be one of {', '.join(choices)}, got {freeze!r}")
    return len(unit_names(config)) - 1 if freeze == FREEZE_BACKBONE else choices.index(freeze)


def unit_multipliers(config: DarknetConfig, freeze: str, head_lr_mult: float, layer_decay: float | None) -> list[float]:
    """The learning-rate multiplier of each unit: 0 when frozen; layer_decay ** (distance from the head); x head_lr_mult
    on the head."""
    n = len(unit_names(config))
    mults = [1.0 if layer_decay is None else layer_decay ** (n - 1 - i) for i in range(n)]
    mults[-1] *= head_lr_mult
    for i in range(frozen_units(config, freeze)):
        mults[i] = 0.0
    return mults


def module_multipliers(config: DarknetConfig, multipliers: list[float]) -> dict[str, float]:
    """Each top-level module's learning-rate multiplier: its unit's (what both trainers group parameters by)."""
    return {name: m for unit, m in zip(unit_names(config), multipliers, strict=True) for name in unit}


def frozen_modules(config: DarknetConfig, freeze: str) -> frozenset[str]:
    """Top-level module names whose parameters and BatchNorm statistics must not change."""
    units = unit_names(config)[: frozen_units(config, freeze)]
    return frozenset(name for unit in units for name in unit)


def group_label(multiplier: float) -> str:
    """The optax.multi_transform label of a multiplier ('frozen' for 0)."""
    return "frozen" if multiplier == 0 else f"lr_x{multiplier:.6g}"


def param_labels(config: DarknetConfig, multipliers: list[float]) -> Any:
    """A function params -> the same tree of group labels (for optax.multi_transform)."""
    by_module = {name: group_label(m) for name, m in module_multipliers(config, multipliers).items()}

    def labels(params: Any) -> Any:
        unknown = sorted(set(params) - set(by_module))
        if unknown:
            raise ValueError(f"parameters {unknown} belong to no unit of the network ({sorted(by_module)})")
        return {name: _fill(sub, by_module[name]) for name, sub in params.items()}

    return labels


def _fill(tree: Any, label: str) -> Any:
    return {k: _fill(v, label) for k, v in tree.items()} if isinstance(tree, dict) else label
