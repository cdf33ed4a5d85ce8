"""Declarative key maps between torch_ref (seed) names, Flax paths and timm names, derived from the config.

Every conv of Darknet is a ConvBN unit; one table (`CONV_BN_RULES`) says how each of its tensors is named and
laid out on each side, and `units(config, num_classes)` lists the units in Darknet's file order. Nothing here imports a
framework.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

from darknet_arch import DarknetConfig
from porting.state import shape_of

# PyTorch OIHW conv weight -> Flax HWIO kernel; Linear (out, in) -> Dense kernel (in, out).
OIHW_TO_HWIO = (2, 3, 1, 0)
HWIO_TO_OIHW = (3, 2, 0, 1)
LINEAR_TO_DENSE = (1, 0)

# torch_ref's conv unit is Sequential(Conv2d, BatchNorm2d, LeakyReLU): indices 0 and 1; timm names them conv and bn.
TORCH_CONV, TORCH_BN = "0", "1"
TIMM_CONV, TIMM_BN = "conv", "bn"
# timm's darknet53 built with act_layer="prelu" holds each unit's slope as `<unit>.bn.act.weight` (one element):
# the one way a timm config can express a LeakyReLU slope other than nn.LeakyReLU's default.
TIMM_ACT_WEIGHT = "act.weight"
NUM_BATCHES_TRACKED = "num_batches_tracked"

PARAMS, BATCH_STATS = "params", "batch_stats"


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """One tensor of a unit: its torch suffix, Flax collection and sub-path, and the torch -> Flax transpose."""

    torch_suffix: str
    collection: str
    flax_path: tuple[str, ...]
    transpose: tuple[int, ...] | None


CONV_BN_RULES: tuple[TensorRule, ...] = (
    TensorRule(f"{TORCH_CONV}.weight", PARAMS, ("conv", "kernel"), OIHW_TO_HWIO),
    TensorRule(f"{TORCH_BN}.weight", PARAMS, ("bn", "scale"), None),
    TensorRule(f"{TORCH_BN}.bias", PARAMS, ("bn", "bias"), None),
    TensorRule(f"{TORCH_BN}.running_mean", BATCH_STATS, ("bn", "mean"), None),
    TensorRule(f"{TORCH_BN}.running_var", BATCH_STATS, ("bn", "var"), None),
)
DENSE_RULES: tuple[TensorRule, ...] = (
    TensorRule("weight", PARAMS, ("kernel",), LINEAR_TO_DENSE),
    TensorRule("bias", PARAMS, ("bias",), None),
)


@dataclasses.dataclass(frozen=True)
class Unit:
    """A ConvBN unit (or the linear head) under its three names, with its torch-layout shapes."""

    torch_prefix: str  # residual_block3.7.layer2
    flax_prefix: tuple[str, ...]  # (residual_block3, block7, layer2)
    timm_prefix: str  # stages.2.blocks.7.conv2
    kind: str  # "conv_bn" or "dense"
    out_channels: int
    in_channels: int
    kernel: int  # 1 for the head

    @property
    def rules(self) -> tuple[TensorRule, ...]:
        return CONV_BN_RULES if self.kind == "conv_bn" else DENSE_RULES

    def torch_shape(self, rule: TensorRule) -> tuple[int, ...]:
        """Shape of `rule`'s tensor in torch layout."""
        if rule.transpose is None:
            return (self.out_channels,)
        if self.kind == "conv_bn":
            return (self.out_channels, self.in_channels, self.kernel, self.kernel)
        return (self.out_channels, self.in_channels)

    def torch_key(self, rule: TensorRule) -> str:
        return f"{self.torch_prefix}.{rule.torch_suffix}"

    def flax_key(self, rule: TensorRule) -> tuple[str, ...]:
        return (rule.collection, *self.flax_prefix, *rule.flax_path)

    def timm_key(self, rule: TensorRule) -> str:
        if self.kind == "dense":
            return f"{self.timm_prefix}.{rule.torch_suffix}"
        index, _, attr = rule.torch_suffix.partition(".")
        return f"{self.timm_prefix}.{TIMM_CONV if index == TORCH_CONV else TIMM_BN}.{attr}"

    def timm_act_key(self) -> str:
        """The timm key of this ConvBN unit's PReLU slope (act_layer="prelu")."""
        return f"{self.timm_prefix}.{TIMM_BN}.{TIMM_ACT_WEIGHT}"

    def bn_counter_keys(self) -> tuple[str, str]:
        """(torch, timm) keys of the BN's num_batches_tracked counter."""
        return (
            f"{self.torch_prefix}.{TORCH_BN}.{NUM_BATCHES_TRACKED}",
            f"{self.timm_prefix}.{TIMM_BN}.{NUM_BATCHES_TRACKED}",
        )


def conv_units(config: DarknetConfig) -> Iterator[Unit]:
    """The ConvBN units in forward (= Darknet cfg and file) order."""
    yield Unit(config.stem_name(), (config.stem_name(),), "stem.conv1", "conv_bn",
               config.stem_channels, config.in_channels, config.stem_kernel)  # fmt: skip
    cin = config.stem_channels
    for i, stage in enumerate(config.stages):
        cout, mid = stage.out_channels, stage.out_channels // config.bottleneck_ratio
        down = config.down_name(i)
        yield Unit(down, (down,), f"stages.{i}.conv_down", "conv_bn", cout, cin, config.down_kernel)
        blocks = config.blocks_name(i)
        for j in range(stage.num_blocks):
            torch_block, flax_block, timm_block = f"{blocks}.{j}", (blocks, f"block{j}"), f"stages.{i}.blocks.{j}"
            yield Unit(f"{torch_block}.layer1", (*flax_block, "layer1"), f"{timm_block}.conv1", "conv_bn", mid, cout, 1)
            yield Unit(f"{torch_block}.layer2", (*flax_block, "layer2"), f"{timm_block}.conv2", "conv_bn",
                       cout, mid, config.block_kernel)  # fmt: skip
        cin = cout


def head_unit(config: DarknetConfig, num_classes: int) -> Unit:
    """The linear classifier (Darknet: a 1x1 conv with bias on the pooled features)."""
    return Unit(config.head_name(), (config.head_name(),), "head.fc", "dense", num_classes, config.width, 1)


def head_width(found: Mapping[str, Any], config: DarknetConfig, *, flax: bool = False) -> int | None:
    """Classes of the head in a torch-named state dict (or flat Flax paths 'params/fc/kernel'); None: no head."""
    unit, weight = head_unit(config, 1), DENSE_RULES[0]
    shape = shape_of(found.get("/".join(unit.flax_key(weight)) if flax else unit.torch_key(weight)))
    out_axis = weight.transpose.index(0) if flax and weight.transpose is not None else 0
    return shape[out_axis] if shape is not None and len(shape) == 2 else None


def units(config: DarknetConfig, num_classes: int | None) -> list[Unit]:
    """All units of a network with a `num_classes` head (None: backbone only)."""
    result = list(conv_units(config))
    if num_classes is not None:
        result.append(head_unit(config, num_classes))
    return result


def expected_torch_shapes(config: DarknetConfig, num_classes: int | None) -> dict[str, tuple[int, ...]]:
    """Every float tensor of the torch_ref state_dict (no counters), in order, with its shape."""
    return {u.torch_key(r): u.torch_shape(r) for u in units(config, num_classes) for r in u.rules}
