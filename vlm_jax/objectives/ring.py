"""The ring machinery of the memory-linear losses, and the one `impl='dense'|'ring'` switch.

Every contrastive loss with a global-batch softmax or sigmoid has two implementations that live side by side in
its own module (`contrastive`: CLIP, UniCL, SigLIP; `filip`: FILIP):

- dense: the B×B logits (rows sharded, B/n × B per device) in one go, the reference;
- ring: every device keeps its own B/n images and passes the text side around the data-parallel devices with
  `jax.lax.ppermute` inside `jax.shard_map` (the ring of big_vision's "chunked SigLIP" TODO), walking its rows in
  tiles of `tile` rows, so no array larger than tile × B/n logits exists in the forward or the backward. The
  backward is a `jax.custom_vjp` that keeps only the inputs and small per-row / per-column statistics of the
  forward and recomputes every tile on a second trip around the ring, carrying the text gradient with the
  travelling chunk (Inf-CL: Wang et al. 2024, "Breaking the Memory Barrier: Near Infinite Batch Size Scaling for
  Contrastive Loss", arXiv 2410.17243). Replicated scalars (logit scale t, SigLIP bias b) get their per-device
  partial gradients summed over the ring axes with `psum`.

This module holds what the ring kernels share (ring axes and collectives, tiling, online log-sum-exp,
`shard_map` wrapping, the recomputing `custom_vjp`) and `dense_or_ring`, which turns a (dense, ring) pair into
the registry's objective `fn(outputs, batch, *, mesh_axes=None, impl='dense', tile=None)`, so a config selects
`config.objective_hparams = {'clip': {'impl': 'ring', 'tile': 256}}`. Without an ambient mesh, or with a single
data-parallel device, the ring kernels run without collectives.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vlm_jax.errors import UserError
from vlm_jax.parallel.mesh import BATCH_AXES

IMPLS = ("dense", "ring")
DEFAULT_TILE = 256  # rows per logits tile: 256 × (B/n) fp32 is 4 MiB per temporary at B/n = 4096
_HIGHEST = jax.lax.Precision.HIGHEST


def dense_or_ring(name: str, dense: Callable[..., Any], ring: Callable[..., Any]) -> Callable[..., Any]:
  """The objective `name` with both implementations: `fn(outputs, batch, *, mesh_axes=None, impl='dense',
  tile=None)` calls `dense(outputs, batch, mesh_axes=…)` or `ring(outputs, batch, mesh_axes=…, tile=…)`.

  The docstring is the dense twin's (paper and formula; the ring has the same value, gradients and metrics).
  An unknown `impl`, or a `tile` with impl='dense', raises `UserError`.
  """
  def objective(outputs, batch, *, mesh_axes: str | Sequence[str] | None = None, impl: str = "dense",
                tile: int | None = None):
    if impl not in IMPLS:
      raise UserError(f"objective {name!r} has no impl {impl!r}; choose from {list(IMPLS)}")
    if impl == "ring":
      return ring(outputs, batch, mesh_axes=mesh_axes, tile=tile)
    if tile is not None:
      raise UserError(f"objective {name!r}: tile={tile} only applies to impl='ring'")
    return dense(outputs, batch, mesh_axes=mesh_axes)

  objective.__name__ = objective.__qualname__ = f"{name}_loss"
  objective.__module__ = dense.__module__
  objective.__doc__ = (f"{dense.__doc__.rstrip()}\n\n  impl='dense' (default): `{dense.__name__}` above; "
                       f"impl='ring': `{ring.__name__}`,\n  memory linear in B with `tile` image rows per logits "
                       "tile (same value, gradients and metrics).\n")
  objective.dense, objective.ring = dense, ring
  return objective


def f32(x) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def dot_nt(a, b):
  """a bᵀ in float32 at full precision."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_HIGHEST)


def dot_tn(a, b):
  """aᵀ b in float32 at full precision."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=_HIGHEST)


def dot_nn(a, b):
  return jnp.matmul(a, b, precision=_HIGHEST)


def ring_axes(mesh_axes: str | Sequence[str] | None):
  """(ambient mesh or None, ring axes with size > 1, number of ring devices)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    if mesh_axes is not None:
      raise ValueError(f"mesh_axes={mesh_axes} needs an ambient mesh: call the jitted function inside "
                       "`with jax.set_mesh(mesh):` (or set it globally with `jax.set_mesh(mesh)`)")
    return None, (), 1
  wanted = BATCH_AXES if mesh_axes is None else ((mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes))
  missing = [a for a in wanted if a not in mesh.axis_names]
  if missing:
    raise ValueError(f"mesh_axes {missing} are not axes of the ambient mesh {mesh.axis_names}")
  axes = tuple(a for a in wanted if mesh.shape[a] > 1)
  return mesh, axes, math.prod(mesh.shape[a] for a in axes)


