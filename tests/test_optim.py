"""Optimizers by config (vlm_jax.train.optim): SGD (momentum / Nesterov) against optax.sgd, masked weight decay,
constant and linear warmup, per-group learning rates by regex, and the user errors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vlm_jax.errors import UserError
from vlm_jax import config_lib as config_base
from vlm_jax.train.optim import make_optimizer, make_schedule


def opt(**kw):
  base = {"name": "adamw", "lr": 0.1, "weight_decay": 0.0, "clip_norm": 0.0, "schedule": "constant",
          "warmup_steps": 0}
  base.update(kw)
  return ml_collections.ConfigDict(base)


PARAMS = {"img": {"conv": {"kernel": jnp.array([1.0, -2.0, 3.0]), "bias": jnp.array([0.5])}},
          "txt": {"dense": {"kernel": jnp.array([[0.3, -0.7], [1.1, 0.2]])}}}
CURV = {"img": {"conv": {"kernel": jnp.array([1.0, 2.0, 0.5]), "bias": jnp.array([3.0])}},
        "txt": {"dense": {"kernel": jnp.array([[0.2, 1.0], [4.0, 0.7]])}}}


def quad_grad(params):
  """Gradient of the toy quadratic ½ Σ c·θ²."""
  return jax.grad(lambda p: 0.5 * sum(jnp.sum(c * x ** 2) for c, x in zip(jax.tree.leaves(CURV),
                                                                            jax.tree.leaves(p))))(params)


def run(tx, steps=5, params=PARAMS):
  """Parameters and per-step updates after `steps` steps of `tx` on the quadratic."""
  state, updates_seen = tx.init(params), []
  for _ in range(steps):
    updates, state = tx.update(quad_grad(params), state, params)
    params = optax.apply_updates(params, updates)
    updates_seen.append(updates)
  return params, updates_seen


def assert_trees_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.mark.parametrize("momentum,nesterov", [(0.9, False), (0.9, True), (0.0, False)])
def test_sgd_matches_optax_sgd_exactly(momentum, nesterov):
  tx, _ = make_optimizer(opt(name="sgd", momentum=momentum, nesterov=nesterov), 10)
  ref = optax.sgd(optax.constant_schedule(0.1), momentum=momentum or None, nesterov=nesterov)
  ours, ref_out = run(tx)[0], run(ref)[0]
  assert_trees_equal(ours, ref_out)
  assert not np.allclose(ours["img"]["conv"]["kernel"], PARAMS["img"]["conv"]["kernel"])


def test_sgd_weight_decay_respects_wd_mask():
  """Decay is added to the gradient (torch.optim.SGD's L2) only on leaves whose path matches wd_mask."""
  cfg = opt(name="sgd", momentum=0.9, nesterov=True, weight_decay=0.01, wd_mask=r"(^|/)kernel$")
  tx, _ = make_optimizer(cfg, 10)
  mask = {"img": {"conv": {"kernel": True, "bias": False}}, "txt": {"dense": {"kernel": True}}}
  ref = optax.chain(optax.add_decayed_weights(0.01, mask), optax.sgd(0.1, momentum=0.9, nesterov=True))
  assert_trees_equal(run(tx)[0], run(ref)[0])
  # the bias trajectory is exactly undecayed SGD's; kernels differ from it
  plain = run(optax.sgd(0.1, momentum=0.9, nesterov=True))[0]
  ours = run(tx)[0]
  np.testing.assert_array_equal(ours["img"]["conv"]["bias"], plain["img"]["conv"]["bias"])
  assert not np.array_equal(ours["img"]["conv"]["kernel"], plain["img"]["conv"]["kernel"])


def test_adamw_unchanged_with_defaults():
  """The base config's AdamW equals the hand-built chain it always was."""
  c = config_base.base_config().optimizer
  tx, schedule = make_optimizer(c, 1000)
  mask = {"img": {"conv": {"kernel": True, "bias": False}}, "txt": {"dense": {"kernel": True}}}
  ref = optax.chain(optax.clip_by_global_norm(1.0),
                    optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2, mask=mask))
  assert_trees_equal(run(tx)[0], run(ref)[0])


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_lr_groups_multiply_the_update_exactly(name):
  """Matched leaves get exactly multiplier × the ungrouped update; first match wins; the rest ×1."""
  extra = {"momentum": 0.9, "weight_decay": 0.01} if name == "sgd" else {"weight_decay": 0.01}
  base_tx, _ = make_optimizer(opt(name=name, clip_norm=1.0, **extra), 10)
  groups = (("^img/conv/bias$", 0.5), ("^img/", 10.0), ("kernel", 3.0))  # bias: 0.5 (first), img kernel: 10
  tx, _ = make_optimizer(opt(name=name, clip_norm=1.0, lr_groups=groups, **extra), 10)
  g = quad_grad(PARAMS)
  u0, _ = base_tx.update(g, base_tx.init(PARAMS), PARAMS)
  u1, _ = tx.update(g, tx.init(PARAMS), PARAMS)
  np.testing.assert_array_equal(u1["img"]["conv"]["bias"], 0.5 * u0["img"]["conv"]["bias"])
  np.testing.assert_array_equal(u1["img"]["conv"]["kernel"], 10.0 * u0["img"]["conv"]["kernel"])
  np.testing.assert_array_equal(u1["txt"]["dense"]["kernel"], 3.0 * u0["txt"]["dense"]["kernel"])


