"""One-tower models: the 'render' tokenizer (deterministic text images), CLIPPO (every weight shared by images
and rendered text), the shared-blocks mode, sharded == single device, the zero-shot / retrieval evaluators on
rendered text, and a short run that learns above chance."""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from vlm_jax.data import tokenizers
from vlm_jax.data.render_text import CLIP_MEAN, CLIP_STD, RenderTokenizer
from vlm_jax.errors import UserError
from vlm_jax.models import build_model
from vlm_jax.objectives import make_loss_fn
from vlm_jax.parallel.mesh import batch_sharding, make_mesh, replicated

VIT = {"kind": "vit", "variant": "mu/4", "image_size": 16, "posemb": "sincos2d", "pool_type": "gap"}
CLIPPO = {"framework": "one_tower", "mode": "clippo", "image": VIT, "embed_dim": 16}
SHARED = {"framework": "one_tower", "mode": "shared", "image": VIT, "embed_dim": 16,
          "text": {"vocab_size": 20, "max_len": 8}}


def _images(b=4, s=16, seed=0):
  return np.random.default_rng(seed).normal(size=(b, s, s, 3)).astype(np.float32)


def _init(model, batch):
  return nn.meta.unbox(model.init(jax.random.key(0), batch))


def test_render_tokenizer_is_deterministic_normalised_and_registered():
  tok = tokenizers.get_tokenizer("render", height=16, width=64, font_size=6)
  texts = ["a red circle", "a blue star on the left", "a red circle"]
  x = tok(texts)
  assert x.shape == (3, 16, 64, 3) and x.dtype == np.float32
  np.testing.assert_array_equal(x[0], x[2])
  assert not np.array_equal(x[0], x[1])
  np.testing.assert_array_equal(RenderTokenizer(16, 64, 6)(texts), x)  # a fresh instance draws the same pixels
  white = (1.0 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
  np.testing.assert_allclose(x[0, -1, -1], white, rtol=1e-6)  # background: white, normalised like photos
  assert x[0].min() < white.min() - 1.0  # ink
  long = tok(["word " * 200])  # overflowing text is truncated, not an error
  assert long.shape == (1, 16, 64, 3)
  assert tok("one string").shape == (1, 16, 64, 3)
  assert tok.vocab_size == 0 and tok.image_shape == (16, 64, 3)
  with pytest.raises(UserError, match="render"):
    tokenizers.get_tokenizer("render", height=2)


def test_clippo_shares_every_weight_between_images_and_text():
  model = build_model(CLIPPO)
  text = RenderTokenizer(16, 64, 6)(["a red circle", "a blue star", "two green boxes", "a pink ring"])
  batch = {"image": _images(), "text": text}
  variables = _init(model, batch)
  assert set(variables["params"]) == {"tower", "proj", "log_logit_scale"}
  out = model.apply(variables, batch)
  np.testing.assert_allclose(np.linalg.norm(out["zimg"], axis=-1), 1.0, rtol=1e-5)
  assert out["ztxt"].shape == (4, 16) and out["txt"]["tokens"].shape == (4, 64, 32)  # 4×16 patch grid
  # one function of pixels: an image through the text path equals the image path
  np.testing.assert_allclose(model.apply(variables, text, method="encode_image"),
                             model.apply(variables, text, method="encode_text"), rtol=1e-6)
  with pytest.raises(UserError, match="render"):
    model.apply(variables, {"image": _images(), "text": np.ones((4, 8), np.int32)})
  with pytest.raises(UserError, match="no text tower"):
    build_model(dict(CLIPPO, text={}))


def test_shared_mode_shares_blocks_and_ignores_padding():
  model = build_model(SHARED)
  ids = np.array([[2, 5, 6, 19, 0, 0, 0, 0], [2, 7, 19, 0, 0, 0, 0, 0]], np.int32)
  batch = {"image": _images(2), "text": ids}
  variables = _init(model, batch)
  tower = variables["params"]["tower"]
  assert {"Transformer", "patch_embedding", "token_embedding", "text_pos"} <= set(tower)
  assert {"img_proj", "txt_proj"} <= set(variables["params"])
  out = model.apply(variables, batch)
  assert out["zimg"].shape == out["ztxt"].shape == (2, 16)
  # pad tokens are masked keys and the pooled token is EOT: shorter padding gives the same embedding
  short = model.apply(variables, ids[:, :5], method="encode_text")
  np.testing.assert_allclose(short, out["ztxt"], rtol=1e-5, atol=1e-6)
  with pytest.raises(UserError, match="vocab_size"):
    build_model(dict(SHARED, text={}))


@pytest.mark.parametrize("cfg", [CLIPPO, SHARED], ids=["clippo", "shared"])
def test_sharded_equals_single_device(cfg):
  model = build_model(cfg)
  if cfg["mode"] == "clippo":
    text = np.random.default_rng(1).normal(size=(16, 16, 32, 3)).astype(np.float32)
  else:
    text = np.random.default_rng(1).integers(1, 19, size=(16, 8)).astype(np.int32)
    text[:, -1] = 19
  batch = {"image": _images(16), "text": text}
  params = _init(model, batch)["params"]
  loss_fn = make_loss_fn({"clip": 1.0})

  def f(p, b):
    return loss_fn(model.apply({"params": p}, b, train=True), b)

  results = []
  for mesh in (make_mesh({"data": 1}, devices=jax.devices()[:1]), make_mesh({"data": 4, "fsdp": 2})):
    with jax.set_mesh(mesh):
      b = {k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
      (loss, _), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(jax.device_put(params, replicated(mesh)), b)
      results.append((float(loss), jax.tree.map(np.asarray, grads)))
  np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5), results[1][1], results[0][1])


