"""TPT: Test-time Prompt Tuning (Shu, Nie, Huang, Yu, Goldstein, Anandkumar & Xiao 2022, NeurIPS).

Per test image x, independently of every other test image: N − 1 = 63 random augmented views A_i(x) plus x
itself; the views whose predictions have the lowest entropy (the ρ = 10 % most confident: ⌊0.1 · 64⌋ = 6) are
kept, and the text context p (CoOp's M context vectors, initialised from "a photo of a") takes one AdamW step on
the entropy of their averaged prediction

  p̃(y | x) = (1 / ρN) Σ_{i : H(p(·|A_i x)) ≤ τ_ρ} p_p(y | A_i x)                     (TPT eq. 3)
  p*       = one AdamW step from p₀ on  L(p) = −Σ_y p̃(y | x) log p̃(y | x)             (TPT eq. 2)

with p_p(y | v) = softmax_y(exp(log τ⁻¹) · cos(f(v), g(t_y(p)))) (CoOp eq. 2); x is then classified with p*,
and the context is reset to p₀ for the next image. Nothing persists between images (no parameter: p₀ is the
phrase's frozen token embeddings; the optimizer state is fresh per image), and `classify` maps the whole test
batch with `jax.vmap`, so one jit serves the batch and an image's prediction does not depend on its neighbours.

Views: random resized crops (scale ∈ [0.08, 1] of the area, aspect ratio ∈ [3/4, 4/3], bilinear back to the
input size, as torchvision's RandomResizedCrop) with a random horizontal flip, the TPT recipe for ImageNet and its
shifts (AugMix for the fine-grained sets is not implemented). The crop boxes are drawn from `method.seed` and are
the same for every image (so a prediction is a pure function of the image); they act on the normalised image
(resizing is linear, so it commutes with the normalisation). Paper: AdamW lr 5e-3 (weight decay 0.01, PyTorch's
default, on the context vectors themselves), one step, N = 64, ρ = 0.1.

Config (`config.method`): init (phrase), n_ctx (0: the phrase's length), position, views (N, with the original),
keep (ρ), lr, weight_decay, steps (1), min_scale, seed. Evaluate with a small `eval_batch_size` (every image
carries N views through the image tower and C prompts through the text tower).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from vlm_jax.errors import UserError
from vlm_jax.transfer.methods import Method
from vlm_jax.transfer.methods import prompting as pr
from vlm_jax.transfer.methods.coop import prompt_options
from vlm_jax.transfer.methods.zeroshot import zero_loss


def crop_boxes(key, n: int, size: int, min_scale: float = 0.08) -> jax.Array:
  """[n, 5] (y0, x0, h, w, flip) of n RandomResizedCrop boxes in pixels of a size × size image: area fraction
  ∈ [min_scale, 1], aspect ratio log-uniform in [3/4, 4/3], clipped to the image, flip ∈ {0, 1}."""
  ks = jax.random.split(key, 5)
  area = jax.random.uniform(ks[0], (n,), minval=min_scale, maxval=1.0) * size * size
  ratio = jnp.exp(jax.random.uniform(ks[1], (n,), minval=math.log(3 / 4), maxval=math.log(4 / 3)))
  w = jnp.clip(jnp.sqrt(area * ratio), 1.0, size)
  h = jnp.clip(jnp.sqrt(area / ratio), 1.0, size)
  y0 = jax.random.uniform(ks[2], (n,)) * (size - h)
  x0 = jax.random.uniform(ks[3], (n,)) * (size - w)
  flip = (jax.random.uniform(ks[4], (n,)) < 0.5).astype(jnp.float32)
  return jnp.stack([y0, x0, h, w, flip], axis=1)


def resized_crop(image: jax.Array, box: jax.Array) -> jax.Array:
  """The crop `box` (y0, x0, h, w, flip) of image [H, W, 3], bilinearly resized back to [H, W, 3]."""
  hh, ww = image.shape[:2]
  scale = jnp.stack([hh / box[2], ww / box[3]])
  out = jax.image.scale_and_translate(image, image.shape, (0, 1), scale, -box[:2] * scale, method="linear",
                                      antialias=False)
  return jnp.where(box[4] > 0.5, out[:, ::-1], out)


def entropy(logits: jax.Array) -> jax.Array:
  """H(softmax(logits)) over the last axis."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def marginal_entropy(view_logits: jax.Array, keep: int) -> jax.Array:
  """TPT's loss: the entropy of the mean prediction of the `keep` lowest-entropy views [V, C] (TPT eq. 2–3)."""
  _, idx = jax.lax.top_k(-jax.lax.stop_gradient(entropy(view_logits)), keep)
  logp = jax.nn.log_softmax(view_logits[idx].astype(jnp.float32), axis=-1)
  mean_logp = jax.nn.logsumexp(logp, axis=0) - math.log(keep)  # log of the averaged probabilities
  return -jnp.sum(jnp.exp(mean_logp) * mean_logp)


