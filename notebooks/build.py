"""Builds notebooks/NN_name.ipynb from notebooks/src/NN_name.py (outputs stripped), or checks they match.

  .venv/bin/python notebooks/build.py          # (re)write every notebook from its source
  .venv/bin/python notebooks/build.py --check  # exit 1 when a committed notebook differs from its source

A source is plain Python in the "percent" format: `# %%` starts a code cell, `# %% [markdown]` a markdown cell
(its lines start with `# `), `# %% [parameters]` the one code cell tagged `parameters` (papermill's convention:
the tests inject their small settings as a cell right after it), and `# %% [setup]` the shared first cell
(`SETUP` below: install / locate the checkout, then detect the accelerator), which takes the number of simulated
CPU devices as `# %% [setup] cpu_devices=8`. Notebooks are written with no outputs and no execution counts.
"""

from __future__ import annotations

import glob
import os
import re
import sys

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))

SETUP = '''\
# Setup: on Colab, clone REPO_URL and pip-install it; locally, use the checkout this notebook lives in.
REPO_URL = "https://github.com/YOUR_ORG/vlm_jax"  # set to your copy of the repository (the README's badges too)
REPO_DIR = ""      # a local checkout; "" = the one containing this notebook (Colab: /content/vlm_jax)
CPU_DEVICES = {cpu_devices}    # simulated CPU devices when there is no accelerator (must be set before JAX is imported)

import os, subprocess, sys
if "google.colab" in sys.modules:
    REPO_DIR = REPO_DIR or "/content/vlm_jax"
    if not os.path.isdir(REPO_DIR):
        subprocess.run(["git", "clone", "--depth=1", REPO_URL, REPO_DIR], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", REPO_DIR], check=True)
elif not REPO_DIR:
    REPO_DIR = os.path.abspath("")
    while not os.path.isfile(os.path.join(REPO_DIR, "vlm_jax", "__init__.py")):
        if os.path.dirname(REPO_DIR) == REPO_DIR:
            raise RuntimeError("open this notebook inside a vlm_jax checkout, or set REPO_DIR")
        REPO_DIR = os.path.dirname(REPO_DIR)
REPO_DIR = os.path.abspath(REPO_DIR)
if REPO_DIR not in sys.path:
    sys.path.insert(0, REPO_DIR)
os.chdir(REPO_DIR)  # configs/… and workdirs/… below are relative to the checkout
if CPU_DEVICES > 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={{CPU_DEVICES}}").strip()

import jax
BACKEND = jax.default_backend()  # 'tpu' | 'gpu' | 'cpu': the parameters below pick their sizes from it
ACCELERATOR = BACKEND != "cpu"
print(f"vlm_jax at {{REPO_DIR}}; JAX {{jax.__version__}} on {{BACKEND}}: "
      f"{{jax.device_count()}} x {{jax.devices()[0].device_kind}}")

import io
import matplotlib.pyplot as plt
from IPython import display as ipd
from vlm_jax.config_lib import load_file as get_config  # 'configs/…/x.py:arg' -> ConfigDict, as --config= reads it


def show(fig):
    """Displays a figure inline as a PNG, whatever pyplot's backend (runs that write PNG plots switch it to Agg)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    ipd.display(ipd.Image(buf.getvalue()))'''

_MARK = re.compile(r"^# %%(?:\s+\[(\w+)\])?(.*)$")


def cells_of(source: str) -> list:
  """nbformat cells of a percent-format source (module docstring)."""
  cells, kind, arg, lines = [], None, "", []

  def flush():
    if kind is None:
      return
    text = "\n".join(lines).strip("\n")
    if kind == "markdown":
      text = "\n".join(l[2:] if l.startswith("# ") else l.lstrip("#") for l in text.splitlines())
      cells.append(nbformat.v4.new_markdown_cell(text))
    elif kind == "setup":
      opts = dict(kv.split("=") for kv in arg.split())
      cells.append(nbformat.v4.new_code_cell(SETUP.format(cpu_devices=int(opts.get("cpu_devices", 1)))))
    else:
      cell = nbformat.v4.new_code_cell(text)
      if kind == "parameters":
        cell.metadata["tags"] = ["parameters"]
      cells.append(cell)

  for line in source.splitlines():
    m = _MARK.match(line)
    if m:
      flush()
      kind, arg, lines = (m.group(1) or "code"), m.group(2).strip(), []
    elif kind is not None:
      lines.append(line)
  flush()
  return cells


def build(src_path: str):
  with open(src_path) as f:
    nb = nbformat.v4.new_notebook(cells=cells_of(f.read()))
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
  nb.metadata["language_info"] = {"name": "python"}
  nb.metadata["accelerator"] = "GPU"  # Colab: ask for an accelerator runtime; the notebook runs on CPU too
  for i, cell in enumerate(nb.cells):  # stable ids: rebuilding an unchanged source changes nothing
    cell["id"] = f"cell-{i:02d}"
  nbformat.validate(nb)
  return nb


def target(src_path: str) -> str:
  return os.path.join(HERE, os.path.basename(src_path)[:-3] + ".ipynb")


def sources() -> list[str]:
  return sorted(glob.glob(os.path.join(HERE, "src", "[0-9][0-9]_*.py")))


def main(argv: list[str]) -> int:
  stale = []
  for src in sources():
    text = nbformat.writes(build(src)) + "\n"
    path = target(src)
    if "--check" in argv:
      if not os.path.exists(path) or open(path).read() != text:
        stale.append(os.path.relpath(path, HERE))
    else:
      with open(path, "w") as f:
        f.write(text)
      print("wrote", os.path.relpath(path))
  if stale:
    print("notebooks out of date with notebooks/src (run notebooks/build.py):", ", ".join(stale))
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
