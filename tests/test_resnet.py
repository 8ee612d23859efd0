"""Tests for CLIP's ModifiedResNet (vlm_jax/models/resnet.py): shapes, parameter counts, the anti-aliased
bottleneck and the attention pool against numpy references, BatchNorm collections, and sharded apply."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.errors import UserError
from vlm_jax.models import resnet
from vlm_jax.models.resnet import AttentionPool2d, Bottleneck, ModifiedResNet
from vlm_jax.parallel import mesh as mesh_lib
from vlm_jax.parallel import partitioning


def _unboxed(variables):
  return partitioning.unbox(variables)


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _randomise(tree, seed: int, scale: float = 0.3):
  """Replaces every leaf by N(0, scale^2) numpy values (non-zero biases / BN scales for a real check)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (scale * rng.standard_normal(x.shape)).astype(np.float32), tree)


def _images(seed: int, shape) -> np.ndarray:
  """Per-image colour offsets plus noise: image differences survive the trunk's average pools."""
  rng = np.random.default_rng(seed)
  offsets = rng.standard_normal((shape[0], 1, 1, shape[-1]))
  return (offsets + 0.5 * rng.standard_normal(shape)).astype(np.float32)


def _variables(model, x_shape, seed: int):
  """Random variables with the model's tree, without compiling `init` (threefry init compiles slowly on CPU).

  Kernels ~ N(0, 2/fan_in), BN scale ~ 1 + N(0, 0.1), other vectors ~ N(0, 0.1), BN mean ~ N(0, 0.1),
  var ~ U(0.5, 1.5).
  """
  abstract = _unboxed(jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(x_shape, jnp.float32)))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    names = [getattr(k, "key", "") for k in path]
    shape = leaf.shape
    if names[-1] == "var":
      return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    if names[-1] == "kernel":
      fan_in = shape[0] * shape[1] if "c_proj" in names else (shape[0] if len(shape) == 3 else np.prod(shape[:-1]))
      return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    base = 1.0 if names[-1] == "scale" else 0.0
    return (base + 0.1 * rng.standard_normal(shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def _torch_param_count(layers, width, output_dim, image_size) -> int:
  """Parameters of open_clip's ModifiedResNet, counted from its PyTorch layer list (convs have no bias;
  BatchNorm2d has weight + bias parameters; running stats are buffers, not parameters)."""
  conv = lambda cin, cout, k: cin * cout * k * k
  bn = lambda c: 2 * c
  half = width // 2
  n = conv(3, half, 3) + bn(half) + conv(half, half, 3) + bn(half) + conv(half, width, 3) + bn(width)
  inplanes = width
  for s, blocks in enumerate(layers):
    planes = width * 2 ** s
    for j in range(blocks):
      stride = 2 if (s > 0 and j == 0) else 1
      n += conv(inplanes, planes, 1) + bn(planes) + conv(planes, planes, 3) + bn(planes)
      n += conv(planes, 4 * planes, 1) + bn(4 * planes)
      if stride > 1 or inplanes != 4 * planes:
        n += conv(inplanes, 4 * planes, 1) + bn(4 * planes)
      inplanes = 4 * planes
  c, g = 32 * width, image_size // 32
  return n + (g * g + 1) * c + 3 * (c * c + c) + (c * output_dim + output_dim)


# Published CLIP totals (Radford et al. 2021 checkpoints as loaded by open_clip) minus the text tower
# (token emb + pos emb + 12 residual blocks of 12 d^2 + 13 d + ln_final + text_projection + logit_scale):
# RN50 102,007,137 - 63,690,241; RN101 119,688,033 - 63,428,097; RN50x4 178,300,601 - 91,163,521.
PUBLISHED_VISUAL = {"RN50": 38_316_896, "RN101": 56_259_936, "RN50x4": 87_137_080}


@pytest.mark.parametrize("name", ["RN50", "RN101", "RN50x4"])
def test_variant_shapes_and_param_count(name):
  model = ModifiedResNet.from_variant(name)
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  assert set(variables) == {"params", "batch_stats"}
  out = jax.eval_shape(model.apply, _unboxed(variables), x)
  assert out["pooled"].shape == (2, model.output_dim)
  assert out["tokens"].shape == (2, 7 * 7, model.output_dim)  # RN50x4 (made for 288) resizes its embedding
  n = _count(variables["params"])
  assert n == _torch_param_count(model.layers, model.width, model.output_dim, model.image_size)
  assert n == PUBLISHED_VISUAL[name]


def test_tiny_apply_shapes_and_collections():
  model = ModifiedResNet.from_variant("tiny")
  x = _images(1, (2, 64, 64, 3))
  variables = _variables(model, x.shape, 0)
  assert set(variables) == {"params", "batch_stats"}
  assert variables["batch_stats"]["layer1_0"]["bn1"].keys() == {"mean", "var"}
  out = jax.jit(model.apply)(variables, x)
  assert out["pooled"].shape == (2, 64) and out["tokens"].shape == (2, 4, 64)
  assert np.all(np.isfinite(out["pooled"]))
  # another resolution: the positional embedding is resized to the 3x3 grid
  out96 = jax.jit(model.apply)(variables, jnp.zeros((1, 96, 96, 3)))
  assert out96["tokens"].shape == (1, 9, 64)
  # bfloat16 compute with remat traces and differentiates (float32 params, bfloat16 outputs)
  fast = model.clone(dtype=jnp.bfloat16, remat=True)
  loss = lambda p: fast.apply({"params": p, "batch_stats": variables["batch_stats"]}, x)["pooled"].sum()
  grads = jax.eval_shape(jax.grad(loss), variables["params"])
  assert jax.tree.leaves(grads)[0].dtype == jnp.float32
  assert jax.eval_shape(fast.apply, variables, x)["pooled"].dtype == jnp.bfloat16


def test_from_variant_errors():
  with pytest.raises(UserError):
    ModifiedResNet.from_variant("RN9000")
  with pytest.raises(UserError):
    ModifiedResNet.from_variant("tiny", depth=3)


def _np_conv(x, w, pad):
  """Hand-written NHWC stride-1 conv with symmetric zero padding; w [k, k, cin, cout]."""
  k = w.shape[0]
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  h, wd = x.shape[1] + 2 * pad - k + 1, x.shape[2] + 2 * pad - k + 1
  out = np.zeros((x.shape[0], h, wd, w.shape[-1]))
  for i in range(k):
    for j in range(k):
      out += np.einsum("bhwc,cd->bhwd", xp[:, i:i + h, j:j + wd], w[i, j])
  return out


def _np_bn(x, p, s):
  return (x - s["mean"]) / np.sqrt(s["var"] + resnet.BN_EPSILON) * p["scale"] + p["bias"]


def _np_pool(x, k):
  b, h, w, c = x.shape
  h, w = h // k, w // k
  return x[:, :h * k, :w * k].reshape(b, h, k, w, k, c).mean(axis=(2, 4))


def test_antialiased_bottleneck_matches_numpy_and_halves():
  block = Bottleneck(planes=4, stride=2)
  x = np.random.default_rng(2).standard_normal((2, 8, 8, 8)).astype(np.float32)
  v = _variables(block, x.shape, 3)
  p, s = v["params"], v["batch_stats"]
  y = np.asarray(jax.jit(block.apply)({"params": p, "batch_stats": s}, x))
  assert y.shape == (2, 4, 4, 16)  # stride 2 halves the grid, 4x planes
  p, s = jax.tree.map(np.asarray, (p, s))
  relu = lambda a: np.maximum(a, 0)
  h = relu(_np_bn(_np_conv(x, p["conv1"]["kernel"], 0), p["bn1"], s["bn1"]))
  h = relu(_np_bn(_np_conv(h, p["conv2"]["kernel"], 1), p["bn2"], s["bn2"]))
  h = _np_bn(_np_conv(_np_pool(h, 2), p["conv3"]["kernel"], 0), p["bn3"], s["bn3"])
  sc = _np_bn(_np_conv(_np_pool(x, 2), p["downsample_conv"]["kernel"], 0), p["downsample_bn"], s["downsample_bn"])
  np.testing.assert_allclose(y, relu(h + sc), rtol=1e-4, atol=1e-4)
  # odd sizes floor like torch's AvgPool2d
  assert block.apply({"params": p, "batch_stats": s}, np.zeros((1, 7, 7, 8), np.float32)).shape == (1, 3, 3, 16)


def test_attention_pool_matches_numpy():
  heads, c, out_dim = 2, 8, 6
  pool = AttentionPool2d(grid=2, heads=heads, output_dim=out_dim)
  x = np.random.default_rng(5).standard_normal((3, 2, 2, c)).astype(np.float32)
  p = _randomise(_variables(pool, x.shape, 0)["params"], 6, scale=0.5)
  pooled, tokens = jax.jit(pool.apply)({"params": p}, x)
  p = jax.tree.map(np.asarray, p)

  # reference: open_clip's formulation (full self-attention over [mean; x] + pos, keep row 0)
  b, hd = x.shape[0], c // heads
  seq = x.reshape(b, 4, c)
  feats = seq
  seq = np.concatenate([seq.mean(1, keepdims=True), seq], 1) + p["positional_embedding"]
  lin = lambda t, name: t @ p[name]["kernel"].reshape(c, c) + p[name]["bias"].reshape(c)
  split = lambda t: t.reshape(b, -1, heads, hd).transpose(0, 2, 1, 3)
  q, k, v = (split(lin(seq, n)) for n in ("q_proj", "k_proj", "v_proj"))
  logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
  attn = np.exp(logits - logits.max(-1, keepdims=True))
  attn /= attn.sum(-1, keepdims=True)
  o = (attn @ v).transpose(0, 2, 1, 3).reshape(b, -1, c)
  c_lin = lambda t: t @ p["c_proj"]["kernel"].reshape(c, out_dim) + p["c_proj"]["bias"]
  np.testing.assert_allclose(pooled, c_lin(o)[:, 0], rtol=1e-5, atol=1e-5)
  # MaskCLIP dense tokens: c_proj(v_proj(x)) per position, no attention, no positional embedding
  np.testing.assert_allclose(tokens, c_lin(lin(feats, "v_proj")), rtol=1e-5, atol=1e-5)


def test_positional_embedding_resize():
  pos = np.random.default_rng(7).standard_normal((1 + 4, 3)).astype(np.float32)
  assert resnet.resize_positional_embedding(pos, (2, 2)) is pos
  big = resnet.resize_positional_embedding(pos, (3, 5))
  assert big.shape == (1 + 15, 3)
  np.testing.assert_array_equal(big[0], pos[0])


def test_batch_stats_semantics():
  model = ModifiedResNet(layers=(1, 1, 1, 1), width=8, heads=4, output_dim=16, image_size=64)
  x = _images(8, (4, 64, 64, 3))
  v = _variables(model, x.shape, 8)
  apply = jax.jit(model.apply, static_argnames="train")
  base = apply(v, x)["pooled"]
  # default: running statistics even when train=True -> pure apply, identical output
  np.testing.assert_allclose(apply(v, x, train=True)["pooled"], base, rtol=1e-6, atol=1e-6)
  # the stored statistics are used
  stats = jax.tree.map(lambda a: a, v["batch_stats"])
  stats["bn1"] = {"mean": stats["bn1"]["mean"] + 1.0, "var": stats["bn1"]["var"] * 4.0}
  moved = apply({"params": v["params"], "batch_stats": stats}, x)["pooled"]
  assert not np.allclose(moved, base)
  # opt-in batch statistics update the running averages (torch momentum 0.1)
  trainable = model.clone(train_batch_stats=True)
  _, upd = jax.jit(lambda v, x: trainable.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
  assert not np.allclose(upd["batch_stats"]["bn1"]["mean"], v["batch_stats"]["bn1"]["mean"])


def test_sharded_apply_matches_single_device():
  model = ModifiedResNet(layers=(1, 1, 1, 1), width=8, heads=4, output_dim=16, image_size=64)
  x = _images(9, (8, 64, 64, 3))
  variables = _variables(model, x.shape, 10)
  ref = jax.jit(model.apply)(variables, x)

  mesh = mesh_lib.make_mesh({"data": 4, "model": 2})
  rules = partitioning.DEFAULT_RULES
  shardings = partitioning.logical_to_shardings(jax.eval_shape(model.init, jax.random.key(0), x), mesh, rules)
  assert shardings["params"]["attnpool"]["q_proj"]["kernel"].spec == jax.sharding.PartitionSpec(
      "fsdp", "model", None)
  sharded_vars = partitioning.shard_like(variables, shardings)
  xs = jax.device_put(x, mesh_lib.batch_sharding(mesh, 4))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    out = jax.jit(model.apply)(sharded_vars, xs)
  for key in ("pooled", "tokens"):
    np.testing.assert_allclose(np.asarray(out[key]), np.asarray(ref[key]), rtol=1e-5, atol=1e-5)
