"""Behaviour tests for vlm_jax.models: variant tables, shapes, scan/remat, posemb, FLIP, text, two-tower, sharding."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from vlm_jax.errors import UserError
from vlm_jax.models import build_model, variants
from vlm_jax.models.text import TextTransformer
from vlm_jax.models.transformer import REMAT_NAMES, Encoder, remat_policy, stack_block_params
from vlm_jax.models.masking import random_keep_indices
from vlm_jax.models.vit import ViT, resize_posemb
from vlm_jax.parallel.mesh import make_mesh
from vlm_jax.parallel.partitioning import DEFAULT_RULES, logical_to_shardings

TINY_VIT = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8, image_size=32)
TINY_TEXT = dict(vocab_size=64, max_len=12, width=32, depth=2, mlp_dim=64, num_heads=2)


def fake_params(module, *args, seed=0, **kwargs):
  """Random params with the shapes `module.init` would give, without compiling the initialiser."""
  abstract = nn.meta.unbox(jax.eval_shape(
      lambda: module.init({"params": jax.random.key(0), "mask": jax.random.key(1)}, *args, **kwargs)))
  rng = np.random.default_rng(seed)
  flat = flatten_dict(abstract["params"])
  out = {}
  for path, leaf in flat.items():
    v = rng.normal(0, 0.1, leaf.shape).astype(np.float32)
    out[path] = jnp.asarray(v + 1.0 if path[-1] == "scale" else v)
  return unflatten_dict(out)


def images(b=2, size=32, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(b, size, size, 3)), jnp.float32)


def token_ids(b=2, length=12, vocab=64, seed=0):
  """Ids in [1, vocab-2] with the EOT id (vocab-1, the largest) at a per-row position, padding (0) after."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, vocab - 1, size=(b, length))
  eot = rng.integers(2, length, size=(b,))
  for i, e in enumerate(eot):
    ids[i, e] = vocab - 1
    ids[i, e + 1:] = 0
  return jnp.asarray(ids, jnp.int32), eot


def close(a, b, atol=1e-5):
  np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=atol, rtol=1e-5)


# --- variants ------------------------------------------------------------------------------------------------

VIT_TABLE = {  # big_vision decode_variant (Zhai et al. 2022, Table 2): width, depth, mlp, heads
    "mu": (32, 1, 128, 2), "Ti": (192, 12, 768, 3), "S": (384, 12, 1536, 6), "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12), "L": (1024, 24, 4096, 16), "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16), "g": (1408, 40, 6144, 16), "G": (1664, 48, 8192, 16),
}
TEXT_TABLE = {  # open_clip text_cfg: width, depth, heads
    "S": (384, 12, 6), "M": (512, 12, 8), "B": (512, 12, 8), "L": (768, 12, 12), "H": (1024, 24, 16),
    "g": (1024, 24, 16), "G": (1280, 32, 20), "So400m": (1152, 27, 16),
}


@pytest.mark.parametrize("name", sorted(VIT_TABLE))
def test_vit_variant_table(name):
  for patch in (8, 14, 16, 32):
    v = variants.vit_variant(f"{name}/{patch}")
    assert (v["width"], v["depth"], v["mlp_dim"], v["num_heads"]) == VIT_TABLE[name]
    assert v["patch_size"] == patch
  assert variants.vit_variant(name)["patch_size"] == 16


def test_text_and_resnet_variant_tables():
  for name, (w, d, h) in TEXT_TABLE.items():
    v = variants.text_variant(name)
    assert (v["width"], v["depth"], v["num_heads"]) == (w, d, h)
    assert v["mlp_dim"] == (4304 if name == "So400m" else 4 * w)
  assert variants.resnet_variant("RN50") == dict(layers=(3, 4, 6, 3), width=64, heads=32, output_dim=1024,
                                                 image_size=224)
  assert variants.resnet_variant("RN101")["layers"] == (3, 4, 23, 3)
  assert variants.resnet_variant("RN50x4") == dict(layers=(4, 6, 10, 6), width=80, heads=40, output_dim=640,
                                                   image_size=288)
  assert variants.resnet_variant("tiny")["layers"] == (1, 1, 1, 1)


@pytest.mark.parametrize("fn,bad", [(variants.vit_variant, "X/16"), (variants.vit_variant, "B/x"),
                                    (variants.vit_variant, "b/16"), (variants.text_variant, "XL"),
                                    (variants.resnet_variant, "RN18")])
