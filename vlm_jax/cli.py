"""The command-line skeleton of the config-driven entry points (pretrain, evaluate, transfer, distill).

  command = ConfigCommand("configs/pretrain/clip.py:tiny", workdir_help="…", extra={"checkpoint": "…"})
  config, flags = command.parse(sys.argv)       # every mistake is a one-line UserError (exit 2)
  result = command.run(argv, fn, summary)       # parse, distributed init, fn(config, workdir), print JSON last

Each command has its own absl `FlagValues`, so importing several entry points never collides. `--config` is an
ml_collections config file (`file.py:arg`, overrides as `--config.key=value`); `--workdir` and the `extra` flags
are strings. Flag, override and config-file mistakes all become `UserError`s instead of absl's usage dump or a
traceback from inside the config file.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Callable, Mapping

from absl import flags
from ml_collections import config_flags

from vlm_jax.errors import UserError


def one_line(e: BaseException) -> str:
  return " ".join(str(e).split())[:300]


def _user_error(e: BaseException, prefix: str) -> UserError:
  cause = e.__cause__ or e.__context__
  if isinstance(e, UserError):
    return e
  if isinstance(cause, UserError):
    return cause
  return UserError(prefix + one_line(e))


class ConfigCommand:
  """`--config`, `--workdir` and extra string flags of one entry point, parsed into (config, {flag: value})."""

  def __init__(self, example: str, *, workdir_help: str = "directory for checkpoints, metrics and plots",
               workdir_required: bool = True, extra: Mapping[str, str] | None = None):
    self.example, self.workdir_required = example, workdir_required
    self.values = flags.FlagValues()
    self._config = config_flags.DEFINE_config_file("config", None, f"config file, e.g. {example}",
                                                   flag_values=self.values, lock_config=True)
    flags.DEFINE_string("workdir", None, workdir_help, flag_values=self.values)
    self.extra = dict(extra or {})
    for name, help_text in self.extra.items():
      flags.DEFINE_string(name, None, help_text, flag_values=self.values)

  def parse(self, argv: list[str]):
    """(config, {'workdir': …, **extra}) from `argv` (argv[0] is the program name)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    saved, sys.argv = sys.argv, list(argv)  # config_flags finds the --config.key overrides in sys.argv
    try:
      self.values(list(argv))
    except Exception as e:  # flags and --config.key=value overrides are user input
      raise _user_error(e, "bad command line: ") from None
    finally:
      sys.argv = saved
    values = {name: self.values[name].value for name in ["workdir", *self.extra]}
    if self.workdir_required and values["workdir"] is None:
      raise UserError("--workdir is required")
    try:
      config = self._config.value  # config files load lazily: force it here so their errors are reported
      if config is None:
        raise UserError(f"--config is required, e.g. --config={self.example}")
      config.to_dict()
    except Exception as e:  # a config file is user input: any failure to load it is the user's to fix
      raise _user_error(e, "cannot load config: ") from None
    return config, values

  def run(self, argv: list[str] | None, fn: Callable, summary: Callable | None = None) -> dict:
    """The body of a training entry point: parse `argv` (default sys.argv), initialise multi-process JAX when
    launched so, `result = fn(config, workdir)`, print `summary(result)`'s human lines, then the result as one
    JSON line (the last line of stdout). Wrap the caller with `errors.exit_on_user_error`."""
    from vlm_jax.parallel.mesh import maybe_initialize_distributed  # noqa: PLC0415
    config, flags = self.parse(list(sys.argv if argv is None else argv))
    maybe_initialize_distributed()
    result = fn(config, flags["workdir"])
    lines = summary(result) if summary is not None else None
    for line in [lines] if isinstance(lines, str) else (lines or []):
      print(line, flush=True)
    print(json.dumps(result, sort_keys=True), flush=True)
    return result
