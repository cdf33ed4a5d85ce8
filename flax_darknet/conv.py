"""`conv_general_dilated` for the Darknet convs: tiny maps as one matmul (im2col), strided convs with its gradients.

Why: XLA:CPU's convolution is pathologically slow when the output map is only a few pixels wide. On the
2-core CI machine (jax 0.10.2, batch 32), a 3x3 conv 256->512 on a 2x2 map took 63 ms forward and 131 ms
for its gradients, against 1.7 ms / 5.0 ms as a matmul over the 9 gathered taps; a stride-2 3x3 conv
512->1024 from 2x2 to 1x1 took 181 ms / 222 ms against 3.1 ms / 9.8 ms. Darknet-53 at 32-64 px (the demo and
test sizes) ends in such maps, and they made up about two thirds of its CPU training step. From 8x8 maps up,
XLA's own conv is as fast or faster, so only maps up to SMALL_MAP_MAX_SIDE use the matmul for 3x3 kernels; at
256 px the smallest Darknet-53 map is 8x8. A 1x1 conv (stride 1, no padding) is a matmul at every map size:
that measured 9% faster at 256 px batch 8 inference, 10% at 32 px batch 32 inference, 4% on the 32 px train
step and the same on the 256 px train step (bench/NOTES.md 6.3, row 17). The result is the same convolution (summed in
another order); a tap that only ever sees padding is dropped, so a 3x3 conv on a 1x1 map is one dense layer.

A strided conv on a larger map keeps XLA's conv for its values (the forward and inference are unchanged) and takes
the im2col matmul's derivatives (a custom JVP): XLA:CPU differentiates a stride-2 conv into a dilated conv that was
the slowest part of the 256 px train step: for Darknet-53's five downsamplers at 256 px batch 8, XLA's forward and
backward took 1.1-1.9x the matmul's (bench/NOTES.md 6.4).

Only XLA:CPU was measured, so the matmul is chosen per lowering platform (`lax.platform_dependent`):
on CPU it replaces the conv, on every other backend (cuDNN, TPU) XLA's own convolution runs unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

# Largest output height/width computed as a matmul (measured crossover: 4x4 is faster or equal, 8x8 slower).
SMALL_MAP_MAX_SIDE = 4
# Lowering platforms where the matmul was measured to beat XLA's conv (bench/RESULTS.md); elsewhere XLA's conv.
SMALL_MAP_PLATFORMS = ("cpu",)
# On SMALL_MAP_PLATFORMS, strided convs on larger maps differentiate as the im2col matmul (module docstring): the
# 256 px b8 train step 10-14% faster (bench/NOTES.md 6.4). False restores XLA's gradients.
STRIDED_GRADIENT_AS_MATMUL = True
_NHWC = ("NHWC", "HWIO", "NHWC")
Conv = Callable[[jax.Array, jax.Array], jax.Array]


def _sees_data(tap: int, stride: int, out_size: int, pad_lo: int, in_size: int) -> bool:
    """Whether kernel offset `tap` reads at least one real (non-padding) input position."""
    return any(0 <= tap + stride * o - pad_lo < in_size for o in range(out_size))


def _is_nhwc(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any) -> bool:
    if dimension_numbers is None:
        return False
    if isinstance(dimension_numbers, tuple) and all(isinstance(d, str) for d in dimension_numbers):
        return tuple(dimension_numbers) == _NHWC
    return lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC) == dimension_numbers


def _unit(values: Sequence[int] | None) -> bool:
    return values is None or all(v == 1 for v in values)


def darknet_conv(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    out_sharding: Any = None,
) -> jax.Array:
    """`lax.conv_general_dilated`; on SMALL_MAP_PLATFORMS, NHWC 1x1 convs and outputs up to 4x4 run as a matmul."""
    # nnx.Conv passes out_sharding (None unless the user shards explicitly); older jax has no such argument.
    sharding = {} if out_sharding is None else {"out_sharding": out_sharding}

    def xla_conv(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            batch_group_count=batch_group_count,
            precision=precision,
            preferred_element_type=preferred_element_type,
            **sharding,
        )

    general = (
        out_sharding is not None
        or lhs.ndim != 4
        or not _is_nhwc(lhs, rhs, dimension_numbers)
        or not (_unit(lhs_dilation) and _unit(rhs_dilation))
        or feature_group_count != 1
        or batch_group_count != 1
    )
    if general or isinstance(padding, str) or any(p < 0 for pair in padding for p in pair):
        return xla_conv(lhs, rhs)
    (kh, kw), (sh, sw) = rhs.shape[:2], tuple(window_strides)
    h, w = lhs.shape[1:3]
    (ph_lo, ph_hi), (pw_lo, pw_hi) = pads = ((padding[0][0], padding[0][1]), (padding[1][0], padding[1][1]))
    out_h = (h + ph_lo + ph_hi - kh) // sh + 1
    out_w = (w + pw_lo + pw_hi - kw) // sw + 1
    if min(out_h, out_w) < 1:
        return xla_conv(lhs, rhs)
    pointwise = (kh, kw) == (1, 1) and (sh, sw) == (1, 1) and not any(p for pair in padding for p in pair)

    def matmul_conv(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
        return _small_map_matmul(lhs, rhs, (sh, sw), pads, (out_h, out_w), precision, preferred_element_type)

    cpu_conv: Conv
    if pointwise or max(out_h, out_w) <= SMALL_MAP_MAX_SIDE:
        cpu_conv = matmul_conv
    elif STRIDED_GRADIENT_AS_MATMUL and (sh, sw) != (1, 1):
        cpu_conv = _with_derivatives_of(xla_conv, matmul_conv)
    else:
        return xla_conv(lhs, rhs)
    # Both branches are traced; lowering keeps only its platform's (the compiled program has no conditional).
    return lax.platform_dependent(lhs, rhs, default=xla_conv, **dict.fromkeys(SMALL_MAP_PLATFORMS, cpu_conv))


def _with_derivatives_of(primal: Conv, linear: Conv) -> Conv:
    """`primal`'s values with `linear`'s derivatives: both compute the same convolution, bilinear in (lhs, rhs).

    A custom JVP rather than a custom VJP, so that forward-mode differentiation (jax.jvp, jacfwd) still works:
    the tangent of a bilinear map is linear(d_lhs, rhs) + linear(lhs, d_rhs), and reverse mode transposes it into
    `linear`'s gradients (for the im2col matmul: a matmul with the gathered taps, and the taps scattered back).
    """

    @jax.custom_jvp
    def conv(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
        return primal(lhs, rhs)

    def conv_jvp(primals: tuple[jax.Array, jax.Array], tangents: tuple[Any, Any]) -> tuple[jax.Array, jax.Array]:
        (lhs, rhs), (d_lhs, d_rhs) = primals, tangents
        out = primal(lhs, rhs)
        # symbolic_zeros: an input that is not differentiated (an image, a frozen kernel) costs no matmul.
        terms = []
        if not isinstance(d_lhs, SymbolicZero):
            terms.append(linear(d_lhs, rhs))
        if not isinstance(d_rhs, SymbolicZero):
            terms.append(linear(lhs, d_rhs))
        return out, terms[0] + terms[1] if len(terms) == 2 else terms[0]

    conv.defjvp(conv_jvp, symbolic_zeros=True)
    return conv


def _small_map_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    strides: tuple[int, int],
    padding: tuple[tuple[int, int], tuple[int, int]],
    out_shape: tuple[int, int],
    precision: Any,
    preferred_element_type: Any,
) -> jax.Array:
    """The NHWC/HWIO conv as one matmul over the gathered taps that see data (im2col)."""
    (kh, kw), (sh, sw), (out_h, out_w) = rhs.shape[:2], strides, out_shape
    n, h, w, c = lhs.shape
    (ph_lo, ph_hi), (pw_lo, pw_hi) = padding
    rows = [i for i in range(kh) if _sees_data(i, sh, out_h, ph_lo, h)]
    cols = [j for j in range(kw) if _sees_data(j, sw, out_w, pw_lo, w)]
    taps = [(i, j) for i in rows for j in cols]
    if not taps:  # every output position reads only padding (padding wider than stride and kernel allow)
        dtype = preferred_element_type or jnp.result_type(lhs, rhs)
        return jnp.zeros((n, out_h, out_w, rhs.shape[-1]), dtype)
    padded = jnp.pad(lhs, ((0, 0), (ph_lo, ph_hi), (pw_lo, pw_hi), (0, 0)))
    # Tap (i, j) of output (y, x) reads padded[:, i + sh * y, j + sw * x]: one strided slice per tap.
    columns = jnp.concatenate(
        [
            lax.slice(padded, (0, i, j, 0), (n, i + sh * (out_h - 1) + 1, j + sw * (out_w - 1) + 1, c), (1, sh, sw, 1))
            for i, j in taps
        ],
        axis=-1,
    )
    return lax.dot_general(
        columns,
        _tap_kernel(rhs, rows, cols),
        (((3,), (0,)), ((), ())),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


def _tap_kernel(rhs: jax.Array, rows: list[int], cols: list[int]) -> jax.Array:
    """The (len(rows) * len(cols) * C_in, C_out) im2col kernel, taps in (row, col) order as the columns."""
    if rows == list(range(rows[0], rows[-1] + 1)) and cols == list(range(cols[0], cols[-1] + 1)):
        # Why not a concatenation of per-tap slices: XLA:CPU then copies the kernel twice per step (slice and
        # concat), which was 54% of the 32 px inference step (bench/NOTES.md 6). The (i, j, c) order of a
        # rectangle's reshape is the concatenation's; on 2x2+ maps, where every tap is used, it is a bitcast.
        return rhs[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].reshape(-1, rhs.shape[-1])
    # Taps with gaps (an input narrower than the stride) keep the general gather.
    return jnp.concatenate([rhs[i, j] for i in rows for j in cols], axis=0)
