"""Initialisation from checkpoints: copy variables of one or several runs into a freshly initialised model.

`config.init` names the sources, applied in order (a later source overwrites what an earlier one wrote):

  config.init = {'checkpoint': DIR, 'params': REGEX, 'rename': {REGEX: REPL}, 'required': False}   # one source
  config.init.sources = [{'checkpoint': TEACHER, 'params': '^teacher/', 'rename': {'^teacher/': 'img/'}},
                         {'checkpoint': STUDENT, 'params': '^student/img/', 'rename': {'^student/': ''}}]

(the top-level source, when it names a checkpoint, comes first; on the command line:
`--config.init.checkpoint=DIR`, `--config.init.sources[1].checkpoint=DIR`). `params` is a regex over this model's
'/'-joined variable paths (default: every path); `rename` maps this model's paths to the checkpoint's (each
regex → replacement applied in order with `re.sub`); `required=True` makes a source without a checkpoint a
`UserError`. Every variable collection is copied, not only `params`: a converted RN50's BatchNorm statistics
(`batch_stats`) come along bit for bit: the regex and the renames apply to a leaf's path within its collection
(`img/…`, as `config.frozen` names parameters), and each collection is read from the same collection.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import numpy as np
from flax import traverse_util

from vlm_jax.config_lib import plain as _plain
from vlm_jax.errors import UserError
from vlm_jax.runs import directory

SOURCE_KEYS = ("checkpoint", "params", "rename", "required")


def sources(init_config) -> list[dict]:
  """The init sources of `config.init` in application order, each {checkpoint, params, rename, required}."""
  init = dict(_plain(init_config) or {})
  listed = [dict(_plain(s) or {}) for s in (init.pop("sources", None) or ())]
  out = []
  for where, src in [("config.init", init)] + [(f"config.init.sources[{i}]", s) for i, s in enumerate(listed)]:
    unknown = sorted(set(src) - set(SOURCE_KEYS))
    if unknown:
      raise UserError(f"unknown key(s) {unknown} in {where}; valid: {list(SOURCE_KEYS) + ['sources']}")
    if not src.get("checkpoint"):
      if src.get("required"):
        raise UserError(f"this config initialises from a checkpoint: pass --{where}.checkpoint=DIR "
                        "(a vlm_jax run or converted model)")
      continue
    out.append({"checkpoint": str(src["checkpoint"]), "params": src.get("params") or ".*",
                "rename": dict(_plain(src.get("rename")) or {}), "required": bool(src.get("required"))})
  return out


def source_path(path: str, rename: Mapping[str, str] | None) -> str:
  """The checkpoint path of this model's variable `path`: each `rename` item (regex → replacement, in order)
  rewrites it, e.g. {'^teacher/': 'img/'} reads a frozen teacher from a CLIP image tower."""
  for pattern, repl in (rename or {}).items():
    path = re.sub(pattern, repl, path)
  return path


def _flat(variables: Mapping) -> dict[tuple[str, str], Any]:
  """{(collection, '/'-path): leaf} over every collection."""
  return {(c, k): v for c, tree in variables.items()
          for k, v in traverse_util.flatten_dict(dict(tree), sep="/").items()}


def copy_variables(target: Mapping, source: Mapping, pattern: str = ".*", *, rename: Mapping | None = None,
                   source_name: str = "checkpoint") -> dict:
  """`target` variables with every leaf whose path matches `pattern`, in every collection, replaced by
  `source`'s leaf of the same collection at `source_path(path, rename)` (cast to the target's dtype); shapes
  must agree. `UserError` when the pattern matches no parameter or the source lacks a parameter (another
  architecture); a statistic the source lacks (a run trained without them) keeps the target's value."""
  rx = re.compile(pattern)
  tgt, src = _flat(target), _flat(source)
  hits = [ck for ck in tgt if rx.search(ck[1])]
  if not any(c == "params" for c, _ in hits):
    params = [k for c, k in tgt if c == "params"]
    raise UserError(f"init params={pattern!r} matches no parameter of this model; paths look like "
                    f"{params[0] if params else ''!r}")
  out = {c: traverse_util.flatten_dict(dict(t), sep="/") for c, t in target.items()}
  for collection, path in hits:
    value = tgt[(collection, path)]
    s = source_path(path, rename)
    if (collection, s) not in src:
      if collection != "params":
        continue
      raise UserError(f"{source_name} has no parameter {s!r} (another architecture?)")
    have = np.asarray(src[(collection, s)])
    if tuple(have.shape) != tuple(np.shape(value)):
      raise UserError(f"{source_name} variable {collection}/{s} has shape {tuple(have.shape)}, this model "
                      f"needs {tuple(np.shape(value))} for {path!r} (another architecture?)")
    out[collection][path] = have.astype(np.asarray(value).dtype)
  return {c: traverse_util.unflatten_dict(t, sep="/") for c, t in out.items()}


def initializer(init_config) -> Callable[[dict], dict] | None:
  """`fn(variables) -> variables` applying the sources of `config.init` in order, or None when there are none.
  Each checkpoint is read once, when `fn` is called."""
  srcs = sources(init_config)
  if not srcs:
    return None

  def apply(variables: dict) -> dict:
    for src in srcs:
      loaded = directory.load_variables(src["checkpoint"])
      variables = copy_variables(variables, loaded, src["params"], rename=src["rename"],
                                 source_name=src["checkpoint"])
    return variables

  return apply
