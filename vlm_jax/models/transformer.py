"""The shared pre-LayerNorm transformer: attention, MLP, block, and the (optionally scanned, rematerialised) stack.

Pre-LN residual blocks as in ViT (Dosovitskiy et al. 2021) and CLIP (Radford et al. 2021). Every parameter
carries logical axis names (`embed`, `heads`, `kv`, `mlp`, `norm`, `layers` when scanned) and activations are
constrained to (`act_batch`, `act_len`, `act_embed`) at block boundaries, so the same code runs data-parallel,
FSDP or tensor-parallel depending only on the rules table. Layer scanning (`nn.scan`) and the rematerialisation
policy are named in config, MaxText style.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from vlm_jax.errors import UserError

Dtype = Any
ACT = ("act_batch", "act_len", "act_embed")

REMAT_POLICIES: dict[str, Callable | None] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names("query_proj", "key_proj", "value_proj"),
}
REMAT_NAMES = ("none",) + tuple(REMAT_POLICIES)


def quick_gelu(x):
  """x * sigmoid(1.702 x): the GELU approximation of OpenAI CLIP (Radford et al. 2021)."""
  return x * jax.nn.sigmoid(1.702 * x)


def gelu(x):
  """The exact GELU x Φ(x) = ½ x (1 + erf(x / √2)) (Hendrycks & Gimpel 2016), written with erf: `nn.gelu`'s erfc
  form is the same function (within 5e-7 in float32) but XLA:CPU expands erfc into a slower polynomial (2.4x the
  forward time on a [6144, 256] batch)."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


ACTIVATIONS: dict[str, Callable] = {
    "gelu": gelu,
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": nn.relu,
}


def activation(name: str) -> Callable:
  if name not in ACTIVATIONS:
    raise UserError(f"unknown activation {name!r}; valid choices: {', '.join(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def remat_policy(name: str):
  """Maps a config name ('none', 'full', 'dots_saveable', …) to a `jax.checkpoint_policies` policy."""
  if name not in REMAT_NAMES:
    raise UserError(f"unknown remat policy {name!r}; valid choices: {', '.join(REMAT_NAMES)}")
  return REMAT_POLICIES.get(name)


def layer_norm(dtype: Dtype, param_dtype: Dtype, name: str | None = None, eps: float = 1e-5) -> nn.LayerNorm:
  """LayerNorm whose scale/bias carry the `norm` logical axis."""
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


ATTENTION_CHOICES = ("auto", "xla", "cudnn")
_warned: set[str] = set()


def _nvidia_gpu() -> bool:
  devices = jax.devices()
  return devices[0].platform == "gpu" and "cuda" in str(getattr(devices[0].client, "platform_version", "")).lower()


def attention_implementation(name: str, dtype) -> str:
  """`model.attention` -> the implementation the encoders use: 'xla' or 'cudnn' (cuDNN flash attention).

  'auto' picks cuDNN on an NVIDIA GPU when the model computes in bfloat16 / float16, XLA everywhere else (TPU,
  CPU, float32); 'cudnn' asks for it explicitly (a `UserError` off NVIDIA GPUs). Either way `attend` falls back
  to XLA, with a one-line warning, for a call the kernel cannot take.
  """
  if name not in ATTENTION_CHOICES:
    raise UserError(f"unknown model.attention {name!r}; valid choices: {', '.join(ATTENTION_CHOICES)}")
  if name == "xla":
    return "xla"
  gpu = _nvidia_gpu()
  if name == "cudnn":
    if not gpu:
      raise UserError(f"model.attention='cudnn' needs an NVIDIA GPU (this job runs on {jax.default_backend()}); "
                      f"use 'auto' or 'xla'")
    return "cudnn"
  return "cudnn" if gpu and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) else "xla"


def cudnn_unsupported(q, mask) -> str | None:
  """Why cuDNN's flash attention cannot take queries `q` [B, L, heads, head_dim] with `mask`, or None."""
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"{q.dtype} inputs (it takes bfloat16 / float16)"
  if q.shape[-1] > 128 or q.shape[-1] % 8:
    return f"head size {q.shape[-1]} (it takes multiples of 8 up to 128)"
  if mask is not None:
    return "a mask other than causal"
  return None