def test_unknown_variant_raises_user_error(fn, bad):
  with pytest.raises(UserError, match="valid|write"):
    fn(bad)


def test_unknown_variant_message_lists_choices():
  with pytest.raises(UserError, match="So400m"):
    variants.vit_variant("Q/14")


def test_build_model_user_errors():
  good = dict(image=dict(kind="vit", variant="tiny/8"), text=dict(kind="text", variant="tiny"))
  for bad in (dict(good, image=dict(kind="vitt", variant="tiny")),
              dict(good, image=dict(kind="vit", variant="tiny", nonsense=1)),
              dict(good, text=dict(kind="text", variant="Z")),
              dict(good, dtype="float8"),
              dict(good, flip_mask_ratio=1.0),
              dict(good, image=dict(kind="text", variant="tiny"))):
    with pytest.raises(UserError):
      build_model(bad)
  with pytest.raises(UserError):
    ViT(**TINY_VIT, pool_type="avg").init(jax.random.key(0), images())
  with pytest.raises(UserError):
    remat_policy("sometimes")


# --- shapes of every large variant, abstractly ---------------------------------------------------------------

# Known vision-tower sizes (millions, excl. heads): ViT-B/16 85.8, L/14 303.3, H/14 630.8, g/14 1011 (open_clip).
KNOWN_VIT_PARAMS = {"B/16": 85.8e6, "L/14": 303.3e6, "H/14": 630.8e6, "g/14": 1011e6}


@pytest.mark.parametrize("name", [f"{k}/{16 if k in ('mu', 'Ti', 'S', 'M', 'B') else 14}" for k in VIT_TABLE])
def test_large_vit_shapes(name):
  v = variants.vit_variant(name)
  model = ViT(**v, image_size=224, scan=True, pool_type="gap")
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  out, variables = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x), x)
  n = (224 // v["patch_size"]) ** 2
  assert out["pooled"].shape == (2, v["width"])
  assert out["tokens"].shape == (2, n, v["width"])
  if name in KNOWN_VIT_PARAMS:
    count = sum(l.size for l in jax.tree.leaves(nn.meta.unbox(variables)))
    assert abs(count / KNOWN_VIT_PARAMS[name] - 1) < 0.01, count


KNOWN_TEXT_PARAMS = {"B": 63.2e6, "L": 123.1e6, "H": 353.0e6}  # CLIP / open_clip text towers, excl. projection


@pytest.mark.parametrize("name", sorted(TEXT_TABLE))
def test_large_text_shapes(name):
  v = variants.text_variant(name)
  model = TextTransformer(**v, vocab_size=49408, max_len=77, scan=True)
  ids = jax.ShapeDtypeStruct((2, 77), jnp.int32)
  out, variables = jax.eval_shape(lambda i: model.init_with_output(jax.random.key(0), i), ids)
  assert out["pooled"].shape == (2, v["width"]) and out["tokens"].shape == (2, 77, v["width"])
  if name in KNOWN_TEXT_PARAMS:
    count = sum(l.size for l in jax.tree.leaves(nn.meta.unbox(variables)))
    assert abs(count / KNOWN_TEXT_PARAMS[name] - 1) < 0.01, count


def test_b16_compiles():
  """One real XLA compile of ViT-B/16 (scanned, MAP head) on a small batch; nothing is executed."""
  model = ViT(**variants.vit_variant("B/16"), image_size=224, scan=True, pool_type="map")
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), x))
  compiled = jax.jit(model.apply).lower(params, x).compile()
  out = compiled.out_info
  assert out["pooled"].shape == (2, 768) and out["tokens"].shape == (2, 196, 768)


# --- ViT behaviour -------------------------------------------------------------------------------------------

def test_scan_equals_unrolled_and_remat_policies():
  x = images()
  unrolled, scanned = ViT(**TINY_VIT, pool_type="gap"), ViT(**TINY_VIT, pool_type="gap", scan=True)
  params = fake_params(unrolled, x)
  params_scan = dict(params, Transformer=stack_block_params(params["Transformer"], TINY_VIT["depth"]))
  a, b = jax.jit(lambda p, ps: (unrolled.apply({"params": p}, x), scanned.apply({"params": ps}, x)))(
      params, params_scan)
  close(a["pooled"], b["pooled"])
  close(a["tokens"], b["tokens"])

  # Rematerialisation changes memory, never values or gradients.
  h = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 32)), jnp.float32)
  enc = lambda remat: Encoder(depth=2, num_heads=2, mlp_dim=64, scan=True, remat=remat)  # noqa: E731
  enc_params = fake_params(enc("none"), h)

  def loss(p, remat):
    return jnp.sum(enc(remat).apply({"params": p}, h) ** 2)

  grads = jax.jit(lambda p: [jax.value_and_grad(loss)(p, r) for r in ("none", "full", "save_qkv_proj")])(
      enc_params)
  for g in grads[1:]:
    jax.tree.map(close, g, grads[0])
  assert all(remat_policy(r) is not None for r in REMAT_NAMES if r != "none")


