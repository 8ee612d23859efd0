"""Classification distillation (issue 16; open_clip's DistillClipLoss): the KD term against a float64 numpy
reference, and the KD student at λ = 0 — the frozen teacher's targets in every batch — equal to plain CLIP
pre-training bit for bit (same per-step losses, same final weights' zero-shot numbers)."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from tests import train_helpers as th


def _np_kd(zi, zt, s, ui, ut, t, kappa, kind):
  def log_softmax(x, axis):
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))

  S = s * zi @ zt.T / kappa
  T = t * ui @ ut.T / kappa
  out = 0.0
  for axis in (1, 0):
    lp, lq = log_softmax(T, axis), log_softmax(S, axis)
    h = -(np.exp(lp) * lq).sum(axis)
    if kind == "kl":
      h = h + (np.exp(lp) * lp).sum(axis)
    out += 0.5 * h.mean()
  return kappa ** 2 * out


@pytest.mark.parametrize("kind,kappa", [("soft_ce", 1.0), ("kl", 2.0)])
def test_kd_term_matches_numpy(kind, kappa):
  from vlm_jax.objectives import get_objective
  rng = np.random.default_rng(0)

  def unit(n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)
  zi, zt, ui, ut = unit(6, 8), unit(6, 8), unit(6, 5), unit(6, 5)  # the teacher's space may differ
  outputs = {"zimg": zi.astype(np.float32), "ztxt": zt.astype(np.float32), "logit_scale": np.float32(14.0)}
  batch = {"teacher_zimg": ui.astype(np.float32), "teacher_ztxt": ut.astype(np.float32),
           "teacher_logit_scale": np.full((6,), 30.0, np.float32)}
  loss, metrics = get_objective("clip_kd")(outputs, batch, temperature=kappa, kind=kind)
  ref = _np_kd(zi, zt, 14.0, ui, ut, 30.0, kappa, kind)
  print(f"clip_kd {kind} κ={kappa}: {float(loss):.6f} vs numpy {ref:.6f}")
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  assert float(metrics["clip_kd/loss"]) == float(loss)
  if kind == "kl":  # a student equal to its teacher has zero KL
    same = {"zimg": ui.astype(np.float32), "ztxt": ut.astype(np.float32), "logit_scale": np.float32(30.0)}
    assert abs(float(get_objective("clip_kd")(same, batch, kind="kl")[0])) < 1e-5


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_kd_at_weight_zero_is_plain_clip_training(pretrained_resnet, tmp_path):
  from vlm_jax import runner
  from vlm_jax.distill import classification, teacher as teacher_lib
  c = th.load_config("configs/distill/clip_kd.py", "micro")
  c.teacher.checkpoint = pretrained_resnet
  c.total_steps, c.evals = 3, {}
  c.objectives = {"clip": 1.0, "clip_kd": 0.0}
  teacher = teacher_lib.load_teacher(c.teacher)
  seen = []
  targets = classification.make_targets(c, teacher, None)

  def spy(batch):  # the teacher's outputs really are in the λ = 0 run's batches
    out = targets(batch)
    seen.append({k: v.shape for k, v in out.items()})
    return out
  original = classification.make_targets
  classification.make_targets = lambda *a: spy
  try:
    classification.train_one(c, str(tmp_path / "kd0"), teacher=teacher, quiet=True)
  finally:
    classification.make_targets = original
  assert seen and seen[0]["teacher_zimg"] == (16, teacher.embed_dim)
  p = th.load_config("configs/pretrain/clip.py", "micro")
  p.total_steps, p.evals = 3, {}
  runner.pretrain(p, str(tmp_path / "clip"), quiet=True)
  kd0, clip = _losses(str(tmp_path / "kd0")), _losses(str(tmp_path / "clip"))
  print("λ=0 KD losses", kd0, "plain CLIP", clip)
  assert kd0 and kd0 == clip


@pytest.mark.parametrize("key,value,match", [
    ("objectives", {"clip": 1.0}, "objectives.clip_kd"),
    ("objectives", {"clip": 1.0, "clip_kd": -1.0}, ">= 0"),
    ("objective_hparams", {"clip_kd": {"kind": "mse"}}, "soft_ce"),
    ("objective_hparams", {"clip_kd": {"temperature": 0.0}}, "> 0"),
    ("baselines", ("closed_set",), "no_teacher"),
])
def test_config_mistakes_are_user_errors(key, value, match):
  from vlm_jax.distill import classification
  from vlm_jax.errors import UserError
  c = th.load_config("configs/distill/clip_kd.py", "micro")
  c[key] = value
  with pytest.raises(UserError, match=match):
    classification.check(c)


class _Crash(Exception):
  pass


def test_crash_then_resume_replays_the_teacher_targets(pretrained_resnet, tmp_path):
  """A KD run that dies while the teacher computes the targets of step 4's batch (after the step-2 checkpoint) and
  is rerun logs exactly the uninterrupted run's losses (the wrapped iterator's state is the pipeline's)."""
  from vlm_jax.distill import classification, teacher as teacher_lib
  c = th.load_config("configs/distill/clip_kd.py", "micro")
  c.teacher.checkpoint = pretrained_resnet
  c.total_steps, c.checkpoint_every_steps, c.evals = 4, 2, {}
  teacher = teacher_lib.load_teacher(c.teacher)
  classification.train_one(c, str(tmp_path / "a"), teacher=teacher, quiet=True)
  original = classification.make_targets
  calls = []

  def crashing(*args):
    fn = original(*args)

    def targets(batch):
      calls.append(1)
      if len(calls) == 4:
        raise _Crash()
      return fn(batch)
    return targets
  classification.make_targets = crashing
  try:
    with pytest.raises(_Crash):
      classification.train_one(c, str(tmp_path / "b"), teacher=teacher, quiet=True)
  finally:
    classification.make_targets = original
  ckpts = tmp_path / "b" / "checkpoints"  # a real crash ends the process; here the async save must land first
  for _ in range(600):
    if ckpts.exists() and not any(p.name.endswith("orbax-checkpoint-tmp") for p in ckpts.iterdir()):
      break
    time.sleep(0.1)
  classification.train_one(c, str(tmp_path / "b"), teacher=teacher, quiet=True)
  a, b = dict(_losses(str(tmp_path / "a"))), dict(_losses(str(tmp_path / "b")))
  print("uninterrupted", a, "crashed + resumed", b)
  assert sorted(b) == [1, 2, 3, 4] and a == b
