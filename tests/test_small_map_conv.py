"""flax_darknet.conv.darknet_conv: its CPU matmul path for tiny maps is the same convolution, values and gradients;
other backends lower to XLA's convolution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export, lax

from flax_darknet.conv import SMALL_MAP_MAX_SIDE, SMALL_MAP_PLATFORMS, darknet_conv

NHWC = ("NHWC", "HWIO", "NHWC")


def numpy_conv(x: np.ndarray, w: np.ndarray, stride: int, pad: tuple[int, int]) -> np.ndarray:
    """Direct float64 NHWC/HWIO cross-correlation: the independent reference."""
    x = np.pad(x.astype(np.float64), ((0, 0), pad, pad, (0, 0)))
    kh, kw = w.shape[:2]
    out_h = (x.shape[1] - kh) // stride + 1
    out_w = (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], out_h, out_w, w.shape[3]))
    for i in range(kh):
        for j in range(kw):
            window = x[:, i : i + stride * (out_h - 1) + 1 : stride, j : j + stride * (out_w - 1) + 1 : stride]
            out += window @ w[i, j].astype(np.float64)
    return out


# (height, width, kernel, stride, padding): Darknet's 3x3 blocks and stride-2 downsamplers on 1..4 px maps,
# a non-square map, asymmetric padding, and maps just past the matmul threshold (XLA's conv path).
CASES = [
    (1, 1, 3, 1, (1, 1)),
    (2, 2, 3, 1, (1, 1)),
    (3, 3, 3, 1, (1, 1)),
    (4, 4, 3, 1, (1, 1)),
    (2, 2, 3, 2, (1, 1)),
    (4, 4, 3, 2, (1, 1)),
    (7, 7, 3, 2, (1, 1)),
    (2, 5, 3, 1, (1, 1)),
    (3, 3, 3, 2, (0, 1)),
    (1, 1, 5, 4, (4, 4)),  # taps with a gap (rows 0 and 4 only): the per-tap gather
    (1, 1, 3, 10, (5, 5)),  # no tap sees data: zeros
    (16, 16, 1, 1, (0, 0)),  # a 1x1 conv: a matmul at any map size
    (16, 16, 1, 2, (0, 0)),  # a strided 1x1 conv: XLA's conv
    (8, 8, 3, 1, (1, 1)),
    (9, 9, 3, 2, (1, 1)),
]


@pytest.mark.parametrize(("h", "w", "k", "stride", "pad"), CASES)
def test_matches_float64_direct_convolution(h: int, w: int, k: int, stride: int, pad: tuple[int, int]) -> None:
    rng = np.random.default_rng(h * 100 + w * 10 + stride)
    x = rng.normal(size=(3, h, w, 5)).astype(np.float32)
    kernel = rng.normal(size=(k, k, 5, 7)).astype(np.float32)
    got = darknet_conv(jnp.asarray(x), jnp.asarray(kernel), (stride, stride), (pad, pad), dimension_numbers=NHWC)
    want = numpy_conv(x, kernel, stride, pad)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("h", "stride"), [(1, 1), (2, 1), (4, 1), (2, 2), (4, 2)])
def test_gradients_match_xla_convolution(h: int, stride: int) -> None:
    rng = np.random.default_rng(h + 10 * stride)
    x = jnp.asarray(rng.normal(size=(2, h, h, 6)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 6, 4)), jnp.float32)
    out_side = (h + 2 - 3) // stride + 1
    target = jnp.asarray(rng.normal(size=(2, out_side, out_side, 4)), jnp.float32)

    def loss(conv, x, kernel):
        y = conv(x, kernel, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=NHWC)
        return jnp.sum((y - target) ** 2)

    got = jax.grad(lambda a, b: loss(darknet_conv, a, b), argnums=(0, 1))(x, kernel)
    want = jax.grad(lambda a, b: loss(lax.conv_general_dilated, a, b), argnums=(0, 1))(x, kernel)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4)


def _lowered_ops(fn, x: jax.Array, platform: str) -> tuple[bool, bool]:
    """(has a convolution, has a dot) in the StableHLO that jax.export lowers `fn` to for `platform`."""
    text = export.export(jax.jit(fn), platforms=(platform,))(x).mlir_module()
    return "stablehlo.convolution" in text, "stablehlo.dot_general" in text


@pytest.mark.parametrize("direction", ["forward", "gradient"])
def test_tiny_maps_take_the_matmul_on_cpu_only_and_larger_maps_xla_conv(direction: str) -> None:
    kernel = jnp.ones((3, 3, 4, 4))

    def conv(x):
        return darknet_conv(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC)

    fn = conv if direction == "forward" else jax.grad(lambda x: jnp.sum(conv(x) ** 2))
    small = jnp.ones((1, SMALL_MAP_MAX_SIDE, SMALL_MAP_MAX_SIDE, 4))
    large = jnp.ones((1, 2 * SMALL_MAP_MAX_SIDE, 2 * SMALL_MAP_MAX_SIDE, 4))
    assert SMALL_MAP_PLATFORMS == ("cpu",)  # the only backend it was measured on (bench/RESULTS.md)
    assert _lowered_ops(fn, small, "cpu") == (False, True)
    # cuDNN and TPU keep XLA's convolution, even on tiny maps; nothing of the matmul is lowered there.
    for platform in ("cuda", "rocm", "tpu"):
        assert _lowered_ops(fn, small, platform) == (True, False), platform
    for platform in ("cpu", "cuda"):
        assert _lowered_ops(fn, large, platform) == (True, False), platform


def test_taps_that_only_see_padding_are_dropped() -> None:
    # On a 1x1 map with padding 1 only the centre tap reads data: the matmul has C_in rows, not 9 * C_in.
    kernel = jnp.ones((3, 3, 4, 6))
    fn = jax.jit(lambda x: darknet_conv(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC))
    text = export.export(fn, platforms=("cpu",))(jnp.ones((2, 1, 1, 4))).mlir_module()
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    assert len(dots) == 1 and "tensor<4x6xf32>" in dots[0], dots


@pytest.mark.parametrize("side", [2, 4])
def test_the_kernel_of_a_full_map_is_one_slice_not_a_copy_per_tap(side: int) -> None:
    # On maps where every tap sees data the im2col kernel is a reshape of the weights; the only concatenation
    # left is of the activation columns (a per-tap kernel concat was 54% of the 32 px step, bench/NOTES.md 6).
    kernel = jnp.ones((3, 3, 4, 6))
    fn = jax.jit(lambda x, k: darknet_conv(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC))
    text = export.export(fn, platforms=("cpu",))(jnp.ones((2, side, side, 4)), kernel).mlir_module()
    concats = [line for line in text.splitlines() if "stablehlo.concatenate" in line]
    assert len(concats) == 1 and f"tensor<2x{side}x{side}x36xf32>" in concats[0], concats


def test_bf16_inputs_give_bf16_outputs() -> None:
    x = jnp.ones((1, 2, 2, 3), jnp.bfloat16)
    y = darknet_conv(x, jnp.ones((3, 3, 3, 2), jnp.bfloat16), (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC)
    assert y.dtype == jnp.bfloat16


def test_pointwise_convs_take_the_matmul_on_cpu_at_any_map_size_with_the_same_gradients() -> None:
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(2, 16, 16, 6)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(1, 1, 6, 5)), jnp.float32)

    def loss(conv, x, kernel):
        return jnp.sum(jnp.sin(conv(x, kernel, (1, 1), ((0, 0), (0, 0)), dimension_numbers=NHWC)))

    got = jax.grad(lambda a, b: loss(darknet_conv, a, b), argnums=(0, 1))(x, kernel)
    want = jax.grad(lambda a, b: loss(lax.conv_general_dilated, a, b), argnums=(0, 1))(x, kernel)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4)
    fn = jax.grad(lambda x: loss(darknet_conv, x, kernel))
    assert _lowered_ops(fn, x, "cpu") == (False, True)
    assert _lowered_ops(fn, x, "cuda") == (True, False)


def numpy_conv_gradients(
    x: np.ndarray, w: np.ndarray, t: np.ndarray, stride: int, pad: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Float64 gradients of sum(conv(x, w) * t) with respect to x and w, tap by tap: the independent reference."""
    xp = np.pad(x.astype(np.float64), ((0, 0), pad, pad, (0, 0)))
    t64, w64 = t.astype(np.float64), w.astype(np.float64)
    out_h, out_w = t.shape[1:3]
    dx, dw = np.zeros_like(xp), np.zeros_like(w64)
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            rows = slice(i, i + stride * (out_h - 1) + 1, stride)
            cols = slice(j, j + stride * (out_w - 1) + 1, stride)
            dw[i, j] = np.einsum("nyxc,nyxo->co", xp[:, rows, cols], t64)
            dx[:, rows, cols] += t64 @ w64[i, j].T
    return dx[:, pad[0] : pad[0] + x.shape[1], pad[0] : pad[0] + x.shape[2]], dw


