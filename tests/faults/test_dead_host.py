"""Fault: a dead host. One process of a 2-process run (jax.distributed over localhost, gloo CPU collectives) is
SIGKILLed mid-run; the survivor must stop within a bounded time with a non-zero status and say why, and rerunning
both processes must resume and finish exactly like an uninterrupted 2-process run.

First the worker (process 1) dies: the coordinator's next collective fails (the gloo connection is reset) and it
prints one `error:` line naming the knob (`VLM_JAX_DISTRIBUTED_TIMEOUT_S`, 10 s here) and exits 1 at once,
instead of waiting in JAX's exit-time shutdown and aborting with a C++ stack trace. Then the coordinator
(process 0) dies: the worker loses the coordination service and either prints the same line or JAX aborts it
first with its own "another task died" fatal log (a race inside jaxlib); either way it stops, non-zero. Last the
worker hangs (SIGSTOP: its sockets stay open, so the coordinator waits inside a gloo collective): the
coordination service declares it dead after the knob's 10 s without heartbeats and JAX aborts the coordinator
with its fatal log naming the silent process (jaxlib 0.10.2 gives Python no hook there: the client's
`missed_heartbeat_callback` binding crashes with std::bad_cast).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

import portpicker
import pytest

from tests import train_helpers as th
from tests.faults import kill

pytestmark = pytest.mark.faults

OVERRIDES = {"total_steps": 12, "data.streams": 2, "checkpoint_every_steps": 2, "keep_checkpoints": 3}
TIMEOUT_S = 10  # VLM_JAX_DISTRIBUTED_TIMEOUT_S of these runs
TIMING = ("images_per_sec", "tflops_per_device", "mfu")
JAX_FATAL = "Terminating process because the JAX distributed service detected fatal errors"


def _start_two(workdir: str, tag: str) -> list:
  port = portpicker.pick_unused_port()
  return [kill.start(th.pretrain_cmd(workdir, overrides=OVERRIDES), log=os.path.join(workdir, f"{tag}-p{i}.log"),
                     devices=4, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=2,
                     JAX_PROCESS_ID=i, VLM_JAX_DISTRIBUTED_TIMEOUT_S=TIMEOUT_S) for i in range(2)]


def _log(workdir: str, tag: str, i: int) -> str:
  with open(os.path.join(workdir, f"{tag}-p{i}.log")) as f:
    return f.read()


def _finish(procs, workdir: str, tag: str) -> None:
  for i, p in enumerate(procs):
    assert p.wait(timeout=600) == 0, _log(workdir, tag, i)[-3000:]


def _rows(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(ln).items() if k not in TIMING} for ln in f if ln.strip()]


def _kill_one(workdir: str, tag: str, victim: int, at_step: int, sig=signal.SIGKILL) -> tuple[int, float, str]:
  """Starts both processes, sends `victim` `sig` once step `at_step` is logged; (survivor status, seconds it
  took to exit after the signal, its output). Both are gone on return."""
  os.makedirs(workdir, exist_ok=True)
  procs = _start_two(workdir, tag)
  survivor = procs[1 - victim]
  try:
    assert kill.signal_when(procs[victim], kill.metrics_reached(workdir, at_step), sig, timeout=600), \
        _log(workdir, tag, victim)[-3000:]
    t0 = time.time()
    rc = survivor.wait(timeout=120)  # bounded: never hangs in a collective
    return rc, time.time() - t0, _log(workdir, tag, 1 - victim)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def test_dead_process_stops_the_survivor_and_both_resume_exactly(tmp_path):
  ref = str(tmp_path / "ref")
  os.makedirs(ref)
  _finish(_start_two(ref, "ref"), ref, "ref")

  wd = str(tmp_path / "run")
  ckpts, newest = os.path.join(wd, "checkpoints"), []  # the newest finished step after each interruption
  rc, took, out = _kill_one(wd, "a", victim=1, at_step=3)
  newest.append(max(kill.finished_steps(ckpts), default=None))
  lines = [ln for ln in out.splitlines() if ln.strip()]
  print(f"\nworker killed: coordinator exit {rc} after {took:.1f} s; last line: {lines[-1]}")
  assert rc == 1, out[-3000:]
  assert lines[-1].startswith("error: process 0 of 2 lost contact with another process"), out[-3000:]
  assert f"VLM_JAX_DISTRIBUTED_TIMEOUT_S={TIMEOUT_S}" in lines[-1] and "Traceback" not in out

  rc, took, out = _kill_one(wd, "b", victim=0, at_step=7)
  newest.append(max(kill.finished_steps(ckpts), default=None))
  errors = [ln for ln in out.splitlines() if ln.startswith("error: ")]
  how = errors[0] if errors else next(ln for ln in out.splitlines() if JAX_FATAL in ln)[:200]
  print(f"coordinator killed: worker exit {rc} after {took:.1f} s: {how}")
  assert rc != 0 and (errors or JAX_FATAL in out), out[-3000:]

  rc, took, out = _kill_one(wd, "c", victim=1, at_step=9, sig=signal.SIGSTOP)
  newest.append(max(kill.finished_steps(ckpts), default=None))
  errors = [ln for ln in out.splitlines() if ln.startswith("error: ")]
  how = errors[0] if errors else next(ln for ln in out.splitlines() if JAX_FATAL in ln)[:200]
  print(f"worker hung (SIGSTOP): coordinator exit {rc} after {took:.1f} s: {how}")
  assert rc != 0 and (errors or (JAX_FATAL in out and "stopped sending heartbeats" in out)), out[-3000:]

  procs = _start_two(wd, "d")
  _finish(procs, wd, "d")
  resumed = [re.search(r"resumed from \S+/(\d+)", _log(wd, t, 0)) for t in ("b", "c", "d")]
  resumed = [int(m.group(1)) if m else None for m in resumed]
  print("newest finished step after each interruption:", newest, "resumed from:", resumed)
  assert resumed == newest  # both processes restore the newest finished checkpoint (None: started afresh)
  got, want = _rows(wd), _rows(ref)
  assert [r["step"] for r in got] == list(range(1, 13))
  assert got == want  # every digit
