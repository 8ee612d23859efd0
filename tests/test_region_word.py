"""GLIP-style region-word alignment: the focal loss on a hand-computed case, same-class positives and invalid
regions, the model's region/phrase outputs, 8-device sharded == single device, and a short learning run."""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlm_jax.data import pipeline, synthetic
from vlm_jax.data.tokenizers import get_tokenizer
from vlm_jax.errors import UserError
from vlm_jax.models import build_model
from vlm_jax.objectives import make_loss_fn
from vlm_jax.objectives.region_word import region_word_loss, sigmoid_focal_loss
from vlm_jax.parallel.mesh import BATCH_AXES, batch_sharding, make_mesh, replicated


def _fl(x: float, y: int, alpha=0.25, gamma=2.0) -> float:
  p = 1 / (1 + math.exp(-x))
  q = p if y else 1 - p
  return -(alpha if y else 1 - alpha) * (1 - q) ** gamma * math.log(q)


def _outputs(zr, zp, scale=1.0, bias=0.0):
  return {"zregion": jnp.asarray(zr, jnp.float32), "zphrase": jnp.asarray(zp, jnp.float32),
          "region_logit_scale": jnp.float32(scale), "region_logit_bias": jnp.float32(bias)}


def test_hand_computed_case():
  """One image, regions (e1, e2, e1 invalid), phrases equal: logits [[1, 0], [0, 1]] over the valid pairs,
  positives on the diagonal: L = (2 FL(1, 1) + 2 FL(0, 0)) / 2."""
  e1, e2 = [1.0, 0.0], [0.0, 1.0]
  out = _outputs([[e1, e2, e1]], [[e1, e2, e1]])
  loss, m = region_word_loss(out, {"region_valid": np.array([[True, True, False]])})
  np.testing.assert_allclose(loss, (2 * _fl(1.0, 1) + 2 * _fl(0.0, 0)) / 2, rtol=1e-6)
  assert float(m["region_word/accuracy"]) == 1.0 and float(m["region_word/regions"]) == 2.0
  np.testing.assert_allclose(sigmoid_focal_loss(jnp.array([2.0, -1.0]), jnp.array([1, 0])),
                             [_fl(2.0, 1), _fl(-1.0, 0)], rtol=1e-6)


def test_same_class_regions_are_positives():
  """Two images with one region each, both class 7: every valid pair is positive (4 positives)."""
  e1, e2 = [1.0, 0.0], [0.0, 1.0]
  out = _outputs([[e1], [e2]], [[e1], [e2]], scale=2.0, bias=-1.0)
  batch = {"region_valid": np.ones((2, 1), bool), "region_class": np.array([[7], [7]])}
  loss, _ = region_word_loss(out, batch)
  np.testing.assert_allclose(loss, (2 * _fl(1.0, 1) + 2 * _fl(-1.0, 1)) / 4, rtol=1e-6)
  with pytest.raises(UserError, match="region_features"):
    region_word_loss({"zimg": 1}, batch)