def test_posemb_interpolation():
  table = jnp.asarray(np.random.default_rng(0).normal(size=(1, 16, 32)), jnp.float32)
  assert resize_posemb(table, (4, 4), (4, 4)) is table
  big = resize_posemb(table, (4, 4), (6, 6))
  assert big.shape == (1, 36, 32)
  const = resize_posemb(jnp.ones((1, 16, 32)), (4, 4), (6, 6))
  close(const, jnp.ones((1, 36, 32)))  # bilinear weights sum to one

  model32 = ViT(**TINY_VIT, pool_type="gap")
  params = fake_params(model32, images())
  model48 = ViT(**dict(TINY_VIT, image_size=48), pool_type="gap")
  params48 = dict(params, pos_embedding=resize_posemb(params["pos_embedding"], (4, 4), (6, 6)))
  x48 = images(size=48)
  f = jax.jit(lambda p, p48, x: (model32.apply({"params": p}, x), model48.apply({"params": p48}, x)))
  a, b = f(params, params48, x48)
  assert a["tokens"].shape == (2, 36, 32)
  close(a["pooled"], b["pooled"])
  close(a["tokens"], b["tokens"])


def test_keep_mask_and_keep_idx():
  """FLIP: all-kept mask == no mask; masking == gathering for the kept tokens (Li et al. 2023)."""
  x = images()
  model = ViT(**TINY_VIT, pool_type="gap")
  params = fake_params(model, x)
  n = 16
  keep_idx = random_keep_indices(jax.random.key(3), 2, n, 0.5)
  mask = jnp.zeros((2, n), bool).at[jnp.arange(2)[:, None], keep_idx].set(True)

  def run(p, x):
    apply = lambda **kw: model.apply({"params": p}, x, **kw)  # noqa: E731
    return (apply(), apply(keep_mask=jnp.ones((2, n), bool)), apply(keep_idx=jnp.tile(jnp.arange(n), (2, 1))),
            apply(keep_mask=mask), apply(keep_idx=keep_idx))

  full, all_mask, all_idx, masked, gathered = jax.jit(run)(params, x)
  for o in (all_mask, all_idx):
    close(o["pooled"], full["pooled"])
    close(o["tokens"], full["tokens"])
  assert gathered["tokens"].shape == (2, 8, 32)
  close(jnp.take_along_axis(masked["tokens"], keep_idx[..., None], axis=1), gathered["tokens"])
  close(masked["pooled"], gathered["pooled"])
  assert not np.allclose(full["pooled"], gathered["pooled"], atol=1e-4)


def test_random_keep_indices():
  idx = np.asarray(random_keep_indices(jax.random.key(0), 4, 49, 0.75))
  assert idx.shape == (4, round(0.25 * 49)) and idx.dtype == np.int32
  for row in idx:
    assert len(set(row.tolist())) == len(row) and (np.diff(row) > 0).all() and row.max() < 49
  assert len({tuple(r) for r in idx.tolist()}) == 4


