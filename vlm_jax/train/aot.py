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

from vlm_jax import assembly
from vlm_jax.parallel import mesh as mesh_lib
from vlm_jax.train.optim import make_optimizer
from vlm_jax.train.state import create_train_state
from vlm_jax.train.step import jit_train_step, spike_guard_settings


class CompiledStep(NamedTuple):
  lowered: jax.stages.Lowered
  compiled: jax.stages.Compiled
  batch: dict            # the abstract global batch the step was compiled for
  compile_s: float       # lowering + compilation, seconds


def abstract_batch(config, batch_size: int, mesh, model=None) -> dict:
  """ShapeDtypeStructs of a global training batch of `config` (`assembly.example_batch`), sharded over the
  batch axes."""
  rows = assembly.example_batch(config, model)
  return {k: jax.ShapeDtypeStruct((batch_size, *v.shape[1:]), v.dtype,
                                  sharding=mesh_lib.batch_sharding(mesh, v.ndim)) for k, v in rows.items()}


def compile_train_step(config, mesh, rules, batch_size: int) -> CompiledStep:
  """Lowers and compiles `config`'s train step for a global batch of `batch_size` on `mesh` (the loop's jitted
  step, `train.step.jit_train_step`); the model config must be complete without a tokenizer."""
  parts = assembly.assemble(config, tokenizer=False)  # no tokenizer (vocabulary file) needed
  tx, schedule = make_optimizer(config.optimizer, int(config.total_steps))
  batch = abstract_batch(config, batch_size, mesh, parts.model)
  frozen = config.get("frozen") or None
  accum = int(config.optimizer.get("grad_accum_steps", 1))
  spike_factor, spike_window = spike_guard_settings(config)
  shardings = []

  def create(rng):
    state, sh = create_train_state(parts.model, tx, parts.example, mesh=mesh, rules=rules, frozen=frozen, rng=rng,
                                   spike_window=spike_window)
    shardings.append(sh)
    return state

  start = time.perf_counter()
  with jax.set_mesh(mesh):
    abstract = jax.eval_shape(create, jax.random.PRNGKey(0))
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings[0])
    step = jit_train_step(parts.model, parts.loss_fn, tx, schedule, shardings[0], mesh=mesh, rules=rules,
                          accum_steps=accum, frozen=frozen, spike_factor=spike_factor)
    lowered = step.lower(state, batch)
    compiled = lowered.compile()
  return CompiledStep(lowered, compiled, batch, time.perf_counter() - start)
