"""KgCoOp: Knowledge-guided Context Optimization (Yao, Zhang & Xu 2023, "Visual-Language Prompt Tuning with
Knowledge-guided Context Optimization", CVPR).

What is learned: CoOp's context (`coop.CoOp`), the base frozen. The learned class text embeddings w_c = g(t_c)
are kept close to the hand-crafted ones w_c^clip (the CLIP prompt ensemble of the dataset's templates, plus CuPL
descriptions when given):

  L_kg = (1/N_c) Σ_c ||w_c − w_c^clip||²₂ = (1/N_c) Σ_c 2·(1 − cos(w_c, w_c^clip))     (KgCoOp eq. 4, unit norms)
  L = L_ce + λ · L_kg                                                                   (KgCoOp eq. 5)

`method.weight` = λ (paper default 8.0); outputs['kg'] is L_kg (mean squared distance of the unit vectors).
λ = 0 is CoOp exactly.
"""

from __future__ import annotations

import jax.numpy as jnp

from vlm_jax.transfer.methods import Method, coop
from vlm_jax.transfer.methods import prompting as pr


class KgCoOp(coop.CoOp):
  handcrafted: pr.HandCrafted | None = None

  def __call__(self, batch, *, train: bool = False):
    w = self.text_features()
    logits = self.base.logit_scale() * pr.image_embeddings(self.base, batch["image"]) @ w.T
    w_clip = pr.handcrafted_weights(self.base, self.handcrafted)
    return {"logits": logits, "kg": jnp.mean(2.0 - 2.0 * jnp.sum(w * w_clip, axis=-1))}


def make_loss(weight: float):
  def loss_fn(outputs, batch):
    ce, metrics = pr.ce_loss(outputs, batch)
    return ce + weight * outputs["kg"], {**metrics, "kg": outputs["kg"]}
  return loss_fn


def build(cfg, *, base_model, base_config, tokenizer, class_names, templates, descriptions=None) -> Method:
  del base_config
  module = KgCoOp(base_model, **coop.prompt_options(cfg, tokenizer, class_names),
                  handcrafted=pr.make_handcrafted(tokenizer, class_names, templates, descriptions))
  return Method(module, make_loss(float(cfg.get("weight", 8.0))), pr.classify_fn)
