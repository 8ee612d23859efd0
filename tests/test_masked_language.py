"""BERT corruption statistics (15 % of the real tokens; 80/10/10), MLM / MCM losses against hand-computed values,
loss only at selected positions, and sharded (8 simulated devices) vs single-device equality."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.errors import UserError
from vlm_jax.objectives import get_objective
from vlm_jax.models.masking import bert_mask, maskable_positions
from vlm_jax.objectives.masked_language import mcm_loss, mlm_loss
from vlm_jax.parallel.mesh import batch_sharding, make_mesh, replicated

V, L = 50, 24          # vocabulary (EOT = 49), row length
MASK_ID = V            # the extra embedding row


def _rows(n: int, seed: int = 0) -> np.ndarray:
  """CLIP-layout rows: SOT(2), 1..20 word ids in [3, 49), EOT(49), then padding."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((n, L), np.int32)
  for r in range(n):
    k = rng.integers(1, 21)
    ids[r, 0], ids[r, 1:k + 1], ids[r, k + 1] = 2, rng.integers(3, V - 1, k), V - 1
  return ids


def test_bert_mask_statistics():
  ids = _rows(4000)
  corrupted, selected = jax.jit(lambda k, x: bert_mask(k, x, mask_id=MASK_ID, vocab_size=V))(
      jax.random.PRNGKey(0), ids)
  corrupted, selected = np.asarray(corrupted), np.asarray(selected)
  real = np.asarray(maskable_positions(jnp.asarray(ids), eot_id=V - 1))
  assert real[:, 0].sum() == 0 and not np.any(real & ((ids == 0) | (ids == V - 1)))
  assert not np.any(selected & ~real)                       # only real tokens are selected
  n = real.sum(1)
  np.testing.assert_array_equal(selected.sum(1), np.maximum(1, np.floor(0.15 * n + 0.5)))  # BERT's count
  assert selected.sum() / real.sum() == pytest.approx(0.15, abs=0.03)
  np.testing.assert_array_equal(corrupted[~selected], ids[~selected])  # the rest is untouched
  sel_new, sel_old = corrupted[selected], ids[selected]
  frac_mask = np.mean(sel_new == MASK_ID)
  frac_random = np.mean((sel_new != MASK_ID) & (sel_new != sel_old))
  frac_same = np.mean(sel_new == sel_old)
  print(f"selected {selected.sum()}: [MASK] {frac_mask:.3f}, random {frac_random:.3f}, unchanged {frac_same:.3f}")
  assert frac_mask == pytest.approx(0.8, abs=0.02)
  assert frac_random == pytest.approx(0.1 * (1 - 1 / (V - 2)), abs=0.015)
  assert frac_same == pytest.approx(0.1 + 0.1 / (V - 2), abs=0.015)
  rand = sel_new[sel_new != MASK_ID]
  assert rand.min() >= 1 and rand.max() < V - 1            # random ids: no pad, no EOT, no [MASK]
  with pytest.raises(UserError, match="ratio"):
    bert_mask(jax.random.PRNGKey(0), ids, mask_id=MASK_ID, vocab_size=V, ratio=0.0)


def test_mlm_loss_hand_computed_and_only_selected_positions():
  logits = jnp.array([[[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]], [[1.0, 1.0, 1.0], [0.0, 0.0, 5.0]]])
  targets = jnp.array([[0, 2], [1, 2]])
  mask = jnp.array([[1.0, 1.0], [0.0, 0.0]])
  loss, m = mlm_loss({"mlm": {"logits": logits, "targets": targets, "mask": mask}}, {})
  lse = lambda *x: math.log(sum(math.exp(v) for v in x))  # noqa: E731
  expected = ((lse(2, 0, 0) - 2) + (lse(0, 3, 0) - 0)) / 2
  assert float(loss) == pytest.approx(expected, rel=1e-6)
  assert float(m["mlm/accuracy"]) == 0.5
  grad = jax.grad(lambda lg: mlm_loss({"mlm": {"logits": lg, "targets": targets, "mask": mask}}, {})[0])(logits)
  assert np.all(np.asarray(grad)[1] == 0) and np.all(np.abs(np.asarray(grad)[0]) > 0)
  assert get_objective("mlm") is mlm_loss
  with pytest.raises(UserError, match="outputs\\['mlm'\\]"):
    mlm_loss({}, {})


def test_mcm_loss_hand_computed():
  pred = jnp.array([[[1.0, 1.0], [0.0, 0.0]]])
  target = jnp.array([[[0.0, 2.0], [5.0, 5.0]]])
  img_mask = jnp.array([[1.0, 0.0]])
  logits = jnp.array([[[0.0, 0.0], [1.0, 0.0]]])
  out = {"mcm": {"image": {"pred": pred, "target": target, "mask": img_mask},
                 "text": {"logits": logits, "targets": jnp.array([[0, 1]]), "mask": jnp.array([[0.0, 1.0]])}}}
  image_loss = 1.0                                            # mean((1-0)², (1-2)²); patch 2 carries no loss
  text_loss = math.log(math.e + 1) - 0.0                      # −log softmax([1, 0])[1]
  loss, m = mcm_loss(out, {}, image_weight=0.5, text_weight=2.0)
  assert float(m["mcm/image_loss"]) == pytest.approx(image_loss)
  assert float(m["mcm/text_loss"]) == pytest.approx(text_loss, rel=1e-6)
  assert float(loss) == pytest.approx(0.5 * image_loss + 2.0 * text_loss, rel=1e-6)
  assert float(m["mcm/text_accuracy"]) == 0.0
  with pytest.raises(UserError, match="mcm"):
    mcm_loss({}, {})


def test_sharded_matches_single_device():
  b, n, d = 16, 4, 6
  rng = np.random.default_rng(1)
  ids = _rows(b, seed=1)
  arrays = {"logits": rng.normal(size=(b, L, V)).astype(np.float32), "targets": ids,
            "pred": rng.normal(size=(b, n, d)).astype(np.float32), "target": rng.normal(size=(b, n, d)).astype(
                np.float32), "img_mask": (rng.random((b, n)) < 0.4).astype(np.float32)}
  key = jax.random.PRNGKey(5)

  def f(a):
    corrupted, sel = bert_mask(key, a["targets"], mask_id=MASK_ID, vocab_size=V)
    text = {"logits": a["logits"], "targets": a["targets"], "mask": sel.astype(jnp.float32)}
    image = {"pred": a["pred"], "target": a["target"], "mask": a["img_mask"]}

    def total(logits, pred):
      out = {"mlm": dict(text, logits=logits), "mcm": {"image": dict(image, pred=pred),
                                                       "text": dict(text, logits=logits)}}
      l1, m1 = mlm_loss(out, {})
      l2, m2 = mcm_loss(out, {})
      return l1 + l2, (m1, m2)

    (loss, metrics), grads = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(a["logits"], a["pred"])
    return corrupted, loss, metrics, grads

  single = jax.jit(f)(arrays)
  mesh = make_mesh({"data": 2, "fsdp": 4})
  placed = {k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in arrays.items()}
  with jax.set_mesh(mesh):
    sharded = jax.jit(f, out_shardings=replicated(mesh))(placed)
  for a, b_ in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-5, atol=1e-6)
