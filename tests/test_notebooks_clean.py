"""The committed notebooks (notebooks/*.ipynb) carry no outputs and no execution counts, each has exactly one
cell tagged `parameters` (what tests/test_notebooks.py injects after), and each is what notebooks/build.py writes
from its source in notebooks/src/ (so an edit of one without the other fails here). Fast: no kernel is started."""

from __future__ import annotations

import glob
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "[0-9][0-9]_*.ipynb")))
EXPECTED = ("01_zero_shot_quickstart", "02_pretrain_clip", "03_transfer", "04_open_vocabulary", "05_scaling")


def test_every_notebook_of_the_issue_exists():
  assert [os.path.basename(p)[:-6] for p in NOTEBOOKS] == list(EXPECTED)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_stripped(path):
  with open(path) as f:
    nb = json.load(f)
  code = [c for c in nb["cells"] if c["cell_type"] == "code"]
  assert code, path
  with_outputs = [i for i, c in enumerate(nb["cells"]) if c.get("outputs")]
  counted = [i for i, c in enumerate(nb["cells"]) if c.get("execution_count") is not None]
  assert not with_outputs, f"{path}: cells {with_outputs} have outputs (rebuild with notebooks/build.py)"
  assert not counted, f"{path}: cells {counted} have execution counts"
  tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
  assert len(tagged) == 1, f"{path}: {len(tagged)} cells tagged 'parameters'"
  assert code[0] is not tagged[0] and "REPO_URL" in "".join(code[0]["source"]), "the first cell is the setup cell"


def test_notebooks_match_their_sources():
  pytest.importorskip("nbformat")
  spec = importlib.util.spec_from_file_location("notebooks_build", os.path.join(ROOT, "notebooks", "build.py"))
  build = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(build)
  assert build.main(["--check"]) == 0, "notebooks/*.ipynb differ from notebooks/src/*.py: run notebooks/build.py"
