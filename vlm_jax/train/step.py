"""The jitted training step shared by every objective.

  rng_t = fold_in(rng, step);  outputs, extra' = model.apply(variables, batch, train=True, mutable=extra)
  (loss, metrics) = objective(outputs, batch);  g = ∇_θ loss   (θ = trainable leaves only)
  finite(loss, g) ∧ ¬spike ? (θ, extra) ← (optax_update(θ, g), extra') : both unchanged
  skipped_steps += ¬finite(loss, g);   spike_skipped_steps += spike          (optimizer state likewise kept)

Loss-spike guard (`config.loss_spike_factor` = k > 0, `config.loss_spike_window` = W): with L_{t-W..t-1} the
last W finite losses (of applied and skipped steps alike, so a lasting change of level is accepted after about
W/2 steps),

  spike_t = finite(L_t) ∧ (W losses seen) ∧ median(L_{t-W..t-1}) > 0 ∧ L_t > k · median(L_{t-W..t-1})

The window lives in the train state (`state.loss_guard`, replicated; absent when the guard is off, and then the
step is exactly the unguarded one), so the median is computed inside the jitted, sharded step and resumes
exactly from a checkpoint.

Collections other than `params` (`state.extra`, e.g. BatchNorm `batch_stats`) are mutable in training: a ResNet
with `train_batch_stats=True` normalises with the statistics of the global batch (under jit, the batch mean of
an array sharded over the data axes is a cross-device reduction: synchronised BatchNorm for free) and returns
updated running averages, which the step keeps; statistics under a `config.frozen` path stay as they are.

Gradient accumulation splits the global batch into `grad_accum_steps` micro-batches (strided, so every
micro-batch still spans all data-parallel devices), averages their gradients and metrics, then updates once.
Note that contrastive objectives then see the negatives of one micro-batch only.
"""

from __future__ import annotations

import re
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from vlm_jax.errors import UserError
from vlm_jax.parallel import mesh as mesh_lib
from vlm_jax.parallel.mesh import BATCH_AXES
from vlm_jax.train import optim
from vlm_jax.train.state import TrainState

LossFn = Callable[[dict, dict], tuple[jax.Array, dict]]


