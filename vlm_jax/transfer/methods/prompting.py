"""Text-side prompt machinery shared by the CoOp family (CoOp, CoCoOp, KgCoOp, ProGrad, and whoever else learns
text context): tokenised class prompts with context placeholders, the splice of learned context vectors into the
frozen text tower's token embeddings, the hand-crafted (zero-shot) classifier, and the cross-entropy loss.

CoOp (Zhou et al. 2022, IJCV, §3.2) writes the prompt of class c as t_c = [V]_1 … [V]_M [CLASS_c] '.' (class
token at the end; 'middle' puts half of the context after the class, 'front' all of it), runs it through the
frozen text encoder g(·) and classifies with

  p(y = c | x) = exp(cos(g(t_c), f(x)) / τ) / Σ_j exp(cos(g(t_j), f(x)) / τ)          (CoOp eq. 2)

The tokenised placeholder prompts (`PromptText`, `make_prompt_text`, `phrase_ids`) and the `splice` of context
vectors into token embeddings live in `vlm_jax.embedding.context_prompts` (shared with distillation's DetPro) and
are re-exported here.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.embedding import classifier
from vlm_jax.embedding.context_prompts import (  # noqa: F401  (one definition, re-exported for the methods)
    PLACEHOLDER, POSITIONS, PromptText, make_prompt_text, phrase_ids, prompt_strings, splice)
from vlm_jax.errors import UserError


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


def encode_prompt_sets(base: nn.Module, prompt: "PromptText", ctx: jax.Array) -> jax.Array:
  """L2-normalised text features [N, C, E] of N context sets `ctx` [N, M, D], each spliced into every class's
  prompt (PLOT's N prompts per class, UPL's prompt ensemble): one frozen text-tower pass over the N·C prompts."""
  ids, index = prompt.arrays()
  emb = jax.lax.stop_gradient(base.text_token_embeddings(ids))
  prompts = jax.vmap(lambda c: splice(emb, index, c))(ctx)  # [N, C, L, D]
  n, c = prompts.shape[:2]
  z = base.encode_text(embeddings=prompts.reshape(n * c, *prompts.shape[2:]),
                       eot_positions=jnp.tile(base.eot_positions(ids), n), train=False)
  return z.reshape(n, c, -1)


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


def handcrafted_weights(base: nn.Module, hc: HandCrafted, *, stop_gradient: bool = True) -> jax.Array:
  """The CLIP prompt-ensemble classifier [C, E] (Radford et al. 2021 §3.1.4): per class, the mean of its
  prompts' normalised text embeddings, renormalised (`embedding.classifier.class_embeddings`, in-graph and
  with gradients stopped unless `stop_gradient=False`: fine-tuning through the text tower)."""
  z = base.encode_text(jnp.asarray(hc.ids, jnp.int32), train=False)
  owner = jnp.asarray(hc.owner, jnp.int32)
  sums = jax.ops.segment_sum(z, owner, num_segments=hc.n_classes)
  w = l2_normalize(sums)
  return jax.lax.stop_gradient(w) if stop_gradient else w


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