def test_lr_groups_unmatched_leaves_and_clipping_stay_global():
  """A leaf no regex matches moves as without groups; clipping sees every leaf's gradient (global norm)."""
  cfg = dict(name="sgd", momentum=0.0, clip_norm=0.01)
  base_tx, _ = make_optimizer(opt(**cfg), 10)
  tx, _ = make_optimizer(opt(lr_groups={"^txt/": 0.0}, **cfg), 10)
  g = quad_grad(PARAMS)
  u0, _ = base_tx.update(g, base_tx.init(PARAMS), PARAMS)
  u1, _ = tx.update(g, tx.init(PARAMS), PARAMS)
  assert_trees_equal(u1["img"], u0["img"])  # clipped by the norm of all leaves, txt included
  np.testing.assert_array_equal(u1["txt"]["dense"]["kernel"], np.zeros((2, 2)))


def test_lr_groups_from_config_dict_and_json_pairs():
  """A ConfigDict mapping (dotted keys allowed) and JSON-style lists of pairs both work."""
  groups = ml_collections.ConfigDict({"^img/.*": 2.0}, allow_dotted_keys=True)
  tx, _ = make_optimizer(opt(name="sgd", momentum=0.0, lr_groups=groups), 10)
  u, _ = tx.update(quad_grad(PARAMS), tx.init(PARAMS), PARAMS)
  np.testing.assert_allclose(u["img"]["conv"]["bias"], -0.1 * 2.0 * 3.0 * 0.5)
  tx, _ = make_optimizer(opt(name="sgd", momentum=0.0, lr_groups=[["^img/.*", 2.0]]), 10)
  u2, _ = tx.update(quad_grad(PARAMS), tx.init(PARAMS), PARAMS)
  assert_trees_equal(u, u2)


def test_lr_group_errors():
  tx, _ = make_optimizer(opt(lr_groups={"^nothing/": 2.0}), 10)
  with pytest.raises(UserError, match="match no trainable parameter"):
    tx.init(PARAMS)
  with pytest.raises(UserError, match="not a regular expression"):
    make_optimizer(opt(lr_groups={"(": 2.0}), 10)
  with pytest.raises(UserError, match="outside"):
    make_optimizer(opt(lr_groups={"img": -1.0}), 10)
  ambiguous = ml_collections.ConfigDict({"img": 2.0, "kernel": 3.0})  # sorted keys: order is not the user's
  tx, _ = make_optimizer(opt(lr_groups=ambiguous), 10)
  with pytest.raises(UserError, match="does not keep their order"):
    tx.init(PARAMS)


def test_constant_warmup_values():
  """CoOp's constant warmup: warmup_lr for warmup_steps, then the decay from lr."""
  s = make_schedule(opt(lr=2e-3, schedule="cosine", warmup="constant", warmup_steps=4, warmup_lr=1e-5), 14)
  for step in range(4):
    assert float(s(step)) == pytest.approx(1e-5, rel=1e-6)
  assert float(s(4)) == pytest.approx(2e-3, rel=1e-6)
  assert float(s(9)) == pytest.approx(1e-3, rel=1e-5)  # half-way through the cosine
  assert float(s(14)) == pytest.approx(0.0, abs=1e-9)
  default = make_schedule(opt(lr=2e-3, warmup="constant", warmup_steps=2), 10)
  assert float(default(0)) == pytest.approx(1e-5, rel=1e-6)


def test_linear_warmup_values():
  s = make_schedule(opt(lr=1.0, schedule="constant", warmup="linear", warmup_steps=4), 10)
  assert [float(s(i)) for i in range(6)] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0])
  legacy = make_schedule(opt(lr=1.0, schedule="constant", warmup_steps=4), 10)  # no `warmup` key: linear
  assert float(legacy(2)) == pytest.approx(0.5)


def test_old_configs_without_new_keys():
  """Configs written before these options (only name/lr) still build AdamW without clipping or decay."""
  tx, s = make_optimizer(ml_collections.ConfigDict({"name": "adamw", "lr": 1e-3}), 10)
  run(tx, steps=2)
  assert float(s(3)) == pytest.approx(float(optax.cosine_decay_schedule(1e-3, 10)(3)))


@pytest.mark.parametrize("key,value,match", [
    ("name", "adam", "adamw, sgd"), ("schedule", "step", "cosine, linear, rsqrt, constant"),
    ("warmup", "cosine", "linear, constant"), ("momentum", 1.5, "outside"), ("lr", "fast", "not a number"),
    ("warmup_steps", -1, "outside"), ("nesterov", "yes", "true/false"), ("wd_mask", "[", "not a regular"),
    ("lr_groups", "img", "regex: multiplier")])
def test_bad_values_are_user_errors(key, value, match):
  cfg = opt(**{"name": "sgd" if key in ("momentum", "nesterov") else "adamw", key: value})
  with pytest.raises(UserError, match=match):
    make_optimizer(cfg, 10)


def test_nesterov_needs_momentum():
  with pytest.raises(UserError, match="momentum > 0"):
    make_optimizer(opt(name="sgd", momentum=0.0, nesterov=True), 10)
