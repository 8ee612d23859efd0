"""Transfer part 2, adapters (issue 14): linear probe, CLIP-Adapter, Tip-Adapter / Tip-Adapter-F and TaskRes.

Exactness tests use a randomly initialised micro CLIP (no training needed): each adapter at its neutral setting is
zero-shot CLIP bit for bit, Tip-Adapter's cache logits and (α, β) search against numpy. The run-level test drives
every adapter through the benchmark runner on the micro model saved as a run directory and instruments the test
split and the (α, β) search. The behaviour test uses the cached pretrained ViT fixture on the default shift task.
"""

from __future__ import annotations

import json
import re
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tests import train_helpers as th
from vlm_jax import assembly, runs
from vlm_jax.parallel import partitioning
from vlm_jax.transfer import datasets, run as run_lib
from vlm_jax.transfer.methods import build_method, frozen_features, tip_adapter

NAMES = ["red circle", "blue square", "green triangle", "yellow star"]
TEMPLATES = ("a {}.", "a photo of a {}.", "a drawing of a {}.")
ADAPTERS = ("linear_probe", "clip_adapter", "tip_adapter", "tip_adapter_f", "taskres")


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
  images = jax.random.normal(jax.random.PRNGKey(1), (5, 16, 16, 3))
  init = m.module.init(jax.random.PRNGKey(2), {"image": images, "label": jnp.zeros(5, jnp.int32)})
  params = {**jax.device_get(partitioning.unbox(init["params"])), "base": v["params"]}
  return m, {"params": params}, images


def _logits(m, variables, images):
  return np.asarray(jax.jit(lambda v, x: m.logits_fn(m.module, v, x))(variables, images))


def _with(variables, **params):
  return {**variables, "params": {**variables["params"], **params}}


def _random_cache(micro, n=7, seed=3):
  """(keys [n, E] L2-normalised, one-hot values [n, C], labels) of a made-up cache."""
  keys = np.array(jax.random.normal(jax.random.PRNGKey(seed), (n, micro[2].embed_dim)), np.float32)
  keys /= np.linalg.norm(keys, axis=1, keepdims=True)
  labels = np.arange(n) % len(NAMES)
  return keys, np.eye(len(NAMES), dtype=np.float32)[labels], labels


def test_neutral_settings_equal_zeroshot_exactly(micro):
  """CLIP-Adapter with r = 0 (image, text, both), TaskRes with x = 0 and Tip-Adapter with α = 0 give zero-shot
  CLIP's logits bit for bit; away from the neutral setting they differ."""
  zs, zv, images = _method(micro, "zeroshot")
  want = _logits(zs, zv, images)
  for side in ("image", "text", "both"):
    m, v, _ = _method(micro, "clip_adapter", side=side, ratio=0.2)
    np.testing.assert_array_equal(_logits(m, _with(v, ratio=jnp.float32(0.0)), images), want)
    assert not np.array_equal(_logits(m, v, images), want), side  # r = 0.2: the random adapter is felt
  m, v, _ = _method(micro, "taskres", alpha=0.5)
  assert not np.any(v["params"]["residual"])  # zero-initialised: TaskRes starts at zero-shot
  np.testing.assert_array_equal(_logits(m, v, images), want)
  x = jax.random.normal(jax.random.PRNGKey(4), v["params"]["residual"].shape)
  assert not np.array_equal(_logits(m, _with(v, residual=x), images), want)
  keys, values, _ = _random_cache(micro)
  for name in ("tip_adapter", "tip_adapter_f"):
    m, v, _ = _method(micro, name)
    cached = _with(v, keys=keys, values=values, alpha=jnp.float32(0.0), beta=jnp.float32(5.5))
    np.testing.assert_array_equal(_logits(m, cached, images), want)
    assert not np.array_equal(_logits(m, _with(cached, alpha=jnp.float32(1.0)), images), want)


