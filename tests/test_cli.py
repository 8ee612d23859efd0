"""Entry-point user errors: one line `error: …` on stderr and exit code 2, no traceback."""

from __future__ import annotations

import sys

import pytest

from tests import train_helpers as th


def _assert_user_error(result, fragment: str):
  assert result.returncode == 2, (result.returncode, result.stderr[-1500:])
  lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
  assert lines and lines[-1].startswith("error: "), result.stderr[-1500:]
  assert "Traceback" not in result.stderr
  assert fragment in lines[-1], lines[-1]


@pytest.mark.parametrize("args,fragment", [
    (["--config=configs/pretrain/clip.py:nosuch=1"], "unknown config argument"),
    (["--config=configs/pretrain/clip.py:img=Z/16"], "unknown"),
    (["--config=configs/pretrain/missing.py:tiny"], "config"),
    (["--config=configs/pretrain/clip.py:tiny", "--config.batch_size=12"], "not divisible"),
    (["--config=configs/pretrain/clip.py:tiny", "--config.no_such_key=1"], "no_such_key"),
    (["--config=configs/pretrain/clip.py:tiny", "--config.objectives.nosuch=1.0"], "nosuch"),
    (["--config=configs/pretrain/clip.py:tiny", "--config.mesh.model=3"], "mesh"),
])
def test_user_errors_exit_2_with_one_line(tmp_path, args, fragment):
  r = th.run_cli([sys.executable, "-m", "vlm_jax.pretrain", *args, f"--workdir={tmp_path}/w"], timeout=120)
  _assert_user_error(r, fragment)


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  r = th.run_cli([sys.executable, "-m", "vlm_jax.pretrain", "--config=configs/pretrain/clip.py:tiny",
                  f"--workdir={blocker}/sub"], timeout=120)
  _assert_user_error(r, "not writable")


def test_missing_workdir_flag():
  r = th.run_cli([sys.executable, "-m", "vlm_jax.pretrain", "--config=configs/pretrain/clip.py:tiny"], timeout=120)
  _assert_user_error(r, "--workdir")


def test_config_command_takes_overrides_from_the_given_argv():
  """In-process parsing (tests, notebooks): `--config.key=value` overrides come from the argv given, not sys.argv."""
  from vlm_jax.cli import ConfigCommand
  command = ConfigCommand("configs/pretrain/clip.py:micro")
  config, flags = command.parse(["prog", "--config=configs/pretrain/clip.py:micro", "--workdir=/tmp/w",
                                 "--config.total_steps=7", "--config.optimizer.name=sgd"])
  assert config.total_steps == 7 and config.optimizer.name == "sgd" and flags["workdir"] == "/tmp/w"


def test_a_failed_run_keeps_its_workdir_only_when_it_trained(tmp_path):
  """`remove_unused_workdir`: a run that failed before training leaves nothing; one that logged a step or wrote
  a checkpoint keeps its workdir (the logs say where it stopped)."""
  import os  # noqa: PLC0415
  from vlm_jax.cli import remove_unused_workdir  # noqa: PLC0415

  def workdir(name, files):
    d = tmp_path / name
    for rel, text in files.items():
      (d / rel).parent.mkdir(parents=True, exist_ok=True)
      (d / rel).write_text(text)
    return str(d)

  never = workdir("never", {"config.json": "{}", "metrics.jsonl": ""})
  logged = workdir("logged", {"config.json": "{}", "metrics.jsonl": '{"step": 1}\n'})
  saved = workdir("saved", {"checkpoints/2/state/x": ""})
  for d in (never, logged, saved):
    remove_unused_workdir(d)
  assert not os.path.exists(never) and os.path.exists(logged) and os.path.exists(saved)