def tile_rows(local: int, tile: int | None) -> int:
  """Rows per tile: `tile` (clamped to the local batch) or the largest divisor of it ≤ DEFAULT_TILE."""
  if tile is None:
    return max(d for d in range(1, min(local, DEFAULT_TILE) + 1) if local % d == 0)
  tile = min(int(tile), local)
  if tile < 1 or local % tile:
    raise UserError(f"ring loss tile={tile} must be a positive divisor of the per-device batch {local}")
  return tile


def ring_layout(batch: int, mesh_axes, tile: int | None, default_tile: Callable[[int], int] | None = None):
  """(mesh, axes, ring size, rows per tile) for a global batch; `default_tile(local)` replaces DEFAULT_TILE's
  rule when `tile` is None. A batch the ring devices do not divide raises `UserError`."""
  mesh, axes, size = ring_axes(mesh_axes)
  if batch % size:
    raise UserError(f"global batch {batch} is not divisible by the {size} data-parallel devices")
  local = batch // size
  if tile is None and default_tile is not None:
    tile = default_tile(local)
  return mesh, axes, size, tile_rows(local, tile)


class Ring:
  """The ring's collectives: `shift` sends to the next device of `axes`; `psum` sums over them."""

  def __init__(self, axes: tuple[str, ...], size: int):
    self.axes, self.size = axes, size

  def shift(self, tree):
    if self.size == 1:
      return tree
    perm = [(i, (i + 1) % self.size) for i in range(self.size)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, self.axes, perm), tree)

  def psum(self, x):
    return jax.lax.psum(x, self.axes) if self.size > 1 else x

  def run(self, step, local, chunk, acc):
    """step(local, chunk, acc, own) over the own chunk and then every other device's, hop by hop; `acc` (the
    per-chunk accumulator) is home again at the end. `own` is a Python bool (True for the own chunk only).
    Returns (local, acc)."""
    local, acc = step(local, chunk, acc, True)
    if self.size > 1:
      def hop(_, carry):
        local, chunk, acc = carry
        chunk, acc = self.shift((chunk, acc))
        local, acc = step(local, chunk, acc, False)
        return local, chunk, acc
      local, chunk, acc = jax.lax.fori_loop(1, self.size, hop, (local, chunk, acc))
      acc = self.shift(acc)
    return local, acc


def over_tiles(n: int, tile: int, body, carry):
  """fori_loop of body(r0, carry) over the row offsets 0, tile, 2·tile, … < n."""
  return jax.lax.fori_loop(0, n // tile, lambda i, c: body(i * tile, c), carry)


def rows(x, r0, tile):
  return jax.lax.dynamic_slice_in_dim(x, r0, tile, axis=0)


def set_rows(x, r0, value):
  return jax.lax.dynamic_update_slice_in_dim(x, value, r0, axis=0)


def own_positive(r0, tile: int, n: int) -> jax.Array:
  """[tile, n] indicator of the pairs (r0 + a, r0 + a) of the own chunk (the CLIP / SigLIP / FILIP positives)."""
  return (r0 + jnp.arange(tile))[:, None] == jnp.arange(n)[None, :]


def lse_merge(m, s, block_max, block_sum_at):
  """Online log-sum-exp: running (max, Σ exp(x − max)) merged with a block of maximum `block_max`;
  block_sum_at(m_new) is the block's Σ exp(x − m_new)."""
  m_new = jnp.maximum(m, block_max)
  return m_new, s * jnp.exp(m - m_new) + block_sum_at(m_new)


def sharded(kernel, mesh, axes, size, tile, in_kinds, out_kinds):
  """`kernel(ring, tile, *args)` over global arrays: 'b' = batch-sharded over `axes`, 's' = replicated."""
  ring = Ring(axes, size)
  fn = functools.partial(kernel, ring, tile)
  if mesh is None or not axes:
    return fn
  spec = {"b": P(axes), "s": P()}
  return jax.shard_map(fn, mesh=mesh, in_specs=tuple(spec[k] for k in in_kinds),
                       out_specs=tuple(spec[k] for k in out_kinds), check_vma=False)


def recomputed(forward: Callable, backward: Callable, nondiff: Sequence[int] = ()) -> Callable:
  """`jax.custom_vjp` function args -> (loss, *metrics) whose backward recomputes instead of storing.

  `forward(*args)` returns ((loss, *metrics), stats) with `stats` the small per-row / per-column residuals;
  `backward(*args, *stats, g)` returns the gradients of the arguments not in `nondiff` (those get None, e.g.
  integer labels or masks), g being the loss cotangent (metrics are not differentiated).
  """
  fn = jax.custom_vjp(lambda *args: forward(*args)[0])

  def fwd(*args):
    out, stats = forward(*args)
    return out, (args, tuple(stats))

  def bwd(res, cotangents):
    args, stats = res
    grads = iter(backward(*args, *stats, cotangents[0]))
    return tuple(None if i in nondiff else next(grads) for i in range(len(args)))

  fn.defvjp(fwd, bwd)
  return fn