def test_vit_options_cls_sincos_conv_stem_prompts():
  x = images()
  cases = [dict(pool_type="cls", pre_norm=True, patch_bias=False), dict(pool_type="gap", posemb="sincos2d"),
           dict(pool_type="map", stem="conv")]
  for kw in cases:
    model = ViT(**TINY_VIT, **kw)
    out, variables = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x), x)
    assert ("pos_embedding" in variables["params"]) == (kw.get("posemb") != "sincos2d")
    assert out["pooled"].shape == (2, 32) and out["tokens"].shape == (2, 16, 32)
  with pytest.raises(UserError):
    ViT(**dict(TINY_VIT, patch_size=6), stem="conv").init(jax.random.key(0), x)

  # VPT-deep prompts (Jia et al. 2022): tokens keep N, prompts change the result; scan == unrolled.
  model = ViT(**TINY_VIT, pool_type="cls")
  params = fake_params(model, x)
  prompts = jnp.asarray(np.random.default_rng(1).normal(size=(1, 3, 32)), jnp.float32)  # shallow, 1 layer
  deep = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3, 32)), jnp.float32)
  scan_params = dict(params, Transformer=stack_block_params(params["Transformer"], 2))
  scanned = ViT(**TINY_VIT, pool_type="cls", scan=True)

  shallow = jax.eval_shape(lambda: model.apply({"params": params}, x, prompts=prompts))
  assert shallow["tokens"].shape == (2, 16, 32)

  def run(p, sp, x):
    return (model.apply({"params": p}, x), model.apply({"params": p}, x, prompts=deep),
            scanned.apply({"params": sp}, x, prompts=deep))

  plain, deep_out, deep_scan = jax.jit(run)(params, scan_params, x)
  assert deep_out["tokens"].shape == (2, 16, 32)
  assert not np.allclose(plain["pooled"], deep_out["pooled"], atol=1e-4)
  close(deep_out["pooled"], deep_scan["pooled"])


# --- text ----------------------------------------------------------------------------------------------------

def test_text_eot_pooling_ids_vs_embeddings_and_causality():
  ids, eot = token_ids()
  model = TextTransformer(**TINY_TEXT)
  params = fake_params(model, ids)
  table = params["token_embedding"]["embedding"]
  changed = ids.at[:, -1].set(5)  # a token after every EOT: invisible to the EOT under the causal mask

  def run(p):
    a = model.apply({"params": p}, ids)
    b = model.apply({"params": p}, embeddings=table[ids], eot_positions=jnp.asarray(eot))
    c = model.apply({"params": p}, changed)
    e = model.apply({"params": p}, ids, method="embed")
    return a, b, c, e

  a, b, c, e = jax.jit(run)(params)
  close(e, table[ids])
  close(a["pooled"], b["pooled"])
  close(a["tokens"], b["tokens"])
  close(a["pooled"], np.asarray(a["tokens"])[np.arange(2), eot])
  assert list(np.argmax(np.asarray(ids), axis=1)) == list(eot)
  close(a["pooled"], c["pooled"])
  assert a["tokens"].shape == (2, 12, 32)


def test_text_bidirectional_pools_and_maple_prompts():
  ids, _ = token_ids()
  pools = ("first", "last", "mean")
  models = [TextTransformer(**TINY_TEXT, causal=False, pool_type=pool) for pool in pools]
  params = fake_params(models[0], ids)
  causal = TextTransformer(**TINY_TEXT)  # MaPLe deep prompts replace tokens 1..P in the first n layers
  prompts = jnp.asarray(np.random.default_rng(0).normal(size=(2, 2, 3, 32)), jnp.float32)

  def run(p):
    outs = [m.apply({"params": p}, ids) for m in models]
    changed = models[0].apply({"params": p}, ids.at[:, -1].set(5))
    return outs, changed, causal.apply({"params": p}, ids), causal.apply({"params": p}, ids, prompts=prompts)

  (first, last, mean), changed, plain, prompted = jax.jit(run)(params)
  t = first["tokens"]
  close(first["pooled"], t[:, 0])
  close(last["pooled"], t[:, -1])
  close(mean["pooled"], t.mean(axis=1))
  assert not np.allclose(changed["tokens"][:, 0], t[:, 0], atol=1e-5)  # bidirectional: sees the future
  assert prompted["tokens"].shape == (2, 12, 32)
  assert not np.allclose(prompted["pooled"], plain["pooled"], atol=1e-4)
  with pytest.raises(UserError):
    causal.apply({"params": params}, jnp.ones((2, 13), jnp.int32))


# --- two tower -----------------------------------------------------------------------------------------------

def tiny_config(**kw):
  cfg = dict(image=dict(kind="vit", variant="tiny/8", pool_type="map", image_size=32),
             text=dict(kind="text", variant="tiny", vocab_size=64, max_len=12), embed_dim=16,
             logit_scale_init=math.log(1 / 0.07))
  cfg.update(kw)
  return cfg


