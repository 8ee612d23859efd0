"""CLIPSeg (Lüddecke & Ecker 2022, "Image Segmentation Using Text and Image Prompts", §3): a light transformer
decoder over a frozen CLIP ViT's intermediate activations, conditioned on a query embedding by FiLM, producing one
binary mask per (image, query).

    a_k = ViT block-k patch tokens, k ∈ layers (e.g. three chosen blocks), read deepest first: k_1 > k_2 > …
    x_1 = W_1 a_{k_1};  x_1 ← γ(q) ⊙ x_1 + β(q)     FiLM (Perez et al. 2018): γ(q) = W_γ q, β(q) = W_β q
    x_1 ← Block_1(x_1);   x_j = Block_j(W_j a_{k_j} + x_{j−1})   (j ≥ 2; W_j: D_vit → d "reduce" projections)
    m(x, q) = ConvTranspose_{p×p, stride p}(grid(x_last)) ∈ R^{H×W}     (p: the ViT's patch size; a mask logit)

q is a text embedding t_c of the class name in the teacher's joint space (the 'constants' class embeddings) — the
paper's text prompts — or any other conditional vector in that space given per query as batch['conditions']
[B, K, E]: the teacher's image embedding of a visual prompt, or an interpolation a·v + (1 − a)·t_c (§3;
`vlm_jax.distill.visual_prompts`). Without 'conditions' the class ids of batch['queries'] pick the text embeddings.
The ViT runs once per image; its activations are broadcast over the image's queries, so a query's mask depends only on (image, query)
— never on the other rows or queries of the batch (tested).

`__call__(batch)` with batch['image'] [B, H, W, 3] and batch['queries'] int [B, K] (class ids) →
{'mask_logits' [B, K, H', W']} (H' = grid · p). `segment(images)` → semantic logits [B, H', W', 1 + C] over
background + the test classes for the shared evaluator: class c's logit is m(x, t_c), background's is the constant
logit(θ) (θ = `threshold`, 0.5 by default: a pixel is background unless some query's mask probability exceeds θ),
classes outside `test_mask` get −1e9; the argmax is then the most confident query above θ.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.errors import UserError
from vlm_jax.models.transformer import Block

Dtype = Any
NEG = -1e9


class FiLM(nn.Module):
  """Feature-wise linear modulation (Perez et al. 2018): x ↦ (W_γ q) ⊙ x + W_β q, per query q [R, E] over x [R, N, d]."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, q: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gamma = nn.Dense(self.features, name="mul", **kw)(q)
    beta = nn.Dense(self.features, name="add", **kw)(q)
    return gamma[:, None, :] * x + beta[:, None, :]


class CLIPSegDecoder(nn.Module):
  """The decoder of the module docstring over activations [R, N, D] (one per chosen layer, deepest first)."""
  reduce_dim: int = 64
  num_heads: int = 4
  mlp_dim: int = 128
  patch_size: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, activations: Sequence[jax.Array], q: jax.Array, grid: tuple[int, int]) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = None
    for j, a in enumerate(activations):
      r = nn.Dense(self.reduce_dim, name=f"reduce{j}", **kw)(a)
      x = r if x is None else x + r
      if j == 0:
        x = FiLM(self.reduce_dim, name="film", **kw)(x, q)
      x, _ = Block(self.num_heads, self.mlp_dim, name=f"block{j}", **kw)(x)
    r, (gh, gw), p = x.shape[0], grid, self.patch_size
    x = x.reshape(r, gh, gw, self.reduce_dim)
    y = nn.ConvTranspose(1, (p, p), strides=(p, p), padding="VALID", name="trans_conv", **kw)(x)
    return y[..., 0].astype(jnp.float32)