def test_tip_adapter_cache_logits_match_numpy(micro):
  """logits − zero-shot = α exp(−β (1 − f Keysᵀ)) Values, computed in float64 numpy from f = encode_image."""
  _, _, model, base = micro
  zs, zv, images = _method(micro, "zeroshot")
  m, v, _ = _method(micro, "tip_adapter")
  keys, values, _ = _random_cache(micro)
  alpha, beta = 1.7, 5.5
  got = _logits(m, _with(v, keys=keys, values=values, alpha=jnp.float32(alpha), beta=jnp.float32(beta)), images)
  f = np.asarray(model.apply(base, images, method="encode_image"), np.float64)
  ref = alpha * np.exp(-beta * (1.0 - f @ keys.astype(np.float64).T)) @ values
  np.testing.assert_allclose(got - _logits(zs, zv, images), ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(tip_adapter.cache_logits(jnp.asarray(f, jnp.float32), keys, values, beta),
                             ref / alpha, rtol=1e-5, atol=1e-6)


def test_tip_adapter_fit_builds_the_cache_and_searches_on_validation(micro):
  """The cache of `fit`: keys = normalised mean over the augmented passes (recomputed here), values one-hot; the
  (α, β) it keeps is the brute-force best of the grid on the validation split (numpy), ties to the first."""
  _, _, model, base = micro
  m, v, _ = _method(micro, "tip_adapter", augment_passes=3, alpha_range=(0.1, 3.0, 5), beta_range=(0.1, 7.0, 9))
  rng = np.random.default_rng(0)
  train = datasets.Split(rng.normal(size=(8, 16, 16, 3)).astype(np.float32), np.arange(8) % 4)
  val = datasets.Split(rng.normal(size=(12, 16, 16, 3)).astype(np.float32), np.arange(12) % 4)
  nested = run_lib.nest_base(base)
  out = m.fit(nested, train, val)
  p = out["params"]
  mean = frozen_features.augmented_embed(model, nested, train.images, passes=3, seed=0)
  np.testing.assert_allclose(p["keys"], mean / np.linalg.norm(mean, axis=1, keepdims=True), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(p["values"], np.eye(4, dtype=np.float32)[train.labels])
  one_pass = frozen_features.augmented_embed(model, nested, train.images, passes=1, seed=0)
  plain = frozen_features.embed(model, nested, train.images)
  assert not np.allclose(one_pass, plain, atol=1e-3)  # the passes are augmented, not the plain images
  # brute force on the validation split
  f = np.asarray(model.apply(base, val.images, method="encode_image"), np.float64)
  zs_m, zs_v, _ = _method(micro, "zeroshot")
  zs = np.asarray(_logits(zs_m, zs_v, jnp.asarray(val.images)), np.float64)
  best = (-1.0, None)
  for beta in tip_adapter.grid((0.1, 7.0, 9)):
    for alpha in tip_adapter.grid((0.1, 3.0, 5)):
      logits = zs + alpha * np.exp(-beta * (1 - f @ p["keys"].astype(np.float64).T)) @ p["values"]
      mine = logits[np.arange(12), val.labels]
      others = np.where(np.eye(4, dtype=bool)[val.labels], -np.inf, logits).max(1)
      acc = float(np.mean(mine > others))
      if acc > best[0] + 1e-9:
        best = (acc, (float(alpha), float(beta)))
  assert out["val_top1_searched"] == pytest.approx(best[0])
  assert (out["alpha"], out["beta"]) == pytest.approx(best[1])


# the keys every transfer run writes (zero-shot's results.json): methods with hooks write them too
RESULT_KEYS = {"method", "dataset", "shots", "seed", "protocol", "metric", "classes", "chance", "train_images",
               "val_images", "labels_used", "zeroshot/val_top1", "steps", "selected_step", "val/top1",
               "zeroshot/top1", "top1"}


def _config(method: str, base: str, **kw):
  c = th.load_config(f"configs/transfer/{method}.py", "tiny")
  c.init.checkpoint = base
  c.dataset, c.shots, c.test_per_class, c.batch_size, c.log_every_steps = "shifted_hues", 2, 2, 16, 1
  if method == "tip_adapter_f":
    c.epochs = 1
  for k, v in kw.items():
    c[k] = v
  return c


def test_test_split_read_last_after_every_search_and_no_loop_when_training_free(micro, tmp_path, monkeypatch):
  """The linear probe and Tip-Adapter (training-free) never call the training loop; Tip-Adapter-F searches
  (α, β) on validation before the loop and again after it; the test split is read once, last, after every
  search; results.json holds the keys of every other run."""
  c, _, _, v = micro
  base = runs.save_model(str(tmp_path / "micro"), c, v)
  events = []
  load, train, search = datasets.Dataset.load, run_lib.loop.train, tip_adapter.search
  monkeypatch.setattr(datasets.Dataset, "load",
                      lambda self, split, **kw: (events.append(split), load(self, split, **kw))[1])
  monkeypatch.setattr(run_lib.loop, "train", lambda *a, **kw: (events.append("loop"), train(*a, **kw))[1])
  monkeypatch.setattr(tip_adapter, "search", lambda *a, **kw: (events.append("search"), search(*a, **kw))[1])
  segments = {}
  for name in ("linear_probe", "tip_adapter", "tip_adapter_f"):
    events.clear()
    r = run_lib.transfer(_config(name, base), str(tmp_path / name), quiet=True)
    with open(os.path.join(tmp_path, name, "results.json")) as f:
      assert json.load(f) == json.loads(json.dumps(r))
    assert RESULT_KEYS <= set(r), (name, RESULT_KEYS - set(r))
    assert events[-1] == "test" and events.count("test") == 1, (name, events)
    segments[name] = list(events)
  assert "loop" not in segments["linear_probe"] and "loop" not in segments["tip_adapter"]
  assert segments["tip_adapter"].count("search") == 1
  seg = segments["tip_adapter_f"]  # the training pool, search, the loop, search again, the test split
  assert seg == ["train", "search", "loop", "search", "test"], seg


def test_configs_pass_preflight_and_bad_values_are_user_errors(tmp_path):
  """Every adapter config builds through the benchmark runner's loader and passes preflight; its own keys are
  checked there (one-line UserErrors)."""
  from vlm_jax import preflight  # noqa: PLC0415
  from vlm_jax.errors import UserError  # noqa: PLC0415
  from vlm_jax.transfer import benchmark  # noqa: PLC0415
  opts, _ = benchmark.parse([f"--workdir={tmp_path}", f"--methods={','.join(ADAPTERS)}"])
  for name in ADAPTERS:
    cfg = benchmark.method_config(opts, name, [("shots", "16")])
    run_lib.check_labels(name, cfg.dataset, cfg.protocol)
    preflight.transfer(cfg, {"workdir": str(tmp_path / name)})
  for name, key, value, words in (("clip_adapter", "ratio", 1.5, "[0, 1]"), ("clip_adapter", "side", "audio", "side"),
                                  ("tip_adapter", "beta_range", (0.1, 7.0), "steps"),
                                  ("tip_adapter_f", "augment_passes", 0, "augment_passes"),
                                  ("linear_probe", "l2_grid", (), "l2_grid"), ("taskres", "alpha", 0.0, "alpha")):
    cfg = benchmark.method_config(opts, name, [])
    cfg.method[key] = value
    with pytest.raises(UserError, match=re.escape(words)):
      preflight.transfer(cfg, {"workdir": str(tmp_path / "bad")})


def test_clip_adapter_candidates_are_the_ratio_grid(micro):
  """After training, one candidate per residual ratio, the training ratio first (ties keep it), the trained
  adapter unchanged in each."""
  m, v, images = _method(micro, "clip_adapter", ratio=0.2, ratio_grid=(0.0, 0.2, 0.6, 1.0))
  cands = m.candidates(None, v)
  assert [lab["ratio"] for lab, _ in cands] == [0.2, 0.0, 0.6, 1.0]
  for lab, var in cands:
    assert float(var["params"]["ratio"]) == np.float32(lab["ratio"])
    assert var["params"]["image_adapter"] is v["params"]["image_adapter"]


def test_tip_adapter_beats_zeroshot_and_tip_adapter_f_at_least_matches_it(pretrained_vit, tmp_path):
  """On the pretrained ViT fixture and the default shift task at 16 shots: training-free Tip-Adapter beats
  zero-shot CLIP on the test split, and Tip-Adapter-F (keys fine-tuned, fewer epochs than the tiny recipe's 20 to
  keep the test short) is at least as good as Tip-Adapter."""
  out = {}
  for name, kw in (("tip_adapter", {}), ("tip_adapter_f", {"epochs": 5})):
    c = th.load_config(f"configs/transfer/{name}.py", "tiny")
    c.init.checkpoint, c.shots, c.test_per_class = pretrained_vit, 16, 8
    for k, v in kw.items():
      c[k] = v
    out[name] = run_lib.transfer(c, str(tmp_path / name), quiet=True)
  tip, tip_f = out["tip_adapter"], out["tip_adapter_f"]
  print(f"chance {tip['chance']:.4f} | zero-shot test {tip['zeroshot/top1']:.4f} (val {tip['zeroshot/val_top1']:.4f})"
        f" | Tip-Adapter test {tip['top1']:.4f} (val {tip['val/top1']:.4f}, alpha {tip['fit/alpha']:.2f}, beta "
        f"{tip['fit/beta']:.2f}) | Tip-Adapter-F test {tip_f['top1']:.4f} (val {tip_f['val/top1']:.4f}, step "
        f"{tip_f['selected_step']} of {tip_f['steps']}, alpha {tip_f['alpha']:.2f}, beta {tip_f['beta']:.2f})")
  assert tip["zeroshot/top1"] == tip_f["zeroshot/top1"] > 2 * tip["chance"]
  assert tip["top1"] > tip["zeroshot/top1"]
  assert tip_f["top1"] >= tip["top1"]
