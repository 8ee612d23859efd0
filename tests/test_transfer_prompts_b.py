"""Transfer part 1, second half (issue 13): VP, VPT (shallow / deep), MaPLe, DualCoOp, PLOT and Sinkhorn.

Exactness tests use a randomly initialised micro CLIP with two-layer towers (no training needed); the frozen-base
test drives the training loop's own step; the behaviour tests use the cached pretrained ViT fixture. DualCoOp
also runs through the transfer entry point on the multi-label scenes (k-shot rule, label-kind errors, mAP
results, benchmark table, a learning effect on the ViT fixture).
"""

from __future__ import annotations

import json
import os

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
# (256 test images, zero-shot 0.793). A test that cannot fail (a non-strict xfail) would only spend CI minutes, so
# the behaviour tests return when the recipes (or a stronger ViT fixture) meet the criterion. (DualCoOp: below.)


# --- DualCoOp through the transfer entry point: the multi-label scenes, mAP -------------------------------------
def test_multilabel_k_shot_rule():
  """Per class k training rows that contain it (union), validation drawn the same way from the rest: disjoint,
  every class covered, reproducible per seed; a pool too small for the request is a UserError."""
  from vlm_jax.errors import UserError
  from vlm_jax.transfer import datasets
  rng = np.random.default_rng(0)
  pool = (rng.random((400, 12)) < 0.15).astype(np.float32)  # ~3 positives per row of 12 classes, as the scenes
  for shots, val in ((1, 1), (4, 2), (8, 4)):
    tr, va = datasets.sample_multilabel(pool, shots=shots, val_shots=val, seed=3)
    assert not set(tr) & set(va) and len(set(tr)) == len(tr) and len(set(va)) == len(va)
    assert (pool[tr].sum(0) >= shots).all() and (pool[va].sum(0) >= val).all()
    assert len(tr) <= 12 * shots and len(va) <= 12 * val  # a union of per-class draws, nothing else
    again = datasets.sample_multilabel(pool, shots=shots, val_shots=val, seed=3)
    assert np.array_equal(tr, again[0]) and np.array_equal(va, again[1])
  other = datasets.sample_multilabel(pool, shots=4, val_shots=2, seed=4)
  assert not np.array_equal(other[0], datasets.sample_multilabel(pool, shots=4, val_shots=2, seed=3)[0])
  rare = pool.copy()
  rare[:, 5] = 0
  rare[:6, 5] = 1  # class 5 in 6 rows: 4 shots + 2 validation fit, 4 + 4 do not
  datasets.sample_multilabel(rare, shots=4, val_shots=2, seed=1)
  with pytest.raises(UserError, match="class 5"):
    datasets.sample_multilabel(rare, shots=4, val_shots=4, seed=1)


def test_scenes_dataset_labels_are_the_objects_shown():
  from vlm_jax.data import synthetic_scenes
  from vlm_jax.transfer import datasets
  ds = datasets.open_dataset("synthetic:scenes", image_size=32, test_per_class=2)
  assert ds.multilabel and ds.num_classes == 48 and datasets.is_multilabel("scenes")
  train = ds.load("train", indices=[0, 5, 9])
  src = synthetic_scenes.OpenVocabScenes("train", image_size=32, view="eval")
  for row, i in zip(train.labels, (0, 5, 9)):
    el = src[i]
    want = sorted(ds.class_names.index(synthetic_scenes.class_names()[c]) for c in el["classes"][el["valid"]])
    assert sorted(np.flatnonzero(row).tolist()) == sorted(set(want))
    np.testing.assert_array_equal(train.images[[0, 5, 9].index(i)], el["image"])
  test = ds.load("test")
  assert test.labels.shape == (len(test.images), 48) and test.labels.sum(0).min() >= 2
  assert test.labels[:-1].sum(0).min() < 2  # the smallest such prefix of the test stream


def test_label_kind_mismatch_is_one_line_exit_2(tmp_path, capsys):
  from vlm_jax.transfer import benchmark
  from vlm_jax.transfer.__main__ import run
  for config, dataset, words in (("dualcoop", "shifted_hues", "multi-label method"),
                                 ("coop", "scenes", "single-label method")):
    with pytest.raises(SystemExit) as e:
      run(["prog", f"--config=configs/transfer/{config}.py:tiny", f"--workdir={tmp_path / config}",
           f"--config.dataset={dataset}"])
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("error: ")]
    assert e.value.code == 2 and len(err) == 1 and words in err[0], err
  with pytest.raises(SystemExit) as e:  # the grid checks every method before its first cell
    benchmark.run(["--methods=zeroshot,dualcoop,coop", "--dataset=scenes", f"--workdir={tmp_path / 'grid'}"])
  assert e.value.code == 2 and not (tmp_path / "grid").exists()


