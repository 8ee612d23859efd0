"""Feature pyramids for the detector: FPN over ResNet stages, ViTDet's simple pyramid over a plain ViT.

FPN (Lin et al. 2017, "Feature Pyramid Networks for Object Detection", arXiv 1612.03144, §3, Fig. 3): lateral 1×1
convs bring C2..C5 to `out_channels`; the top-down path adds the nearest-neighbour 2× upsampled coarser map,
P_l = conv3×3(lateral(C_l) + up2(M_{l+1})); P6 = max-pool(P5, kernel 1, stride 2) (the RPN's extra level, §4.1).
Returns [P2, P3, P4, P5, P6] at strides 4 … 64 for a stride-32 backbone.

Simple feature pyramid (Li et al. 2022, "Exploring Plain Vision Transformer Backbones for Object Detection"
(ViTDet), arXiv 2203.16527, §3, Fig. 2c): only the last ViT feature map (stride p = patch size) is used; scales
4, 2, 1, ½ come from two 2×2 stride-2 deconvolutions (LayerNorm + GELU between them), one deconvolution, identity,
and 2×2 max-pooling; each then passes a 1×1 conv + LayerNorm and a 3×3 conv + LayerNorm (the paper's "norm"
convs). Returns [P2, P3, P4, P5] at strides p/4, p/2, p, 2p (`top_pool=True` adds P6 = max-pool(P5) as ViTDet's
RPN uses). Odd-sized maps are handled: upsampled maps are cropped to the lateral's size (FPN), pooling floors.

Parameters carry logical axes like the backbones (conv kernels (None, None, 'conv_in', 'conv_out'), norms
('norm',)); maps are constrained ('act_batch', None, None, 'act_embed') so the batch stays data-sharded.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
_CONV_AXES = (None, None, "conv_in", "conv_out")


def constrain_map(x: jax.Array) -> jax.Array:
  """NHWC feature map sharded over the batch (no-op without logical rules)."""
  return nn.with_logical_constraint(x, ("act_batch", None, None, "act_embed"))


def conv(features: int, kernel: int, name: str, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
         use_bias: bool = True, std: float | None = None) -> nn.Conv:
  """k×k stride-1 conv with symmetric padding k // 2; He (fan-in, uniform as Detectron2's c2_xavier) init or
  normal(std)."""
  init = nn.initializers.normal(std) if std else nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), use_bias=use_bias,
                 kernel_init=nn.with_logical_partitioning(init, _CONV_AXES),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                 dtype=dtype, param_dtype=param_dtype, name=name)


def _up2(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
  """Nearest-neighbour 2× upsampling cropped to hw."""
  x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  return x[:, :hw[0], :hw[1]]


def max_pool2(x: jax.Array, kernel: int = 1) -> jax.Array:
  """Stride-2 max-pool (kernel 1: FPN's P6 subsampling; kernel 2: ViTDet's ½ scale)."""
  return nn.max_pool(x, (kernel, kernel), strides=(2, 2), padding="VALID")


class FPN(nn.Module):
  """Feature Pyramid Network over [C2, C3, C4, C5] -> [P2, …, P6] (module docstring; Lin et al. 2017)."""
  out_channels: int = 256
  top_pool: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, stages: Sequence[jax.Array]) -> list[jax.Array]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    laterals = [conv(self.out_channels, 1, f"lateral{i + 2}", **kw)(c.astype(self.dtype))
                for i, c in enumerate(stages)]
    merged = [laterals[-1]]
    for lat in reversed(laterals[:-1]):
      merged.insert(0, lat + _up2(merged[0], lat.shape[1:3]))
    outs = [constrain_map(conv(self.out_channels, 3, f"output{i + 2}", **kw)(m)) for i, m in enumerate(merged)]
    if self.top_pool:
      outs.append(max_pool2(outs[-1]))
    return outs


class _ConvNorm(nn.Module):
  """conv (no bias) + LayerNorm over channels (ViTDet's norm convs)."""
  features: int
  kernel: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = conv(self.features, self.kernel, "conv", self.dtype, self.param_dtype, use_bias=False)(x)
    return nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype, name="norm",
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))(x)


class SimpleFeaturePyramid(nn.Module):
  """ViTDet's simple feature pyramid from one stride-p map [B, h, w, D] -> [P2, P3, P4, P5] (+ P6) (module
  docstring; Li et al. 2022)."""
  out_channels: int = 256
  scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5)
  top_pool: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x.astype(self.dtype)
    d = x.shape[-1]

    def deconv(features, name):
      return nn.ConvTranspose(features, (2, 2), strides=(2, 2), padding="VALID", name=name,
                              kernel_init=nn.with_logical_partitioning(
                                  nn.initializers.variance_scaling(1.0, "fan_in", "uniform"), _CONV_AXES),
                              bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)), **kw)

    outs = []
    for i, scale in enumerate(self.scales):
      tag = f"scale{i}"
      if scale == 4.0:
        y = deconv(d // 2, f"{tag}_deconv0")(x)
        y = nn.gelu(nn.LayerNorm(epsilon=1e-6, name=f"{tag}_norm0", **kw)(y), approximate=False)
        y = deconv(d // 4, f"{tag}_deconv1")(y)
      elif scale == 2.0:
        y = deconv(d // 2, f"{tag}_deconv0")(x)
      elif scale == 1.0:
        y = x
      elif scale == 0.5:
        y = max_pool2(x, kernel=2)
      else:
        raise ValueError(f"SimpleFeaturePyramid scale {scale} is not one of 4, 2, 1, 0.5")
      y = _ConvNorm(self.out_channels, 1, name=f"{tag}_lateral", **kw)(y)
      y = _ConvNorm(self.out_channels, 3, name=f"{tag}_output", **kw)(y)
      outs.append(constrain_map(y))
    if self.top_pool:
      outs.append(max_pool2(outs[-1]))
    return outs
