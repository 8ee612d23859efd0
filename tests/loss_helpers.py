"""Shared assertion for the loss-implementation tests: value, metrics and gradients equal a reference."""

from __future__ import annotations

import numpy as np


def assert_value_and_grads_close(got, ref, grad_names) -> None:
  """`got` and `ref` are ((loss, metrics), grads) from `jax.value_and_grad(..., has_aux=True)`; rtol 1e-5."""
  (loss, metrics), grads = got
  (ref_loss, ref_metrics), ref_grads = ref
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert set(metrics) == set(ref_metrics)
  for key in ref_metrics:
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
  for name, g, ref_g in zip(grad_names, grads, ref_grads):
    np.testing.assert_allclose(g, ref_g, rtol=1e-5, atol=1e-7, err_msg=name)
