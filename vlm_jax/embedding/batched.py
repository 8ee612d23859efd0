"""Batched, mesh-sharded embedding of evaluation data.

`Embedder` jit-compiles a model method once per batch shape, splits a host array into fixed-size batches
(the last one padded, so shapes never change), places each batch sharded over the mesh's batch axes and returns
the concatenated, un-padded result on the host of every process. The jitted function is shared by all
Embedders of the same (model, method, mesh).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import numpy as np

from vlm_jax.parallel import mesh as mesh_lib


class Embedder:
  """`Embedder(model, 'encode_image', batch_size)(variables, x) -> np.ndarray` over the ambient/current mesh."""

  def __init__(self, model, method: str, batch_size: int = 256, mesh=None):
    self.model, self.method, self.batch_size, self.mesh = model, method, int(batch_size), mesh

  def __call__(self, variables: Any, x: np.ndarray) -> np.ndarray:
    mesh = self.mesh or current_mesh()
    return apply_batched(_compiled(self.model, self.method, mesh), variables, x, self.batch_size, mesh)


def apply_batched(fn: Callable, variables: Any, x: np.ndarray, batch_size: int, mesh) -> np.ndarray:
  """`fn(variables, batch)` over `x` in fixed-size batches (a multiple of the data-parallel size; the last one
  padded by repeating its final row), each placed sharded over the mesh's batch axes; the un-padded results
  concatenated on the host."""
  dp = mesh_lib.data_parallel_size(mesh)
  bs = -(-min(int(batch_size), max(len(x), 1)) // dp) * dp
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


@functools.lru_cache(maxsize=16)
def _compiled(model, method: str, mesh) -> Callable:
  """One jitted apply per (model, method, mesh), shared by every Embedder: evaluators that embed with the same
  model compile each batch shape once. (Flax modules hash and compare by their configuration.)"""

  def apply(variables, x):
    return model.apply(variables, x, method=method)
  return jax.jit(apply, out_shardings=mesh_lib.replicated(mesh))


def current_mesh():
  """The mesh set by `jax.set_mesh` (the training loop sets it), else all devices on `data`."""
  mesh = jax.sharding.get_mesh()
  if mesh is None or getattr(mesh, "empty", True):
    return mesh_lib.make_mesh({"data": -1})
  return mesh
