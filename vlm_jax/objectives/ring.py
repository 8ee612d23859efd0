"""Memory-linear CLIP, UniCL and SigLIP losses: a ring over the batch axes with tile recomputation in the backward.

The dense objectives in `vlm_jax.objectives.contrastive` hold B/n × B logits per device. Here every device keeps
its own B/n images and passes the text embeddings around the data-parallel devices with `jax.lax.ppermute`
inside `jax.shard_map` (the ring of big_vision's "chunked SigLIP" TODO), and inside a device it walks its rows in
tiles of `tile` rows, so no array larger than tile × B/n logits exists in the forward or the backward:

- softmax InfoNCE (CLIP, and UniCL's label positives): the image→text log-sum-exp of each row is accumulated
  online (running max and rescaled sum), and the text→image statistics of each column travel around the ring
  with their text chunk (and its labels) and arrive home after the last hop;
- pairwise sigmoid (SigLIP): the sum of log σ(−logits) over all pairs, the positives (the diagonal of the own
  chunk) corrected in closed form, log σ(x) − log σ(−x) = x.

The backward is a `jax.custom_vjp` that keeps only the embeddings and the per-row / per-column log-sum-exps (and
positive counts) of the forward and recomputes every logits tile on a second trip around the ring, carrying the
text gradient with the travelling chunk (Inf-CL: Wang et al. 2024, "Breaking the Memory Barrier: Near Infinite
Batch Size Scaling for Contrastive Loss", arXiv 2410.17243). The scalar parameters (logit scale t, SigLIP bias
b) are replicated, so their per-device partial gradients are summed over the ring axes with `psum`.

The values, gradients and metrics equal the dense losses (fp32 arithmetic whatever the input dtype). Without an
ambient mesh, or with a single data-parallel device, the same tiled kernels run without collectives.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vlm_jax.errors import UserError
from vlm_jax.parallel.mesh import BATCH_AXES

Metrics = dict[str, jax.Array]
DEFAULT_TILE = 256  # rows per logits tile: 256 × (B/n) fp32 is 4 MiB per temporary at B/n = 4096
_HIGHEST = jax.lax.Precision.HIGHEST


def _f32(x) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def _dot_nt(a, b):
  """a bᵀ in float32 at full precision."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_HIGHEST)


def _dot_tn(a, b):
  """aᵀ b in float32 at full precision."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=_HIGHEST)


def _dot_nn(a, b):
  return jnp.matmul(a, b, precision=_HIGHEST)


def _ring_axes(mesh_axes: str | Sequence[str] | None):
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


def _tile_rows(local: int, tile: int | None) -> int:
  """Rows per tile: `tile` (clamped to the local batch) or the largest divisor of it ≤ DEFAULT_TILE."""
  if tile is None:
    return max(d for d in range(1, min(local, DEFAULT_TILE) + 1) if local % d == 0)
  tile = min(int(tile), local)
  if tile < 1 or local % tile:
    raise UserError(f"ring loss tile={tile} must be a positive divisor of the per-device batch {local}")
  return tile


class _Ring:
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
    per-chunk accumulator) is home again at the end. Returns (local, acc)."""
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


