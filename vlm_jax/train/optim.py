"""Optimizer, learning-rate schedules, per-group learning rates and parameter freezing.

Optimizers (`optimizer.name`):
- `adamw` (Loshchilov & Hutter 2019): Adam with decoupled weight decay (keys `b1`, `b2`, `eps`).
- `sgd`: SGD with heavy-ball momentum (Polyak 1964) or Nesterov momentum (Sutskever et al. 2013), keys
  `momentum` (0.9; 0 for plain SGD) and `nesterov` (False). Weight decay is added to the gradient before the
  momentum (L2 as in torch.optim.SGD, the CoOp / CLIP-Adapter recipes): g + λ·θ → trace → −lr·(…).
In both, weight decay applies only to parameters whose '/'-joined path matches `optimizer.wd_mask` (by default
Dense/Conv kernels: biases, norms, embeddings, position tables, the logit scale and the SigLIP bias get none),
and `clip_norm` clips the global gradient norm (over every trainable leaf) first.

Schedule: a warmup of `warmup_steps`, `warmup` = 'linear' (0 → lr, Goyal et al. 2017) or 'constant' (a fixed
`warmup_lr`, default 1e-5, as CoOp's ConstantWarmupScheduler, Zhou et al. 2022), then `schedule` = cosine
(Loshchilov & Hutter 2017) | linear | rsqrt | constant decay from lr to `lr * end_factor`.

Per-group learning rates: `optimizer.lr_groups` maps regexes over '/'-joined trainable-parameter paths to lr
multipliers; the first regex that matches a leaf wins, unmatched leaves keep ×1, a regex that matches no leaf is
a user error. Give an ordered sequence of pairs, `(('^img/', 0.1), ('prompt', 10.0))`, or a mapping: a plain
dict keeps its order, but a ConfigDict sorts its keys (and rejects dots unless `allow_dotted_keys=True`), so there
a leaf matched by two regexes with different multipliers is an error. The multiplier scales the whole step
(lr and the lr-coupled weight decay alike), after clipping: clipping stays global.

Freezing (LiT, Zhai et al. 2022): `config.frozen` is a regex over '/'-joined parameter paths. Frozen leaves are
split off before differentiation, so they get no gradient and no optimizer state and stay bit-identical.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from vlm_jax.errors import UserError

PyTree = Any

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "linear", "rsqrt", "constant")
WARMUPS = ("linear", "constant")
DEFAULT_WARMUP_LR = 1e-5  # CoOp's constant warmup learning rate


def _number(opt_cfg, key: str, default, *, low: float | None = None, high: float | None = None,
            integer: bool = False):
  """`opt_cfg[key]` (or `default`) as a float / int inside [low, high]; anything else is a UserError."""
  value = opt_cfg.get(key, default)
  try:
    out = int(value) if integer else float(value)
  except (TypeError, ValueError):
    raise UserError(f"optimizer.{key}={value!r} is not a number") from None
  if integer and out != float(value):
    raise UserError(f"optimizer.{key}={value!r} is not an integer")
  if not math.isfinite(out) or (low is not None and out < low) or (high is not None and out > high):
    bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
    raise UserError(f"optimizer.{key}={value!r} is outside {bounds}")
  return out


def _choice(opt_cfg, key: str, default: str, choices: Sequence[str]) -> str:
  value = opt_cfg.get(key, default)
  if value not in choices:
    raise UserError(f"unknown optimizer.{key} {value!r}; use one of {', '.join(choices)}")
  return value


def make_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
  """Warmup (linear from 0, or constant `warmup_lr`) then cosine | linear | rsqrt | constant decay."""
  lr = _number(opt_cfg, "lr", None, low=0.0)
  warmup = _number(opt_cfg, "warmup_steps", 0, low=0, integer=True)
  kind = _choice(opt_cfg, "schedule", "cosine", SCHEDULES)
  warmup_kind = _choice(opt_cfg, "warmup", "linear", WARMUPS)
  end = lr * _number(opt_cfg, "end_factor", 0.0, low=0.0)
  decay_steps = max(total_steps - warmup, 1)
  if kind == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
  elif kind == "linear":
    decay = optax.linear_schedule(lr, end, decay_steps)
  elif kind == "rsqrt":
    timescale = max(_number(opt_cfg, "rsqrt_timescale", warmup or 1, low=0, integer=True), 1)
    decay = lambda s: lr * jax.lax.rsqrt(1.0 + s / timescale)  # noqa: E731 (lr at s=0, ∝ 1/√s later)
  else:
    decay = optax.constant_schedule(lr)
  if warmup <= 0:
    return decay
  if warmup_kind == "constant":
    head = optax.constant_schedule(_number(opt_cfg, "warmup_lr", DEFAULT_WARMUP_LR, low=0.0))
  else:
    head = optax.linear_schedule(0.0, lr, warmup)
  return optax.join_schedules([head, decay], [warmup])


def _path_mask(tree: PyTree, pattern: str) -> PyTree:
  rx = re.compile(pattern)
  flat = traverse_util.flatten_dict(tree, sep="/")
  return traverse_util.unflatten_dict({k: bool(rx.search(k)) for k in flat}, sep="/")


def _compile(pattern: str, where: str) -> re.Pattern:
  try:
    return re.compile(pattern)
  except re.error as e:
    raise UserError(f"{where}: {pattern!r} is not a regular expression ({e})") from None


def parse_lr_groups(spec) -> tuple[list[tuple[str, float]], bool]:
  """`optimizer.lr_groups` → ([(regex, multiplier), …] in match order, order_is_reliable)."""
  if not spec:
    return [], True
  if isinstance(spec, Mapping) or hasattr(spec, "items"):
    pairs, ordered = list(spec.items()), type(spec) is dict
  elif isinstance(spec, Sequence) and not isinstance(spec, str) and all(
      isinstance(p, Sequence) and not isinstance(p, str) and len(p) == 2 for p in spec):
    pairs, ordered = [tuple(p) for p in spec], True
  else:
    raise UserError(f"optimizer.lr_groups={spec!r}: give {{regex: multiplier}} or ((regex, multiplier), …)")
  out = []
  for pattern, mult in pairs:
    if not isinstance(pattern, str):
      raise UserError(f"optimizer.lr_groups: the regex {pattern!r} is not a string")
    _compile(pattern, "optimizer.lr_groups")
    out.append((pattern, _number({"lr_groups": mult}, "lr_groups", None, low=0.0)))
  return out, ordered


def group_labels(params: PyTree, groups: Sequence[tuple[str, float]], ordered: bool = True) -> PyTree:
  """A tree of labels like `params`: 'group<i>' for the first of `groups` whose regex matches the leaf's
  '/'-joined path, 'base' for the rest. A regex matching no leaf is a UserError."""
  flat = traverse_util.flatten_dict(params, sep="/")
  rxs = [re.compile(p) for p, _ in groups]
  labels, used = {}, [False] * len(groups)
  for path in flat:
    hits = [i for i, rx in enumerate(rxs) if rx.search(path)]
    labels[path] = f"group{hits[0]}" if hits else "base"
    for i in hits[:1]:
      used[i] = True
    if not ordered and len({groups[i][1] for i in hits}) > 1:
      raise UserError(f"optimizer.lr_groups: {path!r} matches {[groups[i][0] for i in hits]} with different "
                      "multipliers and a ConfigDict does not keep their order; give ((regex, multiplier), …)")
  unused = [groups[i][0] for i, u in enumerate(used) if not u]
  if unused:
    example = next(iter(flat), "")
    raise UserError(f"optimizer.lr_groups: {unused} match no trainable parameter (or only ones an earlier regex "
                    f"took); paths look like {example!r}")
  return traverse_util.unflatten_dict(labels, sep="/")


def lr_multipliers(groups: Sequence[tuple[str, float]], ordered: bool = True) -> optax.GradientTransformation:
  """Scales each leaf's update by its group's multiplier (`optax.partition` of `optax.scale`)."""
  transforms = {f"group{i}": optax.scale(m) for i, (_, m) in enumerate(groups)}
  transforms["base"] = optax.identity()
  return optax.partition(transforms, lambda params: group_labels(params, groups, ordered))


def _base_optimizer(opt_cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
  name = _choice(opt_cfg, "name", "adamw", OPTIMIZERS)
  wd_mask = opt_cfg.get("wd_mask", r"(^|/)kernel$")
  _compile(wd_mask, "optimizer.wd_mask")
  weight_decay = _number(opt_cfg, "weight_decay", 0.0, low=0.0)
  mask = lambda p: _path_mask(p, wd_mask)  # noqa: E731
  if name == "adamw":
    return optax.adamw(schedule, b1=_number(opt_cfg, "b1", 0.9, low=0.0, high=1.0),
                       b2=_number(opt_cfg, "b2", 0.98, low=0.0, high=1.0),
                       eps=_number(opt_cfg, "eps", 1e-6, low=0.0), weight_decay=weight_decay, mask=mask)
  momentum = _number(opt_cfg, "momentum", 0.9, low=0.0, high=1.0)
  nesterov = opt_cfg.get("nesterov", False)
  if not isinstance(nesterov, bool):
    raise UserError(f"optimizer.nesterov={nesterov!r} is not true/false")
  if nesterov and not momentum:
    raise UserError("optimizer.nesterov=True needs optimizer.momentum > 0")
  parts = [optax.add_decayed_weights(weight_decay, mask)] if weight_decay else []
  parts.append(optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov))
  return optax.chain(*parts)


def make_optimizer(opt_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax chain: global-norm clip → adamw | sgd (masked decay) with the schedule → per-group lr
  multipliers; returns (tx, schedule). `schedule` is the base lr (logged), before group multipliers."""
  schedule = make_schedule(opt_cfg, total_steps)
  parts = []
  if opt_cfg.get("clip_norm"):
    parts.append(optax.clip_by_global_norm(_number(opt_cfg, "clip_norm", None, low=0.0)))
  parts.append(_base_optimizer(opt_cfg, schedule))
  groups, ordered = parse_lr_groups(opt_cfg.get("lr_groups"))
  if groups:
    parts.append(lr_multipliers(groups, ordered))
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


