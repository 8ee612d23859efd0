"""Zero-shot segmentation: mIoU against a plain numpy reference, MaskCLIP dense features checked by hand, and a
short-trained tiny CLIP whose MaskCLIP segmentation beats the broadcast global-embedding baseline."""

from __future__ import annotations

import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from vlm_jax.errors import UserError
from vlm_jax.evaluate import segmentation as seg
from vlm_jax.models import build_model
from vlm_jax.models.transformer import stack_block_params
from vlm_jax.models.vit import ViT

sys.path.insert(0, os.path.dirname(__file__))
import train_helpers as th  # noqa: E402

SYN = {"n_shapes": 3, "n_colours": 3, "n_holdout": 3}  # 9 classes (6 seen): learnt in a few hundred steps
VIT = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8, image_size=32)


def random_variables(module, *args, seed=0, **kwargs):
  """Random variables of `module` without compiling its initialiser: params normal(0, 0.1) (norm scales around
  1), BatchNorm statistics mean 0 / var 1."""
  abstract = nn.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs)))
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in flatten_dict(abstract).items():
    if path[0] == "params":
      v = rng.normal(0, 0.1, leaf.shape).astype(np.float32) + (1.0 if path[-1] == "scale" else 0.0)
    else:
      v = np.full(leaf.shape, 1.0 if path[-1] == "var" else 0.0, np.float32)
    out[path] = jnp.asarray(v)
  return unflatten_dict(out)


def random_params(module, *args, **kwargs):
  return random_variables(module, *args, **kwargs)["params"]


def images(b=2, size=32, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(b, size, size, 3)), jnp.float32)


# --- metric --------------------------------------------------------------------------------------------------

def reference_miou(gts, preds, num_labels):
  """Straightforward mIoU: per label, pixel intersection / union summed over all images; labels with an empty
  union are skipped."""
  ious = []
  for k in range(num_labels):
    inter = sum(np.sum((g == k) & (p == k)) for g, p in zip(gts, preds))
    union = sum(np.sum((g == k) | (p == k)) for g, p in zip(gts, preds))
    if union:
      ious.append(inter / union)
  return float(np.mean(ious))


def test_miou_matches_numpy_reference_and_accumulates():
  rng = np.random.default_rng(0)
  k = 7
  gts = [rng.choice([0, 1, 2, 4], size=(9, 11), p=[0.6, 0.2, 0.1, 0.1]) for _ in range(5)]
  preds = [np.where(rng.random(g.shape) < 0.7, g, rng.choice([0, 1, 5], size=g.shape)) for g in gts]
  conf = sum(seg.confusion_matrix(g, p, k) for g, p in zip(gts, preds))  # accumulated image by image
  np.testing.assert_array_equal(conf, seg.confusion_matrix(np.stack(gts), np.stack(preds), k))
  assert conf.sum() == 5 * 9 * 11
  iou = seg.iou_per_label(conf)
  assert np.isnan(iou[3]) and np.isnan(iou[6])  # absent from both ground truth and prediction: excluded
  assert iou[5] == 0.0  # predicted, never true: counts as 0
  assert seg.mean_iou(conf) == pytest.approx(reference_miou(gts, preds, k), abs=1e-12)
  # ignored pixels drop out of both sides
  g = np.array([[0, 1, -1]])
  p = np.array([[0, 1, 1]])
  np.testing.assert_array_equal(seg.confusion_matrix(g, p, 2), [[1, 0], [0, 1]])
  assert seg.mean_iou(seg.confusion_matrix(g, p, 2)) == 1.0


def test_chance_miou_is_the_expected_miou_of_random_labels():
  rng = np.random.default_rng(1)
  k = 5
  gt = rng.choice(k - 1, size=(200_000,), p=[0.7, 0.2, 0.05, 0.05])  # label 4 never occurs in the truth
  sim = seg.mean_iou(seg.confusion_matrix(gt, rng.integers(0, k, gt.shape), k))
  assert seg.chance_miou(np.bincount(gt, minlength=k)) == pytest.approx(sim, abs=2e-3)


