"""Count first: arithmetic and memory traffic of one Darknet training step, from the config's shapes alone.

The FLOP count comes from `darknet_arch.summarize` (a multiply-add is two FLOPs; training is the forward
plus a backward that costs two forwards: the input gradient and the weight gradient). The traffic model
counts activation tensors (conv outputs and residual-block outputs) and how many times a fused
XLA/cuDNN schedule must move each of them through device memory in one step; parameters and optimizer
state add a per-step constant. Both give floors: measured time over the larger floor is the gap.
"""

from __future__ import annotations

import dataclasses

from darknet_arch import DARKNET53, DarknetConfig, summarize

# The backward of a conv is two conv-sized products (grad wrt input, grad wrt weights).
TRAIN_FLOP_FACTOR = 3
# Element passes per conv output in one training step, for a schedule where BN+activation(+add) are fused
# but the conv output must be materialised because BN needs whole-batch statistics first:
#   forward:  conv writes y (1), BN-stats read y (1), normalise+act read y and write a (2)         = 4
#   backward: read da and y for the BN-grad reductions (2), read them again and write dy (3),
#             conv data-grad reads dy (1), conv weight-grad reads dy (1)                           = 7
# The conv input (the previous layer's output) is read once forward and twice backward (data grad writes
# it, weight grad reads it): 3 more passes charged to the producer. Total 14 per activation element.
TRAIN_PASSES_PER_ACTIVATION = 14
# Inference: conv writes y, normalise+act (running stats, no reduction) reads y and writes a; the next conv
# reads a. XLA can fold inference BN into the conv epilogue, which would leave 2; we count the unfused 4.
INFER_PASSES_PER_ACTIVATION = 4
# Per parameter per step: read (fwd), read (bwd), write grad, read grad, read+write momentum, read+write param.
TRAIN_PASSES_PER_PARAM = 8
F32_BYTES = 4


@dataclasses.dataclass(frozen=True)
class StepCounts:
    """Arithmetic and memory-traffic estimate of one step at one batch size and compute width."""

    batch: int
    image_size: int
    fwd_flop_per_image: float
    train_flop_per_image: float
    activation_elems_per_image: int
    params: int
    act_bytes: int  # bytes per activation element (2 for bf16 compute, 4 for f32)

    @property
    def train_bytes_per_step(self) -> float:
        """Estimated device-memory bytes moved by one training step (activations + parameters)."""
        act = TRAIN_PASSES_PER_ACTIVATION * self.activation_elems_per_image * self.act_bytes * self.batch
        return act + TRAIN_PASSES_PER_PARAM * self.params * F32_BYTES

    @property
    def infer_bytes_per_step(self) -> float:
        """Estimated device-memory bytes moved by one inference step."""
        return INFER_PASSES_PER_ACTIVATION * self.activation_elems_per_image * self.act_bytes * self.batch

    def floors(self, flop_per_s: float, bytes_per_s: float) -> dict[str, float]:
        """Upper bounds in img/s from arithmetic and from memory bandwidth, for train and inference."""
        return {
            "train_img_s_arith": flop_per_s / self.train_flop_per_image,
            "train_img_s_memory": self.batch * bytes_per_s / self.train_bytes_per_step,
            "infer_img_s_arith": flop_per_s / self.fwd_flop_per_image,
            "infer_img_s_memory": self.batch * bytes_per_s / self.infer_bytes_per_step,
        }


def activation_elements(config: DarknetConfig, image_size: int) -> int:
    """Elements of every conv output and residual-block output for one image (what the schedule must move)."""
    h = w = image_size
    total = config.stem_channels * h * w
    for stage in config.stages:
        h, w = -(-h // config.down_stride), -(-w // config.down_stride)
        c = stage.out_channels
        mid = c // config.bottleneck_ratio
        total += c * h * w  # the stride-2 conv
        # Per block: the 1x1 output, the 3x3 output, and the sum with the block input.
        total += stage.num_blocks * (mid * h * w + 2 * c * h * w)
    return total


def step_counts(
    batch: int, image_size: int = 256, act_bytes: int = 2, config: DarknetConfig = DARKNET53, num_classes: int = 18
) -> StepCounts:
    """Counts for one step of `batch` images of `image_size` px with `act_bytes`-wide activations."""
    s = summarize(config, num_classes, image_size)
    return StepCounts(
        batch=batch,
        image_size=image_size,
        fwd_flop_per_image=float(s.flops),
        train_flop_per_image=float(TRAIN_FLOP_FACTOR * s.flops),
        activation_elems_per_image=activation_elements(config, image_size),
        params=s.params,
        act_bytes=act_bytes,
    )
