"""Optimizer, learning-rate schedules and parameter freezing.

AdamW (Loshchilov & Hutter 2019) with decoupled weight decay applied only to parameters whose path matches
`optimizer.wd_mask` (by default Dense/Conv kernels: biases, norms, embeddings, position tables, the logit scale
and the SigLIP bias get none), global-norm clipping, and a warmup + decay schedule.

Freezing (LiT, Zhai et al. 2022): `config.frozen` is a regex over '/'-joined parameter paths. Frozen leaves are
split off before differentiation, so they get no gradient and no optimizer state and stay bit-identical.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from vlm_jax.errors import UserError

PyTree = Any


def make_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
  """Warmup (linear from 0) then `cosine` | `linear` | `rsqrt` | `constant` decay to `lr * end_factor`."""
  lr = float(opt_cfg.lr)
  warmup = int(opt_cfg.get("warmup_steps", 0))
  kind = opt_cfg.get("schedule", "cosine")
  end = lr * float(opt_cfg.get("end_factor", 0.0))
  decay_steps = max(total_steps - warmup, 1)
  if kind == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
  elif kind == "linear":
    decay = optax.linear_schedule(lr, end, decay_steps)
  elif kind == "rsqrt":
    timescale = max(int(opt_cfg.get("rsqrt_timescale", warmup or 1)), 1)
    decay = lambda s: lr * jax.lax.rsqrt(1.0 + s / timescale)  # noqa: E731 (lr at s=0, ∝ 1/√s later)
  elif kind == "constant":
    decay = optax.constant_schedule(lr)
  else:
    raise UserError(f"unknown schedule {kind!r}; use cosine, linear, rsqrt or constant")
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def _path_mask(tree: PyTree, pattern: str) -> PyTree:
  rx = re.compile(pattern)
  flat = traverse_util.flatten_dict(tree, sep="/")
  return traverse_util.unflatten_dict({k: bool(rx.search(k)) for k in flat}, sep="/")


def make_optimizer(opt_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax chain: clip → AdamW (masked decay) with the schedule; returns (tx, schedule)."""
  schedule = make_schedule(opt_cfg, total_steps)
  name = opt_cfg.get("name", "adamw")
  if name != "adamw":
    raise UserError(f"unknown optimizer {name!r}; use adamw")
  wd_mask = opt_cfg.get("wd_mask", r"(^|/)kernel$")
  parts = []
  if opt_cfg.get("clip_norm"):
    parts.append(optax.clip_by_global_norm(float(opt_cfg.clip_norm)))
  parts.append(optax.adamw(schedule, b1=float(opt_cfg.get("b1", 0.9)), b2=float(opt_cfg.get("b2", 0.98)),
                           eps=float(opt_cfg.get("eps", 1e-6)),
                           weight_decay=float(opt_cfg.get("weight_decay", 0.0)),
                           mask=lambda p: _path_mask(p, wd_mask)))
  return optax.chain(*parts), schedule


def split_frozen(params: PyTree, frozen: str | None) -> tuple[PyTree, PyTree]:
  """Splits params into (trainable, frozen) nested dicts by a regex over '/'-joined paths."""
  flat = traverse_util.flatten_dict(params, sep="/")
  if not frozen:
    return params, {}
  rx = re.compile(frozen)
  train = {k: v for k, v in flat.items() if not rx.search(k)}
  froz = {k: v for k, v in flat.items() if rx.search(k)}
  if not froz:
    raise UserError(f"frozen={frozen!r} matches no parameter; paths look like {next(iter(flat), '')!r}")
  if not train:
    raise UserError(f"frozen={frozen!r} freezes every parameter; nothing would train")
  return (traverse_util.unflatten_dict(train, sep="/"), traverse_util.unflatten_dict(froz, sep="/"))


def merge_params(trainable: PyTree, frozen: PyTree) -> PyTree:
  """Inverse of `split_frozen`."""
  if not frozen:
    return trainable
  flat = traverse_util.flatten_dict(trainable, sep="/")
  flat.update(traverse_util.flatten_dict(frozen, sep="/"))
  return traverse_util.unflatten_dict(flat, sep="/")


def all_finite(*trees: PyTree) -> jax.Array:
  """True when every leaf of every tree is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for t in trees for x in jax.tree.leaves(t)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def select_tree(pred: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


