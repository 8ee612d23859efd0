"""Fault 5, numerical faults: a NaN gradient with a finite loss, Inf in a batch, a loss spike (with the optional
guard) and a checkpoint whose parameters were tampered with to hold NaN.

Faults are injected through the loop's own extension points: the data iterator (a per-row `fault` code added to
every batch) and the objective (`loss_fn`, wrapped so that code 1 makes the gradient NaN while the loss stays
finite, code 3 multiplies the loss by 100). Skipped steps must leave every parameter and the optimizer state
bit-identical (compared between consecutive checkpoints). The runs are marked `faults` (`make test-faults`); the
settings check stays in `make test`.
"""

from __future__ import annotations

import os
import re

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from tests import train_helpers as th
from vlm_jax import assembly, runs
from vlm_jax.data import pipeline
from vlm_jax.errors import UserError
from vlm_jax.runs import directory
from vlm_jax.train import loop

NAN_GRAD, INF_BATCH, SPIKE = 1, 2, 3


class Faulty(grain.DatasetIterator):
  """The normal stream with a float `fault` column: `faults[n]` (1-based batch number) on every row of batch n."""

  def __init__(self, it, faults: dict[int, int]):
    super().__init__(it)
    self.n, self.faults = 0, faults

  def __next__(self):
    b = next(self._parent)
    self.n += 1
    code = self.faults.get(self.n, 0)
    b = dict(b, fault=np.full((len(b["image"]),), code, np.float32))
    if code == INF_BATCH:
      b["image"] = np.full_like(b["image"], np.inf)
    return b

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


@jax.custom_vjp
def _nan_gradient_if(x, flag):
  """Identity; its gradient is NaN when `flag` > 0."""
  del flag
  return x


def _fwd(x, flag):
  return x, flag


def _bwd(flag, g):
  return g * jnp.where(flag > 0, jnp.nan, 1.0).astype(g.dtype), jnp.zeros_like(flag)


_nan_gradient_if.defvjp(_fwd, _bwd)


def faulty_loss(loss_fn):
  """`loss_fn` with the batch's `fault` code applied: NAN_GRAD -> NaN gradient (finite loss), SPIKE -> ×100."""

  def wrapped(outputs, batch):
    code = jnp.max(batch["fault"])
    outputs = dict(outputs, zimg=_nan_gradient_if(outputs["zimg"], (code == NAN_GRAD).astype(jnp.float32)))
    loss, metrics = loss_fn(outputs, batch)
    return jnp.where(code == SPIKE, 100.0, 1.0) * loss, metrics

  return wrapped


def _train(config, wd: str, faults: dict[int, int]) -> dict:
  tokenizer, model, loss_fn = assembly.assemble(config)[:3]

  def make_data(pi, pc):
    return Faulty(pipeline.make_train_iterator(config.data, global_batch_size=config.batch_size, seed=config.seed,
                                               tokenizer=tokenizer, process_index=pi, process_count=pc), faults)

  return loop.train(config, wd, make_data=make_data, model=model, loss_fn=faulty_loss(loss_fn), quiet=True)


def _state(wd: str, step: int, items=("params", "opt_state", "extra")) -> dict:
  """The saved train state's `items` at `step`, flattened, as numpy."""
  tree = directory._restore_state_host(os.path.join(wd, "checkpoints"), step, items)  # noqa: SLF001
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_identical(a: dict, b: dict) -> None:
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # bit for bit (NaN nowhere)


def _rows(wd: str) -> dict[int, dict]:
  from vlm_jax.train.metrics import read_jsonl
  return {r["step"]: r for r in read_jsonl(os.path.join(wd, "metrics.jsonl"))}


@pytest.mark.faults  # a few micro runs (~20-60 s each on 2 cores)
def test_nan_gradient_and_inf_batch_are_skipped_with_parameters_bit_identical(tmp_path):
  config = th.micro_config(total_steps=4, checkpoint_every_steps=1, keep_checkpoints=4)
  wd = str(tmp_path / "run")
  last = _train(config, wd, {2: NAN_GRAD, 3: INF_BATCH})
  rows = _rows(wd)
  assert np.isfinite(rows[2]["loss"]) and rows[2]["grad_norm"] == "nan"  # only the gradient is NaN
  assert not np.isfinite(float(rows[3]["loss"]))
  assert [rows[s]["skipped_steps"] for s in (1, 2, 3, 4)] == [0, 1, 2, 2]
  assert last["skipped_steps"] == 2
  s1, s2, s3, s4 = (_state(wd, s) for s in (1, 2, 3, 4))
  _assert_identical(s1, s2)  # the NaN-gradient step changed nothing
  _assert_identical(s2, s3)  # nor did the Inf batch
  assert any(not np.array_equal(s3[k], s4[k]) for k in s3 if k.startswith("['params']"))  # step 4 trained


