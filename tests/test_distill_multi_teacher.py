"""Multi-teacher MaskCLIP+ (issue 16): with the fixed weights (1, 0) it trains bit for bit the single-teacher MaskCLIP+
student of teacher 1 (losses and parameters); the confidence weights and the weighted loss equal a numpy reference
at pixels where the teachers agree and disagree; the micro run through `python -m vlm_jax.distill` reports the
student, each teacher and each single-teacher student; config mistakes are one-line UserErrors."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from tests import train_helpers as th

SMALL = {"total_steps": 6, "checkpoint_every_steps": 6, "log_every_steps": 1, "data.num_train": 16,
         "data.num_eval": 8, "evals.segmentation.num_images": 8, "evals.segmentation.plots": False,
         "method.key_smoothing": False}


def _micro(method: str, cache: str, **overrides):
  return th.micro_config(f"configs/distill/{method}.py", **{"teacher_cache.dir": cache, **overrides})


def _losses(workdir: str) -> list[tuple[int, float]]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


# ---- one micro run through the entry point, beside the single-teacher MaskCLIP+ reference -----------------------------

@pytest.fixture(scope="module")
def runs_(tmp_path_factory, pretrained_resnet, pretrained_vit):
  """(root, MaskCLIP+ metrics on teacher 1, the multi-teacher run's last stdout JSON line): the multi-teacher micro
  run (confidence weighting, both single-teacher baselines) through `python -m vlm_jax.distill`'s `run`."""
  import contextlib
  import io

  from vlm_jax.distill import segmentation
  from vlm_jax.distill.__main__ import run
  root = str(tmp_path_factory.mktemp("multi_teacher"))
  cache = os.path.join(root, "cache")
  ref = segmentation.distill(_micro("maskclip_plus", cache, **SMALL, **{"teacher.checkpoint": pretrained_resnet}),
                             os.path.join(root, "maskclip_plus"), quiet=True)
  flags = {**SMALL, "teacher.checkpoints": f'("{pretrained_resnet}", "{pretrained_vit}")',
           "method.weighting": "confidence", "teacher_cache.dir": cache}
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    run(["distill", "--config=configs/distill/multi_teacher.py:micro", f"--workdir={root}/multi",
         *th.cli_flags(flags)])
  return root, ref, json.loads(out.getvalue().strip().splitlines()[-1])


def test_one_hot_weights_train_exactly_the_single_teacher_student(runs_):
  """The multi-teacher student with fixed weights (1, 0) — the run's `single_1` baseline: teacher 2's labels are
  computed and its head runs with weight 0 — logs the same loss at every step and ends with the same shared
  parameters, bit for bit, as MaskCLIP+ on teacher 1 alone from the same init; its prediction (log of the weighted
  mean of the heads' probabilities) gives the same mIoUs up to float rounding."""
  from vlm_jax import runs
  root, ref, got = runs_
  single = os.path.join(root, "multi", "baselines", "single_1")
  want_losses, got_losses = _losses(os.path.join(root, "maskclip_plus")), _losses(single)
  print("losses MaskCLIP+", want_losses, "\nlosses (1, 0)   ", got_losses)
  assert len(want_losses) == SMALL["total_steps"] and got_losses == want_losses
  with open(os.path.join(single, "metrics.jsonl")) as f:
    last = [json.loads(ln) for ln in f if "loss" in ln][-1]
  assert last["weight/teacher2"] == 0.0 and last["pixel_ce/teacher2"] > 0  # teacher 2's head ran, with weight 0
  a = runs.load_variables(os.path.join(root, "maskclip_plus"))["params"]
  b = runs.load_variables(single)["params"]
  flat_a = dict(jax.tree_util.tree_flatten_with_path(a)[0])
  flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
  assert set(flat_a) < set(flat_b) and any("teacher2" in jax.tree_util.keystr(k) for k in set(flat_b) - set(flat_a))
  for key, value in flat_a.items():
    np.testing.assert_array_equal(np.asarray(flat_b[key]), np.asarray(value), err_msg=jax.tree_util.keystr(key))
  for k in ("miou_base", "miou_novel", "hiou"):
    assert got[f"single_1/segmentation/{k}"] == pytest.approx(ref[f"segmentation/{k}"], abs=2e-3)
    assert got[f"teacher_1/segmentation/{k}"] == ref[f"teacher/segmentation/{k}"]  # the same MaskCLIP teacher


def test_micro_run_reports_student_teachers_and_single_teacher_students(runs_):
  root, _, last = runs_
  with open(os.path.join(root, "multi", "results.json")) as f:
    saved = json.load(f)
  assert saved["weighting"] == "confidence" and len(saved["teachers"]) == 2
  table = {}
  for who in ("", "teacher_1/", "teacher_2/", "single_1/", "single_2/"):
    table[who or "multi/"] = {k: last[f"{who}segmentation/{k}"] for k in ("miou_base", "miou_novel", "hiou")}
    for k, v in table[who or "multi/"].items():
      assert np.isfinite(v) and 0.0 <= v <= 1.0 and saved[f"{who}segmentation/{k}"] == v
  print(json.dumps({k: {m: round(v, 4) for m, v in row.items()} for k, row in table.items()}))
  assert 0.0 <= last["weight/teacher1"] <= 1.0
  assert last["weight/teacher1"] + last["weight/teacher2"] == pytest.approx(1.0, abs=1e-5)


# ---- the weights and the loss against numpy ------------------------------------------------------------------------

def test_confidence_weights_and_loss_match_numpy():
  from vlm_jax.distill.seg_loss import multi_teacher_cross_entropy
  from vlm_jax.models.segmentation.multi_teacher import teacher_weights
  conf = np.array([[0.9, 0.9],     # the teachers agree (equally confident): the prior decides
                   [0.9, 0.3],     # teacher 1 is confident, teacher 2 is not
                   [0.2, 0.8]], np.float32)
  prior, t = (2.0, 1.0), 0.1
  pi = np.array(prior) / 3.0
  e = pi * np.exp(conf / t)
  want = e / e.sum(-1, keepdims=True)
  got = np.asarray(teacher_weights(conf, prior, "confidence", t))
  print("confidence weights", got.round(4).tolist())
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(got[0], pi, rtol=1e-6)
  assert got[1, 0] > 0.99 and got[2, 1] > 0.99
  np.testing.assert_allclose(np.asarray(teacher_weights(conf, prior, "fixed")), np.broadcast_to(pi, conf.shape))
  np.testing.assert_allclose(np.asarray(teacher_weights(conf, prior, "confidence", 1e6)),
                             np.broadcast_to(pi, conf.shape), rtol=1e-5)  # T → ∞: the fixed weights
  # the loss: 1/|P| Σ_x Σ_k w_k(x) CE(ℓ_k(x), ŷ_k(x)) on a 2 × 2 label map at the logits' own resolution
  rng = np.random.default_rng(0)
  logits = [rng.normal(size=(1, 2, 2, 4)).astype(np.float32) for _ in range(2)]
  labels = rng.integers(0, 4, size=(1, 2, 2, 2)).astype(np.int32)
  c = rng.uniform(0.2, 1.0, size=(1, 2, 2, 2)).astype(np.float32)
  loss, metrics = multi_teacher_cross_entropy({"teacher_logits": logits}, {"labels": labels, "teacher_confidence": c},
                                              prior=prior, rule="confidence", temperature=t)
  w = pi * np.exp(c / t)
  w = w / w.sum(-1, keepdims=True)
  logp = [z - np.log(np.exp(z).sum(-1, keepdims=True)) for z in logits]
  nll = np.stack([-np.take_along_axis(logp[k], labels[..., k:k + 1], -1)[..., 0] for k in range(2)], -1)
  np.testing.assert_allclose(float(loss), float((w * nll).sum(-1).mean()), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["pixel_ce/teacher2"]), float(nll[..., 1].mean()), rtol=1e-5)


