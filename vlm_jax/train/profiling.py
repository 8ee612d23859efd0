"""A `jax.profiler` trace of a chosen window of training steps (`config.profile_steps = 'START,END'`).

  python -m vlm_jax.pretrain … --config.profile_steps=10,15     # steps 10…15 (1-based, inclusive)

The trace is written under `DIR/profile/` in the TensorBoard profile plugin's layout
(`profile/plugins/profile/<timestamp>/<host>.xplane.pb`): `tensorboard --logdir DIR/profile` opens it in the
Profile tab, and Perfetto / XProf read the same files. The window starts before step START is dispatched and
ends after step END's outputs are ready, so the trace holds whole steps (host dispatch, data, device compute).
Start after the first step when you want no compilation in it. '' (the default) traces nothing.
"""

from __future__ import annotations

import os

import jax

from vlm_jax.errors import UserError


def parse(spec) -> tuple[int, int] | None:
  """'START,END' -> (START, END) with 1 <= START <= END; '' / None -> None; anything else a `UserError`."""
  if spec in (None, "", ()):
    return None
  parts = spec.split(",") if isinstance(spec, str) else list(spec)
  try:
    start, end = (int(p) for p in parts)
  except (TypeError, ValueError):
    raise UserError(f"profile_steps={spec!r} must be 'START,END' (two step numbers, e.g. '10,15')") from None
  if not 1 <= start <= end:
    raise UserError(f"profile_steps={spec!r} needs 1 <= START <= END")
  return start, end


class StepTrace:
  """Starts the trace when step `START` is about to run and stops it once step `END` is done."""

  def __init__(self, spec, workdir: str, *, quiet: bool = False):
    self.window = parse(spec)
    self.directory = os.path.join(workdir, "profile")
    self.quiet = quiet
    self.active = False

  def before(self, step: int) -> None:
    """Call before running step `step` (1-based)."""
    if self.window and step == self.window[0] and not self.active:
      os.makedirs(self.directory, exist_ok=True)
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, step: int, outputs) -> None:
    """Call after step `step` was dispatched; `outputs` are blocked on before the trace stops."""
    if self.active and step >= self.window[1]:
      jax.block_until_ready(outputs)
      self.stop()

  def stop(self) -> None:
    if not self.active:
      return
    jax.profiler.stop_trace()
    self.active = False
    if not self.quiet and jax.process_index() == 0:
      print(f"profile: steps {self.window[0]}-{self.window[1]} traced to {self.directory} "
            f"(tensorboard --logdir {self.directory})", flush=True)
