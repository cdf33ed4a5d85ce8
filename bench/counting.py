"""Count first: arithmetic and memory traffic of one Darknet step, from the config's shapes alone.

The FLOP count comes from `darknet_arch.summarize` (a multiply-add is two FLOPs; training is the forward
plus a backward that costs two forwards: the input gradient and the weight gradient). The traffic model
counts activation tensors (conv outputs and residual sums) and how many times a fused schedule must move
each through device memory in one step; parameters and optimizer state add a per-step constant. Both give
floors: measured time over the larger floor is the gap.
"""

from __future__ import annotations

from typing import Any

from darknet_arch import DarknetConfig, summarize

# The H200 ceilings measured for this project (bf16 8192^3 matmul, device-to-device copy; the data and its
# date are in bench/RESULTS.md, "Baselines measured for this project on an H200").
H200_BF16_FLOP_S = 794e12
H200_COPY_BYTES_S = 4.26e12
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
# Inference: conv writes y, normalise+act (running stats) reads y and writes a; the next conv reads a.
INFER_PASSES_PER_ACTIVATION = 4
# Per parameter per step: read (fwd), read (bwd), write grad, read grad, read+write momentum, read+write param.
TRAIN_PASSES_PER_PARAM = 8
F32_BYTES = 4
BF16_BYTES = 2


def activation_elements(config: DarknetConfig, image_size: int) -> int:
    """Elements of every conv output and residual-block output for one image (what the schedule must move)."""
    h = w = image_size
    total = config.stem_channels * h * w
    for stage in config.stages:
        h, w = -(-h // config.down_stride), -(-w // config.down_stride)
        c, mid = stage.out_channels, stage.out_channels // config.bottleneck_ratio
        # The stride-2 conv, then per block: the 1x1 output, the 3x3 output, the sum with the block input.
        total += c * h * w + stage.num_blocks * (mid * h * w + 2 * c * h * w)
    return total


def step_counts(
    config: DarknetConfig, num_classes: int, image_size: int, batch: int, act_bytes: int = BF16_BYTES
) -> dict[str, float]:
    """FLOPs per image and estimated bytes per step at `batch` with `act_bytes`-wide activations."""
    s = summarize(config, num_classes, image_size)
    act = activation_elements(config, image_size) * act_bytes * batch
    return {
        "fwd_flop_per_image": float(s.flops),
        "train_flop_per_image": float(TRAIN_FLOP_FACTOR * s.flops),
        "params": s.params,
        "train_bytes_per_step": TRAIN_PASSES_PER_ACTIVATION * act + TRAIN_PASSES_PER_PARAM * s.params * F32_BYTES,
        "infer_bytes_per_step": INFER_PASSES_PER_ACTIVATION * act,
    }


def counts_summary(config: DarknetConfig, num_classes: int, image_size: int, batch: int) -> dict[str, Any]:
    """The report's counts: FLOPs, estimated traffic at bf16 and fp32, and the H200 floors in img/s."""
    bf16 = step_counts(config, num_classes, image_size, batch)
    f32 = step_counts(config, num_classes, image_size, batch, F32_BYTES)
    floors = {
        "train_arith": H200_BF16_FLOP_S / bf16["train_flop_per_image"],
        "train_memory": batch * H200_COPY_BYTES_S / bf16["train_bytes_per_step"],
        "infer_arith": H200_BF16_FLOP_S / bf16["fwd_flop_per_image"],
        "infer_memory": batch * H200_COPY_BYTES_S / bf16["infer_bytes_per_step"],
    }
    return {
        "GFLOP per training image": round(bf16["train_flop_per_image"] / 1e9, 3),
        "GFLOP per inference image": round(bf16["fwd_flop_per_image"] / 1e9, 3),
        "activation elements per image": activation_elements(config, image_size),
        f"estimated GB moved per train step, B={batch}, bf16 / fp32": (
            round(bf16["train_bytes_per_step"] / 1e9, 2),
            round(f32["train_bytes_per_step"] / 1e9, 2),
        ),
        f"estimated GB moved per inference step, B={batch}, bf16": round(bf16["infer_bytes_per_step"] / 1e9, 2),
        "H200 ceilings used (bench/RESULTS.md)": f"{H200_BF16_FLOP_S / 1e12:.0f} TFLOP/s bf16, "
        f"{H200_COPY_BYTES_S / 1e12:.2f} TB/s copy",
        "bf16 floors on an H200, img/s (arithmetic / memory)": {k: round(v) for k, v in floors.items()},
    }
