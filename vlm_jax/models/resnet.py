"""CLIP's ModifiedResNet image encoder (Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision", §2.4), as a Flax Linen module.

Architecture (the facts match OpenAI CLIP / open_clip, so PyTorch checkpoints convert one-to-one):
- stem: three 3x3 convs (stride 2 to width/2, then width/2, then width), each followed by BatchNorm + ReLU, then a
  2x2 average pool — overall stride 4;
- four stages of Bottleneck blocks (expansion 4, stage i has `width * 2**i` planes); all convs have stride 1 and a
  strided block average-pools (kernel = stride) before its last 1x1 conv ("anti-aliased" strided convolution,
  Zhang 2019); its shortcut is avgpool(stride) -> 1x1 conv -> BN. Overall stride 32, `embed_dim = 32 * width`;
- an attention-pool head (`AttentionPool2d`): the mean of the final feature map is the query of one multi-head
  attention over [mean; positions] (+ learned positional embedding), projected to `output_dim` by `c_proj`.
  `output_dim` is already CLIP's joint embedding size: the two-tower model needs no extra image projection.

Outputs: `{'pooled': [B, output_dim], 'tokens': [B, h*w, output_dim]}`. `tokens` are MaskCLIP dense features (Zhou
et al. 2022, "Extract Free Dense Labels from CLIP"): every final feature-map position passed through the
attention pool's value projection and then its output projection (`c_proj(v_proj(x))`), with no query-key
attention and no positional embedding, so they live in the same space as `pooled`. Row-major (h, w) order.
`stages=True` adds 'stages': the four stage outputs [C2, C3, C4, C5], NHWC feature maps at strides 4, 8, 16 and 32
with 4·width·2^i channels (the multi-scale features of a feature pyramid, Lin et al. 2017, for dense heads and
detectors).

BatchNorm and collections: variables are `{'params', 'batch_stats'}`. `params` holds conv kernels, BN scale/bias
and the attention pool; `batch_stats` holds every BN's running `mean`/`var` (PyTorch `running_mean`/`running_var`).
Two modes, chosen by `train_batch_stats`:
- True (pre-training from scratch; the `tiny` configs, as CLIP trained its ResNets): `train=True` normalises with
  the statistics of the batch and updates the running averages (PyTorch momentum 0.1); the caller passes
  `mutable=['batch_stats']` and gets `(outputs, {'batch_stats': …})` back. The training step does this for every
  non-`params` collection. Under `jit` with the batch sharded over the mesh, the batch mean and variance are
  cross-device reductions: the statistics are the global batch's (synchronised BatchNorm).
- False (the default; converted checkpoints, fine-tuning with frozen statistics): BN always normalises with the
  running statistics, also when `train=True`, so `model.apply({'params': p, 'batch_stats': s}, images)` is pure,
  checkpoint conversion is exact, and training learns only the BN scale/bias.
Evaluation (`train=False`) always uses the running statistics.

Initialisation: convs He-normal (fan-in), the last BN of every block has scale 0 (each block starts as identity),
attention projections normal(std = embed_dim ** -0.5), positional embedding normal(std = embed_dim ** -0.5),
biases 0 — as open_clip's `init_parameters`, except convs (open_clip keeps PyTorch's default uniform init).

Parameter names follow the PyTorch module names: `conv1..3`/`bn1..3` (stem), `layer{s}_{b}` (stage s, block b)
with `conv1..3`, `bn1..3`, `downsample_conv`, `downsample_bn`; `attnpool` with `positional_embedding`, `q_proj`,
`k_proj`, `v_proj` (kernels [embed, heads, head_dim]) and `c_proj` (kernel [heads, head_dim, output_dim]).
Logical axes: conv kernels (None, None, 'conv_in', 'conv_out'), BN scale/bias ('norm',), q/k/v ('embed', 'heads',
'kv'), c_proj ('heads', 'kv', 'embed'), positional embedding (None, 'embed'); `batch_stats` are unannotated
(replicated).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models import conv
from vlm_jax.errors import UserError

Dtype = Any

EXPANSION = 4  # Bottleneck output channels = planes * EXPANSION
BN_MOMENTUM = 0.9  # flax convention (decay of the running average) = PyTorch momentum 0.1
BN_EPSILON = 1e-5  # PyTorch BatchNorm2d default
HEAD_WIDTH = 64  # default attention-pool head width: heads = 32 * width // 64 (open_clip convention)

_CONV_AXES = (None, None, "conv_in", "conv_out")


def _conv(features: int, kernel: int, name: str, dtype: Dtype, param_dtype: Dtype, stride: int = 1) -> nn.Conv:
  """A bias-free k x k conv with PyTorch's symmetric padding k // 2 (flax 'SAME' pads asymmetrically)."""
  pad = kernel // 2
  return nn.Conv(
      features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)), use_bias=False,
      kernel_init=nn.with_logical_partitioning(nn.initializers.he_normal(), _CONV_AXES),
      dtype=dtype, param_dtype=param_dtype, conv_general_dilated=conv.conv_general_dilated, name=name)


