"""Pre-training entry point.

  python -m vlm_jax.pretrain --config=configs/pretrain/clip.py:tiny --workdir=DIR [--config.key=value …]

Builds the tokenizer, model, objectives, data stream and evaluators named by the config and runs the one training
loop (`vlm_jax.train.loop`). Rerunning the same command resumes from the newest checkpoint in DIR.
"""

from __future__ import annotations

import json
import logging
import sys

from absl import flags
from ml_collections import config_flags

from vlm_jax.errors import UserError, exit_on_user_error

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/pretrain/clip.py:tiny",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and plots")


def parse_flags(argv: list[str]) -> None:
  """absl flag parsing with user errors reported as one line (exit 2) instead of absl's usage dump."""
  try:
    FLAGS(argv)
  except UserError:
    raise
  except Exception as e:  # flags and --config.key=value overrides are user input
    cause = e.__cause__ or e.__context__
    if isinstance(cause, UserError):
      raise cause from None
    raise UserError("bad command line: " + " ".join(str(e).split())[:300]) from None
  if _WORKDIR.value is None:
    raise UserError("--workdir is required")
  try:
    config = _CONFIG.value  # config files load lazily: force it here so their errors are reported as such
    if config is None:
      raise UserError("--config is required, e.g. --config=configs/pretrain/clip.py:tiny")
    config.to_dict()
  except UserError:
    raise
  except Exception as e:  # a config file is user input: any failure to load it is the user's to fix
    cause = e.__cause__ or e.__context__
    if isinstance(cause, UserError):
      raise cause from None
    raise UserError("cannot load config: " + " ".join(str(e).split())[:300]) from None


@exit_on_user_error
def run(argv: list[str] | None = None) -> dict:
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  from vlm_jax.parallel.mesh import maybe_initialize_distributed
  parse_flags(list(sys.argv if argv is None else argv))
  maybe_initialize_distributed()
  from vlm_jax import runner
  config = _CONFIG.value
  result = runner.pretrain(config, _WORKDIR.value)
  summary = zeroshot_summary(result)
  if summary:
    print(summary, flush=True)
  print(json.dumps(result, sort_keys=True), flush=True)
  return result


def zeroshot_summary(metrics: dict) -> str | None:
  """A human line for the synthetic zero-shot results (seen / unseen pairs), with chance beside them."""
  if "zeroshot/seen_top1" not in metrics:
    return None
  chance = metrics.get("zeroshot/chance", float("nan"))
  return (f"zero-shot top-1 on held-out images: seen pairs {100 * metrics['zeroshot/seen_top1']:.1f}% | "
          f"unseen pairs {100 * metrics['zeroshot/unseen_top1']:.1f}% | chance {100 * chance:.1f}% "
          f"(step {metrics.get('step')})")


def main() -> None:
  """Console-script entry (`vlm-pretrain`): like `run`, but returns None so the exit status is 0."""
  run()


if __name__ == "__main__":
  main()