def _over_tiles(n: int, tile: int, body, carry):
  """fori_loop of body(r0, carry) over the row offsets 0, tile, 2·tile, … < n."""
  return jax.lax.fori_loop(0, n // tile, lambda i, c: body(i * tile, c), carry)


def _rows(x, r0, tile):
  return jax.lax.dynamic_slice_in_dim(x, r0, tile, axis=0)


def _set_rows(x, r0, value):
  return jax.lax.dynamic_update_slice_in_dim(x, value, r0, axis=0)


def _tile_diagonal(logits, r0):
  """Entries (r, r0 + r) of a [tile, n] logits tile of the own chunk: the positive pairs."""
  cols = r0 + jnp.arange(logits.shape[0])
  return jnp.take_along_axis(logits, cols[:, None], axis=1)[:, 0]


def _lse_merge(m, s, block_max, block_sum_at):
  """Online log-sum-exp: running (max, Σ exp(x − max)) merged with a block of maximum `block_max`;
  block_sum_at(m_new) is the block's Σ exp(x − m_new)."""
  m_new = jnp.maximum(m, block_max)
  return m_new, s * jnp.exp(m - m_new) + block_sum_at(m_new)


# ---------------------------------------------------------------------------------------------------------
# Softmax InfoNCE with label positives (CLIP: every pair its own label; UniCL: shared labels)

def _softmax_forward_kernel(ring: _Ring, tile: int, zimg, ztxt, labels, scale):
  """Per device, with positives pos_ik = [y_i = y_k]: the sum of its row terms lse^row_i − mean_{k∈P(i)} L_ik
  and column terms lse^col_j − mean_{k∈P(j)} L_kj, the retrieval hit counts, and the per-row / per-column
  (lse, |P|) the backward needs."""
  n = zimg.shape[0]
  neg_inf = jnp.full((n,), -jnp.inf, jnp.float32)
  zeros = jnp.zeros((n,), jnp.float32)

  def step(local, chunk, acc, own):
    del own
    ztxt_c, labels_c = chunk

    def body(r0, c):
      row, col = c
      logits = scale * _dot_nt(_rows(zimg, r0, tile), ztxt_c)
      pos = _rows(labels, r0, tile)[:, None] == labels_c[None, :]
      pos_logits = jnp.where(pos, logits, 0.0)
      pos_or_ninf = jnp.where(pos, logits, -jnp.inf)
      m, s, pos_sum, pos_cnt, pos_max = (_rows(x, r0, tile) for x in row)
      m, s = _lse_merge(m, s, jnp.max(logits, axis=1),
                        lambda m_new: jnp.sum(jnp.exp(logits - m_new[:, None]), axis=1))
      row_tile = (m, s, pos_sum + jnp.sum(pos_logits, axis=1), pos_cnt + jnp.sum(pos, axis=1, dtype=jnp.float32),
                  jnp.maximum(pos_max, jnp.max(pos_or_ninf, axis=1)))
      row = tuple(_set_rows(x, r0, v) for x, v in zip(row, row_tile))
      cm, cs, c_sum, c_cnt, c_max = col
      cm, cs = _lse_merge(cm, cs, jnp.max(logits, axis=0),
                          lambda m_new: jnp.sum(jnp.exp(logits - m_new[None, :]), axis=0))
      col = (cm, cs, c_sum + jnp.sum(pos_logits, axis=0), c_cnt + jnp.sum(pos, axis=0, dtype=jnp.float32),
             jnp.maximum(c_max, jnp.max(pos_or_ninf, axis=0)))
      return row, col
    return _over_tiles(n, tile, body, (local, acc))

  init = (neg_inf, zeros, zeros, zeros, neg_inf)
  row, col = ring.run(step, init, (ztxt, labels), init)
  (row_m, row_s, row_sum, row_cnt, row_best), (col_m, col_s, col_sum, col_cnt, col_best) = row, col
  row_lse = row_m + jnp.log(row_s)
  col_lse = col_m + jnp.log(col_s)
  total = ring.psum(jnp.sum(row_lse - row_sum / row_cnt) + jnp.sum(col_lse - col_sum / col_cnt))
  i2t = ring.psum(jnp.sum((row_best >= row_m).astype(jnp.float32)))
  t2i = ring.psum(jnp.sum((col_best >= col_m).astype(jnp.float32)))
  return total, i2t, t2i, row_lse, row_cnt, col_lse, col_cnt


def _softmax_backward_kernel(ring: _Ring, tile: int, zimg, ztxt, labels, scale, row_lse, row_cnt, col_lse,
                             col_cnt, g):
  """Cotangents of L = (1/2B)[Σ_i (lse^row_i − mean_{P(i)} L_i·) + Σ_j (lse^col_j − mean_{P(j)} L_·j)]:
  ∂L/∂L_ij = (P_ij + Q_ij − pos_ij (1/|P(i)| + 1/|P(j)|))/(2B), P the row and Q the column softmax, recomputed
  per tile (for CLIP pos = δ and |P| = 1)."""
  n, d = zimg.shape
  coef = g / (2.0 * n * ring.size)

  def step(local, chunk, acc, own):
    del own
    ztxt_c, labels_c, col_lse_c, col_inv_c = chunk

    def body(r0, c):
      (dimg, dscale), dtxt = c
      zi = _rows(zimg, r0, tile)
      sim = _dot_nt(zi, ztxt_c)
      logits = scale * sim
      pos = _rows(labels, r0, tile)[:, None] == labels_c[None, :]
      row_inv = 1.0 / _rows(row_cnt, r0, tile)
      grad = (jnp.exp(logits - _rows(row_lse, r0, tile)[:, None]) + jnp.exp(logits - col_lse_c[None, :])
              - jnp.where(pos, row_inv[:, None] + col_inv_c[None, :], 0.0))
      dimg = _set_rows(dimg, r0, _rows(dimg, r0, tile) + _dot_nn(grad, ztxt_c))
      return (dimg, dscale + jnp.sum(grad * sim)), dtxt + _dot_tn(grad, zi)
    return _over_tiles(n, tile, body, (local, acc))

  zeros = jnp.zeros((n, d), jnp.float32)
  (dimg, dscale), dtxt = ring.run(step, (zeros, jnp.zeros((), jnp.float32)),
                                  (ztxt, labels, col_lse, 1.0 / col_cnt), zeros)
  return coef * scale * dimg, coef * scale * dtxt, coef * ring.psum(dscale)


# ---------------------------------------------------------------------------------------------------------
# Pairwise sigmoid (SigLIP)

def _siglip_forward_kernel(ring: _Ring, tile: int, zimg, ztxt, scale, bias):
  """Per device: Σ_ij log σ(−L_ij) + Σ_i L_ii over its rows, and the retrieval hit counts."""
  n = zimg.shape[0]
  neg_inf = jnp.full((n,), -jnp.inf, jnp.float32)

  def step(local, chunk, acc, own):
    def body(r0, c):
      (total, row_m, diag), col_m = c
      logits = scale * _dot_nt(_rows(zimg, r0, tile), chunk) + bias
      total = total + jnp.sum(jax.nn.log_sigmoid(-logits))
      row_m = _set_rows(row_m, r0, jnp.maximum(_rows(row_m, r0, tile), jnp.max(logits, axis=1)))
      if own:
        diag = _set_rows(diag, r0, _tile_diagonal(logits, r0))
      return (total, row_m, diag), jnp.maximum(col_m, jnp.max(logits, axis=0))
    return _over_tiles(n, tile, body, (local, acc))

  init = (jnp.zeros((), jnp.float32), neg_inf, jnp.zeros((n,), jnp.float32))
  (total, row_m, diag), col_m = ring.run(step, init, ztxt, neg_inf)
  total = ring.psum(total + jnp.sum(diag))
  i2t = ring.psum(jnp.sum((diag >= row_m).astype(jnp.float32)))
  t2i = ring.psum(jnp.sum((diag >= col_m).astype(jnp.float32)))
  return total, i2t, t2i


def _siglip_backward_kernel(ring: _Ring, tile: int, zimg, ztxt, scale, bias, g):
  """Cotangents of L = −(1/B)[Σ_ij log σ(−L_ij) + Σ_i L_ii]: ∂L/∂L_ij = (σ(L_ij) − δ_ij)/B."""
  n, d = zimg.shape
  coef = g / (n * ring.size)

  def step(local, chunk, acc, own):
    del own

    def body(r0, c):
      (dimg, dscale, dbias), dtxt = c
      zi = _rows(zimg, r0, tile)
      sim = _dot_nt(zi, chunk)
      grad = jax.nn.sigmoid(scale * sim + bias)
      dimg = _set_rows(dimg, r0, _rows(dimg, r0, tile) + _dot_nn(grad, chunk))
      return (dimg, dscale + jnp.sum(grad * sim), dbias + jnp.sum(grad)), dtxt + _dot_tn(grad, zi)
    return _over_tiles(n, tile, body, (local, acc))

  zeros = jnp.zeros((n, d), jnp.float32)
  scalar = jnp.zeros((), jnp.float32)
  (dimg, dscale, dbias), dtxt = ring.run(step, (zeros, scalar, scalar), ztxt, zeros)
  dimg = coef * scale * (dimg - ztxt)
  dtxt = coef * scale * (dtxt - zimg)
  dscale = coef * ring.psum(dscale - jnp.sum(zimg * ztxt))
  dbias = coef * ring.psum(dbias - n)
  return dimg, dtxt, dscale, dbias


# ---------------------------------------------------------------------------------------------------------
# Global functions: shard_map over the ring axes (or the kernels as they are on one device), custom_vjp.

def _sharded(kernel, mesh, axes, size, tile, in_kinds, out_kinds):
  """`kernel(ring, tile, *args)` over global arrays: 'b' = batch-sharded over `axes`, 's' = replicated."""
  ring = _Ring(axes, size)
  fn = functools.partial(kernel, ring, tile)
  if mesh is None or not axes:
    return fn
  spec = {"b": P(axes), "s": P()}
  return jax.shard_map(fn, mesh=mesh, in_specs=tuple(spec[k] for k in in_kinds),
                       out_specs=tuple(spec[k] for k in out_kinds), check_vma=False)


def _prepare(outputs, mesh_axes, tile):
  zimg, ztxt = _f32(outputs["zimg"]), _f32(outputs["ztxt"])
  mesh, axes, size = _ring_axes(mesh_axes)
  if zimg.shape[0] % size:
    raise UserError(f"global batch {zimg.shape[0]} is not divisible by the {size} data-parallel devices")
  return zimg, ztxt, mesh, axes, size, _tile_rows(zimg.shape[0] // size, tile)


def _softmax_loss(name, outputs, labels, mesh_axes, tile) -> tuple[jax.Array, Metrics]:
  zimg, ztxt, mesh, axes, size, tile = _prepare(outputs, mesh_axes, tile)
  scale = _f32(outputs["logit_scale"])
  b = zimg.shape[0]
  labels = jnp.arange(b, dtype=jnp.int32) if labels is None else labels
  fwd = _sharded(_softmax_forward_kernel, mesh, axes, size, tile, "bbbs", "sssbbbb")
  bwd = _sharded(_softmax_backward_kernel, mesh, axes, size, tile, "bbbsbbbbs", "bbs")

  def value(zi, zt, y, t):
    total, i2t, t2i, *_ = fwd(zi, zt, y, t)
    return total / (2 * b), i2t / b, t2i / b

  loss = jax.custom_vjp(value)

  def loss_fwd(zi, zt, y, t):
    total, i2t, t2i, *stats = fwd(zi, zt, y, t)
    return (total / (2 * b), i2t / b, t2i / b), (zi, zt, y, t, *stats)

  def loss_bwd(res, cotangents):
    zi, zt, y, t, *stats = res
    dimg, dtxt, dscale = bwd(zi, zt, y, t, *stats, cotangents[0])
    return dimg, dtxt, None, dscale

  loss.defvjp(loss_fwd, loss_bwd)
  value, i2t, t2i = loss(zimg, ztxt, labels, scale)
  metrics = {
      f"{name}/loss": value,
      f"{name}/i2t_accuracy": jax.lax.stop_gradient(i2t),
      f"{name}/t2i_accuracy": jax.lax.stop_gradient(t2i),
      f"{name}/logit_scale": jax.lax.stop_gradient(scale),
  }
  return value, metrics


def ring_clip_loss(outputs: Mapping[str, Any], batch: Mapping[str, Any], *,
                   mesh_axes: str | Sequence[str] | None = None,
                   tile: int | None = None) -> tuple[jax.Array, Metrics]:
  """CLIP's symmetric InfoNCE (Radford et al. 2021) with memory linear in B (ring + Inf-CL recomputation).

    logits_ij = t · z^I_i · z^T_j
    L = ½ [ −(1/B) Σ_i log softmax_j(logits)_ii  −(1/B) Σ_j log softmax_i(logits)_jj ]

  Same inputs, value, gradients and metrics as `contrastive.clip_loss`; `mesh_axes` names the ring axes (default
  the batch axes of the ambient mesh, those of size 1 dropped); `tile` is the number of image rows per logits
  tile (a divisor of the per-device batch; default the largest divisor ≤ 256).
  """
  del batch
  return _softmax_loss("clip", outputs, None, mesh_axes, tile)


def ring_unicl_loss(outputs: Mapping[str, Any], batch: Mapping[str, Any], *,
                    mesh_axes: str | Sequence[str] | None = None,
                    tile: int | None = None) -> tuple[jax.Array, Metrics]:
  """UniCL's image-text-label contrastive loss (Yang et al. 2022) with memory linear in B; positives of anchor
  i are P(i) = {k : y_k = y_i} (batch['label']), whose labels travel around the ring with the text chunk:

    L = ½ [ −(1/B) Σ_i (1/|P(i)|) Σ_{k∈P(i)} log softmax_k(logits_i·)_k
            −(1/B) Σ_j (1/|P(j)|) Σ_{k∈P(j)} log softmax_k(logits_·j)_k ]

  Same value, gradients and metrics as `contrastive.unicl_loss`; `mesh_axes`, `tile` as for `ring_clip_loss`.
  """
  if "label" not in batch:
    raise UserError("the 'unicl' objective needs batch['label'] (class/concept ids); "
                    "use a dataset with labels or the 'clip' objective")
  labels = jnp.asarray(batch["label"]).astype(jnp.int32).reshape(-1)
  return _softmax_loss("unicl", outputs, labels, mesh_axes, tile)


def ring_siglip_loss(outputs: Mapping[str, Any], batch: Mapping[str, Any], *,
                     mesh_axes: str | Sequence[str] | None = None,
                     tile: int | None = None) -> tuple[jax.Array, Metrics]:
  """SigLIP's pairwise sigmoid loss (Zhai et al. 2023) with memory linear in B (ring + Inf-CL recomputation).

    logits_ij = t · z^I_i · z^T_j + b,   z_ij = +1 if i = j else −1
    L = −(1/B) Σ_i Σ_j log σ(z_ij · logits_ij) = −(1/B) [ Σ_ij log σ(−logits_ij) + Σ_i logits_ii ]

  Same inputs, value, gradients (z^I, z^T, t, b) and metrics as `contrastive.siglip_loss`; `mesh_axes` and
  `tile` as for `ring_clip_loss`.
  """
  del batch
  zimg, ztxt, mesh, axes, size, tile = _prepare(outputs, mesh_axes, tile)
  scale = _f32(outputs["logit_scale"])
  bias = _f32(outputs.get("logit_bias", 0.0))
  b = zimg.shape[0]
  fwd = _sharded(_siglip_forward_kernel, mesh, axes, size, tile, "bbss", "sss")
  bwd = _sharded(_siglip_backward_kernel, mesh, axes, size, tile, "bbsss", "bbss")

  def value(zi, zt, t, bb):
    total, i2t, t2i = fwd(zi, zt, t, bb)
    return -total / b, i2t / b, t2i / b

  loss = jax.custom_vjp(value)

  def loss_fwd(zi, zt, t, bb):
    return value(zi, zt, t, bb), (zi, zt, t, bb)

  def loss_bwd(res, cotangents):
    return bwd(*res, cotangents[0])

  loss.defvjp(loss_fwd, loss_bwd)
  value, i2t, t2i = loss(zimg, ztxt, scale, bias)
  metrics = {
      "siglip/loss": value,
      "siglip/i2t_accuracy": jax.lax.stop_gradient(i2t),
      "siglip/t2i_accuracy": jax.lax.stop_gradient(t2i),
      "siglip/logit_scale": jax.lax.stop_gradient(scale),
      "siglip/logit_bias": jax.lax.stop_gradient(bias),
  }
  return value, metrics
