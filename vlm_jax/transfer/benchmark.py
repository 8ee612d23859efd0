"""The method × shots × seeds grid of transfer runs, resumable, with a table and a plot.

  python -m vlm_jax.transfer.benchmark --methods=zeroshot,coop,cocoop,kgcoop,prograd --dataset=shifted_hues \\
      --shots=1,2,4,8,16 --seeds=1,2,3 --workdir=DIR [--protocol=base_to_novel] [--config.KEY=VALUE …]

Each cell runs `configs/transfer/<method>.py:tiny` (or `--variant=full`) with dataset, shots, seed and the
`--config.*` overrides (e.g. --config.init.checkpoint=MODEL_DIR, --config.epochs=5) in
DIR/<method>/<shots>shot_seed<seed>/; a cell with a results.json is skipped, an interrupted one resumes from its
checkpoint. Writes DIR/results.json (every cell), DIR/results.md (CoOp's layout: methods × shots, mean ± std
top-1 over seeds; base-to-novel: Base / Novel / H) and DIR/plots/accuracy_vs_shots.png. The last stdout line is
JSON: each method's mean top-1 at the largest k (harmonic mean for base-to-novel), and "metric".

A multi-label dataset (--dataset=scenes; methods zeroshot and dualcoop) reports mAP instead of top-1 (the cells'
"metric"): results.md is mAP %, chance is the mean class frequency, the plot is DIR/plots/mAP_vs_shots.png.
Every method is checked against the dataset's label kind before the first cell runs.
"""

from __future__ import annotations

import ast
import json
import os
import sys

from vlm_jax import config_lib
from vlm_jax.errors import UserError, exit_on_user_error

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _ints(text: str, what: str) -> list[int]:
  try:
    return [int(x) for x in text.split(",") if x]
  except ValueError:
    raise UserError(f"--{what} must be comma-separated integers, got {text!r}") from None


def parse(argv: list[str]) -> tuple[dict, list[tuple[str, str]]]:
  opts = {"methods": "zeroshot,coop,cocoop,kgcoop,prograd", "dataset": "shifted_hues", "shots": "1,16",
          "seeds": "1", "workdir": None, "protocol": "few_shot", "variant": "tiny",
          "config_dir": os.path.join(ROOT, "configs", "transfer")}
  overrides = []
  for arg in argv:
    if not arg.startswith("--") or "=" not in arg:
      raise UserError(f"bad argument {arg!r}: use --name=value")
    key, value = arg[2:].split("=", 1)
    if key.startswith("config."):
      overrides.append((key[len("config."):], value))
    elif key in opts:
      opts[key] = value
    else:
      raise UserError(f"unknown flag --{key}; flags: {sorted(opts)} and --config.KEY=VALUE")
  if not opts["workdir"]:
    raise UserError("--workdir is required")
  return opts, overrides


def set_override(config, key: str, value: str) -> None:
  """`config.key = value`, the value cast to the type of the current one (bool, int, float, str) or parsed as a
  Python literal."""
  *path, last = key.split(".")
  node = config
  for p in path:
    node = node[p]
  if last not in node:
    raise UserError(f"--config.{key}: no such config key")
  old = node[last]
  try:
    if isinstance(old, bool):
      new = value.lower() in ("1", "true", "yes")
    elif isinstance(old, (int, float, str)) and not isinstance(old, bool):
      new = type(old)(value)
    else:
      new = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    raise UserError(f"--config.{key}={value!r}: not a {type(old).__name__}") from None
  node[last] = new


def method_config(opts: dict, method: str, overrides):
  path = os.path.join(opts["config_dir"], f"{method}.py")
  if not os.path.exists(path):
    raise UserError(f"no config {path} for method {method!r}")
  c = config_lib.load_file(f"{path}:{opts['variant']}")
  c.dataset, c.protocol = opts["dataset"], opts["protocol"]
  for k, v in overrides:
    set_override(c, k, v)
  return c


def metric_of(cells: list[dict]) -> str:
  """The cells' test metric: 'top1', or 'mAP' for a multi-label dataset."""
  return cells[0].get("metric", "top1") if cells else "top1"


