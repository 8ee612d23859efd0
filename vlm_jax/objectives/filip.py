"""FILIP's token-wise late-interaction contrastive loss, dense and memory-linear (ring) implementations.

FILIP (Yao et al. 2021, "FILIP: Fine-grained Interactive Language-Image Pre-Training", arXiv 2111.07783, eq. 4–5)
replaces the pooled-embedding dot product of CLIP by a token-wise maximum similarity. With x_ik the L2-normalised
projected image token k ∈ {1..N} of image i and y_jr the text token r of text j, restricted to the valid text
tokens V_j (no padding, SOT or EOT, `outputs['txt_mask']`):

    s^I_ij = (1/N)     Σ_k        max_{r∈V_j} <x_ik, y_jr>     (image → text: every patch finds its word)
    s^T_ij = (1/|V_j|) Σ_{r∈V_j}  max_k       <x_ik, y_jr>     (text → image: every word finds its patch)

    L = ½ [ −(1/B) Σ_i log softmax_j(t · s^I_i·)_i  −(1/B) Σ_j log softmax_i(t · s^T_·j)_j ]

over the global batch (B images, B texts, t = outputs['logit_scale']). The two directions use different
similarity matrices, so unlike CLIP there is no single logits matrix.

`filip_loss(…, impl='dense'|'ring', tile=None)` is `dense_filip_loss` or `ring_filip_loss` (the one switch,
`ring.dense_or_ring`). Dense builds the B×B×N×L token similarities in one go (the reference). Ring follows
`vlm_jax.objectives.ring`: each device keeps its B/n images, the text token embeddings (with their masks and the
text→image log-sum-exp statistics) travel around the batch axes with `ppermute`, rows are walked in tiles, the
log-sum-exps are accumulated online, and a `jax.custom_vjp` backward recomputes every tile (and its token maxima,
through `jax.vjp` of the tile's scores) on a second trip around the ring, so no device holds more than
tile × (B/n) × N × L similarities (Inf-CL, Wang et al. 2024). Both give the same value, gradients and metrics;
the accuracies follow the tie rule of `contrastive.top1_hits` (the paired score strictly above every other).

Deviation: FILIP trains in fp16 with the similarity in reduced precision; here the scores are fp32.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from vlm_jax.errors import UserError
from vlm_jax.objectives.contrastive import constrain_rows, top1_accuracy, top1_hits
from vlm_jax.objectives.ring import (Ring, dense_or_ring, f32, lse_merge, over_tiles, own_positive, recomputed,
                                     ring_layout, rows, set_rows, sharded)

Metrics = dict[str, jax.Array]
TILE_ELEMENTS = 1 << 22  # default ring tile: rows such that tile × (B/n) × N × L ≤ 4 Mi similarities
_HIGHEST = jax.lax.Precision.HIGHEST


def _valid_mask(mask, length: int, batch: int) -> jax.Array:
  """Float [B, L] valid-token mask; a text without valid tokens counts all its tokens (no empty max/mean)."""
  if mask is None:
    return jnp.ones((batch, length), jnp.float32)
  mask = jnp.asarray(mask).astype(bool)
  mask = mask | ~jnp.any(mask, axis=1, keepdims=True)
  return mask.astype(jnp.float32)


def token_scores(x, y, mask):
  """(s^I [Bx, By], s^T [Bx, By]) between image tokens x [Bx, N, E] and text tokens y [By, L, E] with the
  float valid-text mask [By, L] (see the module docstring); fp32."""
  sim = jnp.einsum("ikd,jrd->ijkr", x, y, precision=_HIGHEST)
  valid = mask[None, :, None, :] > 0
  s_img = jnp.mean(jnp.max(jnp.where(valid, sim, -jnp.inf), axis=3), axis=2)
  best = jnp.max(sim, axis=2)  # [Bx, By, L]
  s_txt = jnp.sum(best * mask[None], axis=2) / jnp.sum(mask, axis=1)[None]
  return s_img, s_txt


def _inputs(outputs):
  for key in ("zimg_tokens", "ztxt_tokens"):
    if key not in outputs:
      raise UserError("the 'filip' objective needs per-token embeddings: set model.token_embeddings=True")
  x, y = f32(outputs["zimg_tokens"]), f32(outputs["ztxt_tokens"])
  return x, y, _valid_mask(outputs.get("txt_mask"), y.shape[1], y.shape[0]), f32(outputs["logit_scale"])


def _metrics(value, i2t, t2i, scale) -> Metrics:
  return {"filip/loss": value, "filip/i2t_accuracy": jax.lax.stop_gradient(i2t),
          "filip/t2i_accuracy": jax.lax.stop_gradient(t2i), "filip/logit_scale": jax.lax.stop_gradient(scale)}


def dense_filip_loss(outputs: Mapping[str, Any], batch: Mapping[str, Any], *,
                     mesh_axes: str | Sequence[str] | None = None) -> tuple[jax.Array, Metrics]:
  """FILIP token-wise late-interaction InfoNCE (Yao et al. 2021; formula in the module docstring), B×B in one go.

  Needs outputs['zimg_tokens'] [B,N,E], ['ztxt_tokens'] [B,L,E] (L2-normalised; `model.token_embeddings=True`),
  optional ['txt_mask'] [B,L] (valid text tokens) and ['logit_scale']; `batch` is unused. Metrics: filip/loss,
  filip/i2t_accuracy, filip/t2i_accuracy (ties wrong: `contrastive.top1_hits`), filip/logit_scale.
  """
  del batch
  x, y, mask, scale = _inputs(outputs)
  b = x.shape[0]
  s_img, s_txt = token_scores(x, y, mask)
  logits_i2t = constrain_rows(scale * s_img, mesh_axes)
  logits_t2i = constrain_rows(scale * s_txt, mesh_axes)  # rows: images i, columns: texts j
  diag = jnp.arange(b)
  loss_i2t = jnp.mean(jax.nn.logsumexp(logits_i2t, axis=1) - logits_i2t[diag, diag])
  loss_t2i = jnp.mean(jax.nn.logsumexp(logits_t2i, axis=0) - logits_t2i[diag, diag])
  value = 0.5 * (loss_i2t + loss_t2i)
  positive = constrain_rows(diag[:, None] == diag[None, :], mesh_axes)
  i2t = top1_accuracy(logits_i2t, positive, axis=1)
  t2i = top1_accuracy(logits_t2i, positive, axis=0)
  return value, _metrics(value, i2t, t2i, scale)


# ---------------------------------------------------------------------------------------------------------
# Ring kernels (per device; `ring` and the tiling helpers are those of vlm_jax.objectives.ring)

def _forward_kernel(ring: Ring, tile: int, x, y, mask, scale):
  """Per device: Σ over its images of lse_j(t s^I_i·) − t s^I_ii, Σ over its texts of
  lse_i(t s^T_·j) − t s^T_jj, the retrieval hit counts (`top1_hits` of the paired score against the running best other score), and the
  per-row / per-column log-sum-exps the backward needs."""
  n = x.shape[0]
  neg_inf = jnp.full((n,), -jnp.inf, jnp.float32)
  zeros = jnp.zeros((n,), jnp.float32)

  def step(local, chunk, acc, own):
    y_c, mask_c = chunk

    def body(r0, c):
      (m, s, diag, neg), (cm, cs, cdiag, cneg) = c
      s_img, s_txt = token_scores(rows(x, r0, tile), y_c, mask_c)
      li, lt = scale * s_img, scale * s_txt
      m_t, s_t = lse_merge(rows(m, r0, tile), rows(s, r0, tile), jnp.max(li, axis=1),
                           lambda m_new: jnp.sum(jnp.exp(li - m_new[:, None]), axis=1))
      m, s = set_rows(m, r0, m_t), set_rows(s, r0, s_t)
      cm, cs = lse_merge(cm, cs, jnp.max(lt, axis=0), lambda m_new: jnp.sum(jnp.exp(lt - m_new[None, :]), axis=0))
      neg_i, neg_t = li, lt
      if own:  # static: only the own chunk holds the positives (its diagonal)
        pos = own_positive(r0, tile, n)
        diag = set_rows(diag, r0, jnp.sum(jnp.where(pos, li, 0.0), axis=1))
        cdiag = cdiag + jnp.sum(jnp.where(pos, lt, 0.0), axis=0)
        neg_i, neg_t = jnp.where(pos, -jnp.inf, li), jnp.where(pos, -jnp.inf, lt)
      neg = set_rows(neg, r0, jnp.maximum(rows(neg, r0, tile), jnp.max(neg_i, axis=1)))
      cneg = jnp.maximum(cneg, jnp.max(neg_t, axis=0))
      return (m, s, diag, neg), (cm, cs, cdiag, cneg)
    return over_tiles(n, tile, body, (local, acc))

  init = (neg_inf, zeros, zeros, neg_inf)
  (m, s, diag, neg), (cm, cs, cdiag, cneg) = ring.run(step, init, (y, mask), init)
  row_lse, col_lse = m + jnp.log(s), cm + jnp.log(cs)
  total = ring.psum(jnp.sum(row_lse - diag) + jnp.sum(col_lse - cdiag))
  i2t = ring.psum(jnp.sum(top1_hits(diag, neg)))
  t2i = ring.psum(jnp.sum(top1_hits(cdiag, cneg)))
  return total, i2t, t2i, row_lse, col_lse


def _backward_kernel(ring: Ring, tile: int, x, y, mask, scale, row_lse, col_lse, g):
  """Cotangents of L = (1/2B)[Σ_i (lse^row_i − t s^I_ii) + Σ_j (lse^col_j − t s^T_jj)]:
  ∂L/∂s^I_ij = t (P_ij − δ_ij)/(2B), ∂L/∂s^T_ij = t (Q_ij − δ_ij)/(2B) (P, Q the row / column softmaxes,
  recomputed per tile), pulled back to the tokens through `jax.vjp` of the tile's token maxima."""
  n = x.shape[0]
  coef = g / (2.0 * n * ring.size)

  def step(local, chunk, acc, own):
    y_c, mask_c, col_lse_c = chunk

    def body(r0, c):
      (dx, dscale), dy = c
      x_t = rows(x, r0, tile)
      (s_img, s_txt), pull = jax.vjp(lambda a, b: token_scores(a, b, mask_c), x_t, y_c)
      gi = jnp.exp(scale * s_img - rows(row_lse, r0, tile)[:, None])
      gt = jnp.exp(scale * s_txt - col_lse_c[None, :])
      if own:
        pos = own_positive(r0, tile, n)
        gi, gt = gi - pos, gt - pos
      dscale = dscale + jnp.sum(gi * s_img) + jnp.sum(gt * s_txt)
      dx_t, dy_c = pull((scale * gi, scale * gt))
      return (set_rows(dx, r0, rows(dx, r0, tile) + dx_t), dscale), dy + dy_c
    return over_tiles(n, tile, body, (local, acc))

  (dx, dscale), dy = ring.run(step, (jnp.zeros_like(x), jnp.zeros((), jnp.float32)), (y, mask, col_lse),
                              jnp.zeros_like(y))
  return coef * dx, coef * dy, coef * ring.psum(dscale)


