"""MaPLe: Multi-modal Prompt Learning (Khattak, Rasheed, Maaz, Khan & Khan 2023, CVPR).

What is learned: language prompts in the first J layers of the frozen text encoder and, coupled to them, vision
prompts in the first J layers of the frozen ViT; everything of the two-tower base is frozen. With b prompt tokens
and W_0 the word embeddings of the class name (the prompt is t_c = [P_0, W_0], class token at the end):

  language  [_, W_i] = L_i([P_{i−1}, W_{i−1}])  for i = 1 … J;   [P_i, W_i] = L_i([P_{i−1}, W_{i−1}])  beyond
                                                                                              (MaPLe eq. 5–6)
  vision    P̃_k = F_k(P_k)  (a linear coupling function per layer, D_text → D_vision),
            [c_i, E_i, _] = V_i([c_{i−1}, E_{i−1}, P̃_{i−1}])  for i = 1 … J                 (MaPLe eq. 7–8)
  p(y = c | x) = softmax_c( exp(log τ⁻¹) · cos(f(x; P̃), g(t_c; P)) ),  cross-entropy.

P_0 ∈ R^{b×D_t} is the input-layer context (CoOp's context vectors, `prompting.context_param`: initialised from the
embeddings of "a photo of a" or N(0, 0.02²)), placed behind the start token where the text tower adds its
position embeddings; P_1 … P_{J−1} are new tokens that replace the previous layer's outputs at the same positions
(`text.py` / `transformer.Block` implement the replacement; position embeddings reach only P_0, as in the
paper's code); F_0 … F_{J−1} are Linear(D_t → D_v). In the ViT the vision prompts sit after the [CLS] token (if
any) and are never pooled. The paper uses b = 2, J = 9 of 12 layers, SGD lr 3.5e-3, 5 epochs, batch 4.

Neutral settings (tests): with `vision=False` (the paper's "deep language prompting" ablation: no coupling, no
vision prompts) and J = 1 MaPLe is CoOp with phrase-initialised context, i.e. at initialisation exactly the
zero-shot classifier of the single template "<phrase> {}.". Needs a ViT image tower.

Config (`config.method`): n_ctx (b; 0 = the phrase's length), init (phrase or ''), depth (J; −1 = every layer
both towers have), vision (couple vision prompts, default True), init_std.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.errors import UserError
from vlm_jax.transfer.methods import Method
from vlm_jax.transfer.methods import prompting as pr
from vlm_jax.transfer.methods.vpt import vit_tower


class MaPLe(nn.Module):
  """The frozen base `base`; learned P_0 (`ctx`), P_1 … P_{J−1} (`text_prompts`), couplings F_k (`couple_k`)."""
  base: nn.Module
  prompt: pr.PromptText
  depth: int
  vision_width: int
  vision: bool = True
  init_phrase: tuple | None = None
  init_std: float = 0.02

  def setup(self):
    b, width = self.prompt.n_ctx, self.base.txt.width
    self.ctx = pr.context_param(self, n_ctx=b, dim=width, n_classes=len(self.prompt.ids), class_specific=False,
                                init_phrase=self.init_phrase, init_std=self.init_std)
    if self.depth > 1:
      self.text_prompts = self.param("text_prompts", nn.initializers.normal(self.init_std),
                                     (self.depth - 1, b, width), jnp.float32)
    if self.vision:
      self.couple = [nn.Dense(self.vision_width, name=f"couple_{k}") for k in range(self.depth)]

  def prompts(self):
    """(text prompt embeddings [C, L, D_t], ctx_index, eot [C], deep text prompts [J, b, D_t] or None,
    vision prompts [J, b, D_v] or None)."""
    ids, index = self.prompt.arrays()
    emb = jax.lax.stop_gradient(self.base.text_token_embeddings(ids))
    b = self.prompt.n_ctx
    ctx = pr.context_value(self.base, self.ctx, self.init_phrase)
    layers = [ctx]
    text = None
    if self.depth > 1:
      deep = self.text_prompts
      layers += list(deep)
      # layer 0's "replacement" is what the tower already holds there: P_0 plus its position embeddings
      start = self.base.txt.prompt_start
      pos = jax.lax.stop_gradient(self.base.txt.pos_embedding[start:start + b]).astype(jnp.float32)
      text = jnp.concatenate([(ctx + pos)[None], deep], axis=0)
    vision = None
    if self.vision:
      vision = jnp.stack([f(p) for f, p in zip(self.couple, layers)])
    return pr.splice(emb, index, ctx), self.base.eot_positions(ids), text, vision

  def classify(self, images):
    """logits [B, C] = exp(log τ⁻¹) · cos(f(x; P̃), g(t_c; P))."""
    emb, eot, text, vision = self.prompts()
    zt = self.base.encode_text(embeddings=emb, eot_positions=eot, prompts=text, train=False)
    zi = self.base.encode_image(images, prompts=vision, train=False)
    return self.base.logit_scale() * zi @ zt.T

  def __call__(self, batch, *, train: bool = False):
    return {"logits": self.classify(batch["image"])}


def check_slots(prompt: pr.PromptText, start: int, class_names: Sequence[str]) -> None:
  """The context slots must be the positions [start, start + b) the deep text prompts replace."""
  want = tuple(range(start, start + prompt.n_ctx))
  for name, row in zip(class_names, prompt.ctx_index):
    have = tuple(i for i, j in enumerate(row) if j >= 0)
    if have != want:
      raise UserError(f"MaPLe needs the context right after the start token (positions {list(want)}); the prompt "
                      f"of {name!r} has it at {list(have)} (class token position must be 'end')")


def build(cfg, *, base_model, base_config, tokenizer, class_names, templates, descriptions=None) -> Method:
  del base_config, templates, descriptions
  img = vit_tower(base_model, "MaPLe")
  phrase = str(cfg.get("init", "a photo of a") or "")
  init_phrase = pr.phrase_ids(tokenizer, phrase) if phrase else None
  n_ctx = int(cfg.get("n_ctx", 0) or 0) or (len(init_phrase) if init_phrase else 2)
  if init_phrase is not None and n_ctx != len(init_phrase):
    raise UserError(f"method.init={phrase!r} has {len(init_phrase)} tokens; set method.n_ctx to that (or 0)")
  top = min(int(img.depth), int(base_model.txt.depth))
  depth = int(cfg.get("depth", -1))
  depth = top if depth < 0 else depth
  if not 1 <= depth <= top:
    raise UserError(f"MaPLe depth J={depth} must be in [1, {top}] (the shallower tower has {top} layers)")
  prompt = pr.make_prompt_text(tokenizer, class_names, n_ctx, "end")
  if depth > 1:
    check_slots(prompt, int(base_model.txt.prompt_start), class_names)
  module = MaPLe(base_model, prompt, depth, int(img.width), bool(cfg.get("vision", True)), init_phrase,
                 float(cfg.get("init_std", 0.02)))
  return Method(module, pr.ce_loss, pr.classify_fn)
