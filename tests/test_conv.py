"""The ResNet convolution (`vlm_jax.models.conv`): the Toeplitz product for a kernel larger than its input equals
XLA's convolution in value and gradient; every other convolution is XLA's own, bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from vlm_jax.models import conv

DN = ("NHWC", "HWIO", "NHWC")


def _both(x, w, padding, strides=(1, 1)):
  ref = lambda x, w: lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN)  # noqa: E731
  ours = lambda x, w: conv.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN)  # noqa: E731
  return ref, ours


@pytest.mark.parametrize("hw,k,padding", [
    ((2, 2), 3, ((1, 1), (1, 1))),    # the last stage of the tiny ResNet at 32 px
    ((1, 1), 3, ((1, 1), (1, 1))),
    ((2, 1), 3, ((1, 1), (1, 1))),
    ((2, 2), 3, ((0, 2), (2, 0))),    # asymmetric padding
    ((5, 4), 7, ((3, 3), (3, 3))),    # a 7 x 7 stem on a tiny image
])
def test_kernel_larger_than_input_equals_xla(hw, k, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, *hw, 5)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k, 5, 4)), jnp.float32)
  ref, ours = _both(x, w, padding)
  np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-4, atol=1e-4)
  loss = lambda f: jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), argnums=(0, 1))(x, w)  # noqa: E731
  for got, want in zip(loss(ours), loss(ref)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("hw,k,padding,strides", [
    ((4, 4), 3, ((1, 1), (1, 1)), (1, 1)),   # input as large as the kernel: XLA's convolution
    ((2, 8), 3, ((1, 1), (1, 1)), (1, 1)),   # smaller in one dimension only
    ((2, 2), 3, ((1, 1), (1, 1)), (2, 2)),   # strided
])
def test_other_convolutions_are_xla_bit_for_bit(hw, k, padding, strides):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, *hw, 3)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k, 3, 4)), jnp.float32)
  ref, ours = _both(x, w, padding, strides)
  np.testing.assert_array_equal(jax.jit(ours)(x, w), jax.jit(ref)(x, w))