def attend(q, k, v, mask=None, *, causal: bool = False, implementation: str = "xla"):
  """softmax(q·kᵀ/√d + mask) v by `jax.nn.dot_product_attention` over [B, L, heads, head_dim] arrays.

  `mask` (boolean, True = may attend) and `causal` combine. 'cudnn' runs the flash kernel (causal as the kernel's
  own mask type, no [L, L] mask built) where `cudnn_unsupported` finds nothing, otherwise XLA with one warning per
  reason; 'xla' builds the causal mask and calls XLA's implementation.
  """
  if implementation == "cudnn":
    why = cudnn_unsupported(q, mask)
    if why is None:
      return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
    if why not in _warned:
      _warned.add(why)
      logging.getLogger("vlm_jax").warning("cuDNN attention cannot run with %s: using XLA attention there", why)
  if causal:
    cm = causal_mask(q.shape[1])
    mask = cm if mask is None else jnp.logical_and(mask, cm)
  return jax.nn.dot_product_attention(q, k, v, mask=mask)


def causal_mask(length: int) -> jax.Array:
  """[1, 1, L, L] boolean mask, True where query i may attend key j <= i (autoregressive text, CLIP)."""
  return jnp.tril(jnp.ones((length, length), bool))[None, None]


class HeadsDense(nn.Module):
  """Linear map contracting the last `contract` input axes into a multi-axis output (q/k/v and output proj).

  The kernel keeps its full shape (e.g. [embed, heads, kv]) so logical names apply per axis; initialised
  Glorot-uniform over the flattened fan-in / fan-out, as big_vision's attention.
  """
  features: tuple[int, ...]
  contract: int
  kernel_axes: tuple[str | None, ...]
  bias_axes: tuple[str | None, ...]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c, f = self.contract, len(self.features)
    init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=tuple(range(c)),
                                            out_axis=tuple(range(c, c + f)))
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.kernel_axes),
                        tuple(x.shape[-c:]) + tuple(self.features), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.bias_axes),
                      tuple(self.features), self.param_dtype)
    y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=c)
    return y + bias.astype(self.dtype)


