"""User-facing errors: one line on stderr, exit code 2.

A `UserError` marks a mistake the user can fix (unknown variant, a batch size the mesh cannot split, no shards
matching a pattern, an unwritable workdir, a checkpoint of another architecture). Entry points wrap their
`main` with `exit_on_user_error`, which prints `error: <message>` and exits with status 2. Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys


class UserError(Exception):
  """A mistake in the user's input; reported as one line, exit code 2."""


def exit_on_user_error(fn):
  """Decorator for entry-point mains: `UserError` -> `error: …` on stderr and `SystemExit(2)`."""

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except UserError as e:
      msg = " ".join(str(e).split())  # always one line
      print(f"error: {msg}", file=sys.stderr, flush=True)
      raise SystemExit(2) from None

  return wrapper
