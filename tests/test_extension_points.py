"""TwoTower extension points for transfer and distillation (issue 12): encode_image / encode_text pass the encoders'
options through (prompts, keep_mask, token embeddings + EOT positions), and image_features returns ViT block
outputs (unrolled and scanned) and ModifiedResNet stage maps."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.errors import UserError
from vlm_jax.models import build_model
from vlm_jax.models.transformer import stack_block_params

L, V = 8, 30
TEXT = {"kind": "text", "variant": "tiny", "width": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64, "vocab_size": V,
        "max_len": L, "sot_id": 28, "eot_id": 29, "pad_id": 0}
VIT = {"kind": "vit", "variant": "mu/4", "image_size": 16, "depth": 3, "pool_type": "cls"}


def _model(image=VIT, **kw):
  return build_model({"image": image, "text": TEXT, "embed_dim": 16, **kw})


def _batch(b=2, size=16):
  rng = np.random.default_rng(0)
  ids = np.zeros((b, L), np.int32)
  ids[:, 0], ids[:, 1:4], ids[:, 4] = 28, rng.integers(1, 28, (b, 3)), 29
  ids[1, 2], ids[1, 3], ids[1, 4] = 29, 0, 0  # a shorter row
  return {"image": rng.normal(size=(b, size, size, 3)).astype(np.float32), "text": ids}


def _init(model, batch):
  return nn.meta.unbox(model.init(jax.random.key(0), batch))


def test_encode_text_from_own_embeddings_equals_ids():
  model, batch = _model(), _batch()
  v = _init(model, batch)
  ids = batch["text"]
  z_ids = model.apply(v, ids, method="encode_text")
  emb = model.apply(v, ids, method="text_token_embeddings")
  eot = model.apply(v, ids, method="eot_positions")
  np.testing.assert_array_equal(eot, [4, 2])
  z_emb = model.apply(v, embeddings=emb, eot_positions=eot, method="encode_text")
  np.testing.assert_array_equal(np.asarray(z_emb), np.asarray(z_ids))
  prompts = jnp.ones((1, 2, 32)) * 0.5  # MaPLe deep text prompts replace tokens [1, 3) before block 0
  z_p = model.apply(v, ids, prompts=prompts, method="encode_text")
  assert z_p.shape == z_ids.shape and not np.allclose(z_p, z_ids)


def test_encode_image_keep_mask_and_prompts_pass_through():
  model, batch = _model(), _batch()
  v = _init(model, batch)
  images = batch["image"]
  z = model.apply(v, images, method="encode_image")
  z_all = model.apply(v, images, keep_mask=jnp.ones((2, 16), bool), method="encode_image")
  np.testing.assert_array_equal(np.asarray(z_all), np.asarray(z))
  z_half = model.apply(v, images, keep_mask=jnp.arange(16)[None].repeat(2, 0) < 8, method="encode_image")
  assert not np.allclose(z_half, z)
  z_vpt = model.apply(v, images, prompts=jnp.zeros((2, 3, 32)), method="encode_image")  # VPT-deep, 3 tokens
  assert z_vpt.shape == (2, 16) and not np.allclose(z_vpt, z)


def test_vit_intermediates_unrolled_and_scanned():
  model, batch = _model(), _batch()
  v = _init(model, batch)
  feats = model.apply(v, batch["image"], layers=(0, -1), method="image_features")
  assert feats["grid"] == (4, 4) and len(feats["intermediates"]) == 2
  assert all(h.shape == (2, 16, 32) for h in feats["intermediates"])  # patch tokens only (no [CLS])
  np.testing.assert_array_equal(np.asarray(feats["zimg"]), np.asarray(model.apply(v, batch["image"],
                                                                                   method="encode_image")))
  every = model.apply(v, batch["image"], method="image_features")["intermediates"]
  assert len(every) == 3
  np.testing.assert_array_equal(np.asarray(every[2]), np.asarray(feats["intermediates"][1]))
  assert not np.allclose(every[0], every[1])
  # the last block's output, after the final LayerNorm, is the encoder's `tokens`
  ln = v["params"]["img"]["Transformer"]["ln_final"]
  h = np.asarray(every[2])
  mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
  normed = (h - mu) / np.sqrt(var + 1e-5) * np.asarray(ln["scale"]) + np.asarray(ln["bias"])
  np.testing.assert_allclose(normed, feats["tokens"], rtol=1e-4, atol=1e-4)

  scanned = _model(scan=True)
  sv = jax.tree.map(lambda x: x, v)
  sv["params"]["img"]["Transformer"] = stack_block_params(v["params"]["img"]["Transformer"], 3)
  sv["params"]["txt"]["Transformer"] = stack_block_params(v["params"]["txt"]["Transformer"], 2)
  sfeats = scanned.apply(sv, batch["image"], layers=(0, -1), method="image_features")
  for a, b in zip(sfeats["intermediates"], feats["intermediates"]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  with pytest.raises(UserError, match="out of range"):
    model.apply(v, batch["image"], layers=(3,), method="image_features")


def test_resnet_stages():
  resnet = {"kind": "resnet", "variant": "tiny", "image_size": 64}
  model, batch = _model(image=resnet), _batch(size=64)
  v = _init(model, batch)
  feats = model.apply(v, batch["image"], method="image_features")
  shapes = [tuple(s.shape) for s in feats["stages"]]
  width = model.img.width
  assert shapes == [(2, 64 // s, 64 // s, 4 * width * 2 ** i) for i, s in enumerate((4, 8, 16, 32))]
  np.testing.assert_array_equal(np.asarray(feats["zimg"]), np.asarray(model.apply(v, batch["image"],
                                                                                   method="encode_image")))
  picked = model.apply(v, batch["image"], layers=(-1,), method="image_features")["stages"]
  np.testing.assert_array_equal(np.asarray(picked[0]), np.asarray(feats["stages"][3]))
  with pytest.raises(UserError, match="ViT"):
    model.apply(v, batch["image"], keep_mask=jnp.ones((2, 4), bool), method="encode_image")
