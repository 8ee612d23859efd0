"""CoOp: Context Optimization (Zhou, Yang, Loy & Liu 2022, "Learning to Prompt for Vision-Language Models", IJCV).

What is learned: M context vectors [V]_1 … [V]_M ∈ R^D (D = the text tower's width), shared by all classes
('unified', `method.class_specific=False`) or one set per class (class-specific context, CSC). Everything of the
two-tower base is frozen. The prompt of class c is

  t_c = [V]_1 [V]_2 … [V]_M [CLASS_c] .          (CoOp eq. 1; class token at the end, or 'middle' / 'front')

and with g the frozen text encoder, f the frozen image encoder, τ the base's temperature:

  p(y = c | x) = exp(cos(g(t_c), f(x)) / τ) / Σ_{j=1}^{K} exp(cos(g(t_j), f(x)) / τ)          (CoOp eq. 2)

trained with cross-entropy. Initialisation: N(0, 0.02²) (`method.init = ''`) or the embeddings of a phrase
(`method.init = 'a photo of a'`, M = its token count). Paper recipe (configs/transfer/coop.py): SGD lr 2e-3,
cosine decay, one warmup epoch at constant lr 1e-5, batch 32, M = 16 (random init) or 4 (phrase init).

Config (`config.method`): n_ctx, init ('' | phrase), class_specific, position ('end' | 'middle' | 'front'),
init_std.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.errors import UserError
from vlm_jax.transfer.methods import Method
from vlm_jax.transfer.methods import prompting as pr


class CoOp(nn.Module):
  """The frozen base `base` plus the learned context `ctx` (see the module docstring)."""
  base: nn.Module
  prompt: pr.PromptText
  class_specific: bool = False
  init_phrase: tuple | None = None
  init_std: float = 0.02

  def setup(self):
    self.ctx = pr.context_param(self, n_ctx=self.prompt.n_ctx, dim=self.base.txt.width,
                                n_classes=len(self.prompt.ids), class_specific=self.class_specific,
                                init_phrase=self.init_phrase, init_std=self.init_std)

  def token_embeddings(self):
    """(frozen token embeddings [C, L, D], ctx_index [C, L], eot positions [C]) of the class prompts."""
    ids, index = self.prompt.arrays()
    emb = jax.lax.stop_gradient(self.base.text_token_embeddings(ids))
    return emb, index, self.base.eot_positions(ids)

  def context(self):
    """The context vectors [M, D] or [C, M, D]."""
    return pr.context_value(self.base, self.ctx, self.init_phrase)

  def text_features(self):
    """L2-normalised class text features [C, E] g(t_c) of the learned prompts."""
    emb, index, eot = self.token_embeddings()
    return pr.encode_prompts(self.base, emb, index, eot, self.context())

  def classify(self, images):
    """logits [B, C] = exp(log τ⁻¹) · cos(f(x), g(t_c)) (CoOp eq. 2 before the softmax)."""
    return self.base.logit_scale() * pr.image_embeddings(self.base, images) @ self.text_features().T

  def __call__(self, batch, *, train: bool = False):
    return {"logits": self.classify(batch["image"])}


def prompt_options(cfg, tokenizer, class_names) -> dict:
  """The CoOp-family module fields from `config.method`: prompt (PromptText), class_specific, init_phrase,
  init_std. `method.init` = a phrase sets M to its token count (n_ctx must agree or be 0)."""
  phrase = str(cfg.get("init", "") or "")
  init_phrase = pr.phrase_ids(tokenizer, phrase) if phrase else None
  n_ctx = int(cfg.get("n_ctx", 0) or 0) or (len(init_phrase) if init_phrase else 16)
  if init_phrase is not None and n_ctx != len(init_phrase):
    raise UserError(f"method.init={phrase!r} has {len(init_phrase)} tokens; set method.n_ctx to that (or 0)")
  prompt = pr.make_prompt_text(tokenizer, class_names, n_ctx, str(cfg.get("position", "end")))
  return {"prompt": prompt, "class_specific": bool(cfg.get("class_specific", False)),
          "init_phrase": init_phrase, "init_std": float(cfg.get("init_std", 0.02))}


def build(cfg, *, base_model, base_config, tokenizer, class_names, templates, descriptions=None) -> Method:
  del base_config, templates, descriptions
  return Method(CoOp(base_model, **prompt_options(cfg, tokenizer, class_names)), pr.ce_loss, pr.classify_fn)
