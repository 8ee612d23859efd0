"""Tensor layout between PyTorch modules and vlm_jax's Flax parameters, both directions, bit-exact.

PyTorch `nn.Linear` stores weight [out, in] (y = x W^T + b); Flax `nn.Dense` stores kernel [in, out]. vlm_jax's
attention keeps q/k/v kernels as [embed, heads, head_dim] and the output kernel as [heads, head_dim, embed]
(`vlm_jax.models.transformer.HeadsDense`), so a torch projection's output (or input) rows split head-major:
row h * head_dim + i is head h, channel i — the layout of `nn.MultiheadAttention`, Hugging Face's q/k/v_proj and
timm's fused qkv alike. Convolutions: torch OIHW, Flax HWIO. LayerNorm: torch weight/bias, Flax scale/bias.
Only transposes, reshapes and slices are used, so every conversion round-trips exactly.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from vlm_jax.errors import UserError

Array = np.ndarray


class StateDict:
  """Read access to a flat {name: array} state dict that records which names were used.

  `take(name)` returns a float32 numpy copy (any float dtype, torch tensors included); `check_consumed()`
  raises a `UserError` naming the tensors no mapping used, so a checkpoint of another architecture is never
  converted silently with parts missing. `ignore` names (regexes) are buffers with no parameter meaning.
  """

  def __init__(self, tensors: Mapping[str, object], source: str, ignore: tuple[str, ...] = ()):
    import re  # noqa: PLC0415
    self.tensors = dict(tensors)
    self.source = source
    self.used: set[str] = {k for k in self.tensors if any(re.search(p, k) for p in ignore)}

  def __contains__(self, name: str) -> bool:
    return name in self.tensors

  def take(self, name: str) -> Array:
    if name not in self.tensors:
      raise UserError(f"{self.source} has no tensor {name!r} (another architecture?)")
    self.used.add(name)
    return to_numpy(self.tensors[name])

  def check_consumed(self) -> None:
    left = sorted(set(self.tensors) - self.used)
    if left:
      shown = ", ".join(left[:8]) + (f", … ({len(left)} in all)" if len(left) > 8 else "")
      raise UserError(f"{self.source} has tensors this architecture does not use: {shown}")


def to_numpy(x) -> Array:
  """float32 numpy array from a numpy array, a jax array or a torch tensor (bf16/fp16 widened exactly)."""
  if hasattr(x, "detach"):  # torch.Tensor: bfloat16 has no numpy dtype, so widen in torch first
    import torch  # noqa: PLC0415
    x = x.detach().cpu()
    if x.is_floating_point():
      x = x.to(torch.float32)
    x = x.numpy()
  x = np.asarray(x)
  return x.astype(np.float32) if np.issubdtype(x.dtype, np.floating) or x.dtype.kind == "V" else x


def dense(weight: Array, bias: Array | None = None) -> dict:
  """torch Linear (weight [out, in], bias [out]) -> Flax Dense {'kernel': [in, out], 'bias'}."""
  p = {"kernel": np.ascontiguousarray(weight.T)}
  if bias is not None:
    p["bias"] = bias
  return p


def linear(p: Mapping) -> tuple[Array, Array | None]:
  """Flax Dense params -> torch Linear (weight [out, in], bias or None)."""
  b = p.get("bias")
  return np.ascontiguousarray(np.asarray(p["kernel"]).T), None if b is None else np.asarray(b)


def layer_norm(weight: Array, bias: Array) -> dict:
  return {"scale": weight, "bias": bias}


def layer_norm_torch(p: Mapping) -> tuple[Array, Array]:
  return np.asarray(p["scale"]), np.asarray(p["bias"])


def conv(weight: Array, bias: Array | None = None) -> dict:
  """torch Conv2d weight OIHW -> Flax Conv kernel HWIO (+ bias)."""
  p = {"kernel": np.ascontiguousarray(weight.transpose(2, 3, 1, 0))}
  if bias is not None:
    p["bias"] = bias
  return p


def conv_torch(p: Mapping) -> tuple[Array, Array | None]:
  b = p.get("bias")
  return np.ascontiguousarray(np.asarray(p["kernel"]).transpose(3, 2, 0, 1)), None if b is None else np.asarray(b)


def heads_in(weight: Array, bias: Array, num_heads: int) -> dict:
  """A q/k/v projection [H*hd, D] (+ [H*hd]) -> HeadsDense {'kernel': [D, H, hd], 'bias': [H, hd]}."""
  out, d = weight.shape
  if out % num_heads:
    raise UserError(f"projection width {out} is not divisible by {num_heads} heads")
  hd = out // num_heads
  return {"kernel": np.ascontiguousarray(weight.T.reshape(d, num_heads, hd)), "bias": bias.reshape(num_heads, hd)}


def heads_in_torch(p: Mapping) -> tuple[Array, Array]:
  k, b = np.asarray(p["kernel"]), np.asarray(p["bias"])
  d, h, hd = k.shape
  return np.ascontiguousarray(k.reshape(d, h * hd).T), b.reshape(h * hd)


def heads_out(weight: Array, bias: Array, num_heads: int) -> dict:
  """The attention output projection [D, H*hd] (+ [D]) -> HeadsDense {'kernel': [H, hd, D], 'bias': [D]}."""
  d, inner = weight.shape
  hd = inner // num_heads
  return {"kernel": np.ascontiguousarray(weight.T.reshape(num_heads, hd, d)), "bias": bias}


def heads_out_torch(p: Mapping) -> tuple[Array, Array]:
  k = np.asarray(p["kernel"])
  h, hd, d = k.shape
  return np.ascontiguousarray(k.reshape(h * hd, d).T), np.asarray(p["bias"])


def attention(q: tuple, k: tuple, v: tuple, out: tuple, num_heads: int) -> dict:
  """vlm_jax `Attention` params from torch (weight, bias) pairs of the q, k, v and output projections."""
  return {"query": heads_in(*q, num_heads), "key": heads_in(*k, num_heads), "value": heads_in(*v, num_heads),
          "out": heads_out(*out, num_heads)}


def attention_torch(p: Mapping) -> dict[str, tuple[Array, Array]]:
  """vlm_jax `Attention` params -> {'q'|'k'|'v'|'out': (weight, bias)} in torch layout."""
  return {"q": heads_in_torch(p["query"]), "k": heads_in_torch(p["key"]), "v": heads_in_torch(p["value"]),
          "out": heads_out_torch(p["out"])}


def split_rows(weight: Array, bias: Array, parts: int) -> list[tuple[Array, Array]]:
  """A fused projection ([q; k; v] or [k; v] stacked along the output rows) -> one (weight, bias) per part."""
  if weight.shape[0] % parts:
    raise UserError(f"fused projection with {weight.shape[0]} rows does not split into {parts} parts")
  return list(zip(np.split(weight, parts, axis=0), np.split(bias, parts, axis=0)))


def join_rows(pairs: list[tuple[Array, Array]]) -> tuple[Array, Array]:
  """Inverse of `split_rows`."""
  return np.concatenate([w for w, _ in pairs], axis=0), np.concatenate([b for _, b in pairs], axis=0)


def _param_names(pattern: str, i: int) -> tuple[str, str]:
  if "{wb}" in pattern:
    return pattern.format(i=i, wb="weight"), pattern.format(i=i, wb="bias")
  n = pattern.format(i=i)
  return n + ".weight", n + ".bias"


def encoder_blocks(take: Callable[[str], Array], depth: int, num_heads: int, names: Mapping[str, str],
                   fused_qkv: bool) -> dict:
  """vlm_jax `Encoder` block params ({'block_i': …}) from torch blocks.

  `names` maps the roles 'ln1', 'ln2', 'fc1', 'fc2', 'out' and either 'qkv' (fused, `fused_qkv=True`) or 'q',
  'k', 'v' to a module name pattern with `{i}` for the block index; `.weight` / `.bias` are appended, or
  substituted for `{wb}` when the pattern has it (`attn.in_proj_{wb}` of `nn.MultiheadAttention`).
  """
  def wb(role, i):
    return tuple(take(n) for n in _param_names(names[role], i))

  blocks = {}
  for i in range(depth):
    qkv = split_rows(*wb("qkv", i), 3) if fused_qkv else [wb(r, i) for r in ("q", "k", "v")]
    blocks[f"block_{i}"] = {
        "ln1": layer_norm(*wb("ln1", i)), "ln2": layer_norm(*wb("ln2", i)),
        "attn": attention(*qkv, wb("out", i), num_heads),
        "mlp": {"fc1": dense(*wb("fc1", i)), "fc2": dense(*wb("fc2", i))}}
  return blocks


def encoder_blocks_torch(params: Mapping, depth: int, names: Mapping[str, str], fused_qkv: bool) -> dict:
  """Inverse of `encoder_blocks`: {torch name: array} for `depth` unrolled blocks of `params`."""
  out = {}

  def put(role, i, pair):
    w, b = _param_names(names[role], i)
    out[w], out[b] = pair

  for i in range(depth):
    b = params[f"block_{i}"]
    put("ln1", i, layer_norm_torch(b["ln1"]))
    put("ln2", i, layer_norm_torch(b["ln2"]))
    a = attention_torch(b["attn"])
    if fused_qkv:
      put("qkv", i, join_rows([a["q"], a["k"], a["v"]]))
    else:
      for r in ("q", "k", "v"):
        put(r, i, a[r])
    put("out", i, a["out"])
    put("fc1", i, linear(b["mlp"]["fc1"]))
    put("fc2", i, linear(b["mlp"]["fc2"]))
  return out


def unrolled(encoder_params: Mapping, depth: int, scanned: bool) -> Mapping:
  """Encoder params with `block_i` keys, unstacking a scanned (`blocks`, leading layers axis) checkpoint."""
  if not scanned:
    return encoder_params
  out = {k: v for k, v in encoder_params.items() if k != "blocks"}
  for i in range(depth):
    out[f"block_{i}"] = _tree_index(encoder_params["blocks"], i)
  return out


def _tree_index(tree, i):
  if isinstance(tree, Mapping):
    return {k: _tree_index(v, i) for k, v in tree.items()}
  return np.asarray(tree)[i]
