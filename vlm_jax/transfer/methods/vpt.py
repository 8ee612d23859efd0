"""VPT: Visual Prompt Tuning (Jia, Tang, Chen, Cardie, Belongie, Hariharan & Lim 2022, ECCV), shallow and deep.

What is learned: P prompt tokens per prompted layer in the frozen ViT image tower; nothing else. With E_0 the
patch embeddings (plus positions) and L_i the i-th frozen block:

  shallow  [x_1, Z_1, E_1] = L_1([x_0, P, E_0]),   [x_i, Z_i, E_i] = L_i([x_{i−1}, Z_{i−1}, E_{i−1}])   (VPT eq. 4)
  deep     [x_i, _, E_i] = L_i([x_{i−1}, P_{i−1}, E_{i−1}])  for i = 1 … n                         (VPT eq. 6)

P ∈ R^{n×P×D} (shallow: n = 1, the input layer only; deep: a new set replacing the previous layer's prompt
outputs before each of the first n blocks, n = `method.layers`, default every block); x is the [CLS] token when
the tower has one (prompts sit right after it) and the prompt outputs are never pooled (a 'gap' tower averages the
patch tokens only). The ViT implements the replacement (`vlm_jax.models.vit`, `transformer.Block`).

Deviation (stated): the paper trains a linear head on the [CLS] feature of a supervised ViT; on a two-tower base
the head here is the frozen CLIP text classifier (the hand-crafted prompt ensemble w_c), as the CLIP-adaptation
literature evaluates VPT (e.g. MaPLe's "independent V-L prompting" baselines), so the learned parameters do not
depend on the classes and base-to-novel evaluation is defined:

  p(y = c | x) = softmax_c( exp(log τ⁻¹) · cos(f(x; P), w_c) ),   trained with cross-entropy.

Initialisation as the paper's code: uniform(−a, a), a = sqrt(6 / (3·patch² + D)) (Xavier over the patch
embedding's fan-in and the width). Prompt dropout (0.1 in the paper) is left out. `layers = 0` or `tokens = 0`
gives exactly the frozen model. Needs a ViT image tower (the pretrained ViT fixture or a ViT pre-training run).

Config (`config.method`): mode ('shallow' | 'deep'), tokens (P), layers (prompted blocks; −1: 1 for shallow,
every block for deep; 0: none, the frozen model).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from vlm_jax.errors import UserError
from vlm_jax.transfer.methods import Method
from vlm_jax.transfer.methods import prompting as pr

MODES = ("shallow", "deep")


def vit_tower(base_model, method: str):
  """The base's ViT image tower, or a `UserError` naming the method that needs one."""
  img = getattr(base_model, "img", None)
  if img is None or not hasattr(img, "num_patches"):
    raise UserError(f"{method} needs a ViT image tower (model.image.kind='vit'), not {type(img).__name__}: use a "
                    "ViT base (e.g. configs/pretrain/clip.py with a ViT image tower)")
  return img


def prompt_init(patch_size: int, width: int):
  """VPT's uniform(−a, a) initialiser, a = sqrt(6 / (3·patch² + width))."""
  a = math.sqrt(6.0 / (3 * patch_size * patch_size + width))
  return lambda key, shape, dtype=jnp.float32: nn.initializers.uniform(2 * a)(key, shape, dtype) - a


class VPT(nn.Module):
  """The frozen base `base`, learned prompt tokens `prompts` [n, P, D], the fixed hand-crafted text head."""
  base: nn.Module
  handcrafted: pr.HandCrafted
  tokens: int
  layers: int
  width: int
  patch_size: int

  def setup(self):
    if self.tokens and self.layers:
      self.prompts = self.param("prompts", prompt_init(self.patch_size, self.width),
                                (self.layers, self.tokens, self.width), jnp.float32)

  def prompt_tokens(self):
    """[n, P, D] learned prompts, or None when nothing is prompted (the frozen model)."""
    return self.prompts if self.tokens and self.layers else None

  def classify(self, images):
    """logits [B, C] = exp(log τ⁻¹) · cos(f(x; P), w_c)."""
    z = self.base.encode_image(images, prompts=self.prompt_tokens(), train=False)
    return self.base.logit_scale() * z @ pr.handcrafted_weights(self.base, self.handcrafted).T

  def __call__(self, batch, *, train: bool = False):
    return {"logits": self.classify(batch["image"])}


def build(cfg, *, base_model, base_config, tokenizer, class_names, templates, descriptions=None) -> Method:
  del base_config
  img = vit_tower(base_model, "VPT")
  mode = str(cfg.get("mode", "deep"))
  if mode not in MODES:
    raise UserError(f"unknown VPT mode {mode!r}; use one of {MODES}")
  tokens, layers = int(cfg.get("tokens", 10)), int(cfg.get("layers", -1))
  if layers < 0:
    layers = 1 if mode == "shallow" else img.depth
  if tokens < 0:
    raise UserError(f"VPT tokens must be >= 0, got {tokens}")
  if mode == "shallow" and layers > 1:
    raise UserError(f"VPT-shallow prompts the input layer only; method.layers={layers} needs mode='deep'")
  if layers > img.depth:
    raise UserError(f"VPT-deep with {layers} prompted layers for a {img.depth}-block ViT")
  hc = pr.make_handcrafted(tokenizer, class_names, templates, descriptions)
  module = VPT(base_model, hc, tokens, layers, int(img.width), int(img.patch_size))
  return Method(module, pr.ce_loss, pr.classify_fn)
