"""ProGrad: Prompt-aligned Gradient (Zhu, Niu, Han, Zhang & Zhang 2023, "Prompt-aligned Gradient for Prompt
Tuning", ICCV).

What is learned: CoOp's context (`coop.CoOp`), the base frozen. Two gradients w.r.t. the context V:

  G_d = ∇_V L_ce(V)                                    the downstream (few-shot cross-entropy) gradient
  G_g = ∇_V KL(p_zs ‖ p_V)                              the general-knowledge gradient: KL from the zero-shot
                                                        prediction p_zs (hand-crafted prompt ensemble) to p_V
  G_prograd = G_d                                if G_d · G_g ≥ 0
            = G_d − λ · (G_d · G_g / ‖G_g‖²) · G_g  otherwise                           (ProGrad eq. 4–5)

so (λ = 1) the update never increases the KL to the zero-shot prediction to first order: G_prograd · G_g ≥ 0.

Implementation: the context enters the graph through `aligned_split(V, λ)`, an identity with two outputs and a
custom VJP. The first copy feeds the cross-entropy logits, the second the KL logits, so the backward pass receives
(G_d, G_g) as the two cotangents and returns G_prograd as V's gradient: one ordinary `jax.value_and_grad` of
L_ce + KL in the training loop gives exactly ProGrad's update direction (the KL term steers, it is not added).
The projection is over the whole context tensor (one parameter, as the paper's per-parameter rule).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vlm_jax.transfer.methods import Method, coop
from vlm_jax.transfer.methods import prompting as pr


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def aligned_split(v: jax.Array, lam: float):
  """(v, v); backward: (g_d, g_g) -> g_d − λ·min(0, g_d·g_g)/‖g_g‖² · g_g."""
  del lam
  return v, v


def _split_fwd(v, lam):
  del lam
  return (v, v), None


def project(g_d: jax.Array, g_g: jax.Array, lam: float = 1.0) -> jax.Array:
  """ProGrad's rule (eq. 5): g_d with its component against g_g removed (×λ) when they conflict."""
  dot = jnp.vdot(g_d, g_g)
  coef = jnp.where(dot < 0, dot / jnp.maximum(jnp.vdot(g_g, g_g), 1e-30), 0.0)
  return g_d - lam * coef * g_g


def _split_bwd(lam, res, cotangents):
  del res
  g_d, g_g = cotangents
  return (project(g_d, g_g, lam),)


aligned_split.defvjp(_split_fwd, _split_bwd)


class ProGrad(coop.CoOp):
  handcrafted: pr.HandCrafted | None = None
  lam: float = 1.0
  temperature: float = 1.0

  def __call__(self, batch, *, train: bool = False):
    emb, index, eot = self.token_embeddings()
    v_ce, v_kl = aligned_split(self.context(), self.lam)
    z_img = pr.image_embeddings(self.base, batch["image"])
    scale = self.base.logit_scale()
    c = emb.shape[0]
    per_class = lambda v: v if v.ndim == 3 else jnp.broadcast_to(v[None], (c, *v.shape))  # noqa: E731
    v_ce, v_kl = per_class(v_ce), per_class(v_kl)
    # both copies through the text tower in one batch of 2C prompts
    both = pr.encode_prompts(self.base, jnp.concatenate([emb, emb]), jnp.concatenate([index, index]),
                             jnp.concatenate([eot, eot]), jnp.concatenate([v_ce, v_kl]))
    zs = pr.handcrafted_weights(self.base, self.handcrafted)
    return {"logits": scale * z_img @ both[:c].T, "logits_kl": scale * z_img @ both[c:].T,
            "logits_zs": jax.lax.stop_gradient(scale * z_img @ zs.T)}


def kl_to_zeroshot(outputs: dict, temperature: float = 1.0) -> jax.Array:
  """KL(p_zs ‖ p_V) · T², batch mean (the reference implementation's distillation form)."""
  t = temperature
  log_p = jax.nn.log_softmax(outputs["logits_kl"].astype(jnp.float32) / t)
  log_q = jax.nn.log_softmax(outputs["logits_zs"].astype(jnp.float32) / t)
  return jnp.mean(jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1)) * t * t


def make_loss(temperature: float):
  def loss_fn(outputs, batch):
    ce, metrics = pr.ce_loss(outputs, batch)
    kl = kl_to_zeroshot(outputs, temperature)
    # the sum only routes both cotangents to `aligned_split`; V's gradient is ProGrad's G_prograd
    return ce + kl, {**metrics, "kl": kl}
  return loss_fn


def build(cfg, *, base_model, base_config, tokenizer, class_names, templates, descriptions=None) -> Method:
  del base_config
  t = float(cfg.get("temperature", 1.0))
  module = ProGrad(base_model, **coop.prompt_options(cfg, tokenizer, class_names),
                   handcrafted=pr.make_handcrafted(tokenizer, class_names, templates, descriptions),
                   lam=float(cfg.get("lam", 1.0)), temperature=t)
  return Method(module, make_loss(t), pr.classify_fn)
