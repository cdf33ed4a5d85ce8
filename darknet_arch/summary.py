"""Per-stage output shapes, parameter counts and FLOPs, computed from the config alone.

`python -m darknet_arch --image-size 256 --num-classes 18` prints the table.
"""

from __future__ import annotations

import dataclasses

from darknet_arch.config import DARKNET53, DarknetConfig, check_input_shape

# A conv is Conv(bias=False) -> BatchNorm: the BN adds gamma and beta (trained) and mean and var
# (running statistics).
_BN_TRAINABLE_PER_CHANNEL = 2
_BN_STATS_PER_CHANNEL = 2


@dataclasses.dataclass(frozen=True)
class StageRow:
    """One row of the summary: a named layer group with its output shape and costs."""

    name: str
    out_shape: tuple[int, ...]  # (C, H, W) as in the seed's text, or (num_classes,) for the head
    params: int
    running_stats: int
    macs: int


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    """Costs of a whole Darknet at one input size."""

    rows: tuple[StageRow, ...]
    image_size: tuple[int, int]

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def running_stats(self) -> int:
        return sum(r.running_stats for r in self.rows)

    @property
    def macs(self) -> int:
        return sum(r.macs for r in self.rows)

    @property
    def flops(self) -> int:
        """Forward FLOPs, counting a multiply-add as two."""
        return 2 * self.macs

    def table(self) -> str:
        """The summary as an aligned text table."""
        h, w = self.image_size
        lines = [f"Darknet summary at {h}x{w}", f"{'layer':<18}{'output (C, H, W)':>22}{'params':>14}{'GMACs':>10}"]
        for r in self.rows:
            lines.append(f"{r.name:<18}{r.out_shape!s:>22}{r.params:>14,}{r.macs / 1e9:>10.3f}")
        lines.append(
            f"total: {self.params:,} trainable parameters, {self.running_stats:,} BatchNorm running-stat "
            f"floats, {self.macs / 1e9:.3f} G multiply-adds = {self.flops / 1e9:.2f} GFLOP per image"
        )
        return "\n".join(lines)


def _conv_bn(cin: int, cout: int, kernel: int, h: int, w: int) -> tuple[int, int, int]:
    """(params, running stats, MACs) of a bias-free conv + BN producing an h x w map."""
    weights = kernel * kernel * cin * cout
    return weights + _BN_TRAINABLE_PER_CHANNEL * cout, _BN_STATS_PER_CHANNEL * cout, weights * h * w


def summarize(
    config: DarknetConfig = DARKNET53,
    num_classes: int | None = 18,
    image_size: int | tuple[int, int] = 256,
) -> ModelSummary:
    """Summary of the network `config` with a `num_classes` head (None: no head) at `image_size`."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    check_input_shape((1, h, w, config.in_channels), "NHWC", config)
    rows = []
    cin = config.in_channels
    p, s, m = _conv_bn(cin, config.stem_channels, config.stem_kernel, h, w)
    rows.append(StageRow(config.stem_name(), (config.stem_channels, h, w), p, s, m))
    cin = config.stem_channels
    for i, stage in enumerate(config.stages):
        h, w = -(-h // config.down_stride), -(-w // config.down_stride)
        cout = stage.out_channels
        p, s, m = _conv_bn(cin, cout, config.down_kernel, h, w)
        rows.append(StageRow(config.down_name(i), (cout, h, w), p, s, m))
        mid = cout // config.bottleneck_ratio
        p1, s1, m1 = _conv_bn(cout, mid, 1, h, w)
        p2, s2, m2 = _conv_bn(mid, cout, config.block_kernel, h, w)
        n = stage.num_blocks
        rows.append(StageRow(config.blocks_name(i), (cout, h, w), n * (p1 + p2), n * (s1 + s2), n * (m1 + m2)))
        cin = cout
    if num_classes is not None:
        rows.append(StageRow(config.head_name(), (num_classes,), cin * num_classes + num_classes, 0, cin * num_classes))
    return ModelSummary(tuple(rows), (image_size, image_size) if isinstance(image_size, int) else image_size)