MICRO = {"image": {"kind": "vit", "variant": "mu/4", "image_size": 16, "pool_type": "gap"},
         "text": {"kind": "text", "variant": "tiny", "width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64},
         "embed_dim": 16, "region_features": True}


def _batch(tok, n: int, start: int = 0, size: int = 16):
  """Synthetic scenes with boxes (normalised) and their phrases, as the pipeline would emit them."""
  from vlm_jax.data import synthetic_shards
  src = synthetic.SyntheticShapes("train", image_size=size)
  rows = []
  for i in range(start, start + n):
    scene = src.scene(i)
    el = src.render(scene)
    rows.append((el, synthetic_shards.object_meta(scene, el)))
  k = 3
  boxes = np.zeros((n, k, 4), np.float32)
  phrases = np.zeros((n, k, 8), np.int32)
  cls = np.full((n, k), -1, np.int32)
  for r, (el, meta) in enumerate(rows):
    m = len(meta["objects"])
    boxes[r, :m] = el["boxes"][:m] / size
    phrases[r, :m] = tok([o["phrase"] for o in meta["objects"]], 8)
    cls[r, :m] = [o["class"] for o in meta["objects"]]
  return {"image": pipeline.normalize(np.stack([el["image"] for el, _ in rows])),
          "text": tok([el["caption"] for el, _ in rows]), "boxes": boxes, "phrases": phrases,
          "region_valid": cls >= 0, "region_class": cls}


def test_model_outputs_and_sharded_equals_single_device():
  tok = get_tokenizer("words", context_length=16)
  model = build_model(dict(MICRO, text=dict(MICRO["text"], vocab_size=tok.vocab_size, max_len=16)))
  batch = _batch(tok, 8)
  params = model.init(jax.random.key(0), batch)["params"]
  loss_fn = make_loss_fn({"clip": 1.0, "region_word": 1.0})

  def f(p, b):
    out = model.apply({"params": p}, b)
    return loss_fn(out, b)

  (loss, metrics), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params, batch)
  out = model.apply({"params": params}, batch)
  assert out["zregion"].shape == (8, 3, 16) and out["zphrase"].shape == (8, 3, 16)
  np.testing.assert_allclose(np.linalg.norm(out["zregion"], axis=-1), 1.0, rtol=1e-5)
  assert "region_word/loss" in metrics and np.isfinite(loss)
  mesh = make_mesh({"data": 8, "fsdp": 1, "model": 1})
  placed = {k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
  with jax.set_mesh(mesh):
    loss_fn = make_loss_fn({"clip": 1.0, "region_word": 1.0}, mesh_axes=BATCH_AXES)
    (loss8, m8), grads8 = jax.jit(jax.value_and_grad(f, has_aux=True))(
        jax.device_put(params, replicated(mesh)), placed)
  np.testing.assert_allclose(loss8, loss, rtol=1e-5)
  np.testing.assert_allclose(m8["region_word/loss"], metrics["region_word/loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads8), jax.tree.leaves(grads)):  # whole-model gradients: fp32 sum order
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=3e-5)


def test_region_word_learns_beyond_chance():
  """~150 Adam steps of region-word alignment alone on 16-px scenes: held-out boxes are classified over the 64
  class phrases far above chance (1/64)."""
  start = time.time()
  tok = get_tokenizer("words", context_length=16)
  model = build_model(dict(MICRO, text=dict(MICRO["text"], vocab_size=tok.vocab_size, max_len=16)))
  train, held = _batch(tok, 512), _batch(tok, 128, start=100_000)
  params = model.init(jax.random.key(0), {k: v[:2] for k, v in train.items()})["params"]
  opt = optax.adam(3e-3)
  state = opt.init(params)
  loss_fn = make_loss_fn({"region_word": 1.0})

  @jax.jit
  def step(p, s, b):
    (loss, _), g = jax.value_and_grad(lambda q: loss_fn(model.apply({"params": q}, b), b), has_aux=True)(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  rng = np.random.default_rng(0)
  for _ in range(150):
    idx = rng.choice(512, 64, replace=False)
    params, state, loss = step(params, state, {k: v[idx] for k, v in train.items()})
  names = synthetic.SyntheticShapes("train", image_size=16).class_names()
  zp = model.apply({"params": params}, tok(names, 8), method="encode_phrases")
  zr = model.apply({"params": params}, held["image"], held["boxes"], method="encode_regions")
  pred = np.argmax(np.asarray(zr @ zp.T), axis=-1)
  valid = held["region_class"] >= 0
  acc = float(np.mean(pred[valid] == held["region_class"][valid]))
  print(f"region top-1 {acc:.3f} vs chance {1 / 64:.3f} ({time.time() - start:.0f} s)")
  assert acc > 4 / 64


def test_region_word_evaluator():
  from vlm_jax.evaluate import make_evaluators
  tok = get_tokenizer("words", context_length=16)
  model = build_model(dict(MICRO, text=dict(MICRO["text"], vocab_size=tok.vocab_size, max_len=16)))
  params = model.init(jax.random.key(0), _batch(tok, 2))
  evals = make_evaluators({"rw": {"kind": "region_word_synthetic", "num_images": 16, "batch_size": 64}},
                          model=model, tokenizer=tok, data_config={"image_size": 16})
  out = evals["rw"](params)
  assert set(out) == {"rw/top1", "rw/unseen_top1", "rw/chance"} and out["rw/chance"] == 1 / 64
