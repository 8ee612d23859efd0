"""The jitted training step shared by every objective.

  rng_t = fold_in(rng, step);  outputs = model.apply(variables, batch, train=True)
  (loss, metrics) = objective(outputs, batch);  g = ∇_θ loss   (θ = trainable leaves only)
  finite(loss, g) ? θ ← optax_update(θ, g) : θ unchanged, skipped_steps += 1

Gradient accumulation splits the global batch into `grad_accum_steps` micro-batches (strided, so every
micro-batch still spans all data-parallel devices), averages their gradients and metrics, then updates once.
Note that contrastive objectives then see the negatives of one micro-batch only.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

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


def make_train_step(model: nn.Module, loss_fn: LossFn, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, accum_steps: int = 1, mesh, rules) -> Callable:
  """Returns `step(state, batch) -> (state, metrics)` (not yet jitted; the loop jits it with shardings)."""

  def loss_of(trainable, state: TrainState, batch: dict, rng: jax.Array):
    k_drop, k_mask = jax.random.split(rng)
    variables = {"params": optim.merge_params(trainable, state.frozen), **state.extra}
    outputs = model.apply(variables, batch, train=True, rngs={"dropout": k_drop, "mask": k_mask})
    return loss_fn(outputs, batch)

  grad_fn = jax.value_and_grad(loss_of, has_aux=True)

  def step(state: TrainState, batch: dict):
    with nn.logical_axis_rules(rules):
      rng = jax.random.fold_in(state.rng, state.step)
      if accum_steps == 1:
        (loss, metrics), grads = grad_fn(state.params, state, batch, rng)
      else:
        micro = _microbatches(batch, accum_steps, mesh)

        def body(carry, xs):
          g_sum, l_sum, m_sum = carry
          mb, i = xs
          (l, m), g = grad_fn(state.params, state, mb, jax.random.fold_in(rng, i))
          return (jax.tree.map(jnp.add, g_sum, g), l_sum + l, jax.tree.map(jnp.add, m_sum, m)), None

        zeros_g = jax.tree.map(jnp.zeros_like, state.params)
        first_mb = jax.tree.map(lambda x: x[0], micro)
        _, m_shape = jax.eval_shape(lambda: loss_of(state.params, state, first_mb, rng))
        zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape)
        (grads, loss, metrics), _ = jax.lax.scan(
            body, (zeros_g, jnp.zeros((), jnp.float32), zeros_m), (micro, jnp.arange(accum_steps)))
        grads = jax.tree.map(lambda g: g / accum_steps, grads)
        loss = loss / accum_steps
        metrics = jax.tree.map(lambda m: m / accum_steps, metrics)

    finite = optim.all_finite(loss, grads)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1,
        params=optim.select_tree(finite, new_params, state.params),
        opt_state=optim.select_tree(finite, new_opt_state, state.opt_state),
        skipped_steps=state.skipped_steps + (1 - finite.astype(jnp.int32)))
    metrics = dict(metrics)
    metrics.update(loss=loss, grad_norm=optax.tree.norm(grads), learning_rate=schedule(state.step),
                   skipped_steps=new_state.skipped_steps, step_finite=finite)
    return new_state, metrics

  return step