def _bn(name: str, use_running_average: bool, dtype: Dtype, param_dtype: Dtype, zero_scale: bool = False):
  """BatchNorm with PyTorch's epsilon/momentum; scale/bias annotated ('norm',)."""
  scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
  return nn.BatchNorm(
      use_running_average=use_running_average, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
      scale_init=nn.with_logical_partitioning(scale_init, ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
      dtype=dtype, param_dtype=param_dtype, name=name)


def _avg_pool(x: jax.Array, k: int) -> jax.Array:
  """k x k average pool with stride k, flooring odd sizes (PyTorch `AvgPool2d(k)`)."""
  return nn.avg_pool(x, (k, k), strides=(k, k), padding="VALID")


def _constrain(x: jax.Array) -> jax.Array:
  """Activation sharding at stage boundaries: batch over the data axes (no-op without logical rules)."""
  names = ("act_batch", None, None, "act_embed") if x.ndim == 4 else ("act_batch", "act_len", "act_embed")
  return nn.with_logical_constraint(x, names)


def resize_positional_embedding(pos: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """Resizes a [1 + g*g, C] attention-pool positional embedding to a [1 + h*w, C] one for grid (h, w).

  The first (mean-token) row is kept; the g x g spatial rows are resized bicubically without antialiasing in
  float32 (as open_clip's `resize_pos_embed`, up to the bicubic kernel constant). Identity when the grid matches.
  """
  n, c = pos.shape
  g = int(round((n - 1) ** 0.5))
  if g * g != n - 1:
    raise ValueError(f"positional embedding of {n} rows is not 1 + a square grid")
  if (g, g) == tuple(grid):
    return pos
  spatial = pos[1:].astype(jnp.float32).reshape(g, g, c)
  spatial = jax.image.resize(spatial, (grid[0], grid[1], c), method="bicubic", antialias=False)
  return jnp.concatenate([pos[:1], spatial.reshape(grid[0] * grid[1], c).astype(pos.dtype)], axis=0)


class Bottleneck(nn.Module):
  """CLIP's anti-aliased ResNet bottleneck (Radford et al. 2021; He et al. 2016; Zhang 2019).

  1x1 conv -> BN -> ReLU -> 3x3 conv -> BN -> ReLU -> avgpool(stride) -> 1x1 conv (x4 channels) -> BN, plus the
  shortcut (identity, or avgpool(stride) -> 1x1 conv -> BN when the stride or channel count changes), then ReLU.
  """
  planes: int
  stride: int = 1
  use_running_average: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out_ch = self.planes * EXPANSION
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ura = self.use_running_average
    y = nn.relu(_bn("bn1", ura, **kw)(_conv(self.planes, 1, "conv1", **kw)(x)))
    y = nn.relu(_bn("bn2", ura, **kw)(_conv(self.planes, 3, "conv2", **kw)(y)))
    if self.stride > 1:
      y = _avg_pool(y, self.stride)
    y = _bn("bn3", ura, zero_scale=True, **kw)(_conv(out_ch, 1, "conv3", **kw)(y))
    shortcut = x
    if self.stride > 1 or x.shape[-1] != out_ch:
      if self.stride > 1:
        shortcut = _avg_pool(shortcut, self.stride)
      shortcut = _conv(out_ch, 1, "downsample_conv", **kw)(shortcut)
      shortcut = _bn("downsample_bn", ura, **kw)(shortcut)
    return nn.relu(y + shortcut)


class _Projection(nn.Module):
  """Affine map contracting the last `n_in` input axes: kernel [*in, *out] ~ N(0, std^2), bias [*out] = 0.

  Used instead of `nn.DenseGeneral`, whose flat-then-reshape initialiser breaks logically partitioned
  multi-axis kernels when a global mesh is set (flax 0.12 unboxes the 2-D flat value with 3-D axis names).
  """
  out_shape: tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  std: float
  n_in: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_shape = x.shape[x.ndim - self.n_in:]
    kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(self.std), self.kernel_axes),
                        in_shape + tuple(self.out_shape), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes[self.n_in:]),
                      tuple(self.out_shape), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
    return jax.lax.dot_general(x, kernel, (contract, ((), ()))) + bias


