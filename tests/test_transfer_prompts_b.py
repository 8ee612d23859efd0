"""Transfer part 1, second half (issue 13): VP, VPT (shallow / deep), MaPLe, DualCoOp, PLOT and Sinkhorn.

Exactness tests use a randomly initialised micro CLIP with two-layer towers (no training needed); the frozen-base
test drives the training loop's own step; the behaviour tests use the cached pretrained ViT fixture.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from tests import train_helpers as th
from vlm_jax import assembly
from vlm_jax.parallel import partitioning
from vlm_jax.transfer.methods import build_method, dualcoop, sinkhorn
from vlm_jax.transfer.methods import prompting as pr

NAMES = ["red circle", "blue square", "green triangle", "yellow star"]
TEMPLATES = ("a {}.", "a photo of a {}.")


@pytest.fixture(scope="module")
def micro():
  """(config, tokenizer, model, variables) of a random micro CLIP with two-block ViT and text towers."""
  c = th.load_config("configs/pretrain/clip.py", "micro")
  c.model.image.depth = c.model.text.depth = 2
  tok, model = assembly.build(c)
  v = model.init(jax.random.PRNGKey(0), assembly.example_batch(c, model, 2), train=False)
  return c, tok, model, jax.device_get(partitioning.unbox(dict(v)))


def _method(micro, name, **cfg):
  c, tok, model, v = micro
  m = build_method(name, ml_collections.ConfigDict(cfg), base_model=model, base_config=c, tokenizer=tok,
                   class_names=NAMES, templates=TEMPLATES)
  images = jax.random.normal(jax.random.PRNGKey(1), (3, 16, 16, 3))
  init = m.module.init(jax.random.PRNGKey(2), {"image": images, "label": jnp.zeros(3, jnp.int32)})
  params = {**jax.device_get(partitioning.unbox(init["params"])), "base": v["params"]}
  return m, {"params": params}, images


def _logits(m, variables, images):
  return np.asarray(m.logits_fn(m.module, variables, images))


def test_sinkhorn_plans_have_the_given_marginals():
  key = jax.random.split(jax.random.PRNGKey(0), 3)
  cost = 1.0 - jax.random.uniform(key[0], (5, 49, 4), minval=-1.0, maxval=1.0)  # PLOT-like costs in [0, 2]
  mu = jax.nn.softmax(jax.random.normal(key[1], (5, 49)))
  nu = jax.nn.softmax(jax.random.normal(key[2], (5, 4)))
  for eps in (0.1, 0.5):
    t = sinkhorn.plan(cost, mu, nu, eps=eps, iterations=300)
    assert bool(jnp.all(t >= 0))
    np.testing.assert_allclose(t.sum(-1), mu, atol=1e-5, rtol=0)  # rows
    np.testing.assert_allclose(t.sum(-2), nu, atol=1e-5, rtol=0)  # columns
  t = sinkhorn.plan(cost)  # default: uniform marginals
  np.testing.assert_allclose(t.sum(-1), 1 / 49, atol=1e-5, rtol=0)
  np.testing.assert_allclose(t.sum(-2), 1 / 4, atol=1e-5, rtol=0)
  # a constant cost is transported by the independent plan μ νᵀ, at distance = the constant
  flat = jnp.full((3, 4), 0.7)
  np.testing.assert_allclose(sinkhorn.plan(flat), jnp.full((3, 4), 1 / 12), atol=1e-6)
  np.testing.assert_allclose(sinkhorn.distance(flat), 0.7, atol=1e-6)


def test_vp_with_zero_border_and_vpt_without_prompts_equal_the_frozen_model(micro):
  zs, zv, images = _method(micro, "zeroshot")
  want = _logits(zs, zv, images)
  vp, v, _ = _method(micro, "vp")
  assert v["params"]["prompter"]["pad_up"].shape == (2, 16, 3)  # 30 px at 224 -> 2 px at 16
  zero = jax.tree.map(np.zeros_like, v["params"]["prompter"])
  np.testing.assert_array_equal(_logits(vp, {"params": {**v["params"], "prompter": zero}}, images), want)
  assert not np.array_equal(_logits(vp, v, images), want)  # the random border changes the logits
  for cfg in ({"mode": "deep", "layers": 0}, {"mode": "shallow", "tokens": 0}):
    vpt, v, _ = _method(micro, "vpt", **cfg)
    assert set(v["params"]) == {"base"}
    np.testing.assert_array_equal(_logits(vpt, v, images), want)
  for mode, layers in (("shallow", 1), ("deep", 2)):
    vpt, v, _ = _method(micro, "vpt", mode=mode, tokens=3)
    assert v["params"]["prompts"].shape == (layers, 3, 32)
    assert not np.array_equal(_logits(vpt, v, images), want)


def test_maple_neutral_settings_reduce_to_coop_and_vpt(micro):
  """J = 1 without vision coupling is CoOp with phrase context (= the zero-shot template "a photo of a {}.");
  J = 1 with coupling is that text side and VPT-shallow fed the coupled tokens F_0(P_0) on the image side."""
  _, tok, model, base = micro
  maple, mv, images = _method(micro, "maple", depth=1, vision=False, init="a photo of a")
  coop, cv, _ = _method(micro, "coop", n_ctx=0, init="a photo of a")
  assert set(mv["params"]) == {"base", "ctx"}
  got = _logits(maple, mv, images)
  np.testing.assert_array_equal(got, _logits(coop, cv, images))
  ids = jnp.asarray(tok([f"a photo of a {n}." for n in NAMES]))
  want = model.apply(base, images, method="encode_image") @ model.apply(base, ids, method="encode_text").T
  np.testing.assert_allclose(got, want * model.apply(base, method="logit_scale"), atol=1e-5, rtol=1e-5)

  coupled, v, _ = _method(micro, "maple", depth=1, vision=True, init="a photo of a")
  p = v["params"]
  phrase_ids = jnp.asarray([pr.phrase_ids(tok, "a photo of a")])  # P_0 at init: the phrase's embeddings
  phrase = model.apply(base, phrase_ids, method="text_token_embeddings")[0]
  tokens = phrase @ p["couple_0"]["kernel"] + p["couple_0"]["bias"]
  zi = model.apply(base, images, prompts=tokens[None], method="encode_image")
  zt = coop.module.apply(cv, method="text_features")
  np.testing.assert_allclose(_logits(coupled, v, images), model.apply(base, method="logit_scale") * zi @ zt.T,
                             atol=1e-5, rtol=1e-5)
  deep, v, _ = _method(micro, "maple")  # defaults: J = every layer (2), coupled
  assert v["params"]["text_prompts"].shape == (1, 4, 32) and set(v["params"]) >= {"couple_0", "couple_1"}
  assert np.isfinite(_logits(deep, v, images)).all()


def test_plot_with_one_prompt_scores_the_mean_region_similarity(micro):
  """N = 1: the transport plan is uniform over the R regions, d_OT = 1 − mean_r f_rᵀ g_c."""
  _, _, model, base = micro
  plot, v, images = _method(micro, "plot", n_prompts=1, n_ctx=4)
  g = plot.module.apply(v, method="text_features")[0]  # [C, E]
  f = model.apply(base, images, method="encode_image_tokens")  # 'auto' on a gap ViT: the projected tokens
  want = model.apply(base, method="logit_scale") * jnp.mean(f @ g.T, axis=1)
  np.testing.assert_allclose(_logits(plot, v, images), want, atol=1e-5, rtol=1e-5)
  plot4, v4, _ = _method(micro, "plot", n_prompts=4, n_ctx=4)
  assert v4["params"]["ctx"].shape == (4, 4, 32)


def test_dualcoop_scores_and_asymmetric_loss(micro):
  m, v, images = _method(micro, "dualcoop", n_ctx=0, init="a photo of a")
  np.testing.assert_array_equal(_logits(m, v, images), 0.0)  # equal positive and negative contexts: log-odds 0
  logits = jax.random.normal(jax.random.PRNGKey(3), (6, 4)) * 3
  labels = (jax.random.uniform(jax.random.PRNGKey(4), (6, 4)) > 0.5).astype(jnp.float32)
  bce = -(labels * jax.nn.log_sigmoid(logits) + (1 - labels) * jax.nn.log_sigmoid(-logits))
  np.testing.assert_allclose(dualcoop.asymmetric_loss(logits, labels, gamma_pos=0, gamma_neg=0, clip=0), bce,
                             rtol=1e-6, atol=1e-6)
  asl = dualcoop.asymmetric_loss(logits, labels)
  assert bool(jnp.all(asl <= bce + 1e-6))  # focusing and the margin only down-weight
  m, v, images = _method(micro, "dualcoop", n_ctx=4)
  batch = {"image": images, "labels": labels[:3]}
  loss, metrics = m.loss_fn(m.module.apply(v, batch, train=True), batch)
  assert np.isfinite(float(loss)) and "asl" in metrics


def test_frozen_base_bit_identical_after_training_steps(micro):
  """Three steps of the loop's own train step (config.frozen = '^base/') per method: every base parameter is
  bit-identical, and the method's parameters moved."""
  from vlm_jax.parallel import mesh as mesh_lib
  from vlm_jax.train import optim, state as state_lib, step as step_lib
  _, _, _, base = micro
  mesh = mesh_lib.make_mesh({"data": -1})
  rules = partitioning.rules_from_config(None)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(8, 16, 16, 3)).astype(np.float32), "label": np.arange(8, dtype=np.int32) % 4,
           "labels": (rng.random((8, 4)) > 0.5).astype(np.float32)}
  opt = ml_collections.ConfigDict({"name": "sgd", "lr": 0.5, "momentum": 0.9, "schedule": "constant",
                                   "warmup_steps": 0, "weight_decay": 1e-3, "wd_mask": ".*"})
  for name, cfg in (("vp", {}), ("vpt", {"mode": "deep", "tokens": 2}), ("maple", {}),
                    ("plot", {"n_prompts": 2, "n_ctx": 2, "iterations": 20}), ("dualcoop", {"n_ctx": 2})):
    m, v, _ = _method(micro, name, **cfg)
    tx, schedule = optim.make_optimizer(opt, 3)

    def init_fn(variables, v=v):
      return {**variables, "params": v["params"]}

    with jax.set_mesh(mesh):
      state, shardings = state_lib.create_train_state(m.module, tx, batch, mesh=mesh, rules=rules, frozen="^base/",
                                                      rng=jax.random.PRNGKey(0), init_fn=init_fn)
      before = jax.device_get(state.params)
      train_step = step_lib.jit_train_step(m.module, m.loss_fn, tx, schedule, shardings, mesh=mesh, rules=rules,
                                           frozen="^base/")
      for _ in range(3):
        state, _ = train_step(state, batch)
      after = jax.device_get(state.variables()["params"])
    assert "base" not in before and set(state.frozen) == {"base"}
    want = traverse_util.flatten_dict(base["params"], sep="/")
    got = traverse_util.flatten_dict(after["base"], sep="/")
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want), name
    moved = [k for k, x in traverse_util.flatten_dict(before, sep="/").items()
             if not np.array_equal(x, traverse_util.flatten_dict(after, sep="/")[k])]
    assert moved, f"{name}: no trainable parameter changed"


# --- behaviour on the pretrained ViT fixture: not in the suite yet ------------------------------------------------
# The criterion (each method beats zero-shot at 16 shots) is not met on the tiny ViT fixture: measured
# (2-core CPU under load ~15-25, task unseen_compositions, 16 classes, seed 1, 512 test images, zero-shot 0.783,
# chance 0.062) MaPLe 0.797, VP 0.783, PLOT 0.779, VPT-deep 0.756 at 12 epochs; VPT-shallow 0.719 at 6 epochs
# (256 test images, zero-shot 0.793); DualCoOp on the 48-class multi-object scenes mAP 0.151 vs zero-shot 0.238
# (chance 0.072) after 120 steps. A test that cannot fail (a non-strict xfail) would only spend CI minutes, so
# the behaviour tests return when the recipes (or a stronger ViT fixture) meet the criterion.