def test_upsample_bilinear_matches_jax_resize():
  x = np.random.default_rng(2).normal(size=(2, 3, 5, 4)).astype(np.float32)
  for size in ((17, 23), (3, 5), (64, 64)):
    ref = jax.image.resize(jnp.asarray(x), (2,) + size + (4,), method="bilinear", antialias=False)
    np.testing.assert_allclose(seg.upsample_bilinear(x, size), np.asarray(ref), atol=1e-5)


def test_otsu_threshold_splits_two_modes():
  rng = np.random.default_rng(3)
  v = np.concatenate([rng.normal(0.2, 0.03, 800), rng.normal(0.6, 0.03, 200)])
  t = seg.otsu_threshold(v)
  assert 0.3 < t < 0.5
  assert seg.otsu_threshold(np.full(4, 0.5)) == 0.5


def test_background_rules_and_broadcast_baseline():
  emb = np.eye(4, dtype=np.float32)[:3]  # three classes on the first three axes
  z = np.zeros((1, 2, 2, 4), np.float32)
  z[0, 0, 0] = (1, 0, 0, 0)  # class 0
  z[0, 0, 1] = (0, 0.6, 0.8, 0)  # class 2, clearly
  z[0, 1, 0] = (0.5, 0.5, 0.5, 0.5)  # all classes alike: background under the threshold rule
  z[0, 1, 1] = (0, 0, 0, 1)  # nothing: background
  logits = seg.scores_with_background(z, emb, threshold=0.3)
  np.testing.assert_array_equal(logits.argmax(-1), [[[1, 3], [0, 0]]])
  np.testing.assert_allclose(logits[0, 0, 0], [0.3, 2 / 3, -1 / 3, -1 / 3], atol=1e-6)
  bg_emb = np.array([0, 0, 0, 1], np.float32)
  prompt = seg.scores_with_background(z, emb, background="prompt", background_emb=bg_emb).argmax(-1)
  np.testing.assert_array_equal(prompt, [[[1, 3], [0, 0]]])  # a tie goes to label 0 (background)
  pred = seg.predict_dense(z, emb, (8, 8), threshold=0.3)
  assert pred.shape == (1, 8, 8) and pred[0, 0, 0] == 1 and pred[0, 0, 7] == 3 and pred[0, 7, 7] == 0
  base = seg.predict_broadcast(np.array([[0, 0.6, 0.8, 0]], np.float32), emb, (3, 4), threshold=0.3)
  np.testing.assert_array_equal(base, np.full((1, 3, 4), 3))
  with pytest.raises(ValueError):
    seg.scores_with_background(z, emb, background="prompt")
  with pytest.raises(UserError, match="number or 'otsu'"):
    seg.evaluate_synthetic(None, None, None, None, threshold="high")
  with pytest.raises(UserError, match="background rule"):
    seg.evaluate_synthetic(None, None, None, None, background="sky")


# --- MaskCLIP dense features ---------------------------------------------------------------------------------