class AttentionPool2d(nn.Module):
  """CLIP's attention pooling over a feature map (Radford et al. 2021, §2.4).

  Flatten [B, h, w, C] -> prepend the spatial mean -> add the learned positional embedding (resized when (h, w)
  differs from `grid`) -> one multi-head attention whose only query is the mean token, keys/values all h*w + 1
  tokens; q/k/v/c projections have biases. Returns (pooled [B, output_dim], tokens [B, h*w, output_dim]) with
  tokens = c_proj(v_proj(x)) per position (MaskCLIP, Zhou et al. 2022).
  """
  grid: int
  heads: int
  output_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, feats: jax.Array) -> tuple[jax.Array, jax.Array]:
    b, h, w, c = feats.shape
    if c % self.heads:
      raise ValueError(f"embed dim {c} is not divisible by {self.heads} heads")
    head_dim = c // self.heads
    std = c ** -0.5
    pos = self.param("positional_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(std), (None, "embed")), (self.grid * self.grid + 1, c), self.param_dtype)
    pos = resize_positional_embedding(pos, (h, w))

    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = feats.reshape(b, h * w, c).astype(self.dtype)
    seq = jnp.concatenate([jnp.mean(x, axis=1, keepdims=True), x], axis=1) + pos.astype(self.dtype)[None]

    def proj(name):
      return _Projection((self.heads, head_dim), ("embed", "heads", "kv"), std, name=name, **kw)

    q = proj("q_proj")(seq[:, 0])  # [B, heads, head_dim]: the mean token is the only query
    k = proj("k_proj")(seq)  # [B, L, heads, head_dim]
    v_proj = proj("v_proj")
    v = v_proj(seq)
    logits = jnp.einsum("bhd,blhd->bhl", q, k, preferred_element_type=jnp.float32) * head_dim ** -0.5
    attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhl,blhd->bhd", attn, v)

    c_proj = _Projection((self.output_dim,), ("heads", "kv", "embed"), std, n_in=2, name="c_proj", **kw)
    pooled = c_proj(out)
    tokens = c_proj(v_proj(x))  # MaskCLIP dense features: value path only, no positional embedding
    return pooled, tokens


class ModifiedResNet(nn.Module):
  """CLIP's ModifiedResNet image tower (Radford et al. 2021, §2.4); see the module docstring.

  Attributes:
    layers: Bottleneck blocks per stage, e.g. RN50 (3, 4, 6, 3), RN101 (3, 4, 23, 3), RN50x4 (4, 6, 10, 6).
    width: stem / first-stage width (64 for RN50/RN101, 80 for RN50x4); the trunk ends at 32 * width channels.
    heads: attention-pool heads (CLIP: 32 * width // 64).
    output_dim: attention-pool output size = CLIP's joint embedding size (1024 for RN50, 512 RN101, 640 RN50x4).
    image_size: training resolution; sets the positional-embedding grid (image_size // 32). Other input sizes
      work: the embedding is resized to the actual grid.
    train_batch_stats: if True, `train=True` uses batch statistics and updates `batch_stats` (pass
      `mutable=['batch_stats']`); if False (default) BN always uses the stored running statistics.
    remat: rematerialise each Bottleneck in the backward pass (activation memory for compute).
  """
  layers: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  heads: int = 32
  output_dim: int = 1024
  image_size: int = 224
  train_batch_stats: bool = False
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def embed_dim(self) -> int:
    """Channels of the final feature map (attention-pool width)."""
    return self.width * 8 * EXPANSION

  @classmethod
  def from_variant(cls, name: str, **overrides) -> ModifiedResNet:
    """Builds the tower for a named variant ('RN50', 'RN101', 'RN50x4', 'tiny', …) plus field overrides.

    Shapes come from `vlm_jax.models.variants.resnet_variant(name)`: a dict with 'layers', 'width',
    'output_dim', 'image_size' and optionally 'heads' (default 32 * width // 64). Any dataclass field may be
    overridden (dtype, remat, image_size, …).
    """
    from vlm_jax.models import variants  # local: variants imports nothing from here, keep it that way

    spec = dict(variants.resnet_variant(name))
    spec.update(overrides)
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    unknown = sorted(set(spec) - fields)
    if unknown:
      raise UserError(f"unknown ModifiedResNet options {unknown} for variant {name!r}; known: {sorted(fields)}")
    spec["layers"] = tuple(int(n) for n in spec["layers"])
    spec.setdefault("heads", spec["width"] * 8 * EXPANSION // HEAD_WIDTH)
    if (spec["width"] * 8 * EXPANSION) % spec["heads"]:
      raise UserError(f"ResNet width {spec['width']} (embed {spec['width'] * 32}) is not divisible into "
                      f"{spec['heads']} heads")
    return cls(**spec)

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False, dense: bool = False,
               stages: bool = False) -> dict:
    """images [B, H, W, 3] (normalised, H and W multiples of 32) -> {'pooled', 'tokens'} (+ 'stages').

    `dense` is accepted for interface parity with `ViT`: `tokens` are always MaskCLIP dense features.
    `stages=True` adds 'stages': [C2, C3, C4, C5], the output of each stage's last block (module docstring).
    """
    del dense
    if len(self.layers) != 4:
      raise ValueError(f"ModifiedResNet has 4 stages, got layers={tuple(self.layers)}")
    ura = not (train and self.train_batch_stats)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = _constrain(images.astype(self.dtype))
    stem = ((self.width // 2, 2), (self.width // 2, 1), (self.width, 1))
    for i, (ch, stride) in enumerate(stem, start=1):
      x = _conv(ch, 3, f"conv{i}", stride=stride, **kw)(x)
      x = nn.relu(_bn(f"bn{i}", ura, **kw)(x))
    x = _constrain(_avg_pool(x, 2))

    block_cls = nn.remat(Bottleneck) if self.remat else Bottleneck
    maps = []
    for s, n_blocks in enumerate(self.layers):
      for j in range(n_blocks):
        stride = 2 if (s > 0 and j == 0) else 1
        x = block_cls(self.width * 2 ** s, stride, ura, name=f"layer{s + 1}_{j}", **kw)(x)
      x = _constrain(x)
      maps.append(x)

    pooled, tokens = AttentionPool2d(self.image_size // 32, self.heads, self.output_dim, name="attnpool", **kw)(x)
    out = {"pooled": pooled, "tokens": _constrain(tokens)}
    if stages:
      out["stages"] = maps
    return out