def test_benchmark_table_and_plot_report_map(tmp_path):
  from vlm_jax.transfer import benchmark
  cells = [{"method": m, "shots": k, "seed": 1, "metric": "mAP", "mAP": v, "zeroshot/mAP": 0.24, "chance": 0.06}
           for m, k, v in (("zeroshot", 1, 0.24), ("zeroshot", 16, 0.24), ("dualcoop", 1, 0.1), ("dualcoop", 16, 0.2))]
  md = benchmark.table(cells, ["zeroshot", "dualcoop"], [1, 16], "few_shot")
  assert "| dualcoop | 10.0 ± 0.0 | 20.0 ± 0.0 |" in md and md.rstrip().endswith(
      "mAP % on the test split, mean ± std over seeds; chance (mean class frequency) 6.0%.")
  benchmark.plot(cells, ["zeroshot", "dualcoop"], [1, 16], str(tmp_path / "plots" / "mAP_vs_shots.png"))
  assert (tmp_path / "plots" / "mAP_vs_shots.png").stat().st_size > 0


# 46 steps at batch 32 (2 epochs of the 721 16-shot scenes), no warmup, AdamW 1e-2. Measured on the ViT fixture
# (2-core CPU under load ~11-16, seed 1, 249 test scenes): chance mAP 0.060, zero-shot 0.240, DualCoOp at step 0
# 0.076 on 8 devices / 0.084 on 1 (scores 0 up to rounding: the images' order), after 46 steps 0.163 (val 0.157).
# Zero-shot is not beaten: 0.14-0.17 with lr 2e-3 / 1e-2 / 3e-2, 5 epochs, class-specific contexts, M = 16 random
# init, or plain BCE instead of ASL (the benchmark grid with the config's recipe, 2 epochs: 0.174 at 1 shot,
# 0.152 at 16).
# It underfits: 300 steps (lr 1e-2 / 1e-1, shared or class-specific contexts) leave the ASL at 5.1-5.6 (6.5 at
# step 0) and the training scenes' own mAP at 0.14-0.17. The region-aggregated hand-crafted prompt alone (S⁺ of
# "a photo of a {}") ranks at 0.266: the patch tokens carry the information; S⁺ − S⁻, both prompts holding the
# class name, does not reach it through this 2-block text tower. The ResNet fixture's MaskCLIP map at 32 px is
# 1×1 (R = 1: no regions to aggregate): DualCoOp 0.095 there after 115 steps, zero-shot 0.269.
RECIPE = ("--config.epochs=2", "--config.warmup_epochs=0", "--config.optimizer.lr=0.01")


def _dualcoop_run(base: str, workdir, capsys, *flags) -> dict:
  from vlm_jax.transfer.__main__ import run
  run(["prog", "--config=configs/transfer/dualcoop.py:tiny", f"--workdir={workdir}",
       f"--config.init.checkpoint={base}", "--config.test_per_class=8", "--config.log_every_steps=1000",
       "--config.checkpoint_every_steps=1000", *flags])
  last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f) == last
  return last


def test_dualcoop_learns_on_scenes_through_the_entry_point(pretrained_vit, tmp_path, capsys):
  """DualCoOp on the 48-class multi-object scenes (16 shots) through `python -m vlm_jax.transfer`'s function:
  the result keys, and a learning effect: test mAP after training above its mAP at step 0 (both contexts from
  the same phrase: every score 0, i.e. the test images' order) and above chance (mean class frequency).
  Zero-shot (the frozen model's cosine logits) is printed, not asserted against (numbers in the docstring of
  configs/transfer/dualcoop.py)."""
  flags = ["--config.shots=16"]
  start = _dualcoop_run(pretrained_vit, tmp_path / "step0", capsys, *flags, "--config.epochs=0")
  r = _dualcoop_run(pretrained_vit, tmp_path / "trained", capsys, *flags, *RECIPE)
  assert {"method": "dualcoop", "dataset": "scenes", "shots": 16, "seed": 1, "metric": "mAP"}.items() <= r.items()
  assert {"mAP", "zeroshot/mAP", "val/mAP", "zeroshot/val_mAP", "chance", "selected_step"} <= set(r)
  assert "top1" not in r and start["steps"] == 0 and r["steps"] > 0
  print(f"dualcoop on scenes, 16 shots ({r['train_images']} images, {r['steps']} steps, test {r['test_images']}): "
        f"chance mAP {r['chance']:.3f}, zero-shot mAP {r['zeroshot/mAP']:.3f}, step 0 {start['mAP']:.3f}, "
        f"trained {r['mAP']:.3f} (val {r['val/mAP']:.3f} at step {r['selected_step']})")
  assert r["mAP"] > start["mAP"] and r["mAP"] > r["chance"] + 0.03, r
