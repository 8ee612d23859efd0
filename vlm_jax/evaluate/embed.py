"""Batched, mesh-sharded embedding of evaluation data.

`Embedder` jit-compiles a model method once per batch shape, splits a host array into fixed-size batches
(the last one padded, so shapes never change), places each batch sharded over the mesh's batch axes and returns
the concatenated, un-padded result on the host of every process.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from vlm_jax.parallel import mesh as mesh_lib


class Embedder:
  """`Embedder(model, 'encode_image', batch_size)(variables, x) -> np.ndarray` over the ambient/current mesh."""

  def __init__(self, model, method: str, batch_size: int = 256, mesh=None):
    self.model, self.method, self.batch_size, self.mesh = model, method, int(batch_size), mesh
    self._fn: Callable | None = None

  def _compiled(self, mesh):
    if self._fn is None:
      def apply(variables, x):
        return self.model.apply(variables, x, method=self.method)
      self._fn = jax.jit(apply, out_shardings=mesh_lib.replicated(mesh))
    return self._fn

  def __call__(self, variables: Any, x: np.ndarray) -> np.ndarray:
    mesh = self.mesh or _current_mesh()
    dp = mesh_lib.data_parallel_size(mesh)
    bs = -(-min(self.batch_size, max(len(x), 1)) // dp) * dp  # a multiple of the data-parallel size
    fn = self._compiled(mesh)
    out = []
    for start in range(0, len(x), bs):
      chunk = x[start:start + bs]
      n = len(chunk)
      if n < bs:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - n, axis=0)])
      placed = jax.device_put(chunk, mesh_lib.batch_sharding(mesh, chunk.ndim))
      with jax.set_mesh(mesh):
        out.append(np.asarray(fn(variables, placed))[:n])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def _current_mesh():
  """The mesh set by `jax.set_mesh` (the training loop sets it), else all devices on `data`."""
  mesh = jax.sharding.get_mesh()
  if mesh is None or getattr(mesh, "empty", True):
    return mesh_lib.make_mesh({"data": -1})
  return mesh
