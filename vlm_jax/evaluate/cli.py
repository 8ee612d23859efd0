"""Standalone evaluation entry point (`python -m vlm_jax.evaluate`, console script `vlm-evaluate`).

  python -m vlm_jax.evaluate --config=configs/eval/synthetic.py --workdir=DIR
  python -m vlm_jax.evaluate --config=configs/eval/synthetic.py --checkpoint=CKPT [--workdir=OUT]

CKPT (default: DIR) is a pre-training workdir, its `checkpoints/` folder or one `checkpoints/<step>` folder; the
newest step is used unless a step folder is given. The model and tokenizer are rebuilt from the config saved
in that checkpoint (`checkpoints/<step>/config`), its variables loaded (`checkpoint.load_variables`), and the
suite's evaluators (`config.evals`, see `vlm_jax.evaluate`) run over the suite's mesh (`config.mesh`) with the
checkpoint's data config updated by `config.data`. Results go to `OUT/eval/<config.name>.json` and plots under
`OUT/plots/` (OUT: --workdir, else the run directory holding the checkpoint); the last line printed is one JSON
object of the metrics (with `step`). User mistakes print one line `error: …` and exit with status 2.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import flags
from ml_collections import config_flags

from vlm_jax.errors import UserError, exit_on_user_error

_FLAGS = flags.FlagValues()  # private: importing this module never collides with other entry points' flags
_CONFIG = config_flags.DEFINE_config_file("config", None, "eval suite, e.g. configs/eval/synthetic.py",
                                          flag_values=_FLAGS, lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: checkpoint source (unless --checkpoint) and "
                               "where eval/<name>.json and plots/ are written", flag_values=_FLAGS)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "a workdir, its checkpoints/ folder or a step folder",
                                  flag_values=_FLAGS)
_HEADLINES = ("top1", "seen_top1", "unseen_top1", "mean_average_precision", "image_to_text_R@1",
              "text_to_image_R@1", "miou", "baseline_miou")


def _plain(cfg) -> dict:
  return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})


def _one_line(e: Exception) -> str:
  return " ".join(str(e).split())[:300]


def parse_flags(argv: list[str]):
  """absl parsing with every mistake (flags, config file, overrides) reported as a `UserError`."""
  try:
    _FLAGS(argv)
  except Exception as e:  # flags and --config.key=value overrides are user input
    cause = e.__cause__ or e.__context__
    if isinstance(cause, UserError):
      raise cause from None
    raise UserError("bad command line: " + _one_line(e)) from None
  if not (_WORKDIR.value or _CHECKPOINT.value):
    raise UserError("give --workdir=DIR (a pre-training run) or --checkpoint=DIR")
  try:
    config = _CONFIG.value
    if config is None:
      raise UserError("--config is required, e.g. --config=configs/eval/synthetic.py")
    config.to_dict()
  except UserError:
    raise
  except Exception as e:  # a config file is user input
    cause = e.__cause__ or e.__context__
    if isinstance(cause, UserError):
      raise cause from None
    raise UserError("cannot load config: " + _one_line(e)) from None
  if not config.get("evals"):
    raise UserError("the eval config names no evaluators (config.evals is empty)")
  return config


def resolve_checkpoint(path: str) -> tuple[str, int]:
  """(checkpoints root, step) for a workdir, its checkpoints/ folder or one step folder."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise UserError(f"checkpoint directory {path} does not exist")
  if os.path.isdir(os.path.join(path, "state")) and os.path.basename(path).isdigit():
    return os.path.dirname(path), int(os.path.basename(path))
  for root in (path, os.path.join(path, "checkpoints")):
    steps = [int(d) for d in (os.listdir(root) if os.path.isdir(root) else ())
             if d.isdigit() and os.path.isdir(os.path.join(root, d, "state"))]
    if steps:
      return root, max(steps)
  raise UserError(f"no vlm_jax checkpoint found in {path}")


def load_run(path: str):
  """(run config, step, variables) of the checkpoint at `path` (see `resolve_checkpoint`)."""
  import ml_collections  # noqa: PLC0415

  from vlm_jax.train import checkpoint  # noqa: PLC0415
  root, step = resolve_checkpoint(path)
  ckpt = checkpoint.Checkpointer(root, async_save=False)
  try:
    saved = ckpt.restore_config(step)
  except Exception as e:  # a checkpoint written without its config, or not by vlm_jax
    raise UserError(f"checkpoint {root}/{step} has no readable saved config: {_one_line(e)}") from None
  finally:
    ckpt.close()
  return ml_collections.ConfigDict(saved), step, checkpoint.load_variables(os.path.join(root, str(step)))


def evaluate(suite, checkpoint_path: str, out_dir: str | None) -> dict:
  """Runs the suite on a checkpoint; writes `out_dir/eval/<name>.json` and plots (process 0) when given."""
  import jax  # noqa: PLC0415

  from vlm_jax import runner  # noqa: PLC0415
  from vlm_jax.evaluate import make_evaluators  # noqa: PLC0415
  from vlm_jax.parallel import mesh as mesh_lib  # noqa: PLC0415
  run_config, step, variables = load_run(checkpoint_path)
  tokenizer, model, _ = runner.build(run_config)
  data = {**run_config.data.to_dict(), **_plain(suite.get("data"))}
  mesh = mesh_lib.make_mesh(_plain(suite.get("mesh")) or None)
  plot_dir = os.path.join(out_dir, "plots") if out_dir else None
  with jax.set_mesh(mesh):
    evaluators = make_evaluators(suite.evals, model=model, tokenizer=tokenizer, data_config=data,
                                 plot_dir=plot_dir)
    variables = jax.device_put(variables, mesh_lib.replicated(mesh))
    metrics = {"step": int(step)}
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
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  from vlm_jax.parallel.mesh import maybe_initialize_distributed  # noqa: PLC0415
  suite = parse_flags(list(sys.argv if argv is None else argv))
  maybe_initialize_distributed()
  source = _CHECKPOINT.value or _WORKDIR.value
  root, _ = resolve_checkpoint(source)  # fails before anything is written
  out_dir = _WORKDIR.value
  if out_dir is None:
    out_dir = os.path.dirname(root) if os.path.basename(root) == "checkpoints" else root
  try:
    os.makedirs(os.path.join(out_dir, "eval"), exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot write to {out_dir}: {e.strerror or e}") from None
  metrics = evaluate(suite, source, out_dir)
  import jax  # noqa: PLC0415
  if jax.process_index() == 0:
    for line in summary(metrics):
      print(line, flush=True)
    print(json.dumps(metrics, sort_keys=True), flush=True)
  return metrics


def main() -> None:
  """Console-script entry (`vlm-evaluate`): like `run`, but returns None so the exit status is 0."""
  run()