def _default_tile(n_tok: int, l_tok: int):
  def rule(local: int) -> int:
    cap = max(1, TILE_ELEMENTS // max(1, local * n_tok * l_tok))
    return max(d for d in range(1, min(local, cap) + 1) if local % d == 0)
  return rule


def ring_filip_loss(outputs: Mapping[str, Any], batch: Mapping[str, Any], *,
                    mesh_axes: str | Sequence[str] | None = None,
                    tile: int | None = None) -> tuple[jax.Array, Metrics]:
  """FILIP with memory linear in B (module docstring); same inputs, value, gradients and metrics as
  `dense_filip_loss`. `tile`: image rows per similarity tile (a divisor of the per-device batch; default from
  `TILE_ELEMENTS`)."""
  del batch
  x, y, mask, scale = _inputs(outputs)
  b = x.shape[0]
  mesh, axes, size, tile = ring_layout(b, mesh_axes, tile, _default_tile(x.shape[1], y.shape[1]))
  fwd = sharded(_forward_kernel, mesh, axes, size, tile, "bbbs", "sssbb")
  bwd = sharded(_backward_kernel, mesh, axes, size, tile, "bbbsbbs", "bbs")

  def forward(xx, yy, mm, t):
    total, i2t, t2i, *stats = fwd(xx, yy, mm, t)
    return (total / (2 * b), i2t / b, t2i / b), stats

  value, i2t, t2i = recomputed(forward, bwd, nondiff=(2,))(x, y, mask, scale)
  return value, _metrics(value, i2t, t2i, scale)


filip_loss = dense_or_ring("filip", dense_filip_loss, ring_filip_loss)