def _microbatches(batch: dict, accum: int, mesh) -> dict:
  """[B, …] -> [accum, B/accum, …]; micro-batch j holds rows j, j+accum, … (spread over all devices)."""
  def split(x):
    x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
    spec = P(None, BATCH_AXES, *([None] * (x.ndim - 2)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
  return jax.tree.map(split, batch)


def _keep_frozen(new_extra: dict, old_extra: dict, frozen: str | None) -> dict:
  """`new_extra` with the leaves under a `frozen` path (within each collection) taken from `old_extra`."""
  if not frozen or not old_extra:
    return new_extra
  rx = re.compile(frozen)
  out = {}
  for collection, tree in new_extra.items():
    new = traverse_util.flatten_dict(tree, sep="/")
    old = traverse_util.flatten_dict(old_extra[collection], sep="/")
    out[collection] = traverse_util.unflatten_dict(
        {k: old[k] if rx.search(k) else v for k, v in new.items()}, sep="/")
  return out


def loss_spike(guard: dict, loss: jax.Array, finite: jax.Array, factor: float) -> tuple[jax.Array, dict]:
  """(spike, guard') for the loss-spike guard (formula in the module docstring): whether `loss` is a spike
  against the window of recent finite losses, and the window with `loss` appended when finite."""
  recent = guard["recent"]
  median = jnp.median(recent)  # NaN until W losses were seen
  spike = finite & jnp.all(jnp.isfinite(recent)) & (median > 0) & (loss > factor * median)
  shifted = jnp.concatenate([recent[1:], jnp.reshape(loss, (1,)).astype(recent.dtype)])
  return spike, {"recent": jnp.where(finite, shifted, recent),
                 "skipped": guard["skipped"] + spike.astype(jnp.int32)}


def make_train_step(model: nn.Module, loss_fn: LossFn, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, accum_steps: int = 1, mesh, rules,
                    frozen: str | None = None, spike_factor: float = 0.0) -> Callable:
  """Returns `step(state, batch) -> (state, metrics)` (not yet jitted: see `jit_train_step`); `spike_factor` k
  > 0 needs a state made with a loss-guard window (`create_train_state(spike_window=W)`)."""

  def loss_of(trainable, extra, state: TrainState, batch: dict, rng: jax.Array):
    k_drop, k_mask = jax.random.split(rng)
    variables = {"params": optim.merge_params(trainable, state.frozen), **extra}
    outputs, new_extra = model.apply(variables, batch, train=True, rngs={"dropout": k_drop, "mask": k_mask},
                                     mutable=list(extra))
    loss, metrics = loss_fn(outputs, batch)
    return loss, (metrics, dict(new_extra))

  grad_fn = jax.value_and_grad(loss_of, has_aux=True)

  def step(state: TrainState, batch: dict):
    with nn.logical_axis_rules(rules):
      rng = jax.random.fold_in(state.rng, state.step)
      if accum_steps == 1:
        (loss, (metrics, extra)), grads = grad_fn(state.params, state.extra, state, batch, rng)
      else:
        micro = _microbatches(batch, accum_steps, mesh)

        def body(carry, xs):  # running statistics are updated micro-batch after micro-batch
          g_sum, l_sum, m_sum, ex = carry
          mb, i = xs
          (l, (m, ex)), g = grad_fn(state.params, ex, state, mb, jax.random.fold_in(rng, i))
          return (jax.tree.map(jnp.add, g_sum, g), l_sum + l, jax.tree.map(jnp.add, m_sum, m), ex), None

        zeros_g = jax.tree.map(jnp.zeros_like, state.params)
        first_mb = jax.tree.map(lambda x: x[0], micro)
        _, (m_shape, _) = jax.eval_shape(lambda: loss_of(state.params, state.extra, state, first_mb, rng))
        zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape)
        (grads, loss, metrics, extra), _ = jax.lax.scan(
            body, (zeros_g, jnp.zeros((), jnp.float32), zeros_m, state.extra), (micro, jnp.arange(accum_steps)))
        grads = jax.tree.map(lambda g: g / accum_steps, grads)
        loss = loss / accum_steps
        metrics = jax.tree.map(lambda m: m / accum_steps, metrics)
      extra = _keep_frozen(extra, state.extra, frozen)

    finite = optim.all_finite(loss, grads)
    apply, guard = finite, state.loss_guard
    if spike_factor > 0:
      spike, guard = loss_spike(state.loss_guard, loss, finite, spike_factor)
      apply = finite & ~spike
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1,
        params=optim.select_tree(apply, new_params, state.params),
        extra=optim.select_tree(apply, extra, state.extra),
        opt_state=optim.select_tree(apply, new_opt_state, state.opt_state),
        skipped_steps=state.skipped_steps + (1 - finite.astype(jnp.int32)),
        loss_guard=guard)
    metrics = dict(metrics)
    metrics.update(loss=loss, grad_norm=optax.tree.norm(grads), learning_rate=schedule(state.step),
                   skipped_steps=new_state.skipped_steps, step_finite=finite)
    if spike_factor > 0:
      metrics.update(spike_skipped_steps=guard["skipped"])
    return new_state, metrics

  return step


def spike_guard_settings(config) -> tuple[float, int]:
  """(factor, window) of the loss-spike guard from `config.loss_spike_factor` / `loss_spike_window`; (0, 0)
  when off. `UserError` for a factor in (0, 1] (it would skip most steps) or a window < 1."""
  factor = float(config.get("loss_spike_factor", 0.0) or 0.0)
  window = int(config.get("loss_spike_window", 32) or 0)
  if factor == 0:
    return 0.0, 0
  if factor <= 1 or window < 1:
    raise UserError(f"loss_spike_factor={factor} and loss_spike_window={window}: the guard needs a factor > 1 "
                    "(a loss above factor × the median of the last window losses is skipped) and a window >= 1; "
                    "0 turns it off")
  return factor, window


def jit_train_step(model: nn.Module, loss_fn: LossFn, tx: optax.GradientTransformation, schedule: optax.Schedule,
                   state_shardings, *, mesh, rules, accum_steps: int = 1, frozen: str | None = None,
                   spike_factor: float = 0.0) -> Callable:
  """The jitted step of the loop and of ahead-of-time compilation (`train/aot.py`): state in and out on
  `state_shardings` (donated), metrics replicated."""
  step = make_train_step(model, loss_fn, tx, schedule, accum_steps=accum_steps, mesh=mesh, rules=rules,
                         frozen=frozen, spike_factor=spike_factor)
  return jax.jit(step, out_shardings=(state_shardings, mesh_lib.replicated(mesh)), donate_argnums=0)
