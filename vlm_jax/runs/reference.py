"""Frozen weights by reference: a run whose frozen parameters all come from its init sources stores none of them.

Transfer and distillation runs train a few parameters around a large frozen model (prompts around CLIP, a
student beside a teacher). With `config.checkpoint_frozen = False` the loop writes their checkpoints without the
frozen parameters and records, once, in `DIR/frozen_reference.json`:

  {"sources": [{"checkpoint": ABS_PATH, "fingerprint": SHA256}, …],   # the init sources, in order
   "frozen": {PATH: [SHAPE, DTYPE], …}}                               # every frozen parameter

A resumed run, `runs.load(DIR)`, `vlm_jax.evaluate` and `vlm_jax.inference` rebuild the frozen parameters from
the sources, after checking that each source's fingerprint (`directory.fingerprint`) is unchanged: a base model
that changed since the run started is a `UserError`, never silently different weights.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
from flax import traverse_util

from vlm_jax.errors import UserError
from vlm_jax.runs import directory, init

FILE = "frozen_reference.json"


def path(run_dir: str) -> str:
  return os.path.join(run_dir, FILE)


def _covered(frozen_paths, sources: list[dict]) -> list[str]:
  """The frozen paths no init source writes (they could not be rebuilt)."""
  return [p for p in frozen_paths if not any(re.search(s["params"], p) for s in sources)]


def record_or_verify(run_dir: str, init_config, frozen: dict, *, write: bool = True) -> dict:
  """Writes `DIR/frozen_reference.json` for a new run (when `write`), or checks an existing one against the
  sources' current fingerprints; returns its content. `UserError` when a frozen parameter comes from no init
  source, or a source changed."""
  file = path(run_dir)
  if os.path.exists(file):
    with open(file) as f:
      ref = json.load(f)
    verify(ref)
    return ref
  sources = init.sources(init_config)
  flat = traverse_util.flatten_dict(frozen or {}, sep="/")
  missing = _covered(flat, sources)
  if missing:
    raise UserError(f"checkpoint_frozen=False needs every frozen parameter to come from config.init; "
                    f"{missing[0]!r} (and {len(missing) - 1} more) comes from none")
  ref = {"sources": [{"checkpoint": os.path.abspath(s["checkpoint"]), "fingerprint": directory.fingerprint(
      s["checkpoint"]), "params": s["params"], "rename": s["rename"]} for s in sources],
         "frozen": {k: [[int(d) for d in v.shape], np.dtype(v.dtype).name] for k, v in flat.items()}}
  if write:
    with open(file + ".tmp", "w") as f:
      json.dump(ref, f, indent=2, sort_keys=True)
    os.replace(file + ".tmp", file)
  return ref


def verify(ref: dict) -> None:
  for s in ref["sources"]:
    if not os.path.isdir(s["checkpoint"]):
      raise UserError(f"the base model {s['checkpoint']} this run was built on is gone")
    now = directory.fingerprint(s["checkpoint"])
    if now != s["fingerprint"]:
      raise UserError(f"the base model {s['checkpoint']} changed since this run started (fingerprint "
                      f"{s['fingerprint'][:12]}… is now {now[:12]}…); restore it or start a new run")


def frozen_params(run_dir: str) -> dict | None:
  """The frozen parameters of a by-reference run, rebuilt from its (verified) sources; None for other runs."""
  file = path(run_dir)
  if not os.path.exists(file):
    return None
  with open(file) as f:
    ref = json.load(f)
  verify(ref)
  target = {"params": traverse_util.unflatten_dict(
      {k: np.zeros(shape, dtype) for k, (shape, dtype) in ref["frozen"].items()}, sep="/")}
  for s in ref["sources"]:
    if any(re.search(s["params"], k) for k in ref["frozen"]):
      target = init.copy_variables(target, directory.load_variables(s["checkpoint"]), s["params"],
                                   rename=s["rename"], source_name=s["checkpoint"])
  return target["params"]
