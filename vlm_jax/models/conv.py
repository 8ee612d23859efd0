"""The convolution of the ResNet towers: `lax.conv_general_dilated`, except where the kernel is larger than its input.

A stride-1 kh x kw convolution whose input is smaller than the kernel in both spatial dimensions (a 3 x 3 conv on
the 2 x 2 grid of the last ResNet stage at 32 px, say) is one matrix product with the convolution's Toeplitz
matrix,

    y[n, i, j, o] = Σ_{p, q, c} x[n, p, q, c] · W[p − i + pt, q − j + pl, c, o]   (taps outside the kernel are 0)
                  = (vec(x[n]) · T)[i, j, o],   T[(p, q, c), (i, j, o)] = W[p − i + pt, q − j + pl, c, o],

the same sum as the convolution with padding (pt, pb), (pl, pr). XLA's algebraic simplifier swaps the operands of
such a convolution (the kernel becomes the "image"), and XLA:CPU runs the swapped form about 60x slower than the
product: 124 ms against 2 ms for the forward pass of a 3 x 3, 128-channel conv on a [256, 2, 2, 128] batch
(benchmarks/cpu_step_profile.py names the op). T has (H W)(Ho Wo) C_in C_out entries, at most (kh kw)² times the
kernel, built from the kernel by one gather. Every other convolution (strided, dilated, grouped, or with an input
at least as large as the kernel) is left to XLA. The parameters are the same `kernel` [kh, kw, C_in, C_out], so
checkpoints and weight conversion are unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")


def _is_small_input(lhs, rhs, window_strides, lhs_dilation, rhs_dilation, dimension_numbers,
                    feature_group_count) -> bool:
  if lhs.ndim != 4 or feature_group_count != 1 or any(s != 1 for s in window_strides):
    return False
  if any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ())):
    return False
  if lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC) != lax.conv_dimension_numbers(
      lhs.shape, rhs.shape, dimension_numbers):
    return False
  return all(x < k for x, k in zip(lhs.shape[1:3], rhs.shape[:2]))


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                         precision=None, **kwargs) -> jax.Array:
  """`lax.conv_general_dilated`, or the Toeplitz-matrix product for a kernel larger than its input (module
  docstring); `flax.linen.Conv(conv_general_dilated=…)` calls it with the lax signature."""
  if dimension_numbers is None or isinstance(padding, str) or not _is_small_input(
      lhs, rhs, window_strides, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count, precision=precision, **kwargs)
  (pt, pb), (pl, pr) = padding
  n, h, w, cin = lhs.shape
  kh, kw, _, cout = rhs.shape
  ho, wo = h + pt + pb - kh + 1, w + pl + pr - kw + 1
  p, q = np.arange(h)[:, None, None, None], np.arange(w)[None, :, None, None]
  i, j = np.arange(ho)[None, None, :, None], np.arange(wo)[None, None, None, :]
  a, b = p - i + pt, q - j + pl
  tap = np.where((a >= 0) & (a < kh) & (b >= 0) & (b < kw), a * kw + b, kh * kw)  # kh * kw: the zero tap
  taps = jnp.concatenate([rhs.reshape(kh * kw, cin, cout), jnp.zeros((1, cin, cout), rhs.dtype)])
  toeplitz = taps[tap].transpose(0, 1, 4, 2, 3, 5).reshape(h * w * cin, ho * wo * cout)
  y = jnp.dot(lhs.reshape(n, h * w * cin), toeplitz, precision=precision,
              preferred_element_type=kwargs.get("preferred_element_type"))
  return y.reshape(n, ho, wo, cout)
