"""Executes every notebook in notebooks/ top to bottom in a fresh kernel (marker `notebooks`: `make test-notebooks`).

Each notebook runs with nbclient on CPU with the small settings of `SMALL` injected as a cell right after its
`parameters` cell (papermill's convention), in a kernel of this interpreter whose environment has one CPU device
(the suite's 8 simulated devices are removed: 05_scaling asks for its own). The test fails on any cell error, on a
notebook that shows no figure, and on a headline number that does not beat its chance level: each notebook's
last cell prints `headline: {json}`. Wall and kernel CPU seconds and the load average are printed per notebook.
"""

from __future__ import annotations

import glob
import json
import os
import re
import resource
import sys
import time

import pytest

pytestmark = pytest.mark.notebooks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(os.path.basename(p)[:-6] for p in glob.glob(os.path.join(ROOT, "notebooks", "[0-9][0-9]_*.ipynb")))


def small_parameters(name: str, request, workdir: str) -> dict:
  """The settings injected into notebook `name`: its own CPU-sized defaults (so the run times measured here are
  the ones a CPU user sees), a temporary WORKDIR, and the pretrained ResNet fixture where a model is read (03, 04;
  01 trains its :micro fallback model itself)."""
  if name == "01_zero_shot_quickstart":   # no MODEL_DIR: the :micro model the notebook trains itself
    return {"WORKDIR": workdir, "FALLBACK_STEPS": 300, "NUM_EVAL": 256}
  if name == "02_pretrain_clip":
    return {"WORKDIR": workdir, "CONFIG": "micro", "STEPS": 300, "BATCH": 64}
  if name == "03_transfer":
    return {"MODEL_DIR": request.getfixturevalue("pretrained_resnet"), "WORKDIR": workdir,
            "METHODS": ["zeroshot", "coop", "tip_adapter", "linear_probe"], "SHOTS": [1, 4], "EPOCHS": 4,
            "TEST_PER_CLASS": 8}
  if name == "04_open_vocabulary":
    return {"TEACHER_DIR": request.getfixturevalue("pretrained_resnet"), "WORKDIR": workdir, "VARIANT": "micro"}
  if name == "05_scaling":
    return {"LOSS_BATCHES": [512, 1024, 2048, 4096], "TIMED_STEPS": 5}
  raise AssertionError(f"no small settings for notebook {name}: add them to SMALL in {__file__}")


def headline_checks(name: str, h: dict) -> None:
  """Each notebook's headline numbers against their chance level (or reference)."""
  if name == "01_zero_shot_quickstart":
    assert h["zeroshot_top1"] > 2 * h["chance"], h
    assert h["retrieval_r1"] > h["retrieval_chance"], h
  elif name == "02_pretrain_clip":
    assert h["seen_top1"] > 2 * h["chance"], h
    assert h["unseen_top1"] > h["chance"], h
  elif name == "03_transfer":
    assert h["zeroshot"] > 2 * h["chance"], h
    assert max(h[m] for m in ("coop", "tip_adapter", "linear_probe")) > 2 * h["chance"], h
  elif name == "04_open_vocabulary":
    assert h["teacher_miou_base"] > h["chance_miou"], h
    assert h["student_miou_base"] > h["chance_miou"], h
  elif name == "05_scaling":
    assert h["ring_temp_bytes"] < h["dense_temp_bytes"], h     # at the largest batch
    assert h["fsdp_param_bytes_per_device"] < h["data_param_bytes_per_device"], h
    assert 0 < h["mfu"] < 1, h


def kernel_env() -> dict:
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
  if flags:
    env["XLA_FLAGS"] = flags
  else:
    env.pop("XLA_FLAGS", None)
  env["JAX_PLATFORMS"] = "cpu"
  env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
  env.pop("PYTEST_XDIST_WORKER", None)
  return env


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, request, tmp_path):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  nb = nbformat.read(os.path.join(ROOT, "notebooks", f"{name}.ipynb"), as_version=4)
  tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1, f"{name}: {len(tagged)} cells tagged 'parameters'"
  params = small_parameters(name, request, str(tmp_path / "work"))
  injected = nbformat.v4.new_code_cell("# Parameters injected by tests/test_notebooks.py\n" + "\n".join(
      f"{k} = {v!r}" for k, v in params.items()))
  injected.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(tagged[0] + 1, injected)

  client = nbclient.NotebookClient(nb, timeout=3600, kernel_name="python3",
                                   resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}})
  load0, t0, cpu0 = os.getloadavg(), time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
  try:
    client.execute(env=kernel_env())   # raises CellExecutionError on the first failing cell
  finally:  # the executed notebook, outputs and all, for a look at what went wrong
    nbformat.write(nb, str(tmp_path / f"{name}.executed.ipynb"))
  wall = time.perf_counter() - t0
  cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)

  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
  lines = [l for l in text.splitlines() if l.startswith("headline: ")]
  print(f"\n{name}: wall {wall:.0f} s, kernel CPU {cpu:.0f} s, {len(images)} figures, load average "
        f"{load0[0]:.1f} -> {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
  assert images, f"{name} produced no figure"
  assert lines, f"{name} printed no headline"
  headline = json.loads(lines[-1][len("headline: "):])
  print(f"{name} headline: {headline}")
  headline_checks(name, headline)