class Attention(nn.Module):
  """Multi-head dot-product attention (Vaswani et al. 2017) with q/k/v kernels [embed, heads, kv].

  `mask` is boolean, broadcastable to [B, heads, Lq, Lk]; True = may attend. `causal` adds the autoregressive
  mask and `implementation` ('xla' | 'cudnn') picks the kernel (`attend`).
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  causal: bool = False
  implementation: str = "xla"

  @nn.compact
  def __call__(self, x_q, x_kv=None, mask=None):
    x_kv = x_q if x_kv is None else x_kv
    d = x_q.shape[-1]
    if d % self.num_heads:
      raise UserError(f"width {d} is not divisible by num_heads {self.num_heads}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def proj(name, x):
      return HeadsDense((self.num_heads, d // self.num_heads), 1, ("embed", "heads", "kv"), ("heads", "kv"),
                        name=name, **kw)(x)

    heads_spec = ("act_batch", "act_len", "act_heads", "act_kv")
    q = nn.with_logical_constraint(checkpoint_name(proj("query", x_q), "query_proj"), heads_spec)
    k = nn.with_logical_constraint(checkpoint_name(proj("key", x_kv), "key_proj"), heads_spec)
    v = nn.with_logical_constraint(checkpoint_name(proj("value", x_kv), "value_proj"), heads_spec)
    y = attend(q, k, v, mask, causal=self.causal, implementation=self.implementation)
    y = nn.with_logical_constraint(y, heads_spec)
    return HeadsDense((d,), 2, ("heads", "kv", "embed"), ("embed",), name="out", **kw)(y)


class Mlp(nn.Module):
  """Transformer feed-forward block: Dense(mlp_dim) -> activation -> Dense(width)."""
  mlp_dim: int
  act: str = "gelu"
  dropout: float = 0.0
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.Dense(self.mlp_dim, name="fc1", **kw,
                 kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), ("embed", "mlp")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.normal(1e-6), ("mlp",)))(x)
    h = nn.with_logical_constraint(activation(self.act)(h), ("act_batch", "act_len", "act_mlp"))
    h = nn.Dropout(self.dropout)(h, deterministic=self.deterministic)
    return nn.Dense(d, name="fc2", **kw,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), ("mlp", "embed")),
                    bias_init=nn.with_logical_partitioning(nn.initializers.normal(1e-6), ("embed",)))(h)


class Block(nn.Module):
  """One pre-LN block: x + Attn(LN(x)), then x + MLP(LN(x)) (Dosovitskiy et al. 2021).

  Deep prompts (VPT-deep, Jia et al. 2022; MaPLe, Khattak et al. 2023): when `prompt` [B|1, P, D] is given
  and `use_prompt` is true, tokens [prompt_start, prompt_start + P) are replaced by `prompt` before the block.
  MaskCLIP dense mode (Zhou et al. 2022, "Extract Free Dense Labels from CLIP", §3.2): when `self_only` is
  true every token attends only to itself, so the attention output of token i is out(v_i) — the value path
  with no query-key attention — and the block computes x_i + out(v(LN(x_i))), then the usual residual MLP.
  `self_only` may be a Python bool or a traced scalar (a per-layer flag under `nn.scan`).
  Returns (x, None) so the block can be the body of `nn.scan`; (x, x) with `emit=True` (the scan then stacks
  every block's output: `Encoder`'s intermediate features).
  """
  num_heads: int
  mlp_dim: int
  act: str = "gelu"
  dropout: float = 0.0
  prompt_start: int = 0
  deterministic: bool = True
  norm_eps: float = 1e-5
  emit: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  causal: bool = False           # set by `Encoder` only for the cuDNN kernel (XLA gets the causal mask in `mask`)
  attention: str = "xla"

  @nn.compact
  def __call__(self, x, mask=None, prompt=None, use_prompt=None, self_only=None):
    if prompt is not None:
      s, p = self.prompt_start, prompt.shape[-2]
      prompt = jnp.broadcast_to(prompt.astype(x.dtype), (x.shape[0], p, x.shape[-1]))
      old = x[:, s:s + p]
      new = prompt if use_prompt is None else jnp.where(use_prompt, prompt, old)
      x = jax.lax.dynamic_update_slice_in_dim(x, new, s, axis=1)
    x = nn.with_logical_constraint(x, ACT)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self_only is not None:
      eye = jnp.eye(x.shape[1], dtype=bool)[None, None]
      full = jnp.ones_like(eye) if mask is None else jnp.broadcast_to(mask, jnp.broadcast_shapes(mask.shape,
                                                                                                 eye.shape))
      mask = jnp.where(self_only, eye, full)
    y = layer_norm(name="ln1", eps=self.norm_eps, **kw)(x)
    y = Attention(self.num_heads, name="attn", causal=self.causal, implementation=self.attention, **kw)(y, mask=mask)
    y = nn.Dropout(self.dropout)(y, deterministic=self.deterministic)
    x = nn.with_logical_constraint(x + y, ACT)
    y = layer_norm(name="ln2", eps=self.norm_eps, **kw)(x)
    y = Mlp(self.mlp_dim, self.act, self.dropout, self.deterministic, name="mlp", **kw)(y)
    y = nn.Dropout(self.dropout)(y, deterministic=self.deterministic)
    x = nn.with_logical_constraint(x + y, ACT)
    return x, (x if self.emit else None)


class Encoder(nn.Module):
  """A stack of `depth` pre-LN blocks followed by a final LayerNorm.

  scan=True runs the blocks with `nn.scan` (parameters stacked along a leading `layers` axis under
  `blocks/…`); scan=False unrolls them (`block_0`, `block_1`, …). `remat` names the rematerialisation policy
  (see `REMAT_POLICIES`). `causal` adds the autoregressive mask; `mask` (boolean, broadcastable to
  [B, heads, L, L]) is combined with it. `prompts` [n, P, D] or [n, B, P, D] (n <= depth) replace tokens
  [prompt_start, prompt_start + P) before each of the first n blocks (VPT-deep / MaPLe); the caller has
  already placed P tokens there. `dense=True` runs the last block in MaskCLIP mode (each token attends only to
  itself: see `Block`), for dense patch features (Zhou et al. 2022). `norm_eps` is the epsilon of every
  LayerNorm (1e-5 as CLIP; SigLIP checkpoints use 1e-6, Zhai et al. 2023). `attention` is the kernel
  ('xla' | 'cudnn', `attention_implementation`); with 'cudnn' a causal stack hands causality to the kernel.

  `intermediates` (block indices, negative counting from the end) makes the call return (x, [h_i …]): h_i the
  sequence after block i (before the final LayerNorm), in the order given. Unrolled, the chosen outputs are
  kept as they are produced; scanned, the scan stacks every block's output ([depth, B, L, D]) and the chosen
  ones are read from the stack.
  """
  depth: int
  num_heads: int
  mlp_dim: int
  act: str = "gelu"
  dropout: float = 0.0
  causal: bool = False
  prompt_start: int = 0
  scan: bool = False
  remat: str = "none"
  final_norm: bool = True
  norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x, mask=None, prompts=None, *, train: bool = False, dense: bool = False,
               intermediates=None):
    layers = None if intermediates is None else block_indices(intermediates, self.depth)
    kernel_causal = self.causal and self.attention == "cudnn"
    if self.causal and not kernel_causal:
      cm = causal_mask(x.shape[1])
      mask = cm if mask is None else jnp.logical_and(mask, cm)
    use = None
    if prompts is not None:
      n = prompts.shape[0]
      if n > self.depth:
        raise UserError(f"{n} prompt layers given for a {self.depth}-layer encoder")
      if prompts.ndim == 3:
        prompts = prompts[:, None]
      pad = [(0, self.depth - n)] + [(0, 0)] * (prompts.ndim - 1)
      prompts = jnp.pad(prompts, pad)
      use = jnp.arange(self.depth) < n

    block_cls = Block
    policy = remat_policy(self.remat)
    if self.remat != "none":
      block_cls = nn.remat(Block, policy=policy, prevent_cse=not self.scan)
    kw = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, act=self.act, dropout=self.dropout,
              prompt_start=self.prompt_start, deterministic=not train, norm_eps=self.norm_eps, dtype=self.dtype,
              param_dtype=self.param_dtype, causal=kernel_causal, attention=self.attention)
    feats = {}
    x = nn.with_logical_constraint(x, ACT)
    if self.scan:
      stack = nn.scan(
          block_cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
          in_axes=(nn.broadcast, 0, 0, 0), length=self.depth,
          metadata_params={nn.PARTITION_NAME: "layers"})
      self_only = (jnp.arange(self.depth) == self.depth - 1) if dense else None
      x, stacked = stack(name="blocks", emit=layers is not None, **kw)(x, mask, prompts, use, self_only)
      feats = {} if layers is None else {i: stacked[i] for i in set(layers)}
    else:
      for i in range(self.depth):
        p_i = None if prompts is None else prompts[i]
        u_i = None if use is None else use[i]
        s_i = True if dense and i == self.depth - 1 else None
        x, _ = block_cls(name=f"block_{i}", **kw)(x, mask, p_i, u_i, s_i)
        if layers is not None and i in layers:
          feats[i] = x
    if self.final_norm:
      x = layer_norm(self.dtype, self.param_dtype, name="ln_final", eps=self.norm_eps)(x)
    x = nn.with_logical_constraint(x, ACT)
    return x if layers is None else (x, [feats[i] for i in layers])


def block_indices(layers, depth: int) -> tuple[int, ...]:
  """Block indices (negative: from the end) -> non-negative ints in [0, depth); out of range: `UserError`."""
  if isinstance(layers, int):
    layers = (layers,)
  out = []
  for i in layers:
    i = int(i)
    if not -depth <= i < depth:
      raise UserError(f"block index {i} is out of range for a {depth}-block encoder")
    out.append(i % depth)
  return tuple(out)


def stack_block_params(params: dict, depth: int) -> dict:
  """Converts unrolled encoder params (`block_0`…) to the scanned layout (`blocks`, leading layers axis)."""
  out = {k: v for k, v in params.items() if not k.startswith("block_")}
  out["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"block_{i}"] for i in range(depth)])
  return out


def unstack_block_params(params: dict, depth: int) -> dict:
  """Inverse of `stack_block_params`."""
  out = {k: v for k, v in params.items() if k != "blocks"}
  for i in range(depth):
    out[f"block_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["blocks"])
  return out