def table(cells: list[dict], methods, shots, protocol: str) -> str:
  from vlm_jax.transfer.protocol import mean_std  # noqa: PLC0415
  metric = metric_of(cells)

  def fmt(vals):
    m, s = mean_std(vals)
    return "–" if m != m else f"{100 * m:.1f} ± {100 * s:.1f}"

  by = lambda m, k, key: [c[key] for c in cells if c["method"] == m and c["shots"] == k and key in c]  # noqa: E731
  if protocol == "base_to_novel":
    lines = ["| method | shots | Base | Novel | H |", "|---|---|---|---|---|"]
    for m in methods:
      for k in shots:
        lines.append(f"| {m} | {k} | {fmt(by(m, k, 'base/top1'))} | {fmt(by(m, k, 'novel/top1'))} | "
                     f"{fmt(by(m, k, 'harmonic_mean'))} |")
  else:
    lines = ["| method | " + " | ".join(f"{k} shots" for k in shots) + " |", "|---" * (len(shots) + 1) + "|"]
    for m in methods:
      lines.append(f"| {m} | " + " | ".join(fmt(by(m, k, metric)) for k in shots) + " |")
  chance = cells[0]["chance"] if cells else float("nan")
  what, base = ("mAP", "chance (mean class frequency)") if metric == "mAP" else ("Top-1", "chance")
  return "\n".join(lines) + f"\n\n{what} % on the test split, mean ± std over seeds; {base} {100 * chance:.1f}%.\n"


def plot(cells, methods, shots, path: str) -> None:
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  from vlm_jax.transfer.protocol import mean_std  # noqa: PLC0415
  metric = metric_of(cells)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig, ax = plt.subplots(figsize=(5, 4))
  for m in methods:
    ms = [mean_std([c[metric] for c in cells if c["method"] == m and c["shots"] == k]) for k in shots]
    ax.errorbar(shots, [100 * a for a, _ in ms], yerr=[100 * s for _, s in ms], marker="o", label=m, capsize=3)
  ax.set_xscale("log", base=2)
  ax.set_xticks(shots, [str(k) for k in shots])
  ax.set_xlabel("shots per class")
  ax.set_ylabel("mAP (%)" if metric == "mAP" else "top-1 (%)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


@exit_on_user_error
def run(argv: list[str] | None = None) -> dict:
  opts, overrides = parse(list(sys.argv[1:] if argv is None else argv))
  methods = [m for m in opts["methods"].split(",") if m]
  shots, seeds = _ints(opts["shots"], "shots"), _ints(opts["seeds"], "seeds")
  from vlm_jax.transfer.run import check_labels, transfer  # noqa: PLC0415
  for m in methods:  # a method that cannot run on the dataset fails now, not after the cells before it
    check_labels(m, opts["dataset"], opts["protocol"])
  workdir = os.path.abspath(opts["workdir"])
  cells = []
  for m in methods:
    for k in shots:
      for s in seeds:
        cell_dir = os.path.join(workdir, m, f"{k}shot_seed{s}")
        done = os.path.join(cell_dir, "results.json")
        if os.path.exists(done):
          with open(done) as f:
            cells.append(json.load(f))
          print(f"skip {m} {k}-shot seed {s} (done)", flush=True)
          continue
        c = method_config(opts, m, overrides)
        c.shots, c.seed = k, s
        r = transfer(c, cell_dir, quiet=True)
        key = r.get("metric", "top1")
        print(f"{m} {k}-shot seed {s}: {key} {100 * r[key]:.1f}% (zero-shot {100 * r['zeroshot/' + key]:.1f}%)",
              flush=True)
        cells.append(r)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(cells, f, indent=2, sort_keys=True)
  md = table(cells, methods, shots, opts["protocol"])
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(md)
  metric = metric_of(cells)
  plot(cells, methods, shots, os.path.join(workdir, "plots", "mAP_vs_shots.png" if metric == "mAP" else
                                           "accuracy_vs_shots.png"))
  print(md, flush=True)
  from vlm_jax.transfer.protocol import mean_std  # noqa: PLC0415
  key = "harmonic_mean" if opts["protocol"] == "base_to_novel" else metric
  last = {m: mean_std([c[key] for c in cells if c["method"] == m and c["shots"] == max(shots)])[0]
          for m in methods}
  print(json.dumps({"dataset": opts["dataset"], "shots": max(shots), "metric": key, **last}, sort_keys=True),
        flush=True)
  return last


if __name__ == "__main__":
  run()