class CLIPSeg(nn.Module):
  """Frozen ViT backbone (its blocks `layers`) + `CLIPSegDecoder`; queries are class ids into the constants."""
  backbone: nn.Module
  decoder: CLIPSegDecoder
  layers: tuple[int, ...]
  num_classes: int
  embed_dim: int
  threshold: float = 0.5

  def setup(self):
    c, e = self.num_classes, self.embed_dim
    self.class_embeddings = self.variable("constants", "class_embeddings", lambda: jnp.zeros((c, e), jnp.float32))
    self.train_mask = self.variable("constants", "train_mask", lambda: jnp.ones((c,), bool))
    self.test_mask = self.variable("constants", "test_mask", lambda: jnp.ones((c,), bool))

  def activations(self, images: jax.Array, *, train: bool = False) -> tuple[list[jax.Array], tuple[int, int]]:
    """The chosen blocks' patch tokens, deepest first, and the patch grid."""
    order = sorted(self.layers, key=lambda k: k % self.backbone.depth, reverse=True)
    enc = self.backbone(images, train=train, intermediates=tuple(order))
    return list(enc["intermediates"]), self.backbone.grid_size(images.shape[1:3])

  def masks(self, activations, grid, cond: jax.Array) -> jax.Array:
    """Mask logits [B, K, H', W'] of every image's K query embeddings cond [B, K, E]."""
    b, k = cond.shape[:2]
    rows = [jnp.broadcast_to(a[:, None], (b, k) + a.shape[1:]).reshape((b * k,) + a.shape[1:])
            for a in activations]
    q = cond.reshape(b * k, cond.shape[-1]).astype(jnp.float32)
    out = self.decoder(rows, q, grid)
    return out.reshape((b, k) + out.shape[1:])

  def query_embeddings(self, ids: jax.Array) -> jax.Array:
    t = self.class_embeddings.value
    return (t / jnp.linalg.norm(t, axis=-1, keepdims=True).clip(1e-6))[ids]

  def __call__(self, batch: Mapping, *, train: bool = False) -> dict:
    acts, grid = self.activations(batch["image"], train=train)
    if "conditions" in batch:  # conditional vectors given per query (visual prompts, interpolations)
      return {"mask_logits": self.masks(acts, grid, batch["conditions"])}
    return {"mask_logits": self.masks(acts, grid, self.query_embeddings(batch["queries"].astype(jnp.int32)))}

  def segment(self, images: jax.Array) -> jax.Array:
    """[B, H', W', 1 + C]: background logit(θ), then every class's mask logit (−1e9 outside `test_mask`)."""
    acts, grid = self.activations(images)
    b, c = images.shape[0], self.num_classes
    ids = jnp.broadcast_to(jnp.arange(c)[None], (b, c))
    m = jnp.moveaxis(self.masks(acts, grid, self.query_embeddings(ids)), 1, -1)
    m = jnp.where(self.test_mask.value, m, NEG)
    bg = jnp.full(m.shape[:-1] + (1,), math.log(self.threshold / (1 - self.threshold)), m.dtype)
    return jnp.concatenate([bg, m], axis=-1)


def build(cfg: Mapping[str, Any]) -> CLIPSeg:
  """`CLIPSeg` from a model config: image (a ViT encoder dict), layers (block indices, negative from the end),
  reduce_dim, num_heads, mlp_dim, embed_dim, num_classes, threshold θ, dtype / param_dtype."""
  from vlm_jax import models  # noqa: PLC0415

  cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  cfg.pop("framework", None)
  known = {"image", "layers", "reduce_dim", "num_heads", "mlp_dim", "embed_dim", "num_classes", "threshold",
           "dtype", "param_dtype", "scan", "remat", "temperature"}
  unknown = sorted(set(cfg) - known)
  if unknown:
    raise UserError(f"unknown CLIPSeg option(s) {unknown}; valid: {sorted(known)}")
  image_cfg = models._plain(cfg["image"])
  if image_cfg.get("kind") != "vit":
    raise UserError(f"CLIPSeg decodes a ViT's intermediate activations; the image tower is {image_cfg.get('kind')!r}")
  theta = float(cfg.get("threshold", 0.5))
  if not 0.0 < theta < 1.0:
    raise UserError(f"CLIPSeg threshold must be in (0, 1), got {theta}")
  defaults = models.common_defaults(cfg)
  backbone = models.build_encoder(image_cfg, defaults, models.IMAGE_KINDS)
  layers = tuple(int(k) for k in cfg.get("layers", (-1,)))
  depth = int(backbone.depth)
  bad = [k for k in layers if not -depth <= k < depth]
  if not layers or bad or len({k % depth for k in layers}) != len(layers):
    raise UserError(f"CLIPSeg layers must be distinct block indices of the {depth}-block ViT, got {list(layers)}")
  decoder = CLIPSegDecoder(int(cfg.get("reduce_dim", 64)), int(cfg.get("num_heads", 4)), int(cfg.get("mlp_dim", 128)),
                           int(backbone.patch_size), dtype=defaults["dtype"], param_dtype=defaults["param_dtype"])
  return CLIPSeg(backbone=backbone, decoder=decoder, layers=layers, num_classes=int(cfg["num_classes"]),
                 embed_dim=int(cfg.get("embed_dim", 512)), threshold=theta)
