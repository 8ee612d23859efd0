"""Contrastive objectives over the global batch: CLIP, SigLIP, UniCL (each dense and ring) and SimCLR (SLIP).

Notation (as in the VLM survey): a global batch of B pairs, z^I_i and z^T_i the L2-normalised image and text
embeddings of pair i, τ the temperature and t = 1/τ the learned logit scale, b the SigLIP logit bias. Every
objective has the signature `loss_fn(outputs, batch, *, mesh_axes=None, **hparams) -> (scalar, metrics)` and
computes in float32 whatever the input dtype (matmuls at `Precision.HIGHEST`, so TPUs do not round the
similarities to bf16 before they are multiplied by t ≤ 100); log-softmax and log-sigmoid are the numerically
stable `jax.nn` forms.

Two implementations of each of CLIP, UniCL and SigLIP, side by side, chosen by the registry's `impl` keyword
(`ring.dense_or_ring`): `clip_loss(…, impl='dense'|'ring', tile=None)` is `dense_clip_loss` or `ring_clip_loss`,
with the same value, gradients and metrics.

Dense: negatives and sharding. Under GSPMD the embeddings are global, batch-sharded `jax.Array`s, so the dense
B×B formulation already takes its negatives from the whole global batch. With `mesh_axes` (the batch axes,
e.g. `('data', 'fsdp')`) every B×B matrix is constrained to rows sharded over those axes,
`PartitionSpec(mesh_axes, None)`, so a device holds B/n × B and never the full B×B logits; column-wise
(text-to-image) reductions become all-reduces of length-B vectors. The constraint is a bare `PartitionSpec`,
which needs an ambient mesh while the step is traced: in jax 0.10 that is `jax.set_mesh(mesh)`, used either as
a context manager around the call of the jitted step (`with jax.set_mesh(mesh): step(state, batch)`) or as a
global setter; `jax.sharding.use_mesh` no longer exists in this version. Without an ambient mesh a `ValueError`
says so rather than silently gathering the logits. Per-device memory is O(B²/n).

Ring: memory linear in B (`vlm_jax.objectives.ring` for the machinery). Each device keeps its B/n images, the
text chunk travels around the ring and rows are walked in tiles:
- softmax InfoNCE (CLIP, and UniCL's label positives): the image→text log-sum-exp of each row is accumulated
  online (running max and rescaled sum), and the text→image statistics of each column travel around the ring
  with their text chunk (and its labels) and arrive home after the last hop;
- pairwise sigmoid (SigLIP): the sum of log σ(−logits) over all pairs, the positives (the diagonal of the own
  chunk) corrected in closed form, log σ(x) − log σ(−x) = x.
The backward recomputes every tile (Inf-CL), keeping only the embeddings and the per-row / per-column
log-sum-exps (and positive counts) of the forward.

Accuracy metrics ('<name>/i2t_accuracy', '<name>/t2i_accuracy', 'simclr/accuracy') share one tie rule,
`top1_hits`: an anchor is correct only if its positive scores strictly above every negative, so a tie is wrong
and collapsed embeddings (all logits equal) report 0, not 100 %.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vlm_jax.errors import UserError
from vlm_jax.objectives.ring import (Ring, dense_or_ring, dot_nn, dot_nt, dot_tn, f32, lse_merge, over_tiles,
                                     own_positive, recomputed, ring_layout, rows, set_rows, sharded)

Metrics = dict[str, jax.Array]
_HIGHEST = jax.lax.Precision.HIGHEST


def _normalise_axes(mesh_axes: str | Sequence[str] | None) -> tuple[str, ...] | None:
  if mesh_axes is None:
    return None
  return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def constrain_rows(x: jax.Array, mesh_axes: str | Sequence[str] | None) -> jax.Array:
  """Shards the leading axis of `x` over `mesh_axes` (others replicated); identity when `mesh_axes` is None.

  Needs the ambient mesh set by `jax.set_mesh(mesh)` (see the module docstring).
  """
  axes = _normalise_axes(mesh_axes)
  if axes is None:
    return x
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    raise ValueError(f"mesh_axes={axes} needs an ambient mesh: call the jitted function inside "
                     "`with jax.set_mesh(mesh):` (or set it globally with `jax.set_mesh(mesh)`)")
  missing = [a for a in axes if a not in mesh.axis_names]
  if missing:
    raise ValueError(f"mesh_axes {missing} are not axes of the ambient mesh {mesh.axis_names}")
  return jax.lax.with_sharding_constraint(x, P(axes, *([None] * (x.ndim - 1))))


def similarity_logits(za: jax.Array, zb: jax.Array, scale, *,
                      mesh_axes: str | Sequence[str] | None = None) -> jax.Array:
  """float32 logits `scale · za zbᵀ` [A, B], rows sharded over `mesh_axes` when given."""
  logits = f32(scale) * jnp.matmul(f32(za), f32(zb).T, precision=_HIGHEST)
  return constrain_rows(logits, mesh_axes)


# ---------------------------------------------------------------------------------------------------------
# In-batch retrieval accuracy: the one tie rule (dense, ring and FILIP)

def top1_hits(best_positive: jax.Array, best_negative: jax.Array) -> jax.Array:
  """1.0 per anchor whose best positive logit is strictly greater than its best negative logit, else 0.0.

    hit_a = [ max_{k∈P(a)} logits_ak  >  max_{k∉P(a)} logits_ak ]      (max over an empty set = −∞)

  A tie counts as wrong, so collapsed embeddings (every logit equal) give 0 accuracy, not 100 %. With one
  positive per anchor (CLIP, SigLIP, FILIP, SimCLR) this is "the paired logit is strictly greater than every
  other logit of the row". With label positives (UniCL: several columns share a label) it reads: the
  best-scoring column has the anchor's label and scores strictly above every column with another label (ties
  among same-label columns do not matter; an anchor whose whole batch shares its label is a hit).
  """
  return (jax.lax.stop_gradient(best_positive) > jax.lax.stop_gradient(best_negative)).astype(jnp.float32)


def top1_accuracy(logits: jax.Array, positive: jax.Array, axis: int) -> jax.Array:
  """Mean `top1_hits` of the anchors along `axis` (axis=1: rows are anchors; axis=0: columns are)."""
  logits = jax.lax.stop_gradient(logits)
  best_positive = jnp.max(jnp.where(positive, logits, -jnp.inf), axis=axis)
  best_negative = jnp.max(jnp.where(positive, -jnp.inf, logits), axis=axis)
  return jnp.mean(top1_hits(best_positive, best_negative))


def _accuracy_metrics(name: str, i2t, t2i, scale, **extra) -> Metrics:
  return {f"{name}/i2t_accuracy": i2t, f"{name}/t2i_accuracy": t2i,
          f"{name}/logit_scale": jax.lax.stop_gradient(scale),
          **{f"{name}/{k}": jax.lax.stop_gradient(v) for k, v in extra.items()}}


def _labels(batch, name: str) -> jax.Array:
  if "label" not in batch:
    raise UserError(f"the {name!r} objective needs batch['label'] (class/concept ids); "
                    "use a dataset with labels or the 'clip' objective")
  return jnp.asarray(batch["label"]).astype(jnp.int32).reshape(-1)


# ---------------------------------------------------------------------------------------------------------
# Dense (B/n × B logits per device)

def _multi_positive_ce(logits: jax.Array, positive: jax.Array, axis: int) -> jax.Array:
  """Per anchor: −(1/|P|) Σ_{k∈P} log softmax(logits)_k, the softmax and P taken along `axis`."""
  logp = jax.nn.log_softmax(logits, axis=axis)
  n_pos = jnp.sum(positive, axis=axis, dtype=jnp.float32)
  return -jnp.sum(jnp.where(positive, logp, 0.0), axis=axis) / n_pos


def _diagonal_mask(n: int, mesh_axes) -> jax.Array:
  rows_ = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)
  return constrain_rows(rows_ == cols, mesh_axes)


def _label_contrastive(name: str, zimg, ztxt, scale, labels, mesh_axes) -> tuple[jax.Array, Metrics]:
  """Symmetric image-text contrastive loss whose positives are the pairs sharing a label (shared by CLIP/UniCL)."""
  logits = similarity_logits(zimg, ztxt, scale, mesh_axes=mesh_axes)
  positive = constrain_rows(labels[:, None] == labels[None, :], mesh_axes)
  loss_i2t = jnp.mean(_multi_positive_ce(logits, positive, axis=1))
  loss_t2i = jnp.mean(_multi_positive_ce(logits, positive, axis=0))
  loss = 0.5 * (loss_i2t + loss_t2i)
  return loss, {f"{name}/loss": loss, **_accuracy_metrics(name, top1_accuracy(logits, positive, axis=1),
                                                          top1_accuracy(logits, positive, axis=0), f32(scale))}


def dense_clip_loss(outputs: Mapping[str, Any], batch: Mapping[str, Any], *,
                    mesh_axes: str | Sequence[str] | None = None) -> tuple[jax.Array, Metrics]:
  """Symmetric InfoNCE of CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural
  Language Supervision").

    logits_ij = t · z^I_i · z^T_j        (t = 1/τ = outputs['logit_scale'])
    L = ½ [ −(1/B) Σ_i log softmax_j(logits)_ii  −(1/B) Σ_j log softmax_i(logits)_jj ]
      = ½ [ CE(logits, diag) + CE(logitsᵀ, diag) ]

  The image-to-text term normalises each row, the text-to-image term each column. Uses outputs 'zimg',
  'ztxt' [B, D] and 'logit_scale'; `batch` is unused. Metrics: 'clip/loss', 'clip/i2t_accuracy',
  'clip/t2i_accuracy' (top-1 retrieval of the paired item within the global batch, ties wrong: `top1_hits`),
  'clip/logit_scale'.
  """
  del batch
  zimg, ztxt = f32(outputs["zimg"]), f32(outputs["ztxt"])
  pair_ids = jnp.arange(zimg.shape[0], dtype=jnp.int32)
  return _label_contrastive("clip", zimg, ztxt, outputs["logit_scale"], pair_ids, mesh_axes)


def dense_unicl_loss(outputs: Mapping[str, Any], batch: Mapping[str, Any], *,
                     mesh_axes: str | Sequence[str] | None = None) -> tuple[jax.Array, Metrics]:
  """Image-text-label contrastive loss of UniCL (Yang et al. 2022, "Unified Contrastive Learning in
  Image-Text-Label Space").

  Every pair carries a label y_i (batch['label']); positives of anchor i are P(i) = {k : y_k = y_i}:

    logits_ik = t · z^I_i · z^T_k
    L_i2t = −(1/B) Σ_i (1/|P(i)|) Σ_{k∈P(i)} log softmax_k(logits_i·)_k
    L_t2i = −(1/B) Σ_j (1/|P(j)|) Σ_{k∈P(j)} log softmax_k(logits_·j)_k
    L = ½ (L_i2t + L_t2i)

  With all labels distinct P(i) = {i} and L equals CLIP's exactly (image-text data are the special case where
  every caption is its own class). Metrics 'unicl/…' as for CLIP; an anchor is a hit when its best-scoring
  column has its label and scores strictly above every column with another label (`top1_hits`).
  """
  zimg, ztxt = f32(outputs["zimg"]), f32(outputs["ztxt"])
  return _label_contrastive("unicl", zimg, ztxt, outputs["logit_scale"], _labels(batch, "unicl"), mesh_axes)


def dense_siglip_loss(outputs: Mapping[str, Any], batch: Mapping[str, Any], *,
                      mesh_axes: str | Sequence[str] | None = None) -> tuple[jax.Array, Metrics]:
  """Pairwise sigmoid loss of SigLIP (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training").

    logits_ij = t · z^I_i · z^T_j + b,   z_ij = +1 if i = j else −1
    L = −(1/B) Σ_i Σ_j log σ(z_ij · logits_ij)

  normalised by the batch size B as in the paper (not by B²). t = outputs['logit_scale'] and
  b = outputs['logit_bias'] (paper init t = 10, b = −10); a model without a bias uses b = 0. t is used as given:
  SigLIP runs leave it unclamped, t = exp(t'), as the paper's big_vision code does (configs/pretrain/siglip.py
  sets `model.max_log_logit_scale = None`; released SigLIP checkpoints carry t > 100 (about 110–120), and the sigmoid
  loss's bias b, not a cap on t, keeps the logits of the many negatives in range). Metrics: 'siglip/loss',
  'siglip/i2t_accuracy', 'siglip/t2i_accuracy' (ties wrong: `top1_hits`), 'siglip/logit_scale',
  'siglip/logit_bias'.
  """
  del batch
  zimg, ztxt = f32(outputs["zimg"]), f32(outputs["ztxt"])
  scale = f32(outputs["logit_scale"])
  bias = f32(outputs.get("logit_bias", 0.0))
  n = zimg.shape[0]
  logits = similarity_logits(zimg, ztxt, scale, mesh_axes=mesh_axes) + bias
  positive = _diagonal_mask(n, mesh_axes)
  signs = jnp.where(positive, 1.0, -1.0)
  loss = -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / n
  return loss, {"siglip/loss": loss, **_accuracy_metrics("siglip", top1_accuracy(logits, positive, axis=1),
                                                         top1_accuracy(logits, positive, axis=0), scale,
                                                         logit_bias=bias)}


# ---------------------------------------------------------------------------------------------------------
# Ring kernels: softmax InfoNCE with label positives (CLIP: every pair its own label; UniCL: shared labels)

def _softmax_forward_kernel(ring: Ring, tile: int, zimg, ztxt, labels, scale):
  """Per device, with positives pos_ik = [y_i = y_k]: the sum of its row terms lse^row_i − mean_{k∈P(i)} L_ik
  and column terms lse^col_j − mean_{k∈P(j)} L_kj, the retrieval hit counts (`top1_hits` of the running best
  positive and best negative), and the per-row / per-column (lse, |P|) the backward needs."""
  n = zimg.shape[0]
  neg_inf = jnp.full((n,), -jnp.inf, jnp.float32)
  zeros = jnp.zeros((n,), jnp.float32)

  def step(local, chunk, acc, own):
    del own
    ztxt_c, labels_c = chunk

    def body(r0, c):
      row, col = c
      logits = scale * dot_nt(rows(zimg, r0, tile), ztxt_c)
      pos = rows(labels, r0, tile)[:, None] == labels_c[None, :]
      pos_logits = jnp.where(pos, logits, 0.0)
      pos_or_ninf = jnp.where(pos, logits, -jnp.inf)
      neg_or_ninf = jnp.where(pos, -jnp.inf, logits)
      m, s, pos_sum, pos_cnt, pos_max, neg_max = (rows(x, r0, tile) for x in row)
      m, s = lse_merge(m, s, jnp.max(logits, axis=1),
                       lambda m_new: jnp.sum(jnp.exp(logits - m_new[:, None]), axis=1))
      row_tile = (m, s, pos_sum + jnp.sum(pos_logits, axis=1), pos_cnt + jnp.sum(pos, axis=1, dtype=jnp.float32),
                  jnp.maximum(pos_max, jnp.max(pos_or_ninf, axis=1)),
                  jnp.maximum(neg_max, jnp.max(neg_or_ninf, axis=1)))
      row = tuple(set_rows(x, r0, v) for x, v in zip(row, row_tile))
      cm, cs, c_sum, c_cnt, c_max, c_neg = col
      cm, cs = lse_merge(cm, cs, jnp.max(logits, axis=0),
                         lambda m_new: jnp.sum(jnp.exp(logits - m_new[None, :]), axis=0))
      col = (cm, cs, c_sum + jnp.sum(pos_logits, axis=0), c_cnt + jnp.sum(pos, axis=0, dtype=jnp.float32),
             jnp.maximum(c_max, jnp.max(pos_or_ninf, axis=0)), jnp.maximum(c_neg, jnp.max(neg_or_ninf, axis=0)))
      return row, col
    return over_tiles(n, tile, body, (local, acc))

  init = (neg_inf, zeros, zeros, zeros, neg_inf, neg_inf)
  row, col = ring.run(step, init, (ztxt, labels), init)
  (row_m, row_s, row_sum, row_cnt, row_pos, row_neg), (col_m, col_s, col_sum, col_cnt, col_pos, col_neg) = row, col
  row_lse = row_m + jnp.log(row_s)
  col_lse = col_m + jnp.log(col_s)
  total = ring.psum(jnp.sum(row_lse - row_sum / row_cnt) + jnp.sum(col_lse - col_sum / col_cnt))
  i2t = ring.psum(jnp.sum(top1_hits(row_pos, row_neg)))
  t2i = ring.psum(jnp.sum(top1_hits(col_pos, col_neg)))
  return total, i2t, t2i, row_lse, row_cnt, col_lse, col_cnt


def _softmax_backward_kernel(ring: Ring, tile: int, zimg, ztxt, labels, scale, row_lse, row_cnt, col_lse,
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
      zi = rows(zimg, r0, tile)
      sim = dot_nt(zi, ztxt_c)
      logits = scale * sim
      pos = rows(labels, r0, tile)[:, None] == labels_c[None, :]
      row_inv = 1.0 / rows(row_cnt, r0, tile)
      grad = (jnp.exp(logits - rows(row_lse, r0, tile)[:, None]) + jnp.exp(logits - col_lse_c[None, :])
              - jnp.where(pos, row_inv[:, None] + col_inv_c[None, :], 0.0))
      dimg = set_rows(dimg, r0, rows(dimg, r0, tile) + dot_nn(grad, ztxt_c))
      return (dimg, dscale + jnp.sum(grad * sim)), dtxt + dot_tn(grad, zi)
    return over_tiles(n, tile, body, (local, acc))

  zeros = jnp.zeros((n, d), jnp.float32)
  (dimg, dscale), dtxt = ring.run(step, (zeros, jnp.zeros((), jnp.float32)),
                                  (ztxt, labels, col_lse, 1.0 / col_cnt), zeros)
  return coef * scale * dimg, coef * scale * dtxt, coef * ring.psum(dscale)


def _ring_softmax_loss(name, outputs, labels, mesh_axes, tile) -> tuple[jax.Array, Metrics]:
  zimg, ztxt, scale = f32(outputs["zimg"]), f32(outputs["ztxt"]), f32(outputs["logit_scale"])
  b = zimg.shape[0]
  mesh, axes, size, tile = ring_layout(b, mesh_axes, tile)
  labels = jnp.arange(b, dtype=jnp.int32) if labels is None else labels
  fwd = sharded(_softmax_forward_kernel, mesh, axes, size, tile, "bbbs", "sssbbbb")
  bwd = sharded(_softmax_backward_kernel, mesh, axes, size, tile, "bbbsbbbbs", "bbs")

  def forward(zi, zt, y, t):
    total, i2t, t2i, *stats = fwd(zi, zt, y, t)
    return (total / (2 * b), i2t / b, t2i / b), stats

  value, i2t, t2i = recomputed(forward, bwd, nondiff=(2,))(zimg, ztxt, labels, scale)
  return value, {f"{name}/loss": value, **_accuracy_metrics(name, jax.lax.stop_gradient(i2t),
                                                            jax.lax.stop_gradient(t2i), scale)}


def ring_clip_loss(outputs: Mapping[str, Any], batch: Mapping[str, Any], *,
                   mesh_axes: str | Sequence[str] | None = None,
                   tile: int | None = None) -> tuple[jax.Array, Metrics]:
  """CLIP's symmetric InfoNCE (Radford et al. 2021) with memory linear in B (ring + Inf-CL recomputation).

    logits_ij = t · z^I_i · z^T_j
    L = ½ [ −(1/B) Σ_i log softmax_j(logits)_ii  −(1/B) Σ_j log softmax_i(logits)_jj ]

  Same inputs, value, gradients and metrics as `dense_clip_loss`; `mesh_axes` names the ring axes (default the
  batch axes of the ambient mesh, those of size 1 dropped); `tile` is the number of image rows per logits tile
  (a divisor of the per-device batch; default the largest divisor ≤ 256).
  """
  del batch
  return _ring_softmax_loss("clip", outputs, None, mesh_axes, tile)


def ring_unicl_loss(outputs: Mapping[str, Any], batch: Mapping[str, Any], *,
                    mesh_axes: str | Sequence[str] | None = None,
                    tile: int | None = None) -> tuple[jax.Array, Metrics]:
  """UniCL's image-text-label contrastive loss (Yang et al. 2022) with memory linear in B; positives of anchor
  i are P(i) = {k : y_k = y_i} (batch['label']), whose labels travel around the ring with the text chunk:

    L = ½ [ −(1/B) Σ_i (1/|P(i)|) Σ_{k∈P(i)} log softmax_k(logits_i·)_k
            −(1/B) Σ_j (1/|P(j)|) Σ_{k∈P(j)} log softmax_k(logits_·j)_k ]

  Same value, gradients and metrics as `dense_unicl_loss`; `mesh_axes`, `tile` as for `ring_clip_loss`.
  """
  return _ring_softmax_loss("unicl", outputs, _labels(batch, "unicl"), mesh_axes, tile)


# ---------------------------------------------------------------------------------------------------------
# Ring kernels: pairwise sigmoid (SigLIP)

def _siglip_forward_kernel(ring: Ring, tile: int, zimg, ztxt, scale, bias):
  """Per device: Σ_ij log σ(−L_ij) + Σ_i L_ii over its rows, and the retrieval hit counts (`top1_hits` of the
  diagonal against the running best off-diagonal logit of each row and column)."""
  n = zimg.shape[0]
  neg_inf = jnp.full((n,), -jnp.inf, jnp.float32)

  def step(local, chunk, acc, own):
    def body(r0, c):
      (total, row_neg, diag), col_neg = c
      logits = scale * dot_nt(rows(zimg, r0, tile), chunk) + bias
      total = total + jnp.sum(jax.nn.log_sigmoid(-logits))
      negatives = logits
      if own:  # static: only the own chunk holds the positives (its diagonal)
        pos = own_positive(r0, tile, n)
        diag = set_rows(diag, r0, jnp.sum(jnp.where(pos, logits, 0.0), axis=1))
        negatives = jnp.where(pos, -jnp.inf, logits)
      row_neg = set_rows(row_neg, r0, jnp.maximum(rows(row_neg, r0, tile), jnp.max(negatives, axis=1)))
      return (total, row_neg, diag), jnp.maximum(col_neg, jnp.max(negatives, axis=0))
    return over_tiles(n, tile, body, (local, acc))

  init = (jnp.zeros((), jnp.float32), neg_inf, jnp.zeros((n,), jnp.float32))
  (total, row_neg, diag), col_neg = ring.run(step, init, ztxt, neg_inf)
  total = ring.psum(total + jnp.sum(diag))
  i2t = ring.psum(jnp.sum(top1_hits(diag, row_neg)))
  t2i = ring.psum(jnp.sum(top1_hits(diag, col_neg)))
  return total, i2t, t2i


def _siglip_backward_kernel(ring: Ring, tile: int, zimg, ztxt, scale, bias, g):
  """Cotangents of L = −(1/B)[Σ_ij log σ(−L_ij) + Σ_i L_ii]: ∂L/∂L_ij = (σ(L_ij) − δ_ij)/B."""
  n, d = zimg.shape
  coef = g / (n * ring.size)

  def step(local, chunk, acc, own):
    del own

    def body(r0, c):
      (dimg, dscale, dbias), dtxt = c
      zi = rows(zimg, r0, tile)
      sim = dot_nt(zi, chunk)
      grad = jax.nn.sigmoid(scale * sim + bias)
      dimg = set_rows(dimg, r0, rows(dimg, r0, tile) + dot_nn(grad, chunk))
      return (dimg, dscale + jnp.sum(grad * sim), dbias + jnp.sum(grad)), dtxt + dot_tn(grad, zi)
    return over_tiles(n, tile, body, (local, acc))

  zeros = jnp.zeros((n, d), jnp.float32)
  scalar = jnp.zeros((), jnp.float32)
  (dimg, dscale, dbias), dtxt = ring.run(step, (zeros, scalar, scalar), ztxt, zeros)
  dimg = coef * scale * (dimg - ztxt)
  dtxt = coef * scale * (dtxt - zimg)
  dscale = coef * ring.psum(dscale - jnp.sum(zimg * ztxt))
  dbias = coef * ring.psum(dbias - n)
  return dimg, dtxt, dscale, dbias


def ring_siglip_loss(outputs: Mapping[str, Any], batch: Mapping[str, Any], *,
                     mesh_axes: str | Sequence[str] | None = None,
                     tile: int | None = None) -> tuple[jax.Array, Metrics]:
  """SigLIP's pairwise sigmoid loss (Zhai et al. 2023) with memory linear in B (ring + Inf-CL recomputation).

    logits_ij = t · z^I_i · z^T_j + b,   z_ij = +1 if i = j else −1
    L = −(1/B) Σ_i Σ_j log σ(z_ij · logits_ij) = −(1/B) [ Σ_ij log σ(−logits_ij) + Σ_i logits_ii ]

  Same inputs, value, gradients (z^I, z^T, t, b) and metrics as `dense_siglip_loss` (t used as given, see
  there); `mesh_axes` and `tile` as for `ring_clip_loss`.
  """
  del batch
  zimg, ztxt, scale = f32(outputs["zimg"]), f32(outputs["ztxt"]), f32(outputs["logit_scale"])
  bias = f32(outputs.get("logit_bias", 0.0))
  b = zimg.shape[0]
  mesh, axes, size, tile = ring_layout(b, mesh_axes, tile)
  fwd = sharded(_siglip_forward_kernel, mesh, axes, size, tile, "bbss", "sss")
  bwd = sharded(_siglip_backward_kernel, mesh, axes, size, tile, "bbsss", "bbss")

  def forward(zi, zt, t, bb):
    total, i2t, t2i = fwd(zi, zt, t, bb)
    return (-total / b, i2t / b, t2i / b), ()

  value, i2t, t2i = recomputed(forward, bwd)(zimg, ztxt, scale, bias)
  return value, {"siglip/loss": value, **_accuracy_metrics("siglip", jax.lax.stop_gradient(i2t),
                                                           jax.lax.stop_gradient(t2i), scale, logit_bias=bias)}


# ---------------------------------------------------------------------------------------------------------
# The registry's objectives: one impl switch (`ring.dense_or_ring`)

clip_loss = dense_or_ring("clip", dense_clip_loss, ring_clip_loss)
unicl_loss = dense_or_ring("unicl", dense_unicl_loss, ring_unicl_loss)
siglip_loss = dense_or_ring("siglip", dense_siglip_loss, ring_siglip_loss)


# ---------------------------------------------------------------------------------------------------------
# SimCLR (image-only; dense)

def simclr_loss(outputs: Mapping[str, Any], batch: Mapping[str, Any], *,
                mesh_axes: str | Sequence[str] | None = None,
                temperature: float = 0.1) -> tuple[jax.Array, Metrics]:
  """NT-Xent over two augmented views (Chen et al. 2020, "A Simple Framework for Contrastive Learning of
  Visual Representations"), the image-only term of SLIP (Mu et al. 2022, "SLIP: Self-supervision meets
  Language-Image Pre-training").

  With u_1..u_B = outputs['zview1'] and u_{B+1}..u_{2B} = outputs['zview2'] (unit vectors) and the positive of
  anchor a being the other view of the same image, p(a) = (a + B) mod 2B:

    s_ak = u_a · u_k / τ,   s_aa = −∞   (self-similarity masked out)
    L = −(1/2B) Σ_{a=1}^{2B} log softmax_k(s_a·)_{p(a)}

  so each anchor sees 2B − 2 negatives from the global batch. τ = `temperature` (SLIP: 0.1). Metrics:
  'simclr/loss', 'simclr/accuracy' (the other view strictly ranked first: `top1_hits`).
  """
  del batch
  if "zview1" not in outputs or "zview2" not in outputs:
    raise UserError("the 'simclr' objective needs model outputs 'zview1'/'zview2': set model.simclr_head "
                    "and provide batch['image_view1'] and batch['image_view2']")
  views = jnp.concatenate([f32(outputs["zview1"]), f32(outputs["zview2"])], axis=0)
  n = views.shape[0]
  sim = similarity_logits(views, views, 1.0 / temperature, mesh_axes=mesh_axes)
  rows_ = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)
  sim = jnp.where(constrain_rows(rows_ == cols, mesh_axes), -jnp.inf, sim)
  positive = constrain_rows(cols == (rows_ + n // 2) % n, mesh_axes)
  loss = jnp.mean(_multi_positive_ce(sim, positive, axis=1))
  return loss, {"simclr/loss": loss, "simclr/accuracy": top1_accuracy(sim, positive, axis=1)}