def test_confidence_maps_are_the_teachers_max_probability():
  """c(x) at a pixel equals max of softmax(100 · s) of the centred MaskCLIP scores with the background score δ."""
  from vlm_jax.distill import multi_teacher
  from vlm_jax.evaluate import segmentation as seg
  rng = np.random.default_rng(1)
  emb = rng.normal(size=(3, 8)).astype(np.float32)
  dense = rng.normal(size=(2, 1, 1, 8)).astype(np.float32)
  c = multi_teacher.confidence_maps(dense, emb, (2, 2), threshold=0.01)
  s = seg.scores_with_background(dense, emb, threshold=0.01)[:, 0, 0]
  p = np.exp(100 * (s - s.max(-1, keepdims=True)))
  want = (p / p.sum(-1, keepdims=True)).max(-1)
  np.testing.assert_allclose(c, np.broadcast_to(want[:, None, None], (2, 2, 2)), rtol=1e-5)


# ---- config mistakes -------------------------------------------------------------------------------------------------

def test_multi_teacher_config_mistakes_are_user_errors(tmp_path):
  from vlm_jax import preflight
  from vlm_jax.errors import UserError
  flags = {"workdir": str(tmp_path / "run")}
  preflight.distill(_micro("multi_teacher", ""), flags)  # the shipped config passes
  for overrides, match in (({"method.teacher_weights": (1.0, -1.0)}, "non-negative"),
                           ({"method.teacher_weights": (0.0, 0.0)}, "non-negative"),
                           ({"method.teacher_weights": (1.0, 1.0, 1.0)}, "3 weight"),
                           ({"method.weighting": "entropy"}, "unknown method.weighting"),
                           ({"method.weight_temperature": 0.0}, "weight_temperature"),
                           ({"teacher.checkpoints": ("only_one",), "method.teacher_weights": (1.0,)}, "at least 2")):
    with pytest.raises(UserError, match=match):
      preflight.distill(_micro("multi_teacher", "", **overrides), flags)


def test_teachers_with_different_class_vocabularies_are_refused():
  from types import SimpleNamespace

  from vlm_jax.data.tokenizers import WordTokenizer
  from vlm_jax.distill import multi_teacher
  from vlm_jax.errors import UserError
  names = ["red circle", "blue square", "green star"]
  full = SimpleNamespace(tokenizer=WordTokenizer(["red", "blue", "green", "circle", "square", "star"]))
  same = SimpleNamespace(tokenizer=WordTokenizer(["star", "green", "square", "blue", "circle", "red", "extra"]))
  short = SimpleNamespace(tokenizer=WordTokenizer(["red", "blue", "green", "circle", "square"]))  # no 'star'
  multi_teacher.check_vocabulary([full, same], ["a", "b"], names)  # the same classes: accepted
  with pytest.raises(UserError, match="different class vocabularies.*green star"):
    multi_teacher.check_vocabulary([full, short], ["a", "b"], names)
