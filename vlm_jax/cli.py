"""The command-line skeleton of the config-driven entry points (pretrain, evaluate, transfer, distill).

  command = ConfigCommand("configs/pretrain/clip.py:tiny", workdir_help="…", extra={"checkpoint": "…"})
  config, flags = command.parse(sys.argv)       # every mistake is a one-line UserError (exit 2)
  result = command.run(argv, fn, summary)       # parse, distributed init, check, fn(config, workdir), JSON last

Each parse builds its own absl `FlagValues`, so importing several entry points never collides and one command
parses many argvs in a process (tests, notebooks) without flags or overrides of an earlier argv leaking in.
`--config` is an ml_collections config file (`file.py:arg`, overrides as `--config.key=value`); `--workdir` and
the `extra` flags are strings. Flag, override and config-file mistakes all become `UserError`s instead of
absl's usage dump or a traceback from inside the config file. `check(config, flags)` (`vlm_jax.preflight`)
rejects the config before anything is written; a `UserError` the run raises later removes the workdir when
this command created it and no checkpoint was written into it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
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
  key_error = next((x for x in (e, cause) if isinstance(x, KeyError)), None)
  if key_error is not None and prefix.startswith("bad command line"):  # a --config.KEY=VALUE override of a key
    # the (locked) config does not have
    key = str(key_error.args[0] if key_error.args else key_error).strip("'\"")
    return UserError(f"{prefix}unknown config key {key!r} (a --config.… override names a key the config "
                     "does not have)")
  return UserError(prefix + one_line(e))


def _config_path(argv: list[str]) -> str | None:
  """The file part of `--config=file.py:arg` (or `--config file.py:arg`) in `argv`, if any."""
  for i, a in enumerate(argv):
    value = a.split("=", 1)[1] if a.startswith("--config=") else (
        argv[i + 1] if a == "--config" and i + 1 < len(argv) else None)
    if value is not None:
      return value.split(":", 1)[0]
  return None


class ConfigCommand:
  """`--config`, `--workdir` and extra string flags of one entry point, parsed into (config, {flag: value})."""

  def __init__(self, example: str, *, workdir_help: str = "directory for checkpoints, metrics and plots",
               workdir_required: bool = True, extra: Mapping[str, str] | None = None,
               check: Callable | None = None):
    self.example, self.workdir_required, self.workdir_help = example, workdir_required, workdir_help
    self.extra = dict(extra or {})
    self.check = check

  def _flag_values(self):
    """(fresh FlagValues with --config, --workdir and the extra flags, the --config holder)."""
    values = flags.FlagValues()
    config = config_flags.DEFINE_config_file("config", None, f"config file, e.g. {self.example}",
                                             flag_values=values, lock_config=True)
    flags.DEFINE_string("workdir", None, self.workdir_help, flag_values=values)
    for name, help_text in self.extra.items():
      flags.DEFINE_string(name, None, help_text, flag_values=values)
    return values, config

  def parse(self, argv: list[str]):
    """(config, {'workdir': …, **extra}) from `argv` (argv[0] is the program name)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parsed, holder = self._flag_values()
    # config_flags executes the file into sys.modules['config_config'] when it is there: a second parse in this
    # process would run the new file inside the previous one's namespace (a file without get_config would
    # silently use the previous file's)
    sys.modules.pop("config_config", None)
    path = _config_path(argv)
    if path and not os.path.isfile(path):
      raise UserError(f"config file {path} does not exist (e.g. --config={self.example})")
    saved, sys.argv = sys.argv, list(argv)  # config_flags finds the --config.key overrides in sys.argv
    try:
      parsed(list(argv))
    except Exception as e:  # flags and --config.key=value overrides are user input
      raise _user_error(e, "bad command line: ") from None
    finally:
      sys.argv = saved
    values = {name: parsed[name].value for name in ["workdir", *self.extra]}
    if self.workdir_required and not values["workdir"]:
      raise UserError("--workdir is required")
    try:
      config = holder.value  # config files load lazily: force it here so their errors are reported
      if config is None:
        raise UserError(f"--config is required, e.g. --config={self.example}")
      config.to_dict()
    except Exception as e:  # a config file is user input: any failure to load it is the user's to fix
      raise _user_error(e, "cannot load config: ") from None
    return config, values

  def run(self, argv: list[str] | None, fn: Callable, summary: Callable | None = None) -> dict:
    """The body of a training entry point: parse `argv` (default sys.argv), initialise multi-process JAX when
    launched so, `check(config, flags)`, `result = fn(config, workdir)`, print `summary(result)`'s human lines,
    then the result as one JSON line (the last line of stdout). Wrap the caller with `errors.exit_on_user_error`."""
    from vlm_jax.parallel.mesh import maybe_initialize_distributed  # noqa: PLC0415
    config, flags = self.parse(list(sys.argv if argv is None else argv))
    maybe_initialize_distributed()
    if self.check is not None:
      self.check(config, flags)
    workdir = flags["workdir"]
    created = bool(workdir) and not os.path.exists(workdir)
    try:
      result = fn(config, workdir)
    except UserError:
      if created:
        remove_unused_workdir(workdir)
      raise
    lines = summary(result) if summary is not None else None
    for line in [lines] if isinstance(lines, str) else (lines or []):
      print(line, flush=True)
    print(json.dumps(result, sort_keys=True), flush=True)
    return result


def remove_unused_workdir(workdir: str) -> None:
  """Removes `workdir` (created by a run that then failed on a user error) unless the run trained: a checkpoint
  step (a `checkpoints/<step>` folder) or a logged step (a non-empty `metrics.jsonl`) somewhere under it. The
  config.json of a run that never started is not worth keeping; the logs of one that stopped mid-run (its data
  vanished, say) are what the user reads next."""
  for root, dirs, files in os.walk(workdir):
    if os.path.basename(root) == "checkpoints" and any(d.isdigit() for d in dirs):
      return
    if "metrics.jsonl" in files and os.path.getsize(os.path.join(root, "metrics.jsonl")) > 0:
      return
  shutil.rmtree(workdir, ignore_errors=True)
