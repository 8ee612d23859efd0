"""CoCoOp: Conditional Context Optimization (Zhou, Yang, Loy & Liu 2022, "Conditional Prompt Learning for
Vision-Language Models", CVPR).

What is learned: CoOp's context v_1 … v_M and a meta-net h_θ = Linear(d → d/16) – ReLU – Linear(d/16 → D) from
the image feature to a bias added to every context vector; the base is frozen. With π = h_θ(x):

  v_m(x) = v_m + π,    t_c(x) = {v_1(x), …, v_M(x), c_c}                                 (CoCoOp eq. 2)
  p(y | x) = exp(cos(f(x), g(t_y(x))) / τ) / Σ_c exp(cos(f(x), g(t_c(x))) / τ)          (CoCoOp eq. 3)

f(x) here is the frozen, L2-normalised image embedding (the reference code feeds the normalised feature to the
meta-net too). Every image has its own C prompts, so the text tower runs B·C times per step. The reference code
loops over images (batch 1 on ImageNet still runs out of memory at ~64× CoOp). Here the B images are batched
and the classes chunked: `method.class_chunk` = K runs the text tower on B·K prompts at a time under a
rematerialised `nn.scan` over ⌈C/K⌉ chunks, so activation memory is bounded by B·K prompts (backward included)
instead of B·C; K = 0 encodes all classes at once. `benchmarks/cocoop_memory.py` measures it against CoOp.

With the meta-net's output layer at zero CoCoOp is CoOp exactly (a test checks it).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.transfer.methods import Method, coop
from vlm_jax.transfer.methods import prompting as pr


def _chunk_logits(mdl, carry, xs):
  """Logits [B, K] of one chunk of K classes: B·K spliced prompts through the frozen text tower."""
  z_img, ctx = carry                                       # [B, E], [B, M, D]
  emb, index, eot = xs                                     # [K, L, D], [K, L], [K]
  b, k = ctx.shape[0], emb.shape[0]
  prompts = jax.vmap(lambda v: pr.splice(emb, index, v))(ctx)            # [B, K, L, D]
  z = mdl.base.encode_text(embeddings=prompts.reshape(b * k, *emb.shape[1:]),
                           eot_positions=jnp.tile(eot, b), train=False).reshape(b, k, -1)
  return carry, jnp.einsum("be,bke->bk", z_img, z)


class CoCoOp(coop.CoOp):
  class_chunk: int = 0
  meta_hidden: int = 0   # 0: d // 16 (the paper's reduction)

  def setup(self):
    super().setup()
    self.meta_linear1 = nn.Dense(self.meta_hidden or max(self.base.embed_dim // 16, 1))
    self.meta_linear2 = nn.Dense(self.base.txt.width)

  def meta_net(self, z_img):
    """h_θ(f(x)) = Linear(d/16 → D)(ReLU(Linear(d → d/16)(f(x))))."""
    return self.meta_linear2(nn.relu(self.meta_linear1(z_img)))

  def classify(self, images):
    emb, index, eot = self.token_embeddings()
    ctx = self.context()                                            # [M, D]
    z_img = pr.image_embeddings(self.base, images)
    ctx = ctx[None] + self.meta_net(z_img)[:, None]     # [B, M, D]   (CoCoOp eq. 2)
    c = emb.shape[0]
    k = self.class_chunk if 0 < self.class_chunk < c else c
    n = -(-c // k)
    pad = n * k - c                                                    # repeat the last class, sliced off below
    take = lambda x: jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)]).reshape(n, k, *x.shape[1:])  # noqa: E731
    if n == 1:
      _, logits = _chunk_logits(self, (z_img, ctx), (emb, index, eot))
    else:
      scan = nn.scan(nn.remat(_chunk_logits), variable_broadcast="params", split_rngs={"params": False},
                     length=n, out_axes=1)
      _, logits = scan(self, (z_img, ctx), (take(emb), take(index), take(eot)))
      logits = logits.reshape(images.shape[0], n * k)[:, :c]
    return self.base.logit_scale() * logits


def build(cfg, *, base_model, base_config, tokenizer, class_names, templates, descriptions=None) -> Method:
  del base_config, templates, descriptions
  options = coop.prompt_options(cfg, tokenizer, class_names)
  if options["class_specific"]:
    from vlm_jax.errors import UserError  # noqa: PLC0415
    raise UserError("CoCoOp learns a unified context: set method.class_specific=False")
  module = CoCoOp(base_model, **options, class_chunk=int(cfg.get("class_chunk", 0)),
                  meta_hidden=int(cfg.get("meta_hidden", 0)))
  return Method(module, pr.ce_loss, pr.classify_fn)
