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
  except flags.Error as e:
    raise UserError(str(e).splitlines()[0]) from None
  except UserError:
    raise
  except (FileNotFoundError, IOError) as e:
    raise UserError(f"cannot read config: {e}") from None
  if _WORKDIR.value is None:
    raise UserError("--workdir is required")
  try:
    config = _CONFIG.value
  except (AttributeError, KeyError, ValueError) as e:
    raise UserError(f"bad config: {e}") from None
  if config is None:
    raise UserError("--config is required, e.g. --config=configs/pretrain/clip.py:tiny")


@exit_on_user_error
def run(argv: list[str] | None = None) -> dict:
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  from vlm_jax.parallel.mesh import maybe_initialize_distributed
  parse_flags(list(sys.argv if argv is None else argv))
  maybe_initialize_distributed()
  from vlm_jax import runner
  config = _CONFIG.value
  result = runner.pretrain(config, _WORKDIR.value)
  print(json.dumps({k: v for k, v in result.items()}, sort_keys=True), flush=True)
  return result


if __name__ == "__main__":
  run()
