"""Tests of the contrastive objectives: hand-computed values, sharded == dense (value and gradient), per-device
logits memory, and the weighted objective combination."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vlm_jax.errors import UserError
from vlm_jax.objectives import get_objective, make_loss_fn

CONTRASTIVE = {name: get_objective(name) for name in ('clip', 'siglip', 'unicl', 'simclr')}
from vlm_jax.objectives.contrastive import (clip_loss, constrain_rows, siglip_loss, similarity_logits,
                                            simclr_loss, unicl_loss)
from vlm_jax.parallel.mesh import batch_sharding, make_mesh, replicated

MESHES = {
    "data8": {"data": 8, "fsdp": 1, "model": 1},
    "data4_fsdp2": {"data": 4, "fsdp": 2, "model": 1},
    "data2_fsdp2_model2": {"data": 2, "fsdp": 2, "model": 2},
}
BATCH_AXES = ("data", "fsdp")


def _unit(x):
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _embeddings(seed, b, d, n=4):
  rng = np.random.default_rng(seed)
  return [_unit(rng.normal(size=(b, d))) for _ in range(n)]


def _outputs(zimg, ztxt, scale, bias=None, zview1=None, zview2=None):
  out = {"zimg": zimg, "ztxt": ztxt, "logit_scale": scale}
  for key, value in (("logit_bias", bias), ("zview1", zview1), ("zview2", zview2)):
    if value is not None:
      out[key] = value
  return out


# ---------------------------------------------------------------------------------------------------------
# Plain numpy references, written with explicit loops over anchors.

def _log_softmax(v):
  v = np.asarray(v, np.float64)
  m = v.max()
  return v - (m + np.log(np.sum(np.exp(v - m))))


def np_clip(zi, zt, t):
  logits = t * np.asarray(zi, np.float64) @ np.asarray(zt, np.float64).T
  b = len(zi)
  i2t = -np.mean([_log_softmax(logits[i, :])[i] for i in range(b)])
  t2i = -np.mean([_log_softmax(logits[:, j])[j] for j in range(b)])
  return 0.5 * (i2t + t2i)


def np_unicl(zi, zt, t, labels):
  logits = t * np.asarray(zi, np.float64) @ np.asarray(zt, np.float64).T
  b = len(zi)
  i2t = t2i = 0.0
  for i in range(b):
    pos = [k for k in range(b) if labels[k] == labels[i]]
    i2t -= np.mean([_log_softmax(logits[i, :])[k] for k in pos]) / b
    t2i -= np.mean([_log_softmax(logits[:, i])[k] for k in pos]) / b
  return 0.5 * (i2t + t2i)


def np_siglip(zi, zt, t, bias):
  b = len(zi)
  total = 0.0
  for i in range(b):
    for j in range(b):
      z = 1.0 if i == j else -1.0
      x = t * float(np.dot(np.asarray(zi[i], np.float64), zt[j])) + bias
      total += -np.log(1.0 / (1.0 + np.exp(-z * x)))
  return total / b


def np_simclr(z1, z2, tau):
  u = np.concatenate([z1, z2]).astype(np.float64)
  n = len(u)
  total = 0.0
  for a in range(n):
    others = [k for k in range(n) if k != a]
    sims = np.array([u[a] @ u[k] / tau for k in others])
    positive = others.index((a + n // 2) % n)
    total -= _log_softmax(sims)[positive]
  return total / n


# ---------------------------------------------------------------------------------------------------------
# (1) hand-computed values

def test_closed_forms():
  t = 3.0
  eye2 = np.eye(2, dtype=np.float32)
  # Two orthonormal aligned pairs: every anchor's row is [t, 0] -> log(1 + e^-t).
  loss, _ = clip_loss(_outputs(eye2, eye2, t), {})
  np.testing.assert_allclose(loss, np.log1p(np.exp(-t)), rtol=1e-6)
  # Same two pairs under one label: both entries are positives -> log(1 + e^t) - t/2.
  loss, _ = unicl_loss(_outputs(eye2, eye2, t), {"label": np.array([7, 7])})
  np.testing.assert_allclose(loss, np.log1p(np.exp(t)) - t / 2, rtol=1e-6)
  # SimCLR with views [e1, e2 | e1, e2], τ = 0.5: candidates {0, 1/τ, 0} -> log(1 + 2 e^-2).
  loss, _ = simclr_loss(_outputs(eye2, eye2, t, zview1=eye2, zview2=eye2), {}, temperature=0.5)
  np.testing.assert_allclose(loss, np.log1p(2 * np.exp(-2.0)), rtol=1e-6)


def test_siglip_at_init_scale_and_bias():
  """Paper init t = 10, b = -10 on 4 aligned orthonormal pairs: positives sit at logit 0 (log 2 each),
  negatives at -10; normalised by B: log 2 + (B - 1) log(1 + e^-10)."""
  eye4 = np.eye(4, dtype=np.float32)
  loss, metrics = siglip_loss(_outputs(eye4, eye4, 10.0, -10.0), {})
  np.testing.assert_allclose(loss, np.log(2.0) + 3 * np.log1p(np.exp(-10.0)), rtol=1e-6)
  np.testing.assert_allclose(metrics["siglip/logit_bias"], -10.0)
  np.testing.assert_allclose(metrics["siglip/logit_scale"], 10.0)
  # Random unit vectors at init: matches the numpy reference.
  zi, zt = _embeddings(1, 4, 3, n=2)
  loss, _ = siglip_loss(_outputs(zi, zt, 10.0, -10.0), {})
  np.testing.assert_allclose(loss, np_siglip(zi, zt, 10.0, -10.0), rtol=1e-5)


@pytest.mark.parametrize("b,d", [(3, 2), (4, 4)])
def test_against_numpy(b, d):
  zi, zt, z1, z2 = _embeddings(b * 10 + d, b, d)
  t = 2.5
  out = _outputs(zi, zt, t, -1.5, z1, z2)
  np.testing.assert_allclose(clip_loss(out, {})[0], np_clip(zi, zt, t), rtol=1e-5)
  np.testing.assert_allclose(siglip_loss(out, {})[0], np_siglip(zi, zt, t, -1.5), rtol=1e-5)
  labels = np.array([1, 0, 1, 2][:b])
  np.testing.assert_allclose(unicl_loss(out, {"label": labels})[0], np_unicl(zi, zt, t, labels), rtol=1e-5)
  np.testing.assert_allclose(simclr_loss(out, {}, temperature=0.2)[0], np_simclr(z1, z2, 0.2), rtol=1e-5)
  np.testing.assert_allclose(simclr_loss(out, {})[0], np_simclr(z1, z2, 0.1), rtol=1e-5)


def test_unicl_equals_clip_iff_labels_distinct():
  zi, zt = _embeddings(3, 4, 3, n=2)
  out = _outputs(zi, zt, 4.0)
  clip, clip_m = clip_loss(out, {})
  distinct, distinct_m = unicl_loss(out, {"label": np.array([5, 2, 9, 0])})
  assert float(distinct) == float(clip)
  assert float(distinct_m["unicl/i2t_accuracy"]) == float(clip_m["clip/i2t_accuracy"])
  repeated, _ = unicl_loss(out, {"label": np.array([5, 2, 5, 0])})
  assert abs(float(repeated) - float(clip)) > 1e-3
  np.testing.assert_allclose(repeated, np_unicl(zi, zt, 4.0, [5, 2, 5, 0]), rtol=1e-5)


def test_accuracy_metrics():
  eye3 = np.eye(3, dtype=np.float32)
  swapped = eye3[[1, 0, 2]]  # texts 0 and 1 swapped: only pair 2 retrieves its partner
  _, m = clip_loss(_outputs(eye3, swapped, 5.0), {})
  np.testing.assert_allclose([m["clip/i2t_accuracy"], m["clip/t2i_accuracy"]], [1 / 3, 1 / 3], rtol=1e-6)
  np.testing.assert_allclose(m["clip/logit_scale"], 5.0)
  _, m = unicl_loss(_outputs(eye3, swapped, 5.0), {"label": np.array([4, 4, 1])})  # the swap is in-class
  np.testing.assert_allclose([m["unicl/i2t_accuracy"], m["unicl/t2i_accuracy"]], [1.0, 1.0])
  _, m = simclr_loss(_outputs(eye3, eye3, 1.0, zview1=eye3, zview2=eye3), {})
  np.testing.assert_allclose(m["simclr/accuracy"], 1.0)


def test_bf16_inputs_compute_in_float32():
  zi, zt, z1, z2 = (jnp.asarray(z, jnp.bfloat16) for z in _embeddings(4, 4, 4))
  out = _outputs(zi, zt, jnp.bfloat16(10.0), jnp.bfloat16(-10.0), z1, z2)
  as32 = [np.asarray(z, np.float32) for z in (zi, zt, z1, z2)]
  for name, fn in CONTRASTIVE.items():
    loss, _ = fn(out, {"label": np.array([0, 1, 0, 2])})
    assert loss.dtype == jnp.float32, name
  np.testing.assert_allclose(clip_loss(out, {})[0], np_clip(as32[0], as32[1], 10.0), rtol=1e-5)
  np.testing.assert_allclose(siglip_loss(out, {})[0], np_siglip(as32[0], as32[1], 10.0, -10.0), rtol=1e-5)


def test_missing_inputs_are_user_errors():
  zi, zt = _embeddings(5, 4, 3, n=2)
  with pytest.raises(UserError, match="label"):
    unicl_loss(_outputs(zi, zt, 1.0), {})
  with pytest.raises(UserError, match="simclr_head"):
    simclr_loss(_outputs(zi, zt, 1.0), {})


# ---------------------------------------------------------------------------------------------------------
# (2) sharded == single device, value and gradient; no B×B array in the partitioned program

B, D = 16, 8
LABELS = np.array([0, 1, 2, 0, 1, 3, 4, 5, 2, 6, 7, 8, 9, 3, 10, 11], np.int32)


def _loss_of(fn, mesh_axes):
  def f(zimg, ztxt, zview1, zview2, scale, bias, labels):
    out = _outputs(zimg, ztxt, scale, bias, zview1, zview2)
    return fn(out, {"label": labels}, mesh_axes=mesh_axes)
  return jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4, 5), has_aux=True)


@pytest.fixture(scope="module")
def sharding_inputs():
  args = (*_embeddings(7, B, D), np.float32(10.0), np.float32(-10.0), LABELS)
  references = {name: jax.jit(_loss_of(fn, None))(*args) for name, fn in CONTRASTIVE.items()}
  return args, references


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("name", list(CONTRASTIVE))
def test_sharded_matches_single_device(name, mesh_name, sharding_inputs):
  args, references = sharding_inputs
  mesh = make_mesh(MESHES[mesh_name])
  placed = ([jax.device_put(a, batch_sharding(mesh, 2)) for a in args[:4]]
            + [jax.device_put(a, replicated(mesh)) for a in args[4:6]]
            + [jax.device_put(args[6], batch_sharding(mesh, 1))])
  with jax.set_mesh(mesh):
    compiled = jax.jit(_loss_of(CONTRASTIVE[name], BATCH_AXES)).lower(*placed).compile()
    (loss, metrics), grads = compiled(*placed)
  (ref_loss, ref_metrics), ref_grads = references[name]
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
  for key in ref_metrics:
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, atol=1e-6, err_msg=key)
  for g, ref_g in zip(grads, ref_grads):
    np.testing.assert_allclose(g, ref_g, rtol=1e-5, atol=1e-6)
  # After SPMD partitioning the HLO shows per-device shapes: no device materialises a (2)B×(2)B matrix.
  n = 2 * B if name == "simclr" else B
  assert not re.search(rf"\[{n},{n}\]", compiled.as_text()), f"{name}: a device holds {n}x{n}"


# ---------------------------------------------------------------------------------------------------------
# (3) per-device logits are B/n × B

@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("inputs", ["batch_sharded", "replicated"])
def test_logits_rows_sharded(mesh_name, inputs):
  mesh = make_mesh(MESHES[mesh_name])
  n = mesh.shape["data"] * mesh.shape["fsdp"]
  sharding = batch_sharding(mesh, 2) if inputs == "batch_sharded" else replicated(mesh)
  zi, zt = (jax.device_put(z, sharding) for z in _embeddings(8, B, D, n=2))
  with jax.set_mesh(mesh):
    logits = jax.jit(lambda a, b: similarity_logits(a, b, 10.0, mesh_axes=BATCH_AXES))(zi, zt)
  assert logits.sharding.shard_shape((B, B)) == (B // n, B)
  assert {s.data.shape for s in logits.addressable_shards} == {(B // n, B)}
  assert logits.sharding.is_equivalent_to(NamedSharding(mesh, P(BATCH_AXES, None)), 2)
  np.testing.assert_allclose(logits, 10.0 * np.asarray(zi) @ np.asarray(zt).T, rtol=1e-5, atol=1e-6)


def test_mesh_axes_need_an_ambient_mesh():
  zi, zt = _embeddings(9, 4, 3, n=2)
  with pytest.raises(ValueError, match="set_mesh"):
    jax.jit(lambda a, b: clip_loss(_outputs(a, b, 1.0), {}, mesh_axes=BATCH_AXES))(zi, zt)
  with jax.set_mesh(make_mesh({"data": 8})), pytest.raises(ValueError, match="not axes"):
    jax.jit(lambda a: constrain_rows(a, ("batch",)))(zi)


# ---------------------------------------------------------------------------------------------------------
# (4) make_loss_fn

def test_make_loss_fn_weighting():
  zi, zt, z1, z2 = _embeddings(10, 4, 3)
  out = _outputs(zi, zt, 5.0, -2.0, z1, z2)
  batch = {"label": np.array([0, 1, 0, 2])}
  fn = make_loss_fn({"clip": 1.0, "simclr": 0.5, "siglip": 0.0}, {"simclr": {"temperature": 0.2}})
  total, metrics = fn(out, batch)
  expected = np_clip(zi, zt, 5.0) + 0.5 * np_simclr(z1, z2, 0.2)
  np.testing.assert_allclose(total, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], total)
  assert "clip/loss" in metrics and "simclr/loss" in metrics
  assert not any(k.startswith("siglip/") for k in metrics)  # zero weight: skipped
  # ml_collections config data works the same way.
  cfg = ml_collections.ConfigDict({"objectives": {"unicl": 2.0}, "hp": {}})
  total, metrics = make_loss_fn(cfg.objectives, cfg.hp)(out, batch)
  np.testing.assert_allclose(total, 2 * np_unicl(zi, zt, 5.0, [0, 1, 0, 2]), rtol=1e-5)
  assert set(metrics) >= {"loss", "unicl/loss", "unicl/i2t_accuracy"}


def test_make_loss_fn_user_errors():
  with pytest.raises(UserError, match=r"unknown objective 'infonce'.*'clip'.*'siglip'.*'simclr'.*'unicl'"):
    make_loss_fn({"infonce": 1.0})
  with pytest.raises(UserError, match="unknown objective"):
    make_loss_fn({"clip": 1.0}, {"coca": {}})
  with pytest.raises(UserError, match=r"has no hyper-parameter.*'tau'.*accepts \['temperature'\]"):
    make_loss_fn({"simclr": 1.0}, {"simclr": {"tau": 0.1}})
  with pytest.raises(UserError, match="non-zero weight"):
    make_loss_fn({"clip": 0.0})


def test_collapsed_embeddings_score_zero_accuracy():
  """All logits equal (collapsed embeddings): every anchor ties with its negatives, which counts as wrong."""
  z = np.tile(_unit(np.ones((1, 3))), (4, 1))
  out = _outputs(z, z, 5.0, -1.0, zview1=z, zview2=z)
  batch = {"label": np.array([0, 1, 0, 2])}
  for name in ("clip", "siglip", "unicl"):
    _, m = CONTRASTIVE[name](out, batch)
    assert float(m[f"{name}/i2t_accuracy"]) == 0.0 and float(m[f"{name}/t2i_accuracy"]) == 0.0, name
  assert float(simclr_loss(out, {})[1]["simclr/accuracy"]) == 0.0


def test_region_word_accuracy_uses_the_same_tie_rule():
  from vlm_jax.objectives.region_word import region_word_loss
  z = np.tile(_unit(np.ones((1, 3))), (2, 2, 1))  # every region and phrase the same vector
  out = {"zregion": z, "zphrase": z, "region_logit_scale": jnp.float32(5.0), "region_logit_bias": jnp.float32(0.0)}
  _, m = region_word_loss(out, {"region_valid": np.ones((2, 2), bool)})
  assert float(m["region_word/accuracy"]) == 0.0
  eye = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]].reshape(2, 2, 3)  # regions 0 and 3 tie: one miss each
  out = {**out, "zregion": eye, "zphrase": eye}
  _, m = region_word_loss(out, {"region_valid": np.ones((2, 2), bool)})
  np.testing.assert_allclose(m["region_word/accuracy"], 0.5)
