"""Standalone evaluation entry point (`python -m vlm_jax.evaluate`, console script `vlm-evaluate`).

  python -m vlm_jax.evaluate --config=configs/eval/synthetic.py --workdir=DIR
  python -m vlm_jax.evaluate --config=configs/eval/synthetic.py --checkpoint=CKPT [--workdir=OUT]

CKPT (default: DIR) is a run directory (pre-training, transfer or distillation), its `checkpoints/` folder or one
`checkpoints/<step>` folder; the newest step is used unless a step folder is given. The model and tokenizer are
rebuilt from the config saved in that checkpoint (`checkpoints/<step>/config`; a distillation run's `model`
describes its whole student, `open_vocab` classifier included), its variables loaded (`vlm_jax.runs.load`: every
collection, e.g. a student's 'constants' text embeddings; frozen weights kept by reference rebuilt from their
verified source, e.g. the teacher; the newest readable step), and the suite's evaluators (`config.evals`, see
`vlm_jax.evaluate`) run over the suite's mesh (`config.mesh`) with the checkpoint's data config updated by
`config.data`. Results go to `OUT/eval/<config.name>.json` and plots under `OUT/plots/` (OUT: --workdir, else the
run directory holding the checkpoint); the last line printed is one JSON object of the metrics (with `step`).
User mistakes print one line `error: …` and exit with status 2.
"""

from __future__ import annotations

import json
import os
import sys

from vlm_jax import config_lib, preflight
from vlm_jax.cli import ConfigCommand, remove_unused_workdir
from vlm_jax.errors import UserError, exit_on_user_error

COMMAND = ConfigCommand(
    "configs/eval/synthetic.py", workdir_required=False,
    workdir_help="run directory: checkpoint source (unless --checkpoint) and where eval/<name>.json and plots/ "
    "are written", extra={"checkpoint": "a run directory, its checkpoints/ folder or a step folder"})
_HEADLINES = ("top1", "seen_top1", "unseen_top1", "mean_average_precision", "image_to_text_R@1",
              "text_to_image_R@1", "miou", "baseline_miou", "AP", "AP50_base", "AP50_novel", "APr")


def parse_flags(argv: list[str]):
  """(suite config, {'workdir', 'checkpoint'}), every mistake a `UserError`."""
  config, values = COMMAND.parse(argv)
  if not (values["workdir"] or values["checkpoint"]):
    raise UserError("give --workdir=DIR (a pre-training run) or --checkpoint=DIR")
  if not config.get("evals"):
    raise UserError("the eval config names no evaluators (config.evals is empty)")
  return config, values


def evaluate(suite, checkpoint_path: str, out_dir: str | None) -> dict:
  """Runs the suite on a checkpoint; writes `out_dir/eval/<name>.json` and plots (process 0) when given."""
  import jax  # noqa: PLC0415

  from vlm_jax import assembly, runs  # noqa: PLC0415
  from vlm_jax.evaluate import make_evaluators  # noqa: PLC0415
  from vlm_jax.parallel import mesh as mesh_lib  # noqa: PLC0415
  run = runs.load(checkpoint_path)
  tokenizer, model = assembly.build(run.config)
  data = {**config_lib.plain(run.config.data), **config_lib.plain(suite.get("data"))}
  mesh = mesh_lib.make_mesh(config_lib.plain(suite.get("mesh")) or None)
  plot_dir = os.path.join(out_dir, "plots") if out_dir else None
  with jax.set_mesh(mesh):
    evaluators = make_evaluators(suite.evals, model=model, tokenizer=tokenizer, data_config=data,
                                 plot_dir=plot_dir)
    variables = jax.device_put(run.variables, mesh_lib.replicated(mesh))
    metrics = {"step": int(run.step)}
    for fn in evaluators.values():
      metrics.update(fn(variables))
  if out_dir and jax.process_index() == 0:
    path = os.path.join(out_dir, "eval", f"{suite.get('name') or 'eval'}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      json.dump({**metrics, "checkpoint": os.path.abspath(checkpoint_path)}, f, indent=2, sort_keys=True)
  return metrics


def summary(metrics: dict) -> list[str]:
  """One human line per evaluator with its headline numbers (percentages)."""
  by_name: dict[str, list[str]] = {}
  for key, value in metrics.items():
    name, _, metric = key.partition("/")
    if (metric in _HEADLINES or metric.endswith("shot_top1")) and isinstance(value, float):
      by_name.setdefault(name, []).append(f"{metric} {100 * value:.1f}%")
  return [f"{name}: " + " | ".join(parts) for name, parts in by_name.items()]


@exit_on_user_error
def run(argv: list[str] | None = None) -> dict:
  from vlm_jax import runs  # noqa: PLC0415
  from vlm_jax.parallel.mesh import maybe_initialize_distributed  # noqa: PLC0415
  suite, flags = parse_flags(list(sys.argv if argv is None else argv))
  maybe_initialize_distributed()
  source = flags["checkpoint"] or flags["workdir"]
  root, _ = runs.resolve(source)  # these checks fail before anything is written
  out_dir = flags["workdir"] or runs.run_directory(root)
  preflight.evaluate(suite, {**flags, "workdir": out_dir})
  created = not os.path.exists(out_dir)
  try:
    metrics = evaluate(suite, source, out_dir)
  except UserError:
    if created:
      remove_unused_workdir(out_dir)
    raise
  import jax  # noqa: PLC0415
  if jax.process_index() == 0:
    for line in summary(metrics):
      print(line, flush=True)
    print(json.dumps(metrics, sort_keys=True), flush=True)
  return metrics


def main() -> None:
  """Console-script entry (`vlm-evaluate`): like `run`, but returns None so the exit status is 0."""
  run()
