"""Imports go one way (DESIGN.md, "Which part may import which"): a walk over every import statement of the
package (module level and inside functions alike) fails on a forbidden edge.

  models ← objectives ← train ← entry points;  models ← evaluate;  models ← interop
  models know nothing of training, objectives, evaluation, interop or runs; objectives know no loop; evaluators
  and interop never import train; inference imports no evaluator; configs import only the config library;
  the core loop imports no method (transfer / distill); the neutral layers (runs, assembly, embedding, config
  library) import no entry point, loop, evaluator or interop.
"""

from __future__ import annotations

import ast
import os

from tests.train_helpers import ROOT

PACKAGE = os.path.join(ROOT, "vlm_jax")

# part -> parts it must never import (a part is the first component under vlm_jax, e.g. 'models', 'runs')
ENTRY_POINTS = {"pretrain", "runner", "convert", "cli", "transfer", "distill"}
FORBIDDEN = {
    "models": {"objectives", "train", "evaluate", "interop", "runs", "assembly", "inference", "embedding"}
              | ENTRY_POINTS,
    "objectives": {"train", "evaluate", "interop", "runs", "inference"} | ENTRY_POINTS,
    "data": {"models", "objectives", "train", "evaluate", "interop", "runs", "assembly", "inference"}
            | ENTRY_POINTS,
    "parallel": {"models", "objectives", "train", "evaluate", "interop", "runs", "assembly"} | ENTRY_POINTS,
    "embedding": {"train", "evaluate", "interop", "runs", "inference", "objectives"} | ENTRY_POINTS,
    "runs": {"train", "evaluate", "interop", "inference", "objectives", "assembly"} | ENTRY_POINTS,
    "assembly": {"train", "evaluate", "interop", "inference", "runs"} | ENTRY_POINTS,
    "config_lib": {"models", "objectives", "train", "evaluate", "interop", "runs", "inference"} | ENTRY_POINTS,
    "evaluate": {"train", "interop", "transfer", "distill", "pretrain", "runner", "convert"},
    "interop": {"train", "evaluate", "inference", "transfer", "distill", "pretrain", "runner"},
    "inference": {"train", "evaluate", "interop", "transfer", "distill", "pretrain", "runner"},
    "train": {"evaluate", "interop", "inference", "transfer", "distill", "pretrain", "runner", "convert"},
    "decoding": {"train", "evaluate", "interop"} | ENTRY_POINTS,
}


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
  return rel[:-9] if rel.endswith(".__init__") else rel


def _part(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else "vlm_jax"


def imports_of(path: str) -> set[str]:
  """Every vlm_jax module or name imported anywhere in the file (absolute and relative imports)."""
  module = _module_name(path)
  package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name.startswith("vlm_jax"))
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      if base == "vlm_jax":  # `from vlm_jax import runs, assembly`
        out.update(f"vlm_jax.{a.name}" for a in node.names)
      elif base.startswith("vlm_jax"):
        out.add(base)
  return out


def edges() -> list[tuple[str, str]]:
  out = []
  for dirpath, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        out += [(_module_name(path), target) for target in sorted(imports_of(path))]
  return out


def test_no_forbidden_import_edge():
  bad = [f"{src} -> {dst}" for src, dst in edges()
         if _part(dst) in FORBIDDEN.get(_part(src), ()) and _part(src) != _part(dst)]
  assert not bad, "forbidden imports:\n" + "\n".join(bad)


def test_configs_import_only_the_config_library():
  bad = []
  for dirpath, _, files in os.walk(os.path.join(ROOT, "configs")):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        bad += [f"{os.path.relpath(path, ROOT)} -> {m}" for m in imports_of(path)
                if m not in ("vlm_jax.config_lib", "vlm_jax.errors")]
  assert not bad, "configs may import only vlm_jax.config_lib:\n" + "\n".join(bad)


def test_the_walk_sees_function_level_and_relative_imports(tmp_path):
  """The checker itself: an import inside a function and a relative import are both edges."""
  pkg = tmp_path / "vlm_jax" / "models"
  pkg.mkdir(parents=True)
  f = pkg / "probe.py"
  f.write_text("def g():\n  from vlm_jax.train import loop\n  from ..objectives import clip\n")
  import tests.test_imports as me
  old = me.ROOT
  me.ROOT = str(tmp_path)
  try:
    assert imports_of(str(f)) == {"vlm_jax.train", "vlm_jax.objectives"}
  finally:
    me.ROOT = old
