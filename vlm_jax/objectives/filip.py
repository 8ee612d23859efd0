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

impl='dense' builds the B×B×N×L token similarities in one go (the reference). impl='ring' follows
`vlm_jax.objectives.ring`: each device keeps its B/n images, the text token embeddings (with their masks and the
text→image log-sum-exp statistics) travel around the batch axes with `ppermute`, rows are walked in tiles, the
log-sum-exps are accumulated online, and a `jax.custom_vjp` backward recomputes every tile (and its token maxima,
through `jax.vjp` of the tile's scores) on a second trip around the ring, so no device holds more than
tile × (B/n) × N × L similarities (Inf-CL, Wang et al. 2024). Both give the same value, gradients and metrics.

Deviation: FILIP trains in fp16 with the similarity in reduced precision; here the scores are fp32.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from vlm_jax.errors import UserError
from vlm_jax.objectives.contrastive import constrain_rows
from vlm_jax.objectives.ring import (_f32, _lse_merge, _over_tiles, _ring_axes, _Ring, _rows, _set_rows,
                                     _sharded, _tile_rows)

Metrics = dict[str, jax.Array]
IMPLS = ("dense", "ring")
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
  x, y = _f32(outputs["zimg_tokens"]), _f32(outputs["ztxt_tokens"])
  return x, y, _valid_mask(outputs.get("txt_mask"), y.shape[1], y.shape[0]), _f32(outputs["logit_scale"])


def _metrics(value, i2t, t2i, scale) -> Metrics:
  return {"filip/loss": value, "filip/i2t_accuracy": jax.lax.stop_gradient(i2t),
          "filip/t2i_accuracy": jax.lax.stop_gradient(t2i), "filip/logit_scale": jax.lax.stop_gradient(scale)}


def dense_filip_loss(outputs, mesh_axes=None) -> tuple[jax.Array, Metrics]:
  """The B×B FILIP loss in one go (formula in the module docstring)."""
  x, y, mask, scale = _inputs(outputs)
  b = x.shape[0]
  s_img, s_txt = token_scores(x, y, mask)
  logits_i2t = constrain_rows(scale * s_img, mesh_axes)
  logits_t2i = constrain_rows(scale * s_txt, mesh_axes)  # rows: images i, columns: texts j
  diag = jnp.arange(b)
  loss_i2t = jnp.mean(jax.nn.logsumexp(logits_i2t, axis=1) - logits_i2t[diag, diag])
  loss_t2i = jnp.mean(jax.nn.logsumexp(logits_t2i, axis=0) - logits_t2i[diag, diag])
  value = 0.5 * (loss_i2t + loss_t2i)
  i2t = jnp.mean((jnp.argmax(logits_i2t, axis=1) == diag).astype(jnp.float32))
  t2i = jnp.mean((jnp.argmax(logits_t2i, axis=0) == diag).astype(jnp.float32))
  return value, _metrics(value, i2t, t2i, scale)


# ---------------------------------------------------------------------------------------------------------
# Ring kernels (per device; `ring` and the tiling helpers are those of vlm_jax.objectives.ring)

def _own_positive(r0, tile, n):
  """[tile, n] indicator of the pairs (r0 + a, r0 + a) of the own chunk."""
  return (r0 + jnp.arange(tile))[:, None] == jnp.arange(n)[None, :]


def _forward_kernel(ring: _Ring, tile: int, x, y, mask, scale):
  """Per device: Σ over its images of lse_j(t s^I_i·) − t s^I_ii, Σ over its texts of
  lse_i(t s^T_·j) − t s^T_jj,
  the retrieval hit counts, and the per-row / per-column log-sum-exps the backward needs."""
  n = x.shape[0]
  neg_inf = jnp.full((n,), -jnp.inf, jnp.float32)
  zeros = jnp.zeros((n,), jnp.float32)

  def step(local, chunk, acc, own):
    y_c, mask_c = chunk

    def body(r0, c):
      (m, s, diag), (cm, cs, cdiag) = c
      s_img, s_txt = token_scores(_rows(x, r0, tile), y_c, mask_c)
      li, lt = scale * s_img, scale * s_txt
      m_t, s_t = _lse_merge(_rows(m, r0, tile), _rows(s, r0, tile), jnp.max(li, axis=1),
                            lambda m_new: jnp.sum(jnp.exp(li - m_new[:, None]), axis=1))
      m, s = _set_rows(m, r0, m_t), _set_rows(s, r0, s_t)
      cm, cs = _lse_merge(cm, cs, jnp.max(lt, axis=0), lambda m_new: jnp.sum(jnp.exp(lt - m_new[None, :]), axis=0))
      if own:
        pos = _own_positive(r0, tile, n)
        diag = _set_rows(diag, r0, jnp.sum(jnp.where(pos, li, 0.0), axis=1))
        cdiag = cdiag + jnp.sum(jnp.where(pos, lt, 0.0), axis=0)
      return (m, s, diag), (cm, cs, cdiag)
    return _over_tiles(n, tile, body, (local, acc))

  (m, s, diag), (cm, cs, cdiag) = ring.run(step, (neg_inf, zeros, zeros), (y, mask), (neg_inf, zeros, zeros))
  row_lse, col_lse = m + jnp.log(s), cm + jnp.log(cs)
  total = ring.psum(jnp.sum(row_lse - diag) + jnp.sum(col_lse - cdiag))
  i2t = ring.psum(jnp.sum((diag >= m).astype(jnp.float32)))
  t2i = ring.psum(jnp.sum((cdiag >= cm).astype(jnp.float32)))
  return total, i2t, t2i, row_lse, col_lse


def _backward_kernel(ring: _Ring, tile: int, x, y, mask, scale, row_lse, col_lse, g):
  """Cotangents of L = (1/2B)[Σ_i (lse^row_i − t s^I_ii) + Σ_j (lse^col_j − t s^T_jj)]:
  ∂L/∂s^I_ij = t (P_ij − δ_ij)/(2B), ∂L/∂s^T_ij = t (Q_ij − δ_ij)/(2B) (P, Q the row / column softmaxes,
  recomputed per tile), pulled back to the tokens through `jax.vjp` of the tile's token maxima."""
  n = x.shape[0]
  coef = g / (2.0 * n * ring.size)

  def step(local, chunk, acc, own):
    y_c, mask_c, col_lse_c = chunk

    def body(r0, c):
      (dx, dscale), dy = c
      x_t = _rows(x, r0, tile)
      (s_img, s_txt), pull = jax.vjp(lambda a, b: token_scores(a, b, mask_c), x_t, y_c)
      gi = jnp.exp(scale * s_img - _rows(row_lse, r0, tile)[:, None])
      gt = jnp.exp(scale * s_txt - col_lse_c[None, :])
      if own:
        pos = _own_positive(r0, tile, n)
        gi, gt = gi - pos, gt - pos
      dscale = dscale + jnp.sum(gi * s_img) + jnp.sum(gt * s_txt)
      dx_t, dy_c = pull((scale * gi, scale * gt))
      return (_set_rows(dx, r0, _rows(dx, r0, tile) + dx_t), dscale), dy + dy_c
    return _over_tiles(n, tile, body, (local, acc))

  (dx, dscale), dy = ring.run(step, (jnp.zeros_like(x), jnp.zeros((), jnp.float32)), (y, mask, col_lse),
                              jnp.zeros_like(y))
  return coef * dx, coef * dy, coef * ring.psum(dscale)


def _default_tile(local: int, n_tok: int, l_tok: int) -> int:
  cap = max(1, TILE_ELEMENTS // max(1, local * n_tok * l_tok))
  return max(d for d in range(1, min(local, cap) + 1) if local % d == 0)


def ring_filip_loss(outputs, mesh_axes=None, tile: int | None = None) -> tuple[jax.Array, Metrics]:
  """FILIP with memory linear in B (module docstring); same value, gradients and metrics as `dense_filip_loss`.
  `tile`: image rows per similarity tile (a divisor of the per-device batch; default from `TILE_ELEMENTS`)."""
  x, y, mask, scale = _inputs(outputs)
  mesh, axes, size = _ring_axes(mesh_axes)
  b = x.shape[0]
  if b % size:
    raise UserError(f"global batch {b} is not divisible by the {size} data-parallel devices")
  local = b // size
  tile = _tile_rows(local, _default_tile(local, x.shape[1], y.shape[1]) if tile is None else tile)
  fwd = _sharded(_forward_kernel, mesh, axes, size, tile, "bbbs", "sssbb")
  bwd = _sharded(_backward_kernel, mesh, axes, size, tile, "bbbsbbs", "bbs")

  def value(xx, yy, mm, t):
    total, i2t, t2i, *_ = fwd(xx, yy, mm, t)
    return total / (2 * b), i2t / b, t2i / b

  loss = jax.custom_vjp(value)

  def loss_fwd(xx, yy, mm, t):
    total, i2t, t2i, row_lse, col_lse = fwd(xx, yy, mm, t)
    return (total / (2 * b), i2t / b, t2i / b), (xx, yy, mm, t, row_lse, col_lse)

  def loss_bwd(res, cotangents):
    dx, dy, dscale = bwd(*res, cotangents[0])
    return dx, dy, None, dscale

  loss.defvjp(loss_fwd, loss_bwd)
  value, i2t, t2i = loss(x, y, mask, scale)
  return value, _metrics(value, i2t, t2i, scale)


def filip_loss(outputs: Mapping[str, Any], batch: Mapping[str, Any], *,
               mesh_axes: str | Sequence[str] | None = None, impl: str = "dense",
               tile: int | None = None) -> tuple[jax.Array, Metrics]:
  """FILIP token-wise late-interaction InfoNCE (Yao et al. 2021; formula in the module docstring).

  Needs outputs['zimg_tokens'] [B,N,E], ['ztxt_tokens'] [B,L,E] (L2-normalised; `model.token_embeddings=True`),
  optional ['txt_mask'] [B,L] (valid text tokens) and ['logit_scale']. impl='dense' (B×B in one go) or 'ring'
  (memory-linear, `tile` image rows per tile). Metrics: filip/loss, filip/i2t_accuracy, filip/t2i_accuracy,
  filip/logit_scale.
  """
  del batch
  if impl not in IMPLS:
    raise UserError(f"objective 'filip' has no impl {impl!r}; choose from {list(IMPLS)}")
  if impl == "dense":
    if tile is not None:
      raise UserError(f"objective 'filip': tile={tile} only applies to impl='ring'")
    return dense_filip_loss(outputs, mesh_axes)
  return ring_filip_loss(outputs, mesh_axes, tile)
