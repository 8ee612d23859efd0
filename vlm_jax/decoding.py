"""Caption generation for image-to-text models (CoCa, CapPa): greedy and beam search over a key/value cache.

A generating model exposes `decode_memory(images) -> memory` and `decode_logits(ids, memory, decode=bool)`
(see `vlm_jax.models.decoder`). Rows follow the tokenizer layout: `[SOT] w_1 … w_n [EOT] 0 …` of static length
`max_len`; position 0 is SOT and each step feeds one token through the cached decoder (cost O(L) per step instead
of re-running the prefix). The tokenizer's padding id (`pad_id`, 0 in the CLIP layout) and SOT are never generated (the softmax is renormalised over the
other tokens). Everything is traced once per
(model, max_len, beam settings) and batch shape by `make_generator` (`jax.jit`, static max length; the loop is a
`lax.while_loop` that stops when every row has ended).

Beam search (as in Wu et al. 2016, "Google's neural machine translation system", §7, and Vaswani et al. 2017)
keeps the K best unfinished prefixes by log-probability; a candidate ending in EOT moves to the finished pool with
the length-normalised score  s(y) = log p(y | image) / |y|^α  (|y| = generated tokens including EOT; α = 1: mean
log-probability per token, α = 0: no normalisation). At the last position the surviving prefixes are finished
as they are (truncated captions). The search stops early when no unfinished prefix can still beat the best
finished score of its row (log p only decreases as tokens are added, so its bound is log p / (max_len − 1)^α).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def init_cache(model, variables, memory, batch_size: int, length: int) -> Any:
  """A zero KV cache for `batch_size` rows of up to `length` decoded positions (shapes from `jax.eval_shape`)."""
  ids = jnp.zeros((batch_size, length), jnp.int32)

  def create():
    return model.apply(variables, ids, memory, decode=True, method="decode_logits", mutable=["cache"])[1]["cache"]

  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(create))


def _step_logits(model, variables, cache, tokens, memory, banned):
  """Log-probabilities [N, V] of the next token after `tokens` [N] (cached), and the updated cache."""
  logits, mutated = model.apply({**variables, "cache": cache}, tokens[:, None], memory, decode=True,
                                method="decode_logits", mutable=["cache"])
  logits = logits[:, 0].astype(jnp.float32).at[:, banned].set(-jnp.inf)
  return jax.nn.log_softmax(logits, axis=-1).at[:, banned].set(NEG_INF), mutated["cache"]


def _banned(sot_id: int, eot_id: int, pad_id: int) -> jax.Array:
  """Ids never generated: SOT and padding (unless padding is the EOT, as in SigLIP's layout)."""
  return jnp.asarray(sorted({int(sot_id)} | ({int(pad_id)} if pad_id != eot_id else set())), jnp.int32)


def greedy(model, variables, images, *, max_len: int, sot_id: int, eot_id: int, pad_id: int = 0) -> jax.Array:
  """Greedy decoding: ids int32 [B, max_len] (argmax token each step; `pad_id` after EOT)."""
  memory = model.apply(variables, images, method="decode_memory")
  b = images.shape[0]
  cache = init_cache(model, variables, memory, b, max_len - 1)
  ids = jnp.full((b, max_len), pad_id, jnp.int32).at[:, 0].set(sot_id)
  banned = _banned(sot_id, eot_id, pad_id)

  def cond(state):
    i, _, _, done = state
    return (i < max_len - 1) & ~jnp.all(done)

  def body(state):
    i, ids, cache, done = state
    logp, cache = _step_logits(model, variables, cache, ids[:, i], memory, banned)
    nxt = jnp.where(done, pad_id, jnp.argmax(logp, axis=-1).astype(jnp.int32))
    ids = jax.lax.dynamic_update_slice(ids, nxt[:, None], (0, i + 1))
    return i + 1, ids, cache, done | (nxt == eot_id)

  state = (jnp.zeros((), jnp.int32), ids, cache, jnp.zeros((b,), bool))
  return jax.lax.while_loop(cond, body, state)[1]


def beam_search(model, variables, images, *, max_len: int, sot_id: int, eot_id: int, pad_id: int = 0,
                beam_size: int = 4, alpha: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Length-normalised beam search (module docstring): (ids int32 [B, max_len], scores float32 [B])."""
  k = int(beam_size)
  memory = model.apply(variables, images, method="decode_memory")
  b = images.shape[0]
  memory = jnp.repeat(memory, k, axis=0)  # row b*K + j is beam j of image b
  cache = init_cache(model, variables, memory, b * k, max_len - 1)
  seqs = jnp.zeros((b, k, max_len), jnp.int32).at[:, :, 0].set(sot_id)
  alive_lp = jnp.full((b, k), NEG_INF, jnp.float32).at[:, 0].set(0.0)
  fin_seqs = jnp.zeros((b, k, max_len), jnp.int32)
  fin_scores = jnp.full((b, k), NEG_INF, jnp.float32)
  banned = _banned(sot_id, eot_id, pad_id)
  norm = lambda n: jnp.power(n.astype(jnp.float32), alpha)  # noqa: E731
  rows = jnp.arange(b)[:, None]

  def cond(state):
    i, _, alive_lp, _, fin_scores, _ = state
    bound = jnp.max(alive_lp, axis=1) / norm(jnp.asarray(max_len - 1))
    return (i < max_len - 1) & ~jnp.all(jnp.max(fin_scores, axis=1) >= bound)

  def body(state):
    i, seqs, alive_lp, fin_seqs, fin_scores, cache = state
    logp, cache = _step_logits(model, variables, cache, seqs[:, :, i].reshape(-1), memory, banned)
    v = logp.shape[-1]
    cand = (alive_lp[:, :, None] + logp.reshape(b, k, v)).reshape(b, k * v)
    vals, idx = jax.lax.top_k(cand, 2 * k)
    beam, tok = idx // v, (idx % v).astype(jnp.int32)
    new = jax.lax.dynamic_update_slice(seqs[rows, beam], tok[:, :, None], (0, 0, i + 1))  # [B, 2K, L]
    ends = (tok == eot_id) | (i + 1 == max_len - 1)
    scores = jnp.where(ends & (vals > NEG_INF / 2), vals / norm(i + 1), NEG_INF)
    pool_scores = jnp.concatenate([fin_scores, scores], axis=1)
    best = jax.lax.top_k(pool_scores, k)[1]
    fin_scores = pool_scores[rows, best]
    fin_seqs = jnp.concatenate([fin_seqs, new], axis=1)[rows, best]
    alive_vals = jnp.where(tok == eot_id, NEG_INF, vals)
    top = jax.lax.top_k(alive_vals, k)[1]
    alive_lp, seqs = alive_vals[rows, top], new[rows, top]
    src = (rows * k + beam[rows, top]).reshape(-1)
    cache = jax.tree.map(lambda c: c[src] if c.ndim else c, cache)
    return i + 1, seqs, alive_lp, fin_seqs, fin_scores, cache

  state = (jnp.zeros((), jnp.int32), seqs, alive_lp, fin_seqs, fin_scores, cache)
  _, _, _, fin_seqs, fin_scores, _ = jax.lax.while_loop(cond, body, state)
  pick = jnp.argmax(fin_scores, axis=1)
  return fin_seqs[jnp.arange(b), pick], fin_scores[jnp.arange(b), pick]


def make_generator(model, *, max_len: int, sot_id: int, eot_id: int, pad_id: int = 0, beam_size: int = 1,
                   alpha: float = 1.0, out_shardings=None) -> Callable:
  """jit-compiled `fn(variables, images) -> ids int32 [B, max_len]`: greedy (beam_size 1) or beam search.

  `out_shardings` (e.g. replicated over the mesh) is passed to `jax.jit`."""
  if beam_size <= 1:
    fn = functools.partial(greedy, model, max_len=max_len, sot_id=sot_id, eot_id=eot_id, pad_id=pad_id)
  else:
    def fn(variables, images):
      return beam_search(model, variables, images, max_len=max_len, sot_id=sot_id, eot_id=eot_id, pad_id=pad_id,
                         beam_size=beam_size, alpha=alpha)[0]
  return jax.jit(fn) if out_shardings is None else jax.jit(fn, out_shardings=out_shardings)
