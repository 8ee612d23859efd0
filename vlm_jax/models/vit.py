"""Vision Transformer image encoder (Dosovitskiy et al. 2021), big_vision flavoured, returning {'pooled','tokens'}.

Patch (or convolutional) stem -> position embeddings (learned, bilinearly resized to the input grid at call
time, or fixed 2-D sin-cos) -> optional [CLS] token and prompt tokens -> pre-LN transformer with final
LayerNorm -> pooling ('cls', 'gap', or 'map' attention pooling). Supports FLIP patch dropping (Li et al. 2023)
through `keep_idx` (gather: only visible patches are encoded) or `keep_mask` (attention masking: same result
for the kept tokens, full compute), and VPT/MaPLe prompt tokens (Jia et al. 2022; Khattak et al. 2023).
`intermediates=(i, j, …)` also returns the patch tokens after the chosen blocks, for dense heads and detectors
(ViTDet, Li et al. 2022; DPT, Ranftl et al. 2021); the patch indices for `keep_idx` come from
`models.masking.random_keep_indices`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.errors import UserError
from vlm_jax.models.transformer import Attention, Encoder, Mlp, layer_norm

Dtype = Any
POOL_TYPES = ("cls", "gap", "map")
POSEMB_TYPES = ("learn", "sincos2d")
STEMS = ("patch", "conv")


def _pair(x) -> tuple[int, int]:
  if isinstance(x, int):
    return (x, x)
  a, b = x
  return (int(a), int(b))


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000., dtype=jnp.float32):
  """Fixed 2-D sin-cos position embedding [1, h*w, width] (MoCo v3, Chen et al. 2021; big_vision)."""
  if width % 4:
    raise UserError(f"sincos2d position embedding needs width divisible by 4, got {width}")
  y, x = jnp.mgrid[:h, :w]
  quarter = width // 4
  omega = 1. / temperature ** (jnp.arange(quarter) / max(quarter - 1, 1))
  y = y.reshape(-1)[:, None] * omega[None]
  x = x.reshape(-1)[:, None] * omega[None]
  pe = jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)
  return pe[None].astype(dtype)


def resize_posemb(table: jax.Array, old_grid: Sequence[int], new_grid: Sequence[int]) -> jax.Array:
  """Bilinearly resizes a [1, gh*gw, D] position-embedding table to another patch grid.

  The "high-resolution fine-tuning" trick of Dosovitskiy et al. 2021 (Sec. 3.2) and Touvron et al. 2019;
  identity when the grids agree. `jax.image.resize` with antialiasing when shrinking.
  """
  old_grid, new_grid = _pair(tuple(old_grid)), _pair(tuple(new_grid))
  if old_grid == new_grid:
    return table
  d = table.shape[-1]
  grid = table.reshape(old_grid + (d,))
  grid = jax.image.resize(grid.astype(jnp.float32), new_grid + (d,), method="bilinear")
  return grid.reshape(1, new_grid[0] * new_grid[1], d).astype(table.dtype)


class ConvStem(nn.Module):
  """Convolutional stem of Xiao et al. 2021 ("Early convolutions help transformers see better").

  log2(patch) 3x3 stride-2 convolutions (channels doubling, ending at width/2) each followed by a norm and
  ReLU, then a 1x1 convolution to the model width: the same downsampling as a patch stem. Deviation: the
  paper uses BatchNorm; LayerNorm over channels is used here so the model stays stateless (params only).
  """
  width: int
  patch_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = int(round(math.log2(self.patch_size)))
    if 2 ** k != self.patch_size:
      raise UserError(f"stem='conv' needs a power-of-two patch size, got {self.patch_size}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(k):
      ch = max(self.width // 2 ** (k - i), 8)
      x = nn.Conv(ch, (3, 3), strides=(2, 2), padding="SAME", use_bias=False, name=f"conv_{i}", **kw,
                  kernel_init=nn.with_logical_partitioning(
                      nn.initializers.he_normal(), (None, None, "conv_in", "conv_out")))(x)
      x = nn.relu(layer_norm(name=f"norm_{i}", **kw)(x))
    return nn.Conv(self.width, (1, 1), name="proj", **kw,
                   kernel_init=nn.with_logical_partitioning(
                       nn.initializers.lecun_normal(), (None, None, "conv_in", "embed")),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(x)


class MAPHead(nn.Module):
  """Multi-head attention pooling (Zhai et al. 2022, "Scaling Vision Transformers"; big_vision MAPHead).

  A learned probe attends over the tokens, followed by a residual MLP: pooled = y + MLP(LN(y)),
  y = Attn(probe, x). `mask` [B, N] (True = keep) excludes tokens from the attention.
  `dense=True` returns per-token features [B, N, D] through the head's value path instead (MaskCLIP, Zhou et
  al. 2022, applied to attention pooling as for CLIP's ResNet): y_i = out(v(x_i)), then y_i + MLP(LN(y_i)).
  The layout (probe; q/k/v/out projections with biases; LN; MLP) holds SigLIP's pooling heads exactly: Hugging
  Face's `nn.MultiheadAttention` (packed in_proj split into q/k/v) and timm's `AttentionPoolLatent` (q, packed
  kv, proj). `norm_eps` is the LayerNorm epsilon.
  """
  num_heads: int
  mlp_dim: int
  act: str = "gelu"
  norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, dense: bool = False):
    b, n, d = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    probe = self.param("probe", nn.with_logical_partitioning(nn.initializers.xavier_uniform(),
                                                             (None, None, "embed")),
                       (1, 1, d), self.param_dtype)
    if dense:  # every token is its own query and attends only to itself: the value path
      q, attn_mask = x, jnp.eye(n, dtype=bool)[None, None]
    else:
      q = jnp.broadcast_to(probe.astype(x.dtype), (b, 1, d))
      attn_mask = None if mask is None else mask[:, None, None, :]
    y = Attention(self.num_heads, name="attn", **kw)(q, x, mask=attn_mask)
    y = y + Mlp(self.mlp_dim, self.act, name="mlp", **kw)(layer_norm(name="ln", eps=self.norm_eps, **kw)(y))
    return y if dense else y[:, 0]


class ViT(nn.Module):
  """Vision Transformer (Dosovitskiy et al. 2021) returning {'pooled': [B, D], 'tokens': [B, N, D]}.

  `tokens` are the patch tokens after the final LayerNorm (no [CLS], no prompt tokens); with `keep_idx` they
  are the K kept patches in the given order. `image_size` fixes the learned position-table grid
  (image_size // patch_size); other input resolutions resize the table bilinearly at call time (parameters
  keep their shape). By default the [CLS] token gets no position embedding (big_vision convention);
  `cls_posemb=True` gives it a learned one of its own (param `cls_pos_embedding` [1, 1, D], added to `cls`), as
  OpenAI CLIP's ViT (Radford et al. 2021), whose position table's first row belongs to the class token; this keeps
  converted checkpoints exact both ways. `pre_norm` adds CLIP's LayerNorm before the transformer (Radford et al.
  2021). `norm_eps` is the epsilon of every LayerNorm (1e-6 in SigLIP checkpoints, Zhai et al. 2023).

  `dense=True` returns MaskCLIP dense features (Zhou et al. 2022, "Extract Free Dense Labels from CLIP") as
  `tokens`: with 'cls' or 'gap' pooling the last block runs with the value path only (each token attends to
  itself: x_i + out(v(LN(x_i))), then the residual MLP), followed by the final LayerNorm, as MaskCLIP's ViT;
  with 'map' pooling the transformer is unchanged and the tokens go through the MAP head's value path (the
  attention-pool recipe MaskCLIP uses for CLIP's ResNet). In dense mode `pooled` is the pooling of the
  modified network ('map': the usual pooled output); use `dense=False` for the global embedding.

  `intermediates` (block indices; negative count from the end, -1 = the last block) adds the output key
  'intermediates': a list, in the order given, of [B, N, D] patch tokens right after each chosen block (the
  residual stream before the final LayerNorm; no [CLS], no prompt tokens; with `keep_idx`, the kept patches).
  Works unrolled and scanned (`scan=True` stacks every block's output and reads the chosen ones).
  """
  width: int = 768
  depth: int = 12
  mlp_dim: int = 3072
  num_heads: int = 12
  patch_size: int = 16
  image_size: Any = 224
  posemb: str = "learn"
  pool_type: str = "gap"
  stem: str = "patch"
  patch_bias: bool = True
  pre_norm: bool = False
  cls_posemb: bool = False
  act: str = "gelu"
  norm_eps: float = 1e-5
  dropout: float = 0.0
  scan: bool = False
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "xla"        # 'xla' | 'cudnn' (transformer.attention_implementation)

  def grid_size(self, image_hw: Sequence[int]) -> tuple[int, int]:
    """Patch grid (gh, gw) for an input of spatial size (H, W)."""
    p = self.patch_size
    if self.stem == "conv":
      h, w = image_hw
      for _ in range(int(round(math.log2(p)))):
        h, w = -(-h // 2), -(-w // 2)
      return (h, w)
    return (image_hw[0] // p, image_hw[1] // p)

  def num_patches(self, image_shape: Sequence[int]) -> int:
    """Number of patch tokens for an image batch of shape [B, H, W, C]."""
    gh, gw = self.grid_size(image_shape[1:3])
    return gh * gw

  def _check(self):
    for name, value, valid in (("pool_type", self.pool_type, POOL_TYPES), ("posemb", self.posemb, POSEMB_TYPES),
                               ("stem", self.stem, STEMS)):
      if value not in valid:
        raise UserError(f"unknown ViT {name} {value!r}; valid choices: {', '.join(valid)}")
    if self.cls_posemb and self.pool_type != "cls":
      raise UserError(f"cls_posemb=True needs pool_type='cls', got {self.pool_type!r}")

  @nn.compact
  def __call__(self, images, *, keep_idx=None, keep_mask=None, prompts=None, train: bool = False,
               dense: bool = False, intermediates: Sequence[int] | None = None):
    """images [B, H, W, C]; keep_idx int [B, K] or keep_mask bool [B, N]; prompts [n, (B,) P, D];
    intermediates: block indices whose patch tokens to return (class docstring)."""
    self._check()
    if keep_idx is not None and keep_mask is not None:
      raise ValueError("give keep_idx or keep_mask, not both")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = images.astype(self.dtype)
    if self.stem == "conv":
      x = ConvStem(self.width, self.patch_size, name="stem", **kw)(x)
    else:
      p = self.patch_size
      x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", use_bias=self.patch_bias,
                  name="embedding", **kw,
                  kernel_init=nn.with_logical_partitioning(
                      nn.initializers.lecun_normal(), (None, None, "conv_in", "embed")),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(x)
    b, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d)

    if self.posemb == "learn":
      init_grid = self.grid_size(_pair(self.image_size))
      table = self.param("pos_embedding", nn.with_logical_partitioning(
          nn.initializers.normal(stddev=1 / math.sqrt(d)), (None, None, "embed")),
                         (1, init_grid[0] * init_grid[1], d), self.param_dtype)
      pe = resize_posemb(table, init_grid, (gh, gw))
    else:
      pe = posemb_sincos_2d(gh, gw, d)
    x = x + pe.astype(x.dtype)

    if keep_idx is not None:  # FLIP: encode only the visible patches
      x = jnp.take_along_axis(x, keep_idx[..., None].astype(jnp.int32), axis=1)
    n = x.shape[1]
    front = []
    if self.pool_type == "cls":
      cls = self.param("cls", nn.with_logical_partitioning(nn.initializers.zeros, (None, None, "embed")),
                       (1, 1, d), self.param_dtype)
      cls = cls.astype(x.dtype)
      if self.cls_posemb:
        cls = cls + self.param("cls_pos_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(stddev=1 / math.sqrt(d)), (None, None, "embed")),
                               (1, 1, d), self.param_dtype).astype(x.dtype)
      front.append(jnp.broadcast_to(cls, (b, 1, d)))
    start = len(front)
    if prompts is not None:
      if prompts.ndim == 3:
        prompts = prompts[:, None]
      front.append(jnp.broadcast_to(prompts[0].astype(x.dtype), (b, prompts.shape[-2], d)))
    x = jnp.concatenate(front + [x], axis=1) if front else x
    n_front = x.shape[1] - n
    if self.pre_norm:
      x = layer_norm(name="ln_pre", eps=self.norm_eps, **kw)(x)

    mask = None
    if keep_mask is not None:
      keys = jnp.concatenate([jnp.ones((b, n_front), bool), keep_mask.astype(bool)], axis=1)
      mask = keys[:, None, None, :]
    x = Encoder(depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim, act=self.act,
                norm_eps=self.norm_eps, dropout=self.dropout, prompt_start=start, scan=self.scan,
                remat=self.remat, attention=self.attention, name="Transformer", **kw)(x, mask, prompts, train=train,
                                          dense=dense and self.pool_type != "map", intermediates=intermediates)
    if intermediates is not None:
      x, hidden = x
    tokens = x[:, n_front:]

    if self.pool_type == "cls":
      pooled = x[:, 0]
    elif self.pool_type == "gap":
      if keep_mask is None:
        pooled = tokens.mean(axis=1)
      else:
        w = keep_mask.astype(tokens.dtype)[..., None]
        pooled = (tokens * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1.)
    else:
      head = MAPHead(self.num_heads, self.mlp_dim, self.act, self.norm_eps, name="MAPHead", **kw)
      pooled = head(tokens, keep_mask)
      if dense:
        tokens = head(tokens, dense=True)
    out = {"pooled": pooled, "tokens": tokens}
    if intermediates is not None:
      out["intermediates"] = [h[:, n_front:] for h in hidden]
    return out
