"""Image-text matching: the ITM loss against hand-computed values, hard-negative sampling (never the positive,
∝ softmax of the similarity) and sharded (8 simulated devices) vs single-device equality."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.errors import UserError
from vlm_jax.objectives import get_objective
from vlm_jax.models.hard_negatives import sample_hard_negatives
from vlm_jax.objectives.matching import itm_loss
from vlm_jax.parallel.mesh import batch_sharding, make_mesh, replicated


def _lse(*xs):
  return math.log(sum(math.exp(x) for x in xs))


def test_itm_loss_hand_computed():
  logits = jnp.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  labels = jnp.array([1, 0, 0])
  loss, m = itm_loss({"itm": {"logits": logits, "labels": labels}}, {})
  expected = ((_lse(2, 0) - 0) + (_lse(0, 1) - 0) + (_lse(1, 1) - 1)) / 3
  assert float(loss) == pytest.approx(expected, rel=1e-6)
  assert float(m["itm/loss"]) == pytest.approx(expected, rel=1e-6)
  # predictions: 0 (wrong), 1 (wrong), 0 on the tie (right)
  assert float(m["itm/accuracy"]) == pytest.approx(1 / 3)
  assert float(m["itm/pos_accuracy"]) == 0.0 and float(m["itm/neg_accuracy"]) == 0.5
  assert float(m["itm/balanced_accuracy"]) == 0.25
  assert get_objective("itm") is itm_loss


def test_itm_loss_log_odds_form():
  logit = jnp.array([1.5, -0.5, 0.25])
  labels = jnp.array([1, 0, 0])
  loss, m = itm_loss({"itm": {"logits": logit, "labels": labels}}, {})
  sp = lambda x: math.log1p(math.exp(x))  # noqa: E731  (softplus: −log σ(−x))
  assert float(loss) == pytest.approx((sp(-1.5) + sp(-0.5) + sp(0.25)) / 3, rel=1e-6)
  assert float(m["itm/accuracy"]) == pytest.approx(2 / 3)
  with pytest.raises(UserError, match="outputs\\['itm'\\]"):
    itm_loss({}, {})


def test_hard_negatives_exclude_positive_and_follow_softmax():
  b = 4
  sim = jnp.array([[9.0, 2.0, 1.0, 0.0],
                   [0.5, 9.0, 0.5, 0.5],
                   [3.0, 0.0, 9.0, 0.0],
                   [0.0, 0.0, 0.0, 9.0]])
  exclude = jnp.eye(b, dtype=bool)
  keys = jax.random.split(jax.random.PRNGKey(0), 4000)
  neg_txt, neg_img = jax.jit(jax.vmap(lambda k: sample_hard_negatives(k, sim, exclude)))(keys)
  neg_txt, neg_img = np.asarray(neg_txt), np.asarray(neg_img)
  rows = np.arange(b)[None]
  assert not np.any(neg_txt == rows) and not np.any(neg_img == rows)  # never the positive
  for i in range(b):  # empirical frequencies match softmax over the non-positive entries
    for s, negs in ((np.asarray(sim), neg_txt), (np.asarray(sim).T, neg_img)):
      p = np.exp(np.where(np.eye(b, dtype=bool), -np.inf, s)[i])
      p /= p.sum()
      freq = np.bincount(negs[:, i], minlength=b) / len(negs)
      np.testing.assert_allclose(freq, p, atol=0.03)
  # the most similar negative is preferred: image 0 -> text 1 (2.0 beats 1.0, 0.0)
  assert np.bincount(neg_txt[:, 0]).argmax() == 1
  # text 0 -> image 2 (3.0)
  assert np.bincount(neg_img[:, 0]).argmax() == 2


def test_hard_fraction_mixes_softmax_and_uniform():
  """hard_fraction f: each row is drawn ∝ softmax(sim) with probability f, else uniformly over its allowed pairs."""
  b = 4
  sim = jnp.array([[9.0, 4.0, 0.0, 0.0],
                   [4.0, 9.0, 0.0, 0.0],
                   [0.0, 0.0, 9.0, 4.0],
                   [0.0, 4.0, 0.0, 9.0]])
  exclude = jnp.eye(b, dtype=bool)
  keys = jax.random.split(jax.random.PRNGKey(2), 4000)
  for f in (0.0, 0.5):
    neg_txt, neg_img = jax.jit(jax.vmap(lambda k, f=f: sample_hard_negatives(k, sim, exclude, f)))(keys)
    for s, negs in ((np.asarray(sim), np.asarray(neg_txt)), (np.asarray(sim).T, np.asarray(neg_img))):
      assert not np.any(negs == np.arange(b)[None])
      for i in range(b):
        p = np.exp(np.where(np.eye(b, dtype=bool), -np.inf, s)[i])
        p = f * p / p.sum() + (1 - f) * np.where(np.arange(b) == i, 0.0, 1 / (b - 1))
        np.testing.assert_allclose(np.bincount(negs[:, i], minlength=b) / len(negs), p, atol=0.03)
  with pytest.raises(UserError, match="hard_fraction"):
    sample_hard_negatives(keys[0], sim, exclude, 1.5)


def test_hard_negatives_extra_exclusions_and_fallback():
  sim = jnp.zeros((3, 3))
  exclude = jnp.array([[True, True, False], [True, True, True], [False, True, True]])
  keys = jax.random.split(jax.random.PRNGKey(1), 200)
  neg_txt, neg_img = jax.vmap(lambda k: sample_hard_negatives(k, sim, exclude))(keys)
  neg_txt, neg_img = np.asarray(neg_txt), np.asarray(neg_img)
  assert set(neg_txt[:, 0]) == {2} and set(neg_txt[:, 2]) == {0}
  assert set(neg_txt[:, 1]) == {2}  # nothing allowed: falls back to (i + 1) mod B
  assert set(neg_img[:, 0]) == {2} and set(neg_img[:, 2]) == {0}


def test_sharded_matches_single_device():
  b = 16
  rng = np.random.default_rng(0)
  z = rng.normal(size=(2, b, 8)).astype(np.float32)
  sim = 10.0 * z[0] @ z[1].T
  exclude = np.eye(b, dtype=bool)
  logits = rng.normal(size=(3 * b, 2)).astype(np.float32)
  labels = np.concatenate([np.ones(b, np.int32), np.zeros(2 * b, np.int32)])
  key = jax.random.PRNGKey(3)

  def f(sim, exclude, logits, labels):
    neg = sample_hard_negatives(key, sim, exclude)
    loss, m = itm_loss({"itm": {"logits": logits, "labels": labels}}, {})
    grad = jax.grad(lambda lg: itm_loss({"itm": {"logits": lg, "labels": labels}}, {})[0])(logits)
    return neg, loss, m, grad

  single = jax.jit(f)(sim, exclude, logits, labels)
  mesh = make_mesh({"data": 2, "fsdp": 4})
  placed = [jax.device_put(a, batch_sharding(mesh, a.ndim)) for a in (sim, exclude, logits, labels)]
  with jax.set_mesh(mesh):
    sharded = jax.jit(f, out_shardings=replicated(mesh))(*placed)
  assert len(placed[0].sharding.device_set) == 8
  for a, b_ in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-6, atol=1e-7)