# Strided 3x3 convs whose outputs are wider than SMALL_MAP_MAX_SIDE: XLA's conv forward, matmul derivatives.
STRIDED_CASES = [(16, 16, (1, 1)), (9, 9, (1, 1)), (10, 13, (1, 1)), (11, 11, (0, 1))]


@pytest.mark.parametrize(("h", "w", "pad"), STRIDED_CASES)
def test_strided_convs_keep_xla_values_and_take_exact_gradients(h: int, w: int, pad: tuple[int, int]) -> None:
    rng = np.random.default_rng(h * 10 + w)
    x = rng.normal(size=(2, h, w, 5)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 5, 7)).astype(np.float32)
    args = ((2, 2), (pad, pad))
    y = darknet_conv(jnp.asarray(x), jnp.asarray(kernel), *args, dimension_numbers=NHWC)
    xla = lax.conv_general_dilated(jnp.asarray(x), jnp.asarray(kernel), *args, dimension_numbers=NHWC)
    assert max(y.shape[1:3]) > SMALL_MAP_MAX_SIDE
    np.testing.assert_array_equal(np.asarray(y), np.asarray(xla))  # the same program for the values
    t = rng.normal(size=y.shape).astype(np.float32)

    def loss(a, b):
        return jnp.sum(darknet_conv(a, b, *args, dimension_numbers=NHWC) * t)

    got = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(kernel))
    want = numpy_conv_gradients(x, kernel, t, 2, pad)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), r, rtol=1e-5, atol=1e-4)