def test_zeroshot_and_retrieval_evaluators_read_rendered_text():
  from vlm_jax.evaluate import make_evaluators  # noqa: PLC0415
  model = build_model(CLIPPO)
  tok = RenderTokenizer(16, 64, 6)
  evals = make_evaluators({"zeroshot": {"kind": "zeroshot_synthetic"},
                           "retrieval": {"kind": "retrieval_synthetic", "num_images": 16, "captions_per_image": 2}},
                          model=model, tokenizer=tok, data_config={"name": "synthetic", "image_size": 16})
  variables = _init(model, {"image": _images(), "text": tok(["a"] * 4)})
  out = {k: v for e in evals.values() for k, v in e(variables).items()}
  assert 0.0 <= out["zeroshot/top1"] <= 1.0
  assert 0.0 <= out["retrieval/text_to_image_R@1"] <= 1.0


def test_clippo_learns_above_chance():
  """Colour words rendered as text vs images of one coloured shape: zero-shot over the 8 colours on held-out
  images beats chance (1/8) after a short contrastive run."""
  from vlm_jax.data import synthetic  # noqa: PLC0415
  from vlm_jax.data.transforms import normalize  # noqa: PLC0415
  t0 = time.time()
  names = [c[0] for c in synthetic.COLOURS[:8]]

  def split(name, n):
    src = synthetic.SyntheticShapes(name, image_size=16, num_samples=n)
    items = [src[i] for i in range(n)]
    x = normalize(np.stack([it["image"] for it in items]), CLIP_MEAN, CLIP_STD)
    y = np.array([int(it["classes"][0]) % 8 for it in items])  # class = shape · 8 + colour
    return x, y

  train_x, train_y = split("eval_seen", 768)
  test_x, test_y = split("eval_unseen", 256)
  tok = RenderTokenizer(16, 64, 8)
  words = tok(names)
  model = build_model(dict(CLIPPO, image=dict(VIT, width=64, mlp_dim=128)))
  params = _init(model, {"image": train_x[:2], "text": words[:2]})["params"]
  loss_fn = make_loss_fn({"clip": 1.0})
  tx = optax.adamw(2e-3, weight_decay=0.05)
  opt = tx.init(params)

  @jax.jit
  def step(p, o, x, t):
    (loss, _), g = jax.value_and_grad(lambda p: loss_fn(model.apply({"params": p}, {"image": x, "text": t},
                                                                    train=True), {}), has_aux=True)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  rng = np.random.default_rng(0)
  for _ in range(120):
    idx = rng.choice(len(train_x), 32, replace=False)
    params, opt, _ = step(params, opt, train_x[idx], words[train_y[idx]])
  zi = model.apply({"params": params}, test_x, method="encode_image")
  zt = model.apply({"params": params}, words, method="encode_text")
  acc = float(np.mean(np.argmax(np.asarray(zi @ zt.T), 1) == test_y))
  print(f"CLIPPO learning test ({time.time() - t0:.0f}s): held-out colour zero-shot top-1 {acc:.3f}, "
        f"chance {1 / 8:.3f}")
  assert acc > 2 / 8
