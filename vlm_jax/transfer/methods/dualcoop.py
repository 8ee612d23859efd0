"""DualCoOp: positive and negative prompts for multi-label recognition (Sun, Hu & Saenko 2022, NeurIPS, "DualCoOp:
Fast adaptation to multi-label recognition with limited annotations").

What is learned: a pair of contexts, positive V⁺ and negative V⁻ (M vectors each; shared by all classes, or one
pair per class with `class_specific`), giving per class the prompts t⁺_c = [V⁺ CLASS_c .], t⁻_c = [V⁻ CLASS_c .]
with frozen text features g⁺_c, g⁻_c; everything of the two-tower base is frozen. With the image's R local
features f_r (L2-normalised, `local_features`: the ViT's projected patch tokens or MaskCLIP dense features — the
paper keeps the spatial output of CLIP's attention pool), class-specific region feature aggregation (§3.3):

  s^±_{r,c} = f_rᵀ g^±_c,        a_{r,c} = softmax_r( τ⁻¹ · s⁺_{r,c} )
  S^±_c = Σ_r a_{r,c} · s^±_{r,c}
  p_c = exp(τ⁻¹ S⁺_c) / (exp(τ⁻¹ S⁺_c) + exp(τ⁻¹ S⁻_c)) = σ( τ⁻¹ (S⁺_c − S⁻_c) )          (DualCoOp eq. 3–4)

trained with the Asymmetric Loss (Ridnik et al. 2021, as the paper), per class and averaged:

  L = −y (1 − p)^{γ+} log p − (1 − y) p_m^{γ−} log(1 − p_m),   p_m = max(p − m, 0)

(γ+ = 1, γ− = 2, m = 0.05 by default). The score of class c is the log-odds τ⁻¹ (S⁺_c − S⁻_c) (`logits_fn`:
multi-label scores, evaluated with mAP). τ⁻¹ is the base's logit scale. Batches carry 'labels', multi-hot
[B, C]: `python -m vlm_jax.transfer --config=configs/transfer/dualcoop.py:tiny` trains it on the multi-label
'scenes' dataset (`vlm_jax.transfer.datasets.SceneDataset`). Paper: M = 16 (both), SGD lr 2e-3.

Config (`config.method`): as CoOp's (`coop.prompt_options`): n_ctx, position, init (phrase or ''; both contexts
start from it: every score is then 0 and the loss pulls them apart), class_specific, init_std; gamma_pos,
gamma_neg, clip (m), local ('auto' | 'tokens' | 'dense').
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.transfer.methods import Method, local_features
from vlm_jax.transfer.methods import prompting as pr
from vlm_jax.transfer.methods.coop import prompt_options


class DualCoOp(nn.Module):
  """The frozen base `base`; learned contexts `ctx_pos`, `ctx_neg` (see the module docstring)."""
  base: nn.Module
  prompt: pr.PromptText
  local: str = "tokens"
  class_specific: bool = False
  init_phrase: tuple | None = None
  init_std: float = 0.02

  def setup(self):
    kw = dict(n_ctx=self.prompt.n_ctx, dim=self.base.txt.width, n_classes=len(self.prompt.ids),
              class_specific=self.class_specific, init_phrase=self.init_phrase, init_std=self.init_std)
    self.ctx_pos = pr.context_param(self, name="ctx_pos", **kw)
    self.ctx_neg = pr.context_param(self, name="ctx_neg", **kw)

  def text_features(self):
    """(g⁺ [C, E], g⁻ [C, E]) L2-normalised."""
    ids, index = self.prompt.arrays()
    emb = jax.lax.stop_gradient(self.base.text_token_embeddings(ids))
    eot = self.base.eot_positions(ids)
    return tuple(pr.encode_prompts(self.base, emb, index, eot, pr.context_value(self.base, p, self.init_phrase))
                 for p in (self.ctx_pos, self.ctx_neg))

  def classify(self, images):
    """Multi-label scores [B, C]: τ⁻¹ (S⁺_c − S⁻_c), the log-odds of p_c."""
    f = local_features.local_embeddings(self.base, images, self.local)  # [B, R, E]
    pos, neg = self.text_features()
    scale = self.base.logit_scale()
    s_pos, s_neg = jnp.einsum("bre,ce->brc", f, pos), jnp.einsum("bre,ce->brc", f, neg)
    a = jax.nn.softmax(scale * s_pos, axis=1)
    return scale * (jnp.sum(a * s_pos, axis=1) - jnp.sum(a * s_neg, axis=1))

  def __call__(self, batch, *, train: bool = False):
    return {"logits": self.classify(batch["image"])}


def asymmetric_loss(logits: jax.Array, labels: jax.Array, *, gamma_pos: float = 1.0, gamma_neg: float = 2.0,
                    clip: float = 0.05, eps: float = 1e-8) -> jax.Array:
  """ASL (Ridnik et al. 2021) per element [B, C] for log-odds `logits` and multi-hot `labels` (module docstring);
  the focusing weights are held constant in the backward, as the reference implementation's default."""
  logits, y = logits.astype(jnp.float32), labels.astype(jnp.float32)
  p = jax.nn.sigmoid(logits)
  p_m = jnp.maximum(p - clip, 0.0) if clip > 0 else p
  log_pos = jax.nn.log_sigmoid(logits)
  log_neg = jnp.log(jnp.maximum(1.0 - p_m, eps)) if clip > 0 else jax.nn.log_sigmoid(-logits)
  w_pos = jax.lax.stop_gradient((1.0 - p) ** gamma_pos)
  w_neg = jax.lax.stop_gradient(p_m ** gamma_neg)
  return -(y * w_pos * log_pos + (1.0 - y) * w_neg * log_neg)


def make_loss(gamma_pos: float, gamma_neg: float, clip: float):
  """`loss_fn(outputs, batch)`: ASL summed over classes, averaged over images (the reference sums; the mean
  over images keeps the scale independent of the batch size)."""

  def loss_fn(outputs, batch):
    logits, labels = outputs["logits"], batch["labels"]
    loss = jnp.mean(jnp.sum(asymmetric_loss(logits, labels, gamma_pos=gamma_pos, gamma_neg=gamma_neg, clip=clip),
                            axis=-1))
    hits = ((logits > 0) == (labels > 0)).astype(jnp.float32)
    return loss, {"asl": loss, "train_label_accuracy": jnp.mean(hits)}

  return loss_fn


def build(cfg, *, base_model, base_config, tokenizer, class_names, templates, descriptions=None) -> Method:
  del base_config, templates, descriptions
  opts = prompt_options(cfg, tokenizer, class_names)
  module = DualCoOp(base_model, opts["prompt"], local_features.resolve(str(cfg.get("local", "auto")), base_model),
                    opts["class_specific"], opts["init_phrase"], opts["init_std"])
  loss = make_loss(float(cfg.get("gamma_pos", 1.0)), float(cfg.get("gamma_neg", 2.0)), float(cfg.get("clip", 0.05)))
  return Method(module, loss, pr.classify_fn)
