"""Tests of the ring (memory-linear) CLIP, SigLIP and UniCL losses: value, gradients (z^I, z^T, t, b) and metrics equal
the dense losses on every mesh and on one device; the registry selects the implementation from config."""

from __future__ import annotations

import functools
import re

import jax
import numpy as np
import pytest

from tests.loss_helpers import assert_value_and_grads_close
from vlm_jax.errors import UserError
from vlm_jax.objectives import make_loss_fn
from vlm_jax.objectives.contrastive import (dense_clip_loss, dense_siglip_loss, dense_unicl_loss, ring_clip_loss,
                                            ring_siglip_loss, ring_unicl_loss)
from vlm_jax.parallel.mesh import BATCH_AXES, batch_sharding, make_mesh, replicated

B, D = 64, 16
MESHES = {
    "data8": {"data": 8, "fsdp": 1, "model": 1},
    "data4_fsdp2": {"data": 4, "fsdp": 2, "model": 1},
    "data2_fsdp2_model2": {"data": 2, "fsdp": 2, "model": 2},
}
PAIRS = {"clip": (dense_clip_loss, ring_clip_loss), "siglip": (dense_siglip_loss, ring_siglip_loss),
         "unicl": (dense_unicl_loss, ring_unicl_loss)}
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


@pytest.mark.parametrize("name", list(PAIRS))
def test_collapsed_embeddings_score_zero_accuracy(name):
  """Every image and every text embedding the same vector: each paired logit ties with all others in its row and
  column, and a tie counts as wrong, so dense, ring on 8 devices and ring on one device all report 0 (not 100 %),
  with ring == dense in value, gradients and metrics."""
  z = np.tile(np.float32([0.6, 0.8] + [0.0] * (D - 2)), (B, 1))
  args = (z, z, np.float32(7.0), np.float32(-3.0))
  dense = _value_and_grad(PAIRS[name][0])(*args)
  one_device = _value_and_grad(PAIRS[name][1], tile=8)(*args)
  mesh = make_mesh(MESHES["data4_fsdp2"])
  placed = ([jax.device_put(a, batch_sharding(mesh, 2)) for a in args[:2]]
            + [jax.device_put(a, replicated(mesh)) for a in args[2:]])
  with jax.set_mesh(mesh):
    on_mesh = _value_and_grad(PAIRS[name][1], mesh_axes=BATCH_AXES, tile=2)(*placed)
  for got in (dense, one_device, on_mesh):
    metrics = got[0][1]
    assert float(metrics[f"{name}/i2t_accuracy"]) == 0.0
    assert float(metrics[f"{name}/t2i_accuracy"]) == 0.0
  _assert_close(one_device, dense)
  _assert_close(on_mesh, dense)


def test_ties_with_the_paired_item_count_as_wrong():
  """Images e1, e2, e3 and texts e1, e1, e3 (t = 5): logits rows [5 5 0], [0 0 0], [0 0 5]. Image→text: rows 0
  and 1 tie with another column, only row 2 is a hit (1/3); text→image: column 1's best image is image 0 (2/3).
  UniCL with labels [4, 4, 1]: the tie of row 0 is within its class (hit), row 1's positives (0, 0) tie with
  the other class's column (miss): 2/3; every column's best image has its label and beats the others: 1.
  Dense and ring agree."""
  eye3 = np.eye(3, dtype=np.float32)
  out = {"zimg": eye3, "ztxt": eye3[[0, 0, 2]], "logit_scale": np.float32(5.0), "logit_bias": np.float32(0.0)}
  batch = {"label": np.array([4, 4, 1], np.int32)}
  expected = {"clip": (1 / 3, 2 / 3), "siglip": (1 / 3, 2 / 3), "unicl": (2 / 3, 1.0)}
  for name, (dense, ring) in PAIRS.items():
    for fn in (dense, functools.partial(ring, tile=1)):
      _, m = fn(out, batch)
      np.testing.assert_allclose([m[f"{name}/i2t_accuracy"], m[f"{name}/t2i_accuracy"]], expected[name],
                                 rtol=1e-6, err_msg=name)
