"""MAE and feature-target masked image modelling: losses vs hand-computed values, masking (ratio, visible-only
encoder, loss on masked patches only), sharded == single-device, teacher init by path mapping, the reconstruction
evaluator, and a short learning run that beats the mean-patch baseline."""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlm_jax.errors import UserError
from vlm_jax.models import build_model
from vlm_jax.models.masking import masked_from_keep
from vlm_jax.models.patches import normalize_patches, patchify, unpatchify
from vlm_jax.objectives import make_loss_fn
from vlm_jax.objectives.masked_image import mae_loss, mim_feature_loss
from vlm_jax.parallel.mesh import batch_sharding, make_mesh, replicated
from vlm_jax.runs import init as run_init

MICRO = {"framework": "mae", "mask_ratio": 0.75, "norm_pix_loss": True,
         "image": {"kind": "vit", "variant": "mu/4", "image_size": 16, "posemb": "sincos2d", "pool_type": "gap"},
         "decoder": {"width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64}}
TEACHER = {"kind": "vit", "variant": "mu/4", "image_size": 16, "pool_type": "gap"}


def _images(b=8, s=16, seed=0):
  return np.random.default_rng(seed).normal(size=(b, s, s, 3)).astype(np.float32)


def _init(model, images, seed=0):
  variables = model.init({"params": jax.random.key(seed), "mask": jax.random.key(1)}, {"image": images})
  return nn.meta.unbox(variables)


# ---- losses -------------------------------------------------------------------------------------------------

def test_mae_loss_hand_computed():
  pred = np.array([[[1., 2.], [0., 0.], [3., 1.]]], np.float32)
  target = np.array([[[0., 0.], [5., 5.], [1., 1.]]], np.float32)
  mask = np.array([[1., 0., 1.]], np.float32)
  # masked patches 0 and 2: mean_d err = (1 + 4)/2 = 2.5 and (4 + 0)/2 = 2; mean over them 2.25
  loss, metrics = mae_loss({"mim": {"pred": pred, "target": target, "mask": mask}}, {})
  np.testing.assert_allclose(loss, 2.25, rtol=1e-6)
  np.testing.assert_allclose(metrics["mae/mask_ratio"], 2 / 3, rtol=1e-6)
  # another outputs key (FLAVA's image part) through the registry
  fn = make_loss_fn({"mae": 1.0}, {"mae": {"key": "other"}})
  total, m = fn({"other": {"pred": pred, "target": target, "mask": mask}}, {})
  np.testing.assert_allclose(total, 2.25, rtol=1e-6)
  assert set(m) == {"mae/loss", "mae/mask_ratio", "loss"}
  with pytest.raises(UserError, match="outputs"):
    mae_loss({"zimg": 0}, {})


def test_mim_feature_loss_hand_computed():
  pred = np.array([[[1., 0.], [0., 2.], [3., 3.]]], np.float32)
  target = np.array([[[1., 1.], [0., 5.], [-1., -1.]]], np.float32)
  mask = np.array([[1., 1., 0.]], np.float32)
  cos = np.array([1 / np.sqrt(2), 1.0])  # the third patch (cos −1) is visible: no loss
  loss, m = mim_feature_loss({"mim": {"pred": pred, "target": target, "mask": mask}}, {})
  np.testing.assert_allclose(loss, 1 - cos.mean(), rtol=1e-6)
  np.testing.assert_allclose(m["mim_feature/cosine"], cos.mean(), rtol=1e-6)
  mse, _ = mim_feature_loss({"mim": {"pred": pred, "target": target, "mask": mask}}, {}, distance="mse")
  np.testing.assert_allclose(mse, 2 * (1 - cos.mean()), rtol=1e-5)
  with pytest.raises(UserError, match="distance"):
    mim_feature_loss({"mim": {"pred": pred, "target": target, "mask": mask}}, {}, distance="l1")


def test_patchify_roundtrip_and_norm_pix():
  x = _images(2, 8)
  p = np.asarray(patchify(jnp.asarray(x), 4))
  assert p.shape == (2, 4, 48)
  np.testing.assert_array_equal(p[0, 1], x[0, 0:4, 4:8].reshape(-1))  # raster order, (row, col, channel)
  np.testing.assert_array_equal(np.asarray(unpatchify(jnp.asarray(p), (2, 2), 4)), x)
  n = np.asarray(normalize_patches(jnp.asarray(p)))
  ref = (p - p.mean(-1, keepdims=True)) / np.sqrt(p.var(-1, ddof=1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(n, ref, rtol=1e-5, atol=1e-5)


# ---- masking --------------------------------------------------------------------------------------------------

def test_masking_ratio_visible_only_encoder_and_masked_only_loss():
  model = build_model(MICRO)
  images = _images()
  variables = _init(model, images)
  out = model.apply(variables, {"image": images}, rngs={"mask": jax.random.key(3)})
  mask, keep = np.asarray(out["mim"]["mask"]), np.asarray(out["keep_idx"])
  assert mask.shape == (8, 16) and keep.shape == (8, 4)
  np.testing.assert_array_equal(mask.sum(1), 12)  # exactly round(0.75 · 16) masked per example
  for row_mask, row_keep in zip(mask, keep):
    assert len(set(row_keep)) == 4 and np.all(row_mask[row_keep] == 0)
  assert out["img"]["tokens"].shape == (8, 4, 32)  # the encoder ran on the 4 visible patches only
  assert len({tuple(r) for r in keep}) > 1  # a different subset per example

  # the encoder never sees masked pixels: changing them leaves the encoder output unchanged
  pix = np.asarray(patchify(jnp.asarray(images), 4))
  noisy = np.where(mask[..., None] > 0, pix + 5.0, pix)
  images2 = np.asarray(unpatchify(jnp.asarray(noisy), (4, 4), 4))
  out2 = model.apply(variables, {"image": images2}, rngs={"mask": jax.random.key(3)})
  np.testing.assert_allclose(out2["img"]["tokens"], out["img"]["tokens"], atol=1e-6)

  # the loss only reads masked positions: changing predictions at visible ones leaves it unchanged
  mim = dict(out["mim"])
  loss, _ = mae_loss({"mim": mim}, {})
  mim["pred"] = jnp.where(mim["mask"][..., None] > 0, mim["pred"], 100.0)
  np.testing.assert_allclose(mae_loss({"mim": mim}, {})[0], loss, rtol=1e-6)

  # encode_image (linear probe) pools the whole unmasked image
  z = model.apply(variables, images, method="encode_image")
  assert z.shape == (8, 32)
  np.testing.assert_array_equal(np.asarray(masked_from_keep(jnp.asarray(keep), 16)), mask)


def test_mask_ratio_is_checked():
  bad = dict(MICRO, mask_ratio=1.0)
  with pytest.raises(UserError, match="mask_ratio"):
    _init(build_model(bad), _images(2))
  with pytest.raises(UserError, match="ViT"):
    build_model(dict(MICRO, image={"kind": "resnet", "variant": "tiny"}))


# ---- sharded vs one device --------------------------------------------------------------------------------------

@pytest.mark.parametrize("objective,teacher", [("mae", None), ("mim_feature", TEACHER)])
def test_sharded_equals_single_device(objective, teacher):
  cfg = dict(MICRO, teacher=teacher) if teacher else MICRO
  model = build_model(cfg)
  images = _images(16)
  params = _init(model, images)["params"]
  loss_fn = make_loss_fn({objective: 1.0})

  def f(p, x):
    out = model.apply({"params": p}, {"image": x}, rngs={"mask": jax.random.key(5)}, train=True)
    return loss_fn(out, {"image": x})

  results = []
  for mesh in (make_mesh({"data": 1}, devices=jax.devices()[:1]), make_mesh({"data": 4, "fsdp": 2})):
    with jax.set_mesh(mesh):
      x = jax.device_put(images, batch_sharding(mesh, 4))
      p = jax.device_put(params, replicated(mesh))
      (loss, metrics), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(p, x)
      results.append((float(loss), jax.tree.map(np.asarray, grads)))
  np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5), results[1][1], results[0][1])


# ---- feature targets: a frozen teacher read from a checkpoint through a path mapping --------------------------

def test_teacher_targets_and_path_mapping():
  model = build_model(dict(MICRO, teacher=TEACHER))
  images = _images(4)
  params = _init(model, images)["params"]
  teacher_cls = build_model({"image": TEACHER, "text": {"kind": "text", "variant": "tiny", "vocab_size": 10,
                                                        "max_len": 4}})
  clip_params = nn.meta.unbox(teacher_cls.init(jax.random.key(7), {"image": images,
                                                                   "text": np.ones((4, 4), np.int32)})["params"])
  copied = run_init.copy_variables({"params": jax.tree.map(np.asarray, params)},
                                   {"params": jax.tree.map(np.asarray, clip_params)},
                                   r"^teacher/", rename={"^teacher/": "img/"})["params"]
  jax.tree.map(np.testing.assert_array_equal, copied["teacher"], jax.tree.map(np.asarray, clip_params["img"]))
  jax.tree.map(np.testing.assert_array_equal, copied["encoder"], jax.tree.map(np.asarray, params["encoder"]))
  out = model.apply({"params": copied}, {"image": images}, rngs={"mask": jax.random.key(0)})
  tokens = teacher_cls.apply({"params": clip_params}, images, method=lambda m, x: m.img(x)["tokens"])
  np.testing.assert_allclose(out["mim"]["target"], tokens, rtol=1e-5, atol=1e-6)
  assert out["mim"]["pred"].shape == tokens.shape
  assert run_init.source_path("teacher/Transformer/x", {"^teacher/": "img/"}) == "img/Transformer/x"
  with pytest.raises(UserError, match="no parameter 'image/"):
    run_init.copy_variables({"params": jax.tree.map(np.asarray, params)},
                            {"params": jax.tree.map(np.asarray, clip_params)}, r"^teacher/",
                            rename={"^teacher/": "image/"})


# ---- evaluator and learning ---------------------------------------------------------------------------------

def _synthetic_images(n, size=16, split="eval_retrieval", seed=0):
  from vlm_jax.data import synthetic  # noqa: PLC0415
  from vlm_jax.data.transforms import CLIP_MEAN, CLIP_STD, normalize  # noqa: PLC0415
  src = synthetic.SyntheticShapes(split, seed=seed, image_size=size, num_samples=n)
  return normalize(np.stack([src[i]["image"] for i in range(n)]), CLIP_MEAN, CLIP_STD)


def test_reconstruction_evaluator_metrics_and_png(tmp_path):
  from vlm_jax.evaluate import make_evaluators  # noqa: PLC0415
  from vlm_jax.evaluate.reconstruction import reconstruction_metrics  # noqa: PLC0415
  pred = np.zeros((1, 2, 2), np.float32)
  target = np.array([[[1., 1.], [3., 3.]]], np.float32)
  m = reconstruction_metrics(pred, target, np.array([[1., 0.]], np.float32))
  # masked patch 0: model error 1; dataset-mean patch (2, 2) error 1; visible-mean (3, 3) error 4
  assert m == {"reconstruction/loss": 1.0, "reconstruction/baseline_mean_patch": 1.0,
               "reconstruction/baseline_visible_mean": 4.0, "reconstruction/mask_ratio": 0.5}
  model = build_model(MICRO)
  data = {"name": "synthetic", "image_size": 16}
  evals = make_evaluators({"reconstruction": {"kind": "reconstruction_synthetic", "num_images": 24,
                                              "batch_size": 16, "plot_images": 3}},
                          model=model, tokenizer=None, data_config=data, plot_dir=str(tmp_path))
  out = evals["reconstruction"](_init(model, _images(2)))
  assert set(out) == {"reconstruction/loss", "reconstruction/baseline_mean_patch",
                      "reconstruction/baseline_visible_mean", "reconstruction/mask_ratio"}
  assert out["reconstruction/mask_ratio"] == 0.75
  assert (tmp_path / "reconstruction.png").stat().st_size > 0


def test_mae_learns_below_mean_patch_baseline():
  """A few hundred steps on synthetic images: masked-patch loss below predicting the mean patch."""
  from vlm_jax.evaluate.reconstruction import reconstruction_metrics  # noqa: PLC0415
  t0 = time.time()
  model = build_model(dict(MICRO, image=dict(MICRO["image"], width=64, mlp_dim=128)))
  train, test = _synthetic_images(512, split="train"), _synthetic_images(128)
  params = _init(model, train[:2])["params"]
  tx = optax.adamw(2e-3, b2=0.95, weight_decay=0.05)
  opt = tx.init(params)

  @jax.jit
  def step(p, o, x, k):
    def f(p):
      return mae_loss(model.apply({"params": p}, {"image": x}, rngs={"mask": k}, train=True), {})[0]
    loss, g = jax.value_and_grad(f)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  rng = np.random.default_rng(0)
  for i in range(300):
    p_idx = rng.choice(len(train), 64, replace=False)
    params, opt, _ = step(params, opt, train[p_idx], jax.random.key(i))
  mim = model.apply({"params": params}, {"image": test}, rngs={"mask": jax.random.key(10_000)})["mim"]
  m = reconstruction_metrics(*(np.asarray(mim[k]) for k in ("pred", "target", "mask")))
  print(f"MAE learning test ({time.time() - t0:.0f}s): masked-patch loss {m['reconstruction/loss']:.3f}, "
        f"mean-patch baseline {m['reconstruction/baseline_mean_patch']:.3f}, visible-mean baseline "
        f"{m['reconstruction/baseline_visible_mean']:.3f}")
  assert m["reconstruction/loss"] < 0.9 * m["reconstruction/baseline_mean_patch"]
