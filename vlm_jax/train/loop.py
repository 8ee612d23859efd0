"""The one training loop, shared by every objective (and later by transfer and distillation).

    mesh ← config.mesh; model ← config.model; objective ← config.objectives; optimizer ← config.optimizer
    state ← newest readable checkpoint in workdir/checkpoints, else fresh init (+ `init_fn`: variables copied
            from one or several checkpoints, `vlm_jax.runs.initializer(config.init)`)
    for step in [state.step, total_steps):
        batch ← data iterator (per-process) → global jax.Array on the mesh
        state, metrics ← train_step(state, batch)            # jit, sharded, state donated
        log / evaluate / checkpoint on their schedules; SIGTERM → checkpoint and return

A step with a non-finite loss or gradient, or (`config.loss_spike_factor` > 0) a loss spike, is skipped and
counted (`skipped_steps`, `spike_skipped_steps`; `train/step.py`). A full disk (a checkpoint, metrics.jsonl, the
plot) stops the run with one `UserError` line naming the path; the newest finished checkpoint stays the one to
resume from (`runs.checkpointer`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Any, Callable

import jax
import numpy as np

from vlm_jax import runs
from vlm_jax.errors import UserError
from vlm_jax.parallel import mesh as mesh_lib
from vlm_jax.parallel import partitioning
from vlm_jax.train import flops as flops_lib
from vlm_jax.train import metrics as metrics_lib
from vlm_jax.train import profiling
from vlm_jax.train.optim import make_optimizer
from vlm_jax.train.state import create_train_state
from vlm_jax.train.step import jit_train_step, spike_guard_settings

log = logging.getLogger("vlm_jax")


class _Preemption:
  """Turns SIGTERM into a flag the loop checks after each step (then it checkpoints and returns)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler, the flag stays False
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def any_process(self) -> bool:
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))


