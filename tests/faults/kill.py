"""`kill -9` a run at a chosen moment: the one helper of every SIGKILL test.

  proc = kill.start(cmd, log=path)                       # the entry point, as `th.run_cli` runs it
  killed = kill.kill_when(proc, kill.checkpoint_reached(ckpts, 8))
  assert killed, "the run finished before it could be killed"

A condition is a no-argument callable polled every few milliseconds; `kill_when` sends SIGKILL as soon as it
holds and waits for the process, so the files on disk are exactly what a crash at that moment leaves
(`signal_when` sends any signal, e.g. SIGSTOP for a hung process). Conditions: `checkpoint_reached` (a finished
step ≥ N exists), `metrics_reached` (the last metrics.jsonl line has step ≥ N), `save_in_flight` (orbax is
writing a step > N into a new temporary folder: an asynchronous save not yet renamed into place) and
`after_seconds`; `delayed` holds a while after another condition first held. Used by tests/test_resume_shards.py,
tests/test_transfer_prompts.py, tests/test_distill_vild.py and the fault suite (tests/faults/).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from typing import Callable

from tests import train_helpers as th

TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax writes step N into N.orbax-checkpoint-tmp…, renamed to N when done


def start(cmd: list[str], *, log: str | None = None, devices: int = 8, **extra_env) -> subprocess.Popen:
  """Starts an entry point as `th.run_cli` would, stdout and stderr to the file `log` (or discarded)."""
  out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (the child keeps it; closed below)
  try:
    return subprocess.Popen(cmd, cwd=th.ROOT, env=th.env(devices, **extra_env), stdout=out,
                            stderr=subprocess.STDOUT if log else subprocess.DEVNULL)
  finally:
    if log:
      out.close()


def signal_when(proc: subprocess.Popen, ready: Callable[[], bool], sig: int = signal.SIGKILL, *,
                timeout: float = 300, poll: float = 0.005) -> bool:
  """Sends `sig` to `proc` as soon as `ready()` holds; True when sent, False when `proc` exited first.

  Raises `TimeoutError` (after killing it) when neither happens within `timeout` seconds."""
  deadline = time.time() + timeout
  while proc.poll() is None:
    if ready():
      proc.send_signal(sig)
      return True
    if time.time() > deadline:
      proc.kill()
      proc.wait()
      raise TimeoutError(f"no kill condition within {timeout} s: {proc.args}")
    time.sleep(poll)
  return False


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], *, timeout: float = 300,
              poll: float = 0.005) -> bool:
  """SIGKILLs `proc` as soon as `ready()` holds and waits for it; True when it was killed, False when it exited
  first. Raises `TimeoutError` (after killing it) when neither happens within `timeout` seconds."""
  signal_when(proc, ready, signal.SIGKILL, timeout=timeout, poll=poll)
  proc.wait(timeout=60)
  return proc.returncode == -signal.SIGKILL


def finished_steps(ckpts: str) -> list[int]:
  """Step folders orbax has renamed into place (as `vlm_jax.runs.steps`), ascending."""
  try:
    names = os.listdir(ckpts)
  except FileNotFoundError:
    return []
  return sorted(int(d) for d in names if d.isdigit() and os.path.isdir(os.path.join(ckpts, d, "state")))


def _tmp_folders(ckpts: str) -> dict[str, tuple[int, int, int]]:
  """{name: (step, inode, ctime)} of orbax's temporary folders; a folder orbax removed and created again for a
  new write of the same step has another (inode, ctime)."""
  try:
    names = [d for d in os.listdir(ckpts) if TMP_SUFFIX in d and d.split(".")[0].isdigit()]
  except FileNotFoundError:
    return {}
  out = {}
  for d in names:
    try:
      st = os.stat(os.path.join(ckpts, d))
    except FileNotFoundError:  # renamed into place meanwhile
      continue
    out[d] = (int(d.split(".")[0]), st.st_ino, st.st_ctime_ns)
  return out


def tmp_steps(ckpts: str, *, besides: dict | None = None) -> list[int]:
  """Steps with an orbax temporary folder (a save in flight, or one a kill interrupted), ascending; with
  `besides` (a `snapshot`), only folders written since it was taken."""
  besides = besides or {}
  return sorted(v[0] for k, v in _tmp_folders(ckpts).items() if besides.get(k) != v)


def snapshot(ckpts: str) -> dict:
  """The temporary folders present now (those a killed run left), for `tmp_steps` / `save_in_flight`."""
  return _tmp_folders(ckpts)


def last_logged_step(workdir: str) -> int:
  """Step of the last complete line of DIR/metrics.jsonl (0 when there is none)."""
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      lines = [ln for ln in f.read().split("\n")[:-1] if ln.strip()]  # a line without its newline: unfinished
  except FileNotFoundError:
    return 0
  return json.loads(lines[-1])["step"] if lines else 0


def checkpoint_reached(ckpts: str, step: int) -> Callable[[], bool]:
  """A finished checkpoint of step ≥ `step` exists."""
  return lambda: max(finished_steps(ckpts), default=-1) >= step


def metrics_reached(workdir: str, step: int, *, rewound_to: int | None = None) -> Callable[[], bool]:
  """The run logged step ≥ `step`. A resumed run drops the lines past its checkpoint (`rewound_to`) that a killed
  run left only once it has restored: with `rewound_to`, lines count only after the file went back to it."""
  rewound = [rewound_to is None]

  def check() -> bool:
    last = last_logged_step(workdir)
    rewound[0] = rewound[0] or last <= rewound_to
    return rewound[0] and last >= step
  return check


def save_in_flight(ckpts: str, after: int = 0) -> Callable[[], bool]:
  """Orbax is writing a step > `after`: a temporary folder, not yet renamed into place, that is not one a killed
  run left behind. (A resumed run removes those at start-up, with a gap before it writes that step again, so a
  leftover folder counts once it has been seen gone; its inode and ctime are no guide: removing its files changes
  the ctime and a new folder may get the same inode.)"""
  stale = set(_tmp_folders(ckpts))

  def check() -> bool:
    now = _tmp_folders(ckpts)
    stale.intersection_update(now)
    return any(step > after for name, (step, _, _) in now.items() if name not in stale)
  return check


def after_seconds(seconds: float) -> Callable[[], bool]:
  t = time.time() + seconds
  return lambda: time.time() >= t


def delayed(ready: Callable[[], bool], seconds: float) -> Callable[[], bool]:
  """Holds `seconds` after `ready()` first held (e.g. a kill somewhere inside an in-flight write)."""
  since = []

  def check() -> bool:
    if not since and ready():
      since.append(time.time())
    return bool(since) and time.time() >= since[0] + seconds
  return check