class TPT(nn.Module):
  """The frozen base and CoOp's prompt layout; the context p₀ is the init phrase (see the module docstring)."""
  base: nn.Module
  prompt: pr.PromptText
  init_phrase: tuple
  views: int = 64
  keep: float = 0.1
  lr: float = 5e-3
  weight_decay: float = 0.01
  steps: int = 1
  min_scale: float = 0.08
  seed: int = 0

  def initial_context(self):
    """p₀ [M, D]: the phrase's frozen token embeddings."""
    ids = jnp.asarray([self.init_phrase], jnp.int32)
    return jax.lax.stop_gradient(self.base.text_token_embeddings(ids)[0].astype(jnp.float32))

  def text_features(self, ctx):
    ids, index = self.prompt.arrays()
    emb = jax.lax.stop_gradient(self.base.text_token_embeddings(ids))
    return pr.encode_prompts(self.base, emb, index, self.base.eot_positions(ids), ctx)

  def adapt_and_classify(self, image, boxes, ctx0, scale):
    """One image [H, W, 3]: the views, `steps` AdamW steps on the marginal entropy from ctx0, the logits [C]
    of the image itself under the adapted context."""
    views = jnp.concatenate([image[None], jax.vmap(lambda b: resized_crop(image, b))(boxes)])
    z = pr.image_embeddings(self.base, views)  # [V, E], frozen
    keep = max(1, int(self.keep * self.views))
    loss = lambda ctx: marginal_entropy(scale * z @ self.text_features(ctx).T, keep)  # noqa: E731
    opt = optax.adamw(self.lr, weight_decay=self.weight_decay)
    ctx, state = ctx0, opt.init(ctx0)
    for _ in range(self.steps):
      updates, state = opt.update(jax.grad(loss)(ctx), state, ctx)
      ctx = optax.apply_updates(ctx, updates)
    return scale * z[0] @ self.text_features(ctx).T

  def classify(self, images):
    """logits [B, C]: every image adapted on its own (vmap over the batch; the context reset per image)."""
    boxes = crop_boxes(jax.random.PRNGKey(self.seed), self.views - 1, images.shape[1], self.min_scale)
    ctx0, scale = self.initial_context(), jax.lax.stop_gradient(self.base.logit_scale())
    return jax.vmap(lambda x: self.adapt_and_classify(x, boxes, ctx0, scale))(images)

  def __call__(self, batch, *, train: bool = False):
    return {"logits": self.classify(batch["image"])}


def check(config) -> None:
  """Preflight of `config.method`: a phrase to start from, a shared context, views ≥ 2, 0 < keep ≤ 1, steps ≥ 1,
  lr ≥ 0, 0 < min_scale ≤ 1."""
  m = config.method
  if not str(m.get("init", "") or "") or bool(m.get("class_specific", False)):
    raise UserError("tpt tunes one shared context initialised from a phrase: set method.init (e.g. "
                    "'a photo of a') and method.class_specific=False")
  if int(m.get("views", 64)) < 2 or not 0 < float(m.get("keep", 0.1)) <= 1:
    raise UserError(f"tpt needs method.views >= 2 (got {m.get('views')}) and 0 < method.keep <= 1 "
                    f"(got {m.get('keep')})")
  if int(m.get("steps", 1)) < 1 or float(m.get("lr", 5e-3)) < 0 or not 0 < float(m.get("min_scale", 0.08)) <= 1:
    raise UserError("tpt needs method.steps >= 1, method.lr >= 0 and 0 < method.min_scale <= 1")


def build(cfg, *, base_model, base_config, tokenizer, class_names, templates, descriptions=None) -> Method:
  del base_config, templates, descriptions
  check(ml_collections.ConfigDict({"method": cfg}))
  opts = prompt_options(cfg, tokenizer, class_names)
  module = TPT(base_model, opts["prompt"], opts["init_phrase"], views=int(cfg.get("views", 64)),
               keep=float(cfg.get("keep", 0.1)), lr=float(cfg.get("lr", 5e-3)),
               weight_decay=float(cfg.get("weight_decay", 0.01)), steps=int(cfg.get("steps", 1)),
               min_scale=float(cfg.get("min_scale", 0.08)), seed=int(cfg.get("seed", 0)))
  return Method(module, zero_loss, pr.classify_fn)