def test_strided_gradients_lower_to_matmuls_on_cpu_and_to_convolutions_elsewhere() -> None:
    kernel = jnp.ones((3, 3, 4, 4))
    x = jnp.ones((1, 4 * SMALL_MAP_MAX_SIDE, 4 * SMALL_MAP_MAX_SIDE, 4))

    def conv(x, k):
        return darknet_conv(x, k, (2, 2), ((1, 1), (1, 1)), dimension_numbers=NHWC)

    grad = jax.jit(jax.grad(lambda x, k: jnp.sum(conv(x, k) ** 2), argnums=(0, 1)))
    cpu = export.export(grad, platforms=("cpu",))(x, kernel).mlir_module()
    # One convolution on the CPU (the forward); both gradients are dots on the gathered taps.
    assert cpu.count("stablehlo.convolution") == 1 and "stablehlo.dot_general" in cpu
    cuda = export.export(grad, platforms=("cuda",))(x, kernel).mlir_module()
    assert cuda.count("stablehlo.convolution") == 3 and "stablehlo.dot_general" not in cuda
    assert _lowered_ops(lambda x: conv(x, kernel), x, "cpu") == (True, False)  # inference: XLA's conv alone


def test_strided_convs_support_forward_mode_and_kernel_only_gradients() -> None:
    rng = np.random.default_rng(3)
    x, dx = (jnp.asarray(rng.normal(size=(2, 12, 12, 3)), jnp.float32) for _ in range(2))
    kernel, dk = (jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32) for _ in range(2))

    def conv_of(conv):
        return lambda a, b: conv(a, b, (2, 2), ((1, 1), (1, 1)), dimension_numbers=NHWC)

    ours, xla = conv_of(darknet_conv), conv_of(lax.conv_general_dilated)
    got, want = jax.jvp(ours, (x, kernel), (dx, dk)), jax.jvp(xla, (x, kernel), (dx, dk))
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-4)
    # The image is not differentiated (a first conv): the kernel's gradient alone, through a symbolic zero.
    g_kernel = jax.grad(lambda b: jnp.sum(jnp.tanh(ours(x, b))))(kernel)
    w_kernel = jax.grad(lambda b: jnp.sum(jnp.tanh(xla(x, b))))(kernel)
    np.testing.assert_allclose(np.asarray(g_kernel), np.asarray(w_kernel), rtol=1e-5, atol=1e-4)
    bf16 = jax.grad(lambda b: jnp.sum(ours(x.astype(jnp.bfloat16), b)))(kernel.astype(jnp.bfloat16))
    assert bf16.dtype == jnp.bfloat16
