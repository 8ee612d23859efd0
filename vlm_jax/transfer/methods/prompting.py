"""Text-side prompt machinery shared by the CoOp family (CoOp, CoCoOp, KgCoOp, ProGrad, and whoever else learns
text context): tokenised class prompts with context placeholders, the splice of learned context vectors into the
frozen text tower's token embeddings, the hand-crafted (zero-shot) classifier, and the cross-entropy loss.

CoOp (Zhou et al. 2022, IJCV, §3.2) writes the prompt of class c as t_c = [V]_1 … [V]_M [CLASS_c] '.' (class
token at the end; 'middle' puts half of the context after the class, 'front' all of it), runs it through the
frozen text encoder g(·) and classifies with

  p(y = c | x) = exp(cos(g(t_c), f(x)) / τ) / Σ_j exp(cos(g(t_j), f(x)) / τ)          (CoOp eq. 2)

Here a prompt is tokenised as a string with M placeholder words ('X X X X red circle.'); `PromptText` records,
for every class and token position, which context vector j replaces that position (−1: keep the token's own
embedding). EOT pooling uses the tokenised prompt's EOT position. All fields are tuples (hashable), so a Flax
module can carry a `PromptText` as an attribute.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.embedding import classifier
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


def context_param(mdl: nn.Module, *, n_ctx: int, dim: int, n_classes: int, class_specific: bool,
                  init_phrase: tuple | None, init_std: float = 0.02, name: str = "ctx") -> jax.Array:
  """CoOp's learned context parameter `name` (call in `setup`): [M, D] (unified) or [C, M, D] (class-specific).

  Random init: N(0, init_std²) (CoOp: std 0.02). Phrase init ("a photo of a"): the parameter starts at zero and
  `context_value` adds the phrase's frozen token embeddings, so the context is exactly the phrase's embeddings
  at step 0 (this parameterisation needs no base weights at `init`; gradients are the same, weight decay pulls
  towards the phrase instead of 0)."""
  shape = (n_classes, n_ctx, dim) if class_specific else (n_ctx, dim)
  if init_phrase is not None and len(init_phrase) != n_ctx:
    raise UserError(f"the init phrase has {len(init_phrase)} tokens but method.n_ctx={n_ctx}")
  init = nn.initializers.zeros if init_phrase is not None else nn.initializers.normal(init_std)
  return mdl.param(name, init, shape, jnp.float32)


def context_value(base: nn.Module, param: jax.Array, init_phrase: tuple | None) -> jax.Array:
  """The context vectors: `param`, plus the phrase's frozen token embeddings with phrase init."""
  if init_phrase is None:
    return param
  phrase = jax.lax.stop_gradient(base.text_token_embeddings(jnp.asarray([init_phrase], jnp.int32))[0])
  return phrase.astype(jnp.float32) + param


def encode_prompts(base: nn.Module, token_emb: jax.Array, ctx_index: jax.Array, eot: jax.Array,
                   ctx: jax.Array) -> jax.Array:
  """L2-normalised text features [C, E] of the spliced prompts through the frozen text tower."""
  return base.encode_text(embeddings=splice(token_emb, ctx_index, ctx), eot_positions=eot, train=False)


@dataclasses.dataclass(frozen=True)
class HandCrafted:
  """The hand-crafted prompts of C classes (templates filled, plus CuPL descriptions), flat: ids [P][L] and the
  class owning each prompt."""
  ids: tuple
  owner: tuple
  n_classes: int


def make_handcrafted(tokenizer, class_names: Sequence[str], templates: Sequence[str],
                     descriptions: Sequence[Sequence[str]] | None = None) -> HandCrafted:
  per_class = classifier.class_prompts(class_names, templates, descriptions, fix_articles=True)
  flat = [t for texts in per_class for t in texts]
  owner = [c for c, texts in enumerate(per_class) for _ in texts]
  ids = np.asarray(tokenizer(flat), np.int32)
  return HandCrafted(tuple(map(tuple, ids.tolist())), tuple(owner), len(per_class))


def handcrafted_weights(base: nn.Module, hc: HandCrafted) -> jax.Array:
  """The CLIP prompt-ensemble classifier [C, E] (Radford et al. 2021 §3.1.4): per class, the mean of its
  prompts' normalised text embeddings, renormalised (`embedding.classifier.class_embeddings`, in-graph and
  with gradients stopped)."""
  z = base.encode_text(jnp.asarray(hc.ids, jnp.int32), train=False)
  owner = jnp.asarray(hc.owner, jnp.int32)
  sums = jax.ops.segment_sum(z, owner, num_segments=hc.n_classes)
  return jax.lax.stop_gradient(l2_normalize(sums))


def l2_normalize(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


def image_embeddings(base: nn.Module, images: jax.Array) -> jax.Array:
  """Frozen, L2-normalised image embeddings [B, E] (BatchNorm with its running statistics: train=False)."""
  return jax.lax.stop_gradient(base.encode_image(images, train=False))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(mean cross-entropy, top-1 accuracy) of logits [B, C] against int labels [B]."""
  logits = logits.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits)
  ce = -jnp.mean(jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=1))
  return ce, jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))


def ce_loss(outputs: dict, batch: dict):
  """CoOp's loss: cross-entropy of outputs['logits'] = exp(logit scale)·cos against batch['label']."""
  ce, acc = cross_entropy(outputs["logits"], batch["label"])
  return ce, {"ce": ce, "train_top1": acc}


def classify_fn(module, variables, images):
  """The `logits_fn` of a method whose module defines `classify(images) -> [B, C]`."""
  return module.apply(variables, images, method=type(module).classify)