def prepare_workdir(workdir: str) -> str:
  workdir = os.path.abspath(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test_{jax.process_index()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise UserError(f"workdir {workdir} is not writable: {e.strerror or e}") from None
  return workdir


def global_batch(local: dict, mesh) -> dict:
  """Per-process numpy batch -> global jax.Arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(mesh_lib.batch_sharding(mesh, v.ndim), v)
          for k, v in local.items()}


def check_batch_size(batch_size: int, mesh, accum: int) -> None:
  dp = mesh_lib.data_parallel_size(mesh)
  if batch_size % accum or (batch_size // accum) % dp:
    raise UserError(f"batch_size={batch_size} with grad_accum_steps={accum} is not divisible by the "
                    f"data-parallel size {dp} (mesh data×fsdp)")
  if batch_size % jax.process_count():
    raise UserError(f"batch_size={batch_size} is not divisible by the {jax.process_count()} processes")


def _first_rows(batch: dict, n: int) -> dict:
  return {k: v[:n] for k, v in batch.items()}


def _data_stats(data_iter) -> dict:
  """The data pipeline's counters (e.g. `data/skipped/<reason>`), summed over processes."""
  stats = data_iter.stats() if hasattr(data_iter, "stats") else {}
  if stats and jax.process_count() > 1:
    from jax.experimental import multihost_utils
    total = multihost_utils.process_allgather(np.asarray(list(stats.values()), np.int64)).sum(0)
    stats = dict(zip(stats, (int(v) for v in total)))
  return stats


def _model_flops(model, loss_fn, row_shapes: dict, batch_size: int, frozen: str | None) -> float:
  """Model FLOPs per global step for the throughput metrics (see `train/flops.py`)."""
  batch = {k: jax.ShapeDtypeStruct((batch_size, *shape), dtype) for k, (shape, dtype) in row_shapes.items()}
  try:
    model_flops = flops_lib.xla_model_flops_per_step(model, loss_fn, batch, frozen=frozen)
  except Exception as e:  # noqa: BLE001 (a model XLA cannot cost must not stop training)
    log.warning("no FLOPs count for this model (%s); mfu is logged as 0", e)
    model_flops = 0.0
  return model_flops


def train(config, workdir: str, *, make_data: Callable, model, loss_fn: Callable,
          evaluators: dict[str, Callable] | None = None, init_fn: Callable | None = None,
          quiet: bool = False) -> dict:
  """Runs (or resumes) training; returns the last logged and evaluated metrics.

  `make_data(process_index, process_count)` returns the per-process iterator (with get_state/set_state);
  `evaluators` map a name to `fn(variables) -> {metric: value}`, run every `eval_every_steps` and at the end;
  `init_fn(variables) -> variables` (default: `runs.initializer(config.init)`) initialises a fresh run.
  """
  if init_fn is None:
    init_fn = runs.initializer(config.get("init"))
  opened = []

  def open_data(process_index, process_count):
    opened.append(make_data(process_index, process_count))
    return opened[-1]

  with _Preemption() as preempt:  # installed first: a SIGTERM during set-up still ends in a checkpoint
    try:
      return _train(config, workdir, preempt, make_data=open_data, model=model, loss_fn=loss_fn,
                    evaluators=evaluators, init_fn=init_fn, quiet=quiet)
    finally:
      for data_iter in opened:
        _close(data_iter)


def _close(data_iter) -> None:
  """Stops the iterator's workers now (grain's `close`), not in a finaliser racing the interpreter's exit."""
  close = getattr(data_iter, "close", None)
  if close is not None:
    try:
      close()
    except Exception as e:  # noqa: BLE001 - a failing shutdown must not hide the run's own outcome
      log.debug("closing the data iterator failed: %s", e)


def _train(config, workdir, preempt, *, make_data, model, loss_fn, evaluators, init_fn, quiet):
  workdir = prepare_workdir(workdir)
  mesh = mesh_lib.make_mesh(config.mesh)
  rules = partitioning.rules_from_config(config.get("partitioning", {}).get("rules"))
  accum = int(config.optimizer.get("grad_accum_steps", 1))
  check_batch_size(config.batch_size, mesh, accum)
  spike_factor, spike_window = spike_guard_settings(config)
  total = int(config.total_steps)
  if jax.process_index() == 0:
    config_path = os.path.join(workdir, "config.json")
    with metrics_lib.no_space_as_user_error(config_path), open(config_path, "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))

  data_iter = make_data(jax.process_index(), jax.process_count())
  first = next(data_iter)
  row_shapes = {k: (v.shape[1:], v.dtype) for k, v in first.items()}
  tx, schedule = make_optimizer(config.optimizer, total)
  frozen = config.get("frozen") or None
  by_reference = not config.get("checkpoint_frozen", True)  # frozen weights rebuilt from config.init
  ckpt = runs.Checkpointer(os.path.join(workdir, "checkpoints"), keep=int(config.keep_checkpoints))
  resuming = bool(runs.steps(ckpt.directory))
  with jax.set_mesh(mesh):
    example = _first_rows(first, mesh_lib.data_parallel_size(mesh) // max(1, jax.process_count()) or 1)
    # a resumed run reads its own checkpoint, not the init sources (unless its frozen weights live there)
    state, shardings = create_train_state(
        model, tx, example, mesh=mesh, rules=rules, frozen=frozen, rng=jax.random.PRNGKey(int(config.seed)),
        init_fn=None if resuming and not by_reference else init_fn, spike_window=spike_window)
  if by_reference:
    runs.reference.record_or_verify(workdir, config.get("init"), state.frozen, write=jax.process_index() == 0)

  def saved(tree):  # what a checkpoint holds: without the frozen weights when they are kept by reference
    return tree.replace(frozen={}) if by_reference else tree

  restored, start = ckpt.restore_newest(runs.abstract_like(saved(state), saved(shardings)), data_iter=data_iter)
  if restored is not None:
    state, first = restored.replace(frozen=state.frozen), None
    if not quiet and jax.process_index() == 0:
      print(f"resumed from {ckpt.directory}/{start}", flush=True)
  start = int(start or 0)

  train_step = jit_train_step(model, loss_fn, tx, schedule, shardings, mesh=mesh, rules=rules,
                              accum_steps=accum, frozen=frozen, spike_factor=spike_factor)
  writer = metrics_lib.MetricsWriter(workdir, resume_step=start if start else None)
  bar = metrics_lib.ProgressBar(total, start) if not quiet else None
  log_every = max(int(config.log_every_steps), 1)
  config_dict = json.loads(config.to_json_best_effort())
  last: dict[str, Any] = {}
  skipped_seen = int(jax.device_get(state.skipped_steps))
  spikes_seen = int(jax.device_get(state.loss_guard["skipped"])) if spike_factor else 0
  with jax.set_mesh(mesh):
    model_flops = _model_flops(model, loss_fn, row_shapes, config.batch_size, frozen)
  peak = flops_lib.peak_flops_per_device()[0]  # outside the mesh: on CPU it times a matmul on one device
  t0, images, window = time.perf_counter(), 0, 0
  trace = profiling.StepTrace(config.get("profile_steps"), workdir, quiet=quiet)

  def evaluate(step):
    out = {}
    for name, fn in (evaluators or {}).items():
      out.update(fn(state.variables()))
    if out:
      last.update(writer.write(step, out))
    return out

  try:  # the progress bar ends its line before an error (a full disk) is printed
    with jax.set_mesh(mesh):
      for step in range(start, total):
        batch = first if first is not None else next(data_iter)
        first = None
        done = step + 1
        trace.before(done)
        state, metrics = train_step(state, global_batch(batch, mesh))
        trace.after(done, metrics)
        images, window = images + config.batch_size, window + 1
        is_log_step = done % log_every == 0 or done == total
        if step == start and not is_log_step:  # the throughput window starts after compilation
          jax.block_until_ready(metrics)
          t0, images, window = time.perf_counter(), 0, 0
        if is_log_step:
          metrics = jax.device_get(metrics)
          metrics.update(flops_lib.throughput_metrics(images, time.perf_counter() - t0, model_flops, window,
                                                      jax.device_count(), peak))
          metrics.pop("step_finite", None)
          metrics.update(_data_stats(data_iter))
          last.update(writer.write(done, metrics))
          if int(metrics["skipped_steps"]) > skipped_seen:
            log.warning("skipped %d non-finite step(s) up to step %d (total %d)",
                        int(metrics["skipped_steps"]) - skipped_seen, done, int(metrics["skipped_steps"]))
            skipped_seen = int(metrics["skipped_steps"])
          if spike_factor and int(metrics["spike_skipped_steps"]) > spikes_seen:
            log.warning("skipped %d loss spike(s) (loss > %g × median of the last %d losses) up to step %d "
                        "(total %d)", int(metrics["spike_skipped_steps"]) - spikes_seen, spike_factor, spike_window,
                        done, int(metrics["spike_skipped_steps"]))
            spikes_seen = int(metrics["spike_skipped_steps"])
          if bar:
            bar.update_to(done, loss=float(metrics["loss"]), img_s=float(metrics["images_per_sec"]))
          t0, images, window = time.perf_counter(), 0, 0
        eval_every = int(config.get("eval_every_steps", 0) or 0)
        if evaluators and ((eval_every and done % eval_every == 0 and done != total)):
          evaluate(done)
        stop = preempt.any_process()
        if done == total or stop or done % int(config.checkpoint_every_steps) == 0:
          ckpt.save(done, saved(state), data_iter=data_iter, config=config_dict, force=True)
        if stop:
          ckpt.wait()
          if not quiet and jax.process_index() == 0:
            print(f"SIGTERM: saved checkpoint at step {done}; rerun the same command to resume", flush=True)
          break
      else:
        if evaluators:
          evaluate(total)

    ckpt.close()
  finally:
    trace.stop()
    if bar:
      bar.close()
  writer.close()
  if jax.process_index() == 0 and os.path.exists(writer.path):
    plot_path = os.path.join(workdir, "plots", "loss.png")
    with metrics_lib.no_space_as_user_error(plot_path):
      metrics_lib.plot_loss(writer.path, plot_path)
  return last