def test_two_tower_outputs():
  ml_collections = pytest.importorskip("ml_collections")
  cfg = ml_collections.ConfigDict(tiny_config(logit_bias_init=-10., simclr_head=dict(hidden=32, out=8),
                                              flip_mask_ratio=0.5))
  model = build_model(cfg)
  ids, _ = token_ids()
  batch = dict(image=images(), text=ids, image_view1=images(seed=1), image_view2=images(seed=2))
  params = fake_params(model, batch, train=True)
  assert set(params) >= {"img", "txt", "img_proj", "txt_proj", "log_logit_scale", "logit_bias", "simclr_head"}
  params["logit_bias"] = jnp.float32(-10.)

  def run(p, lls):
    p = dict(p, log_logit_scale=lls)
    out = model.apply({"params": p}, batch, train=False)
    train = model.apply({"params": p}, batch, train=True, rngs={"mask": jax.random.key(0)})
    zi = model.apply({"params": p}, batch["image"], method="encode_image")
    zt = model.apply({"params": p}, batch["text"], method="encode_text")
    return out, train, zi, zt

  f = jax.jit(run)
  out, train, zi, zt = f(params, jnp.float32(math.log(50.)))
  for k in ("zimg", "ztxt", "zview1", "zview2"):
    assert out[k].dtype == jnp.float32
    close(jnp.linalg.norm(out[k], axis=-1), jnp.ones(2))
  assert out["zimg"].shape == (2, 16) and out["zview1"].shape == (2, 8)
  close(out["logit_scale"], 50.)
  close(out["logit_bias"], -10.)
  close(zi, out["zimg"])
  close(zt, out["ztxt"])
  assert out["img"]["tokens"].shape == (2, 16, 64) and out["txt"]["tokens"].shape == (2, 12, 64)
  assert train["img"]["tokens"].shape == (2, 8, 64)  # FLIP keeps round(0.5 * 16) patches in training
  out200 = f(params, jnp.float32(math.log(200.)))[0]
  close(out200["logit_scale"], 100.)  # clamped at ln 100

  plain = build_model(tiny_config())
  out, variables = jax.eval_shape(lambda: plain.init_with_output(jax.random.key(0), batch))
  assert "logit_bias" not in variables["params"] and "simclr_head" not in variables["params"]
  assert "logit_bias" not in out and "zview1" not in out


def test_bfloat16_compute_float32_params_and_embeddings():
  model = build_model(tiny_config(dtype="bfloat16", scan=True, remat="full"))
  ids, _ = token_ids()
  batch = dict(image=images(), text=ids)
  out, variables = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), batch))
  assert out["zimg"].dtype == jnp.float32 and out["logit_scale"].dtype == jnp.float32
  assert out["img"]["pooled"].dtype == jnp.bfloat16 and out["txt"]["tokens"].dtype == jnp.bfloat16
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.meta.unbox(variables)))


def test_resnet_tower_builds():
  resnet = pytest.importorskip("vlm_jax.models.resnet")
  model = build_model(dict(tiny_config(remat="full"), image=dict(kind="resnet", variant="tiny", image_size=64)))
  assert isinstance(model.img, resnet.ModifiedResNet) and model.img.output_dim == 16 and model.img.remat is True
  assert not model.project_image  # CLIP ResNets project inside the attention pool
  ids, _ = token_ids()
  out, variables = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), dict(image=images(size=64),
                                                                                         text=ids)))
  assert out["zimg"].shape == (2, 16) and "img_proj" not in variables["params"]


def test_sharded_apply_matches_single_device():
  """Params placed by logical axis rules on a ('data'=4, 'model'=2) mesh give the single-device result."""
  model = build_model(tiny_config(image=dict(kind="vit", variant="tiny/8", pool_type="map", image_size=32)))
  ids, _ = token_ids(b=8)
  batch = dict(image=images(b=8), text=ids)
  params = fake_params(model, batch)
  expected = jax.jit(model.apply)({"params": params}, batch)

  mesh = make_mesh({"data": 4, "model": 2})
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), batch))["params"]
  shardings = logical_to_shardings(abstract, mesh, DEFAULT_RULES)
  mlp_spec = shardings["img"]["Transformer"]["block_0"]["mlp"]["fc1"]["kernel"].spec
  assert tuple(mlp_spec) == ("fsdp", "model")  # fsdp has size 1 here
  sharded = jax.tree.map(jax.device_put, params, shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    got = jax.jit(model.apply)({"params": sharded}, batch)
  for k in ("zimg", "ztxt", "logit_scale"):
    close(got[k], expected[k])
  close(got["img"]["tokens"], expected["img"]["tokens"])
