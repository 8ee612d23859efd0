"""Prompts with learned context slots (CoOp, Zhou et al. 2022, IJCV, §3.2): tokenised class prompts whose M
placeholder words are replaced by continuous context vectors before the frozen text encoder.

The prompt of class c is t_c = [V]_1 … [V]_M [CLASS_c] '.' (class token at the end; 'middle' puts half of the
context after the class, 'front' all of it). It is tokenised as a string with M placeholder words
('X X X X red circle.'); `PromptText` records, for every class and token position, which context vector j
replaces that position (−1: keep the token's own embedding), and `splice` writes the vectors into the token
embeddings that `encode_text(embeddings=…, eot_positions=…)` reads. EOT pooling uses the tokenised prompt's EOT
position. All fields are tuples (hashable), so a Flax module can carry a `PromptText` as an attribute.

Shared by the transfer methods (CoOp family, `vlm_jax.transfer.methods.prompting`) and distillation (DetPro,
`vlm_jax.distill.detpro`), so neither imports the other.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.errors import UserError

POSITIONS = ("end", "middle", "front")
PLACEHOLDER = "X"


@dataclasses.dataclass(frozen=True)
class PromptText:
  """Tokenised prompts of C classes with M context slots: ids [C][L], ctx_index [C][L] (j or −1)."""
  ids: tuple
  ctx_index: tuple
  n_ctx: int

  def arrays(self) -> tuple[jax.Array, jax.Array]:
    return jnp.asarray(self.ids, jnp.int32), jnp.asarray(self.ctx_index, jnp.int32)


def _start(tokenizer) -> int:
  from vlm_jax.data.tokenizers import token_layout  # noqa: PLC0415
  return 1 if token_layout(tokenizer).get("sot_id") is not None else 0


def phrase_ids(tokenizer, phrase: str) -> tuple[int, ...]:
  """The token ids of `phrase` without its SOT / EOT / padding (CoOp's context initialisation words)."""
  from vlm_jax.data.tokenizers import token_layout  # noqa: PLC0415
  layout = token_layout(tokenizer)
  row = np.asarray(tokenizer([phrase]))[0][_start(tokenizer):]
  eot, pad = layout.get("eot_id"), layout.get("pad_id")
  out = []
  for t in row:
    if (eot is not None and t == eot) or (pad is not None and t == pad and eot is not None):
      break
    out.append(int(t))
  if not out:
    raise UserError(f"context init phrase {phrase!r} has no tokens")
  return tuple(out)


def prompt_strings(class_names: Sequence[str], n_ctx: int, position: str = "end") -> list[str]:
  """'X X … X name.' per class (`position` of the class token: end | middle | front)."""
  if position not in POSITIONS:
    raise UserError(f"unknown class token position {position!r}; use one of {POSITIONS}")
  half = n_ctx // 2
  out = []
  for name in class_names:
    x = lambda k: [PLACEHOLDER] * k  # noqa: E731
    words = {"end": x(n_ctx) + [name], "middle": x(half) + [name] + x(n_ctx - half),
             "front": [name] + x(n_ctx)}[position]
    out.append(" ".join(words) + ".")
  return out


def make_prompt_text(tokenizer, class_names: Sequence[str], n_ctx: int, position: str = "end") -> PromptText:
  """Tokenises the placeholder prompts and finds the M context slots of every class (a `UserError` when the
  tokenizer truncates a prompt or a class name tokenises into the placeholder)."""
  if int(n_ctx) < 1:
    raise UserError(f"method.n_ctx must be >= 1, got {n_ctx}")
  ids = np.asarray(tokenizer(prompt_strings(class_names, n_ctx, position)), np.int32)
  placeholder = int(np.asarray(tokenizer([PLACEHOLDER]))[0][_start(tokenizer)])
  index = np.full(ids.shape, -1, np.int32)
  for c, row in enumerate(ids):
    slots = np.flatnonzero(row == placeholder)
    if len(slots) != n_ctx:
      raise UserError(f"the prompt of class {class_names[c]!r} has {len(slots)} context slots after tokenisation, "
                      f"not {n_ctx} (too long for the text length {ids.shape[1]}, or the class name contains "
                      f"the placeholder token {PLACEHOLDER!r})")
    index[c, slots] = np.arange(n_ctx)
  return PromptText(tuple(map(tuple, ids.tolist())), tuple(map(tuple, index.tolist())), int(n_ctx))


def splice(token_emb: jax.Array, ctx_index: jax.Array, ctx: jax.Array) -> jax.Array:
  """Prompt embeddings [C, L, D]: position (c, l) takes ctx[j] (unified ctx [M, D]) or ctx[c, j] (class-specific
  ctx [C, M, D]) where ctx_index[c, l] = j ≥ 0, else the token's own embedding token_emb[c, l]."""
  j = jnp.maximum(ctx_index, 0)
  picked = ctx[j] if ctx.ndim == 2 else jnp.take_along_axis(ctx, j[..., None], axis=1)
  return jnp.where((ctx_index >= 0)[..., None], picked.astype(token_emb.dtype), token_emb)
