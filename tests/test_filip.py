"""FILIP (token-wise late interaction): a hand-computed case, ring == dense (value, gradients, metrics) on 8
simulated devices and on one, the model's token outputs and mask, and the registry wiring."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.loss_helpers import assert_value_and_grads_close
from vlm_jax.errors import UserError
from vlm_jax.models import build_model
from vlm_jax.models.two_tower import text_token_mask
from vlm_jax.objectives import make_loss_fn
from vlm_jax.objectives.filip import filip_loss
from vlm_jax.parallel.mesh import BATCH_AXES, batch_sharding, make_mesh, replicated

B, N, L, E = 16, 5, 6, 8


def test_hand_computed_case():
  """x_0 = (e1, e2), x_1 = (e1, e1); y_0 = (e1, e2), y_1 = (e2, [pad e1]) with t = 1:
  s^I = [[1, .5], [1, 0]], s^T = [[1, 1], [.5, 0]] (rows images, columns texts), so with A = log(e + e^.5) − 1 and
  B = log(e + 1): L = ½[(A + B)/2 + (A + B)/2] and both accuracies are ½."""
  e1, e2 = [1.0, 0.0], [0.0, 1.0]
  out = {"zimg_tokens": jnp.array([[e1, e2], [e1, e1]]), "ztxt_tokens": jnp.array([[e1, e2], [e2, e1]]),
         "txt_mask": jnp.array([[1, 1], [1, 0]]), "logit_scale": jnp.float32(1.0)}
  a, b = math.log(math.e + math.exp(0.5)) - 1.0, math.log(math.e + 1.0)
  for impl in ("dense", "ring"):
    loss, m = filip_loss(out, {}, impl=impl)
    np.testing.assert_allclose(loss, (a + b) / 2, rtol=1e-6)
    np.testing.assert_allclose(m["filip/i2t_accuracy"], 0.5)
    np.testing.assert_allclose(m["filip/t2i_accuracy"], 0.5)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  unit = lambda v: (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)
  x = unit(rng.normal(size=(B, N, E)))
  y = unit(x[:, rng.integers(0, N, size=L)] + 0.8 * rng.normal(size=(B, L, E)))  # correlated pairs
  lengths = rng.integers(1, L + 1, size=B)
  mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
  return x, y, mask, np.float32(5.0)


def _value_and_grad(**kw):
  def f(x, y, mask, scale):
    out = {"zimg_tokens": x, "ztxt_tokens": y, "txt_mask": mask, "logit_scale": scale}
    return filip_loss(out, {}, **kw)
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 3), has_aux=True))


@pytest.fixture(scope="module")
def reference():
  args = _inputs()
  return args, _value_and_grad(impl="dense")(*args)


def _assert_close(got, ref):
  assert_value_and_grads_close(got, ref, ("x", "y", "scale"))


@pytest.mark.parametrize("tile", [None, 1])
def test_ring_matches_dense_on_8_devices(tile, reference):
  args, ref = reference
  assert 0.0 < float(ref[0][1]["filip/i2t_accuracy"]) < 1.0  # a non-trivial case
  mesh = make_mesh({"data": 4, "fsdp": 2, "model": 1})
  placed = [jax.device_put(a, batch_sharding(mesh, a.ndim)) for a in args[:3]] + [
      jax.device_put(args[3], replicated(mesh))]
  with jax.set_mesh(mesh):
    got = _value_and_grad(impl="ring", tile=tile, mesh_axes=BATCH_AXES)(*placed)
    dense = _value_and_grad(impl="dense", mesh_axes=BATCH_AXES)(*placed)
  _assert_close(got, ref)
  _assert_close(dense, ref)  # the sharded dense loss equals the single-device one


@pytest.mark.parametrize("tile", [4, 16])
def test_ring_matches_dense_on_one_device(tile, reference):
  args, ref = reference
  _assert_close(_value_and_grad(impl="ring", tile=tile)(*args), ref)


def test_text_token_mask_drops_sot_eot_and_padding():
  ids = jnp.array([[2, 5, 6, 9, 0, 0], [2, 9, 0, 0, 0, 0]])  # eot = 9
  np.testing.assert_array_equal(text_token_mask(ids), [[0, 1, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0]])


def test_model_token_outputs_and_registry():
  cfg = {"image": {"kind": "vit", "variant": "mu/4", "image_size": 16, "pool_type": "gap"},
         "text": {"kind": "text", "variant": "tiny", "width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64,
                  "vocab_size": 20, "max_len": 6},
         "embed_dim": 16, "token_embeddings": True}
  model = build_model(cfg)
  batch = {"image": jnp.zeros((2, 16, 16, 3)), "text": jnp.array([[2, 5, 6, 19, 0, 0], [2, 7, 19, 0, 0, 0]])}
  params = model.init(jax.random.key(0), batch)["params"]
  out = model.apply({"params": params}, batch)
  assert out["zimg_tokens"].shape == (2, 16, 16) and out["ztxt_tokens"].shape == (2, 6, 16)
  np.testing.assert_allclose(jnp.linalg.norm(out["ztxt_tokens"], axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(out["txt_mask"], [[0, 1, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0]])
  loss, metrics = make_loss_fn({"filip": 1.0}, {"filip": {"impl": "ring", "tile": 1}})(out, batch)
  assert np.isfinite(loss) and "filip/t2i_accuracy" in metrics
  with pytest.raises(UserError, match="token_embeddings"):
    filip_loss({"zimg": out["zimg"], "ztxt": out["ztxt"], "logit_scale": 1.0}, batch)
  with pytest.raises(UserError, match="impl"):
    filip_loss(out, batch, impl="chunked")


def test_filip_maps_evaluator_writes_maps_and_metrics(tmp_path):
  from vlm_jax.data.tokenizers import get_tokenizer
  from vlm_jax.evaluate import make_evaluators
  tok = get_tokenizer("words", context_length=24)
  cfg = {"image": {"kind": "vit", "variant": "mu/4", "image_size": 16, "pool_type": "gap"},
         "text": {"kind": "text", "variant": "tiny", "width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64,
                  "vocab_size": tok.vocab_size, "max_len": 24},
         "embed_dim": 16, "token_embeddings": True}
  model = build_model(cfg)
  params = model.init(jax.random.key(0), {"image": jnp.zeros((1, 16, 16, 3)), "text": jnp.zeros((1, 24), int)})
  evals = make_evaluators({"maps": {"kind": "filip_maps_synthetic", "num_images": 8, "plots": 1}}, model=model,
                          tokenizer=tok, data_config={"image_size": 16}, plot_dir=str(tmp_path))
  out = evals["maps"](params)
  assert out["maps/object_words"] >= 8 and 0.0 < out["maps/chance_hit"] < 1.0
  assert 0.0 <= out["maps/word_patch_hit"] <= 1.0 and out["maps/zeroshot_chance"] == 1 / 64
  assert (tmp_path / "filip_maps_0.png").exists()


def test_filip_learns_beyond_chance():
  """~150 Adam steps of FILIP alone on 16-px synthetic scenes: held-out image→text retrieval among 64 pairs by the
  token-wise similarity s^I is far above chance (1/64)."""
  import time

  import optax

  from vlm_jax.data import pipeline, synthetic
  from vlm_jax.data.tokenizers import get_tokenizer
  from vlm_jax.objectives.filip import token_scores
  start = time.time()
  tok = get_tokenizer("words", context_length=24)
  src = synthetic.SyntheticShapes("train", image_size=16)

  def data(lo, n):
    els = [src.render(src.scene(i), masks=False) for i in range(lo, lo + n)]
    return {"image": pipeline.normalize(np.stack([e["image"] for e in els])), "text": tok([e["caption"] for e in els])}

  train, held = data(0, 1024), data(100_000, 64)
  cfg = {"image": {"kind": "vit", "variant": "mu/4", "image_size": 16, "pool_type": "gap"},
         "text": {"kind": "text", "variant": "tiny", "width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64,
                  "vocab_size": tok.vocab_size, "max_len": 24},
         "embed_dim": 16, "token_embeddings": True}
  model = build_model(cfg)
  params = model.init(jax.random.key(0), {k: v[:2] for k, v in train.items()})["params"]
  opt = optax.adam(3e-3)
  state = opt.init(params)

  @jax.jit
  def step(p, s, b):
    loss_of = lambda q: filip_loss(model.apply({"params": q}, b), b, impl="ring")[0]
    loss, g = jax.value_and_grad(loss_of)(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  rng = np.random.default_rng(0)
  for _ in range(150):
    idx = rng.choice(1024, 64, replace=False)
    params, state, loss = step(params, state, {k: v[idx] for k, v in train.items()})
  out = model.apply({"params": params}, held)
  s_img, _ = token_scores(out["zimg_tokens"], out["ztxt_tokens"], out["txt_mask"].astype(jnp.float32))
  acc = float(np.mean(np.argmax(np.asarray(s_img), axis=1) == np.arange(64)))
  print(f"FILIP held-out i2t top-1 {acc:.3f} vs chance {1 / 64:.3f} ({time.time() - start:.0f} s)")
  assert acc > 4 / 64


def test_collapsed_tokens_score_zero_accuracy():
  """Every image token and every text token the same vector: all FILIP scores tie, and a tie counts as wrong, so
  dense and ring (on 8 devices and on one) report 0 accuracy (not 100 %), ring == dense in value, gradients and
  metrics."""
  x, y, mask, scale = _inputs(3)
  v = np.float32([0.6, 0.8] + [0.0] * (E - 2))
  x, y = np.broadcast_to(v, x.shape).copy(), np.broadcast_to(v, y.shape).copy()
  args = (x, y, mask, scale)
  dense = _value_and_grad(impl="dense")(*args)
  one_device = _value_and_grad(impl="ring", tile=4)(*args)
  mesh = make_mesh({"data": 4, "fsdp": 2, "model": 1})
  placed = [jax.device_put(a, batch_sharding(mesh, a.ndim)) for a in args[:3]] + [
      jax.device_put(args[3], replicated(mesh))]
  with jax.set_mesh(mesh):
    on_mesh = _value_and_grad(impl="ring", tile=1, mesh_axes=BATCH_AXES)(*placed)
  for got in (dense, one_device, on_mesh):
    assert float(got[0][1]["filip/i2t_accuracy"]) == 0.0
    assert float(got[0][1]["filip/t2i_accuracy"]) == 0.0
  _assert_close(one_device, dense)
  _assert_close(on_mesh, dense)
