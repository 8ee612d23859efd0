"""Tests of the ring (memory-linear) CLIP, SigLIP and UniCL losses: value, gradients (z^I, z^T, t, b) and metrics equal
the dense losses on every mesh and on one device; the registry selects the implementation from config."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from tests.loss_helpers import assert_value_and_grads_close
from vlm_jax.errors import UserError
from vlm_jax.objectives import make_loss_fn
from vlm_jax.objectives.contrastive import clip_loss, siglip_loss, unicl_loss
from vlm_jax.objectives.ring import ring_clip_loss, ring_siglip_loss, ring_unicl_loss
from vlm_jax.parallel.mesh import BATCH_AXES, batch_sharding, make_mesh, replicated

B, D = 64, 16
MESHES = {
    "data8": {"data": 8, "fsdp": 1, "model": 1},
    "data4_fsdp2": {"data": 4, "fsdp": 2, "model": 1},
    "data2_fsdp2_model2": {"data": 2, "fsdp": 2, "model": 2},
}
PAIRS = {"clip": (clip_loss, ring_clip_loss), "siglip": (siglip_loss, ring_siglip_loss),
         "unicl": (unicl_loss, ring_unicl_loss)}
BATCH = {"label": np.random.default_rng(9).integers(0, 40, size=B).astype(np.int32)}  # repeated labels


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
  zi = unit(rng.normal(size=(B, D)))
  zt = unit(zi + 0.3 * rng.normal(size=(B, D)))  # correlated pairs: accuracies are neither 0 nor 1
  return zi, zt, np.float32(7.0), np.float32(-3.0)


def _value_and_grad(fn, **kw):
  def f(zimg, ztxt, scale, bias):
    out = {"zimg": zimg, "ztxt": ztxt, "logit_scale": scale, "logit_bias": bias}
    return fn(out, BATCH, **kw)
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))


@pytest.fixture(scope="module")
def references():
  args = _inputs()
  return args, {name: _value_and_grad(dense)(*args) for name, (dense, _) in PAIRS.items()}


def _assert_close(got, ref):
  assert_value_and_grads_close(got, ref, ("zimg", "ztxt", "scale", "bias"))


@pytest.mark.parametrize("tile", [None, 2, 8])
@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("name", list(PAIRS))
def test_ring_matches_dense_on_mesh(name, mesh_name, tile, references):
  """Local batch 64/4 = 16 or 64/8 = 8 rows: tile 2 and 8 divide it; tile None takes the whole local batch."""
  args, refs = references
  mesh = make_mesh(MESHES[mesh_name])
  placed = ([jax.device_put(a, batch_sharding(mesh, 2)) for a in args[:2]]
            + [jax.device_put(a, replicated(mesh)) for a in args[2:]])
  with jax.set_mesh(mesh):
    got = _value_and_grad(PAIRS[name][1], mesh_axes=BATCH_AXES, tile=tile)(*placed)
  _assert_close(got, refs[name])
  assert got[1][0].sharding.is_equivalent_to(batch_sharding(mesh, 2), 2)  # gradients stay batch-sharded


@pytest.mark.parametrize("tile", [8, 64])
@pytest.mark.parametrize("name", list(PAIRS))
def test_ring_matches_dense_on_one_device(name, tile, references):
  args, refs = references
  _assert_close(_value_and_grad(PAIRS[name][1], tile=tile)(*args), refs[name])


def test_no_device_holds_more_than_a_tile():
  """B = 64 on 8 devices with tile 2: the partitioned program has 2 × 8 tiles, no 8 × 8 or B-wide logits."""
  args = _inputs()
  mesh = make_mesh(MESHES["data8"])
  placed = ([jax.device_put(a, batch_sharding(mesh, 2)) for a in args[:2]]
            + [jax.device_put(a, replicated(mesh)) for a in args[2:]])
  with jax.set_mesh(mesh):
    text = _value_and_grad(ring_clip_loss, mesh_axes=BATCH_AXES, tile=2).lower(*placed).compile().as_text()
  assert re.search(r"f32\[2,8\]", text)
  assert not re.search(r"f32\[(8,8|64,64|8,64|64,8)\]", text)


def test_registry_selects_impl():
  zi, zt, t, b = _inputs(1)
  out = {"zimg": zi, "ztxt": zt, "logit_scale": t, "logit_bias": b}
  for name in PAIRS:
    dense, _ = make_loss_fn({name: 1.0})(out, BATCH)
    ring, metrics = make_loss_fn({name: 1.0}, {name: {"impl": "ring", "tile": 16}})(out, BATCH)
    np.testing.assert_allclose(ring, dense, rtol=1e-5)
    assert f"{name}/loss" in metrics
  with pytest.raises(UserError, match=r"no impl 'chunked'.*\['dense', 'ring'\]"):
    make_loss_fn({"clip": 1.0}, {"clip": {"impl": "chunked"}})(out, {})
  with pytest.raises(UserError, match="only applies to impl='ring'"):
    make_loss_fn({"siglip": 1.0}, {"siglip": {"tile": 8}})(out, {})
  with pytest.raises(UserError, match="divisor of the per-device batch 64"):
    ring_clip_loss(out, {}, tile=48)


def test_bf16_inputs_accumulate_in_float32():
  zi, zt, t, b = _inputs(2)
  out = {"zimg": jax.numpy.asarray(zi, "bfloat16"), "ztxt": jax.numpy.asarray(zt, "bfloat16"),
         "logit_scale": t, "logit_bias": b}
  for dense, ring in PAIRS.values():
    loss, _ = ring(out, BATCH, tile=16)
    assert loss.dtype == np.float32
    np.testing.assert_allclose(loss, dense(out, BATCH)[0], rtol=1e-5)


def test_mesh_axes_need_an_ambient_mesh():
  zi, zt, t, _ = _inputs(3)
  with pytest.raises(UserError, match="label"):
    ring_unicl_loss({"zimg": zi, "ztxt": zt, "logit_scale": t}, {})
  with pytest.raises(ValueError, match="set_mesh"):
    ring_clip_loss({"zimg": zi, "ztxt": zt, "logit_scale": t}, {}, mesh_axes=BATCH_AXES)
