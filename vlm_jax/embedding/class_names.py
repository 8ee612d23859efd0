"""Class-name files (package data under classnames/) and the mapping of a dataset's own labels onto one.

`vlm_jax/embedding/classnames/<name>.txt` holds one human-readable class name per line in the dataset's label
order (lines starting with `#` are comments). Shipped: CoOp's 11-dataset few-shot suite (Zhou et al. 2022, IJCV)
with the names and label order CoOp uses — imagenet (CLIP's curated names), caltech101 (100 classes),
oxford_pets, stanford_cars, oxford_flowers, food101, fgvc_aircraft, sun397, dtd, eurosat, ucf101. Their prompt
templates are `coop:<name>` (CoOp's single hand-crafted prompt) and `clip:<name>` (CLIP's published ensemble),
see `prompts.load_templates`. docs/transfer_datasets.md says where each file came from and how to lay out the data.

`resolve(source_names, names)` relates the labels a source gives (sorted folder names, a tfds ClassLabel) to a
class file: when every source name equals a file name (compared ignoring case, spaces, '_' and '-') the source labels
are renumbered into the file's order (a source holding only some of the classes gets those, in file order);
otherwise source label i is file line i, and a source name that equals a *different* line is an error (the
folders would be named in another order than the file).
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from vlm_jax.embedding import prompts
from vlm_jax.errors import UserError

_DIR = "classnames"


def available() -> list[str]:
  """Names of the shipped class-name files."""
  return prompts.shipped(_DIR)


def _parse(text: str, source: str) -> tuple[str, ...]:
  names = tuple(ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#"))
  if not names:
    raise UserError(f"{source} holds no class names")
  return names


def load_class_names(spec: str) -> tuple[str, ...]:
  """Class names from a shipped file name ('oxford_pets') or a .txt path, one name per line, in label order."""
  return _parse(*prompts.read_list_file(str(spec), _DIR, "class-name file"))


def name_key(name: str) -> str:
  """What two names must share to be the same class: 'Apply_Eye_Makeup', 'ApplyEyeMakeup' -> 'applyeyemakeup'."""
  return re.sub(r"[\s_\-]", "", name).lower()


def resolve(source_names: Sequence[str], names: Sequence[str], *, source: str = "the dataset",
            file: str = "the class-name file") -> tuple[list[str], np.ndarray | None]:
  """(class names, label map) of a source whose labels 0..n−1 are named `source_names`, given a class file's
  `names` (module docstring). The map (int32 [n], source label -> class index) is None when it is the identity.

  Every source name equals a file name: the classes are those names in the file's order (all of the file's, or
  the subset the source holds). Otherwise source label i is line i: the counts must agree and no source name may
  equal a different line. Violations raise `UserError`."""
  index: dict[str, int] = {}
  for i, n in enumerate(names):
    index.setdefault(name_key(n), i)
  hits = [index.get(name_key(s)) for s in source_names]
  if hits and all(h is not None for h in hits) and len(set(hits)) == len(hits):
    kept = sorted(hits)
    rank = {h: r for r, h in enumerate(kept)}
    order = np.asarray([rank[h] for h in hits], np.int32)
    return [names[h] for h in kept], None if np.array_equal(order, np.arange(len(order))) else order
  if len(source_names) != len(names):
    raise UserError(f"{source} has {len(source_names)} classes but {file} lists {len(names)}")
  for i, (s, h) in enumerate(zip(source_names, hits)):
    if h is not None and h != i:
      raise UserError(f"{source}: class {s!r} is label {i} there but line {h + 1} of {file}; name the classes "
                      f"so that they sort in the file's order, or all by the file's names")
  return list(names), None
