"""The training state and its sharded creation.

`TrainState` holds everything a resumed run needs besides the data iterator: the step, trainable and frozen
parameters, other model collections (e.g. ResNet `batch_stats`), the optimizer state (for trainable leaves only),
the base RNG key, the count of skipped (non-finite) steps and, only when the loss-spike guard is on
(`config.loss_spike_factor > 0`), its window of recent losses and count of skipped spikes. It is created
directly on the mesh: the abstract state is traced with `jax.eval_shape`, its logical annotations become
`NamedSharding`s through the config's rules, and the jitted initialiser writes every leaf straight into its shard.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from vlm_jax.parallel import partitioning
from vlm_jax.train import optim

PyTree = Any


class TrainState(struct.PyTreeNode):
  step: jax.Array
  params: PyTree          # trainable parameters (the optimizer's view)
  frozen: PyTree          # frozen parameters (LiT): never differentiated, never updated
  extra: PyTree           # other variable collections, e.g. {'batch_stats': …}
  opt_state: PyTree
  rng: jax.Array
  skipped_steps: jax.Array
  # the loss-spike guard (train/step.py): {} when off, else {'recent': f32[window], 'skipped': i32}
  loss_guard: PyTree = struct.field(default_factory=dict)

  def variables(self) -> dict:
    """The full variable dict for `model.apply`."""
    return {"params": optim.merge_params(self.params, self.frozen), **self.extra}


def loss_guard_init(window: int) -> dict:
  """The loss-spike guard's state: `window` recent losses (NaN = not yet seen) and the skipped-spike count; {}
  (no state at all) when `window` is 0."""
  if not window:
    return {}
  return {"recent": jnp.full((int(window),), jnp.nan, jnp.float32), "skipped": jnp.zeros((), jnp.int32)}


def init_rngs(rng: jax.Array) -> tuple[dict, jax.Array]:
  """The run's key split the one way every run initialises: (the `model.init` rngs {'params', 'dropout',
  'mask'}, the state's own key for the steps). Transfer uses it to rebuild a method's step-0 parameters."""
  init_rng, state_rng = jax.random.split(rng)
  k_params, k_drop, k_mask = jax.random.split(init_rng, 3)
  return {"params": k_params, "dropout": k_drop, "mask": k_mask}, state_rng


def _create(model: nn.Module, tx: optax.GradientTransformation, example_batch: dict, frozen: str | None,
            rng: jax.Array, spike_window: int = 0) -> TrainState:
  rngs, state_rng = init_rngs(rng)
  variables = model.init(rngs, example_batch, train=False)
  variables = dict(variables)
  params = variables.pop("params")
  trainable, froz = optim.split_frozen(params, frozen)
  return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, frozen=froz, extra=variables,
                    opt_state=tx.init(trainable), rng=state_rng, skipped_steps=jnp.zeros((), jnp.int32),
                    loss_guard=loss_guard_init(spike_window))


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, example_batch: dict, *,
                       mesh: Mesh, rules, frozen: str | None, rng: jax.Array,
                       init_fn: Callable[[dict], dict] | None = None,
                       spike_window: int = 0) -> tuple[TrainState, TrainState]:
  """Returns (state, state_shardings), every leaf placed on the mesh by its logical annotation (the loss-spike
  guard's window of `spike_window` losses, when > 0, replicated).

  `init_fn(variables) -> variables` may replace variables of every collection after initialisation (LiT, a
  frozen teacher, a student backbone: `vlm_jax.runs.initializer`); it runs on host values before the state is
  placed, and the optimizer state is built after it.
  """
  create = lambda r: _create(model, tx, example_batch, frozen, r, spike_window)  # noqa: E731
  abstract = jax.eval_shape(create, rng)
  shardings = partitioning.logical_to_shardings(abstract, mesh, rules)
  if init_fn is None:
    with nn.logical_axis_rules(rules):
      state = jax.jit(lambda r: partitioning.unbox(create(r)), out_shardings=shardings)(rng)
    return state, shardings
  state = jax.device_get(partitioning.unbox(jax.jit(create)(rng)))
  variables = init_fn(state.variables())
  variables = dict(variables)
  trainable, froz = optim.split_frozen(variables.pop("params"), frozen)
  state = state.replace(params=trainable, frozen=froz, extra=variables, opt_state=tx.init(trainable))
  return jax.device_put(state, shardings), shardings
