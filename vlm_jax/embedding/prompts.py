"""Prompt templates and per-class descriptions for zero-shot classification, read from data files.

Templates (Radford et al. 2021, CLIP §3.1.4: "a photo of a {}." and ensembles of such prompts) live as package
data in `vlm_jax/embedding/templates/<name>.txt`, one template per line with `{}` where the class name goes
(CLIP_benchmark's `{c}` is accepted too); lines starting with `#` are comments. Bundled sets:

  clip_imagenet   CLIP's 80-template ImageNet ensemble, verbatim
  generic         six neutral variants of "a photo of a {}."
  synthetic       the caption prefixes of the procedural dataset (`vlm_jax.data.synthetic`)
  coop_<dataset>  CoOp's single hand-crafted prompt of each dataset of its 11-dataset suite (Zhou et al. 2022)
  clip_<dataset>  CLIP's published prompt set of the same datasets (openai/CLIP data/prompts.md), verbatim

A set is named `coop_oxford_pets` or, equivalently, `coop:oxford_pets` (the `<kind>:<dataset>` spelling maps to
`<kind>_<dataset>`); the suite's class names are in `class_names.py`. `load_templates` also takes a path to such
a file or a list of strings. Descriptions are CuPL-style JSON files
(Pratt et al. 2023, "What does a platypus look like? Generating customized prompts for zero-shot image
classification"): `{class name: [sentence, …]}`, the sentences used as that class's prompts verbatim.
"""

from __future__ import annotations

import importlib.resources
import json
import os
from typing import Sequence

from vlm_jax.errors import UserError

_PACKAGE = "vlm_jax.embedding"
_DIR = "templates"


def shipped(directory: str) -> list[str]:
  """Names (without '.txt') of the text files shipped in vlm_jax/embedding/<directory>/."""
  root = importlib.resources.files(_PACKAGE) / directory
  return sorted(p.name[:-4] for p in root.iterdir() if p.name.endswith(".txt"))


def read_list_file(spec: str, directory: str, what: str, *, name: str | None = None) -> tuple[str, str]:
  """(text, source name) of a list file: a .txt path, or the file `name` (default `spec`) shipped in
  vlm_jax/embedding/<directory>/; an unreadable or unknown one is a `UserError` naming `what` and `spec`."""
  if os.path.sep in spec or spec.endswith(".txt"):
    try:
      with open(spec, encoding="utf-8") as f:
        return f.read(), spec
    except OSError as e:
      raise UserError(f"cannot read {what} file {spec}: {e.strerror or e}") from None
  name = spec if name is None else name
  path = importlib.resources.files(_PACKAGE) / directory / f"{name}.txt"
  if not name or not path.is_file():
    raise UserError(f"unknown {what} {spec!r}; shipped: {shipped(directory)} (or give a .txt path)")
  return path.read_text(encoding="utf-8"), f"{directory}/{name}.txt"


def available() -> list[str]:
  """Names of the bundled template sets."""
  return shipped(_DIR)


def _parse(text: str, source: str) -> tuple[str, ...]:
  out = []
  for n, line in enumerate(text.splitlines(), 1):
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    line = line.replace("{c}", "{}")
    if line.count("{}") != 1 or line.replace("{}", "").count("{") or line.replace("{}", "").count("}"):
      raise UserError(f"{source}:{n}: a template needs exactly one '{{}}' (or '{{c}}') and no other braces: "
                      f"{line!r}")
    out.append(line)
  if not out:
    raise UserError(f"{source} holds no templates")
  return tuple(out)


def load_templates(spec: str | Sequence[str]) -> tuple[str, ...]:
  """Templates from a bundled set name ('generic', 'coop:dtd', …), a .txt path, or a list of template strings
  (validated)."""
  if not isinstance(spec, str):
    return _parse("\n".join(spec), "templates")
  # 'coop:oxford_pets' -> coop_oxford_pets.txt
  return _parse(*read_list_file(spec, _DIR, "template set", name=spec.replace(":", "_", 1)))


def fill(template: str, class_name: str) -> str:
  """The prompt of one class: `{}` replaced by the class name (no other change)."""
  return template.replace("{}", class_name)


def load_descriptions(path: str, class_names: Sequence[str]) -> list[tuple[str, ...]]:
  """CuPL descriptions of every class in `class_names`, in that order, from a JSON {class: [sentences]} file.

  Raises `UserError` for an unreadable file, a malformed entry or a class without a non-empty list.
  """
  try:
    with open(path, encoding="utf-8") as f:
      table = json.load(f)
  except OSError as e:
    raise UserError(f"cannot read descriptions file {path}: {e.strerror or e}") from None
  except json.JSONDecodeError as e:
    raise UserError(f"descriptions file {path} is not valid JSON: {e}") from None
  if not isinstance(table, dict):
    raise UserError(f"descriptions file {path} must hold a JSON object {{class name: [sentences]}}")
  out = []
  for name in class_names:
    sentences = table.get(name)
    if not isinstance(sentences, list) or not sentences or not all(isinstance(s, str) and s.strip()
                                                                     for s in sentences):
      raise UserError(f"descriptions file {path} has no non-empty list of sentences for class {name!r}")
    out.append(tuple(s.strip() for s in sentences))
  return out