@pytest.mark.faults  # a few micro runs (~20-60 s each on 2 cores)
def test_loss_spike_guard_skips_and_counts_a_spike(tmp_path):
  faults = {4: SPIKE}
  guarded = th.micro_config(total_steps=5, checkpoint_every_steps=1, keep_checkpoints=5, loss_spike_factor=3.0,
                            loss_spike_window=3)
  wd = str(tmp_path / "guarded")
  last = _train(guarded, wd, faults)
  rows = _rows(wd)
  assert rows[4]["loss"] > 3 * np.median([rows[s]["loss"] for s in (1, 2, 3)])
  assert [rows[s]["spike_skipped_steps"] for s in (1, 2, 3, 4, 5)] == [0, 0, 0, 1, 1]
  assert last["spike_skipped_steps"] == 1 and last["skipped_steps"] == 0
  s3, s4, s5 = (_state(wd, s) for s in (3, 4, 5))
  _assert_identical(s3, s4)  # the spike changed nothing
  assert any(not np.array_equal(s4[k], s5[k]) for k in s4 if k.startswith("['params']"))
  window = _state(wd, 4, ("loss_guard",))
  np.testing.assert_array_equal(window["['loss_guard']['recent']"], [rows[s]["loss"] for s in (2, 3, 4)])

  # guard off (the default): the spike trains, there is no guard state and no new metric, and the steps before
  # it are those of the guarded run, every digit
  plain = th.micro_config(total_steps=5, checkpoint_every_steps=1, keep_checkpoints=5)
  assert plain.loss_spike_factor == 0
  wd_off = str(tmp_path / "off")
  last_off = _train(plain, wd_off, faults)
  off = _rows(wd_off)
  assert "spike_skipped_steps" not in last_off and last_off["skipped_steps"] == 0
  assert [off[s]["loss"] for s in (1, 2, 3, 4)] == [rows[s]["loss"] for s in (1, 2, 3, 4)]
  assert off[5]["loss"] != rows[5]["loss"]
  meta = ocp.PyTreeCheckpointer().metadata(os.path.join(wd_off, "checkpoints", "5", "state")).item_metadata.tree
  assert not jax.tree.leaves(meta.get("loss_guard", {}))


def test_loss_spike_settings_are_validated(tmp_path):
  with pytest.raises(UserError, match="needs a factor > 1"):
    loop.spike_guard_settings(th.micro_config(loss_spike_factor=0.5))
  assert loop.spike_guard_settings(th.micro_config()) == (0.0, 0)
  assert loop.spike_guard_settings(th.micro_config(loss_spike_factor=4.0, loss_spike_window=8)) == (4.0, 8)


def _tamper(wd: str, step: int) -> str:
  """Writes NaN into one parameter array of the saved state at `step` (via orbax); returns its path."""
  path = os.path.join(wd, "checkpoints", str(step), "state")
  ckptr = ocp.PyTreeCheckpointer()
  meta = ckptr.metadata(path).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
  tree = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=meta, restore_args=args))
  flat = traverse_util.flatten_dict(tree["params"], sep="/")
  name = sorted(k for k in flat if k.endswith("kernel"))[0]
  flat[name] = np.array(flat[name], copy=True)
  flat[name].reshape(-1)[0] = np.nan
  tree["params"] = traverse_util.unflatten_dict(flat, sep="/")
  ckptr.save(path, tree, force=True)
  return f"params/{name}"


@pytest.mark.faults  # a few micro runs (~20-60 s each on 2 cores)
def test_checkpoint_with_a_nan_parameter_is_refused_by_every_reader(tmp_path):
  wd = str(tmp_path / "run")
  overrides = {"total_steps": 2, "checkpoint_every_steps": 1, "keep_checkpoints": 2}
  r = th.run_cli(th.pretrain_cmd(wd, overrides=overrides))
  assert r.returncode == 0, r.stderr[-2000:]
  root = os.path.join(wd, "checkpoints")
  bad = _tamper(wd, 2)
  where = f"checkpoint {root}/2 holds non-finite values (NaN or Inf) in {bad}"

  # training resume: refused, one error line, nothing moved aside
  r = th.run_cli(th.pretrain_cmd(wd, overrides={**overrides, "total_steps": 3}))
  errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
  assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
  print(errors[0])
  assert errors[0].startswith(f"error: {where}")
  assert runs.steps(root) == [1, 2]

  # readers: runs.load, runs.load_variables, config.init through runs.initializer
  for read in (runs.load, runs.load_variables, lambda p: runs.initializer({"checkpoint": p})({})):
    with pytest.raises(UserError, match="^" + re.escape(where)):
      read(wd)
  assert runs.load(os.path.join(root, "1")).step == 1  # the step before still reads when named
