"""Ahead-of-time lowering and compilation of a config's train step, with nothing materialised.

Large variants (B/16, L/14, So400m/14) are checked on machines that cannot hold them: the train state is built
abstractly (`jax.eval_shape` over `create_train_state`, shardings from the logical-axis rules) and the jitted
step is lowered and compiled against abstract, sharded arguments. `compiled.memory_analysis()` then gives the
per-device memory and `lowered.cost_analysis()` the global FLOPs (tests/test_large_compile.py,
benchmarks/compile_memory.py).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp

from vlm_jax import runner
from vlm_jax.models import build_model
from vlm_jax.parallel import mesh as mesh_lib
from vlm_jax.train.optim import make_optimizer
from vlm_jax.train.state import create_train_state
from vlm_jax.train.step import make_train_step


class CompiledStep(NamedTuple):
  lowered: jax.stages.Lowered
  compiled: jax.stages.Compiled
  batch: dict            # the abstract global batch the step was compiled for
  compile_s: float       # lowering + compilation, seconds


def abstract_batch(config, batch_size: int, mesh) -> dict:
  """ShapeDtypeStructs of a global training batch of `config` (image and token ids), sharded over the batch axes."""
  res, length = int(config.data.image_size), int(config.model.text.max_len)
  shapes = {"image": ((batch_size, res, res, 3), jnp.float32), "text": ((batch_size, length), jnp.int32)}
  return {k: jax.ShapeDtypeStruct(s, d, sharding=mesh_lib.batch_sharding(mesh, len(s))) for k, (s, d) in shapes.items()}


def compile_train_step(config, mesh, rules, batch_size: int) -> CompiledStep:
  """Lowers and compiles `config`'s train step for a global batch of `batch_size` on `mesh`."""
  model, loss_fn = build_model(config.model), runner.build_loss_fn(config)  # no tokenizer (vocabulary) needed
  tx, schedule = make_optimizer(config.optimizer, int(config.total_steps))
  batch = abstract_batch(config, batch_size, mesh)
  example = {k: jnp.zeros((1, *v.shape[1:]), v.dtype) for k, v in batch.items()}
  shardings = []

  def create(rng):
    state, sh = create_train_state(model, tx, example, mesh=mesh, rules=rules, frozen=None, rng=rng)
    shardings.append(sh)
    return state

  start = time.perf_counter()
  with jax.set_mesh(mesh):
    abstract = jax.eval_shape(create, jax.random.PRNGKey(0))
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings[0])
    step = make_train_step(model, loss_fn, tx, schedule, mesh=mesh, rules=rules)
    lowered = jax.jit(step, out_shardings=(shardings[0], mesh_lib.replicated(mesh)),
                      donate_argnums=0).lower(state, batch)
    compiled = lowered.compile()
  return CompiledStep(lowered, compiled, batch, time.perf_counter() - start)