def _ln(x, p, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def _value_path(x, attn):
  """out(v(x)) per token: the attention output when every token attends only to itself."""
  v = jnp.einsum("bnd,dhk->bnhk", x, attn["value"]["kernel"]) + attn["value"]["bias"]
  return jnp.einsum("bnhk,hkd->bnd", v, attn["out"]["kernel"]) + attn["out"]["bias"]


def _mlp(x, p):
  h = jax.nn.gelu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"], approximate=False)
  return h @ p["fc2"]["kernel"] + p["fc2"]["bias"]


@pytest.mark.parametrize("pool", ["gap", "cls"])
def test_vit_dense_is_the_last_blocks_value_path(pool):
  vit = ViT(**VIT, pool_type=pool)
  x = images()
  params = random_params(vit, x)
  dense = jax.jit(lambda p: vit.apply({"params": p}, x, dense=True))(params)
  plain, inter = jax.jit(lambda p: vit.apply({"params": p}, x,
                                             capture_intermediates=lambda m, _: m.name == "block_0"))(params)
  h = inter["intermediates"]["Transformer"]["block_0"]["__call__"][0][0]  # input of the last block
  blk = params["Transformer"]["block_1"]
  y = h + _value_path(_ln(h, blk["ln1"]), blk["attn"])  # MaskCLIP: no query-key attention
  y = y + _mlp(_ln(y, blk["ln2"]), blk["mlp"])
  want = _ln(y, params["Transformer"]["ln_final"])[:, 1 if pool == "cls" else 0:]
  np.testing.assert_allclose(dense["tokens"], want, atol=2e-5)
  assert dense["tokens"].shape == plain["tokens"].shape == (2, 16, 32)
  assert not np.allclose(dense["tokens"], plain["tokens"], atol=1e-3)  # attention does mix tokens normally
  # the same under nn.scan and rematerialisation
  scanned = {**params, "Transformer": stack_block_params(params["Transformer"], VIT["depth"])}
  for kw in (dict(scan=True), dict(scan=True, remat="full"), dict(remat="full")):
    p = scanned if kw.get("scan") else params
    model = ViT(**VIT, pool_type=pool, **kw)
    out, plain_kw = jax.jit(lambda p, m=model: (m.apply({"params": p}, x, dense=True),
                                                m.apply({"params": p}, x)))(p)
    np.testing.assert_allclose(out["tokens"], dense["tokens"], atol=2e-5)
    np.testing.assert_allclose(plain_kw["pooled"], plain["pooled"], atol=2e-5)


def test_vit_map_dense_is_the_map_heads_value_path():
  vit = ViT(**VIT, pool_type="map")
  x = images()
  params = random_params(vit, x)
  plain, dense = jax.jit(lambda p: (vit.apply({"params": p}, x), vit.apply({"params": p}, x, dense=True)))(params)
  head = params["MAPHead"]
  y = _value_path(plain["tokens"], head["attn"])
  want = y + _mlp(_ln(y, head["ln"]), head["mlp"])
  np.testing.assert_allclose(dense["tokens"], want, atol=2e-5)
  np.testing.assert_allclose(dense["pooled"], plain["pooled"], atol=1e-6)  # transformer unchanged


def _two_tower(image):
  return build_model({"image": image, "embed_dim": 16,
                      "text": {"kind": "text", "width": 32, "depth": 1, "mlp_dim": 64, "num_heads": 2,
                               "vocab_size": 64, "max_len": 8}})


def test_encode_dense_projects_and_normalises_dense_tokens():
  model = _two_tower(dict(kind="vit", **VIT))
  x = images(size=32)
  batch = {"image": x, "text": jnp.ones((2, 8), jnp.int32)}
  params = random_params(model, batch)
  z = jax.jit(lambda p: model.apply({"params": p}, x, method="encode_dense"))(params)
  tokens = jax.jit(lambda p: model.img.apply({"params": p["img"]}, x, dense=True)["tokens"])(params)
  want = tokens @ params["img_proj"]["kernel"]
  want = want / jnp.linalg.norm(want, axis=-1, keepdims=True)
  assert z.shape == (2, 4, 4, 16) and z.dtype == jnp.float32
  np.testing.assert_allclose(z.reshape(2, 16, 16), want, atol=1e-5)
  z_rect = jax.eval_shape(lambda p: model.apply({"params": p}, jnp.zeros((1, 16, 40, 3)), method="encode_dense"),
                          params)
  assert z_rect.shape == (1, 2, 5, 16)

  resnet = _two_tower({"kind": "resnet", "variant": "tiny", "image_size": 32, "output_dim": 16})
  variables = random_variables(resnet, batch)
  x64 = images(size=64)
  z = jax.jit(lambda v: resnet.apply(v, x64, method="encode_dense"))(variables)
  tok = jax.jit(lambda v: resnet.img.apply({"params": v["params"]["img"], "batch_stats": v["batch_stats"]["img"]},
                                           x64)["tokens"])(variables)
  assert z.shape == (2, 2, 2, 16)  # stride 32: no extra projection (the attention pool projects to embed_dim)
  np.testing.assert_allclose(z.reshape(2, 4, 16), tok / jnp.linalg.norm(tok, axis=-1, keepdims=True), atol=1e-5)


def test_write_overlays_png(tmp_path):
  rng = np.random.default_rng(4)
  imgs = rng.integers(0, 255, (3, 16, 16, 3), dtype=np.uint8)
  gt = np.zeros((3, 16, 16), np.int32)
  gt[:, 4:10, 4:10] = 2
  path = seg.write_overlays(str(tmp_path / "plots" / "seg.png"), imgs, gt, np.roll(gt, 2, axis=2),
                            ["background", "a", "b"], baseline=np.ones_like(gt), max_images=2)
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# --- a short-trained tiny CLIP -------------------------------------------------------------------------------

def _train_tiny_clip(steps: int, batch: int = 64, n_train: int = 4096, seed: int = 0, lr: float = 2e-3):
  """The demo's CLIP ModifiedResNet image tower + a one-layer text tower, trained with the CLIP loss on the
  9-class synthetic set `SYN`; pre-rendered images and a plain jitted loop (no shard rendering, no checkpoints)."""
  from vlm_jax import assembly, objectives
  from vlm_jax.data import pipeline
  from vlm_jax.data.transforms import normalize
  from vlm_jax import config_lib as cb

  c = th.micro_config()
  c.data.image_size = 32
  c.data.synthetic = dict(SYN)
  c.model = cb.tiny_model(32)
  c.model.text = {"kind": "text", "variant": "tiny", "width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64}
  tokenizer, model, _ = assembly.assemble(c)[:3]
  loss_fn = objectives.make_loss_fn({"clip": 1.0}, None, mesh_axes=None)
  src = pipeline.make_source(c.data, "train", image_size=32)
  els = [src.render(src.scene(i), masks=False) for i in range(n_train)]
  imgs = normalize(np.stack([e["image"] for e in els]))
  texts = tokenizer([e["caption"] for e in els])
  # an 'rbg' key: XLA compiles its initialisers in seconds, threefry's truncated normals take ~40 s on 2 cores
  init = jax.jit(model.init)(jax.random.key(seed, impl="rbg"), {"image": imgs[:2], "text": texts[:2]})
  variables = nn.meta.unbox(init)
  params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, steps // 10, steps), weight_decay=0.05)

  @jax.jit
  def step(params, rest, opt, batch):
    def loss(p):  # BatchNorm trains (batch statistics, running averages updated), as in the demo
      out, new_rest = model.apply({"params": p, **rest}, batch, train=True, mutable=list(rest))
      return loss_fn(out, batch)[0], new_rest
    grads, rest = jax.grad(loss, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), rest, opt

  opt = tx.init(params)
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.integers(0, n_train, batch)
    params, rest, opt = step(params, rest, opt, {"image": imgs[idx], "text": texts[idx]})
  return c, tokenizer, model, {"params": params, **rest}


def test_maskclip_beats_broadcast_baseline_on_synthetic_scenes(tmp_path):
  from vlm_jax.evaluate import make_evaluators

  t0 = time.time()
  steps = 600
  config, tokenizer, model, variables = _train_tiny_clip(steps)
  evals = make_evaluators({"segmentation": {"kind": "segmentation_synthetic", "num_images": 192}}, model=model,
                          tokenizer=tokenizer, data_config=config.data, plot_dir=str(tmp_path / "plots"))
  m = evals["segmentation"](variables)
  print(f"\ntiny CLIP ResNet, {steps} steps x 64, 9 classes, 64 px held-out scenes: MaskCLIP mIoU "
        f"{m['segmentation/miou']:.3f} | broadcast baseline {m['segmentation/baseline_miou']:.3f} | chance "
        f"{m['segmentation/chance']:.3f} | Otsu threshold {m['segmentation/threshold']:.3f} "
        f"({time.time() - t0:.0f}s)")
  assert m["segmentation/miou"] > m["segmentation/baseline_miou"] + 0.03
  assert m["segmentation/miou"] > 5 * m["segmentation/chance"]
  assert os.path.isfile(tmp_path / "plots" / "segmentation_overlays.png")
