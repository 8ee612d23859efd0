"""The training state and its sharded creation.

`TrainState` holds everything a resumed run needs besides the data iterator: the step, trainable and frozen
parameters, other model collections (e.g. ResNet `batch_stats`), the optimizer state (for trainable leaves only),
the base RNG key and the count of skipped (non-finite) steps. It is created directly on the mesh: the abstract
state is traced with `jax.eval_shape`, its logical annotations become `NamedSharding`s through the config's rules,
and the jitted initialiser writes every leaf straight into its shard.
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

  def variables(self) -> dict:
    """The full variable dict for `model.apply`."""
    return {"params": optim.merge_params(self.params, self.frozen), **self.extra}


def _create(model: nn.Module, tx: optax.GradientTransformation, example_batch: dict, frozen: str | None,
            rng: jax.Array) -> TrainState:
  init_rng, state_rng = jax.random.split(rng)
  k_params, k_drop, k_mask = jax.random.split(init_rng, 3)
  variables = model.init({"params": k_params, "dropout": k_drop, "mask": k_mask}, example_batch, train=False)
  variables = dict(variables)
  params = variables.pop("params")
  trainable, froz = optim.split_frozen(params, frozen)
  return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, frozen=froz, extra=variables,
                    opt_state=tx.init(trainable), rng=state_rng, skipped_steps=jnp.zeros((), jnp.int32))


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, example_batch: dict, *,
                       mesh: Mesh, rules, frozen: str | None, rng: jax.Array,
                       init_fn: Callable[[dict], dict] | None = None) -> tuple[TrainState, TrainState]:
  """Returns (state, state_shardings), every leaf placed on the mesh by its logical annotation.

  `init_fn(variables) -> variables` may replace variables of every collection after initialisation (LiT, a
  frozen teacher, a student backbone: `vlm_jax.runs.initializer`); it runs on host values before the state is
  placed, and the optimizer state is built after it.
  """
  create = lambda r: _create(model, tx, example_batch, frozen, r)  # noqa: E731
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
