"""Fault: `kill -9` at random points, five times per run, for pre-training, transfer and distillation.

Each test runs one entry point uninterrupted (the reference), then in a second workdir: start, SIGKILL at a
seeded random moment, check what is on disk, rerun, kill again … five times, then lets the sixth run finish. A
kill lands after a random step (`metrics.jsonl` reached step N), while an asynchronous checkpoint write is in
flight (orbax's `<step>.orbax-checkpoint-tmp` folder exists, plus a random 0–0.3 s), or a random 0–8 s after
start (start-up, restore, compilation). After every kill:

- every finished step folder `checkpoints/<int>` restores (state, config, data-iterator state), except at most
  the oldest one when the kill interrupted orbax's keep-N deletion of it;
- the rerun resumes from the newest finished step (`resumed from …/<step>`), never from a temporary folder: a
  write killed in flight is not a step.

At the end `metrics.jsonl` equals the reference's, every digit (timing columns aside), and so does the result JSON.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import sys

import jax
import numpy as np
import pytest

from tests import train_helpers as th
from tests.faults import kill

pytestmark = pytest.mark.faults

KILLS = 5
TIMING = ("images_per_sec", "tflops_per_device", "mfu")  # wall-clock dependent


def _rows(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(ln) for ln in f if ln.strip()]
  return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _result(log: str) -> dict:
  with open(log) as f:
    last = f.read().strip().splitlines()[-1]
  return {k: v for k, v in json.loads(last).items() if k not in TIMING}


def _read_step(ckpts: str, step: int) -> None:
  """Restores everything a resume reads from `checkpoints/<step>`, host-side; raises when anything is unreadable."""
  import orbax.checkpoint as ocp  # noqa: PLC0415
  path = os.path.join(ckpts, str(step))
  ckptr = ocp.PyTreeCheckpointer()
  tree = ckptr.metadata(os.path.join(path, "state")).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  state = ckptr.restore(os.path.join(path, "state"), args=ocp.args.PyTreeRestore(item=tree, restore_args=args))
  assert int(state["step"]) == step, (step, state["step"])
  ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(os.path.join(path, "config"))
  data = glob.glob(os.path.join(path, "data", "process_*.json"))
  assert data, f"{path}/data holds no iterator state"
  for name in data:
    with open(name) as f:
      json.load(f)


def _check_disk(ckpts: str, keep: int) -> tuple[list[int], list[int]]:
  """(readable finished steps, unreadable ones) after a kill; only the oldest of keep+1 may be unreadable (a
  keep-N deletion cut short: orbax deletes the oldest step after the newest one is in place)."""
  done = kill.finished_steps(ckpts)
  bad = []
  for s in done:
    try:
      _read_step(ckpts, s)
    except Exception as e:  # noqa: BLE001 (any failure to read)
      bad.append(s)
      print(f"  step {s} unreadable: {' '.join(str(e).split())[:160]}")
  assert not bad or (bad == done[:1] and len(done) == keep + 1), (done, bad)
  return [s for s in done if s not in bad], bad


def _plan(seed: int, total: int) -> list[tuple[str, float]]:
  """Five (mode, target) kill points: two while a save is in flight, two after a random step, one random."""
  rng = random.Random(seed)
  modes = ["save", "save", "step", "step", rng.choice(["save", "step", "delay"])]
  rng.shuffle(modes)
  targets = sorted(rng.sample(range(2, total - 2), KILLS))
  return [(m, rng.uniform(0.0, 8.0) if m == "delay" else t) for m, t in zip(modes, targets)]


def _kill_five_times(name: str, cmd, ref: str, wd: str, *, total: int, keep: int, seed: int,
                     result: bool = True) -> list[dict]:
  """The kill / check / rerun cycle of the module docstring; returns one record per kill."""
  ckpts, records = os.path.join(wd, "checkpoints"), []
  os.makedirs(wd, exist_ok=True)
  rng = random.Random(seed + 1)
  print(f"\n{name}: kill plan (seed {seed}): {_plan(seed, total)}")
  for i, (mode, target) in enumerate(_plan(seed, total)):
    resume = (records[-1]["expect_resume"] if records else None) or 0  # the step this run goes on from
    stale = kill.snapshot(ckpts)  # temporary folders of writes the last kill cut short
    if mode == "step":
      ready = kill.metrics_reached(wd, max(int(target), resume + 1), rewound_to=resume)
    elif mode == "save":
      ready = kill.delayed(kill.save_in_flight(ckpts, after=max(int(target), resume + 1) - 1),
                           rng.uniform(0.0, 0.3))
    else:
      ready = kill.after_seconds(target)
    log = os.path.join(wd, f"run{i}.log")
    proc = kill.start(cmd(wd), log=log)
    killed = kill.kill_when(proc, ready, timeout=600)
    with open(log) as f:
      out = f.read()
    assert killed, f"{name} run {i} ended before its kill ({mode} {target}): {out[-2000:]}"
    m = re.search(r"resumed from (\S+)/(\d+)", out)
    resumed = int(m.group(2)) if m else None
    if records:  # this run's resume step is the one predicted after the previous kill
      assert resumed == records[-1]["expect_resume"], (records[-1], resumed, out[-2000:])
      records[-1]["resumed"] = resumed
    in_flight = kill.tmp_steps(ckpts, besides=stale)  # this run's writes the kill cut short
    readable, bad = _check_disk(ckpts, keep)
    rec = {"kill": i, "mode": mode, "target": round(target, 2) if mode == "delay" else int(target),
           "killed_after_step": kill.last_logged_step(wd), "finished": readable, "unreadable": bad,
           "cut_write": in_flight, "expect_resume": readable[-1] if readable else None}  # never a tmp one
    records.append(rec)
    print(f"  kill {i}: {mode} {rec['target']} -> killed after step {rec['killed_after_step']}, "
          f"finished steps {readable}, write cut short {rec['cut_write']}, unreadable {bad}")

  log = os.path.join(wd, "final.log")
  proc = kill.start(cmd(wd), log=log)
  assert proc.wait(timeout=600) == 0, open(log).read()[-3000:]
  with open(log) as f:
    m = re.search(r"resumed from (\S+)/(\d+)", f.read())
  records[-1]["resumed"] = int(m.group(2)) if m else None
  assert records[-1]["resumed"] == records[-1]["expect_resume"], records[-1]
  print(f"  resumed from: {[r['resumed'] for r in records]}")
  got, want = _rows(wd), _rows(ref)
  assert [r["step"] for r in got] == [r["step"] for r in want]
  assert got == want  # every loss and metric, every digit
  if result:
    assert _result(log) == _result(os.path.join(ref, "ref.log"))
  assert any(r["cut_write"] for r in records), "no kill hit a checkpoint write in flight"
  return records


def _reference(cmd, ref: str) -> None:
  os.makedirs(ref, exist_ok=True)
  log = os.path.join(ref, "ref.log")
  proc = kill.start(cmd(ref), log=log)
  assert proc.wait(timeout=600) == 0, open(log).read()[-3000:]


def _random_model(config: str, arg: str, out: str) -> str:
  """A randomly initialised two-tower model saved as a run directory (a transfer base or distillation teacher:
  resuming exactly needs no trained weights)."""
  from vlm_jax import assembly, runs  # noqa: PLC0415
  from vlm_jax.parallel import partitioning  # noqa: PLC0415
  c = th.load_config(config, arg)
  _, model = assembly.build(c)
  v = jax.jit(lambda b: model.init(jax.random.PRNGKey(0), b, train=False))(assembly.example_batch(c, model, 2))
  return runs.save_model(out, c, jax.device_get(dict(partitioning.unbox(v))))


def test_pretrain_survives_five_kills(tmp_path):
  overrides = {"total_steps": 24, "checkpoint_every_steps": 2, "log_every_steps": 1}
  cmd = lambda wd: th.pretrain_cmd(wd, overrides=overrides)  # noqa: E731
  ref = str(tmp_path / "ref")
  _reference(cmd, ref)
  _kill_five_times("pretrain", cmd, ref, str(tmp_path / "run"), total=24, keep=2, seed=1, result=False)


def test_transfer_survives_five_kills(tmp_path):
  base = _random_model("configs/pretrain/clip.py", "micro", str(tmp_path / "base"))
  flags = [f"--config.init.checkpoint={base}", "--config.shots=2", "--config.epochs=4",
           "--config.test_per_class=2", "--config.batch_size=16", "--config.log_every_steps=1",
           "--config.checkpoint_every_steps=2", "--config.method.n_ctx=4"]
  cmd = lambda wd: [sys.executable, "-m", "vlm_jax.transfer", "--config=configs/transfer/coop.py:tiny",  # noqa
                    f"--workdir={wd}", *flags]
  ref = str(tmp_path / "ref")
  _reference(cmd, ref)
  total = _result(os.path.join(ref, "ref.log"))["steps"]
  _kill_five_times("transfer", cmd, ref, str(tmp_path / "run"), total=total, keep=1, seed=2)


def test_distill_survives_five_kills(tmp_path):
  teacher = _random_model("configs/pretrain/clip.py", "tiny", str(tmp_path / "teacher"))
  overrides = {"total_steps": 12, "checkpoint_every_steps": 2, "log_every_steps": 1, "baselines": "()",
               "evals.detection.num_images": 4, "evals.detection.batch_size": 4}
  cmd = lambda wd: [sys.executable, "-m", "vlm_jax.distill", "--config=configs/distill/vild.py:micro",  # noqa
                    f"--workdir={wd}", f"--config.teacher.checkpoint={teacher}", *th.cli_flags(overrides),
                    f"--config.teacher_cache.dir={wd}-cache"]  # each its own: kills also hit the cache fill
  ref = str(tmp_path / "ref")
  _reference(cmd, ref)
  _kill_five_times("distill", cmd, ref, str(tmp_path / "run"), total=12, keep=2, seed=3)
