"""Fault 7: malformed configs and flags at every entry point (pretrain, transfer, distill, evaluate, convert).

Each case must end in exactly one `error: …` line on stderr (the last one), exit code 2, no traceback, and nothing
written: the workdir (for convert: --output) does not exist afterwards, or is unchanged when it existed. Most
cases run in-process through the function `python -m …` runs (`pretrain.run`, `transfer.__main__.run`,
`distill.__main__.run`, `evaluate.cli.run`, `convert.convert`; same parse, pre-flight checks and run); a handful
(`test_subprocess_*`, marked `faults`) run the real command lines. `vlm_jax.inference` has no command line.
Each case prints one row `case | entry point | error line` (visible with `-s` or `-n 0`).
"""

from __future__ import annotations

import os
import sys

import pytest

from tests import train_helpers as th

P = ["--config=configs/pretrain/clip.py:micro"]
LIT = ["--config=configs/pretrain/lit.py:micro"]
T = ["--config=configs/transfer/coop.py:tiny"]
D = ["--config=configs/distill/vild.py:micro"]
E = ["--config=configs/eval/synthetic.py:micro"]
W = "--workdir={w}"

# (case id, entry point, argv after the program name, fragment of the error line). Placeholders: {w} the workdir
# (or --output), {file} a regular file, {empty} an empty directory, {fake} a run directory whose only step
# folder holds an empty `state` (found, not readable), {tmp} the test's temporary directory.
CASES = [
    # --- pre-training: keys, types, sizes
    ("unknown key", "pretrain", [*P, W, "--config.no_such_key=1"], "unknown config key 'no_such_key'"),
    ("unknown nested key", "pretrain", [*P, W, "--config.optimizer.nosuch=1"], "nosuch"),
    ("wrong type (str for int)", "pretrain", [*P, W, "--config.batch_size=abc"], "batch_size"),
    ("wrong type (float for int)", "pretrain", [*P, W, "--config.total_steps=1.5"], "total_steps"),
    ("wrong type (bool)", "pretrain", [*P, W, "--config.checkpoint_frozen=maybe"], "checkpoint_frozen"),
    ("negative batch", "pretrain", [*P, W, "--config.batch_size=-16"], "batch_size=-16"),
    ("zero batch", "pretrain", [*P, W, "--config.batch_size=0"], "batch_size=0"),
    ("negative steps", "pretrain", [*P, W, "--config.total_steps=-5"], "total_steps=-5"),
    ("negative data image size", "pretrain", [*P, W, "--config.data.image_size=-16"], "image_size"),
    ("negative model image size", "pretrain", [*P, W, "--config.model.image.image_size=-16"], "image_size"),
    ("zero checkpoint interval", "pretrain", [*P, W, "--config.checkpoint_every_steps=0"], "checkpoint_every_steps"),
    ("negative keep_checkpoints", "pretrain", [*P, W, "--config.keep_checkpoints=-1"], "keep_checkpoints"),
    ("negative eval interval", "pretrain", [*P, W, "--config.eval_every_steps=-3"], "eval_every_steps"),
    ("negative learning rate", "pretrain", [*P, W, "--config.optimizer.lr=-1"], "optimizer.lr"),
    # --- pre-training: mesh and batch
    ("mesh does not divide devices", "pretrain", [*P, W, "--config.mesh.model=3"], "mesh"),
    ("mesh larger than devices", "pretrain", [*P, W, "--config.mesh.data=16"], "devices"),
    ("mesh axis of size 0", "pretrain", [*P, W, "--config.mesh.fsdp=0"], "mesh"),
    ("batch not divisible by mesh", "pretrain", [*P, W, "--config.batch_size=12"], "not divisible"),
    ("grad accumulation splits batch badly", "pretrain", [*P, W, "--config.optimizer.grad_accum_steps=3"],
     "not divisible"),
    # --- pre-training: data, names
    ("shard pattern with no matches", "pretrain",
     [*P, W, "--config.data.name=shards", "--config.data.shards={tmp}/nosuch/*.tar"], "no shard matches"),
    ("unknown data source", "pretrain", [*P, W, "--config.data.name=nosuch"], "unknown data source"),
    ("unknown tokenizer", "pretrain", [*P, W, "--config.tokenizer.name=nosuch"], "nosuch"),
    ("unknown model kind", "pretrain", [*P, W, "--config.model.image.kind=nosuch"], "nosuch"),
    ("unknown model variant", "pretrain", [*P, W, "--config.model.image.variant=Z/16"], "Z/16"),
    ("unknown objective implementation", "pretrain", [*P, W, "--config.objective_hparams.clip.impl=nosuch"],
     "nosuch"),
    ("unknown optimizer", "pretrain", [*P, W, "--config.optimizer.name=lion"], "lion"),
    ("loss-spike factor that would skip most steps", "pretrain", [*P, W, "--config.loss_spike_factor=0.5"],
     "loss_spike_factor"),
    ("unknown lr schedule", "pretrain", [*P, W, "--config.optimizer.schedule=nosuch"], "nosuch"),
    # --- pre-training: init checkpoints, freezing
    ("init checkpoint does not exist", "pretrain", [*P, W, "--config.init.checkpoint={tmp}/nosuch"],
     "does not exist"),
    ("init checkpoint is a file", "pretrain", [*P, W, "--config.init.checkpoint={file}"], "does not exist"),
    ("init checkpoint dir holds no checkpoint", "pretrain", [*P, W, "--config.init.checkpoint={empty}"],
     "no vlm_jax checkpoint"),
    ("init checkpoint unreadable", "pretrain", [*LIT, W, "--config.init.checkpoint={fake}"], "{fake}"),
    ("LiT without an init checkpoint", "pretrain", [*LIT, W], "init.checkpoint"),
    ("frozen regex invalid", "pretrain", [*P, W, "--config.frozen=[unclosed"], "regular expression"),
    ("frozen everything (nothing trainable)", "pretrain", [*P, W, "--config.frozen=.*"], "nothing would train"),
    ("frozen regex matches nothing", "pretrain", [*P, W, "--config.frozen=^nosuch/"], "matches no parameter"),
    # --- pre-training: config file, preset, flags, workdir
    ("bad config file path", "pretrain", ["--config=configs/pretrain/missing.py:tiny", W], "does not exist"),
    ("config file without get_config", "pretrain", ["--config=vlm_jax/errors.py", W], "config"),
    ("unknown preset variant", "pretrain", ["--config=configs/pretrain/clip.py:nosuchvariant", W],
     "unknown variant"),
    *[(f"unknown preset variant of {f}", "pretrain", [f"--config=configs/pretrain/{f}.py:nosuchvariant", W],
       "unknown variant") for f in ("cappa", "clippo", "coca", "flava", "mae")],
    ("unknown preset key", "pretrain", ["--config=configs/pretrain/clip.py:nosuch=1", W], "unknown config argument"),
    ("preset value of wrong type", "pretrain", ["--config=configs/pretrain/clip.py:res=abc", W], "res"),
    ("missing --config", "pretrain", [W], "--config"),
    ("missing --workdir", "pretrain", [*P], "--workdir"),
    ("unknown flag", "pretrain", [*P, W, "--nosuch=1"], "nosuch"),
    ("workdir under a file", "pretrain", [*P, "--workdir={file}/sub"], "not writable"),
    # --- transfer
    ("unknown method", "transfer", [*T, W, "--config.method.name=nosuch"], "unknown transfer method"),
    ("unknown protocol", "transfer", [*T, W, "--config.protocol=nosuch"], "unknown protocol"),
    ("unknown selection", "transfer", [*T, W, "--config.select=nosuch"], "select"),
    ("negative shots", "transfer", [*T, W, "--config.shots=-1"], "shots=-1"),
    ("zero shots", "transfer", [*T, W, "--config.shots=0"], "shots=0"),
    ("negative epochs", "transfer", [*T, W, "--config.epochs=-1"], "epochs=-1"),
    ("negative batch", "transfer", [*T, W, "--config.batch_size=-4"], "batch_size=-4"),
    ("mesh does not divide devices", "transfer", [*T, W, "--config.mesh.model=3"], "mesh"),
    ("unknown key", "transfer", [*T, W, "--config.method.nosuch=1"], "nosuch"),
    ("default base model missing", "transfer", [*T, W], "make demo"),
    ("base checkpoint does not exist", "transfer", [*T, W, "--config.init.checkpoint={tmp}/nosuch"], "not found"),
    ("base checkpoint dir holds no checkpoint", "transfer", [*T, W, "--config.init.checkpoint={empty}"],
     "no vlm_jax checkpoint"),
    ("full variant without a base", "transfer", ["--config=configs/transfer/coop.py:full", W], "no base model"),
    ("unknown preset variant", "transfer", ["--config=configs/transfer/coop.py:nosuch", W], "unknown transfer variant"),
    ("missing --workdir", "transfer", [*T], "--workdir"),
    # --- distillation
    ("unknown method preset", "distill", ["--config=configs/distill/vild.py:micro,method=nosuch", W], "nosuch"),
    ("unknown preset variant", "distill", ["--config=configs/distill/vild.py:nosuch", W], "unknown variant"),
    ("default teacher missing", "distill", [*D, W], "make demo"),
    ("teacher does not exist", "distill", [*D, W, "--config.teacher.checkpoint={tmp}/nosuch"], "nosuch"),
    ("unknown proposals kind", "distill", [*D, W, "--config.proposals.kind=nosuch"], "proposals.kind"),
    ("rpn proposals without their baseline", "distill",
     [*D, W, "--config.proposals.kind=rpn", "--config.baselines=()"], "closed_set"),
    ("unknown pseudo-box scorer", "distill", [*D, W, "--config.pseudo_boxes.scorer=nosuch"], "scorer"),
    ("detpro fg_fraction out of range", "distill", [*D, W, "--config.method.detpro.enabled=True",
                                                    "--config.method.detpro.fg_fraction=1.5"], "fg_fraction"),
    ("detpro without the crop cache", "distill",
     ["--config=configs/distill/vild.py:micro,method=vild_text", W, "--config.method.detpro.enabled=True"],
     "image_weight"),
    ("negative batch", "distill", [*D, W, "--config.batch_size=-8"], "batch_size=-8"),
    ("negative steps", "distill", [*D, W, "--config.total_steps=-1"], "total_steps=-1"),
    ("zero image size", "distill", [*D, W, "--config.data.image_size=0"], "image_size"),
    ("batch not divisible by mesh", "distill", [*D, W, "--config.batch_size=12"], "not divisible"),
    ("missing --workdir", "distill", [*D], "--workdir"),
    # --- standalone evaluation
    ("neither --workdir nor --checkpoint", "evaluate", [*E], "--workdir"),
    ("checkpoint does not exist", "evaluate", [*E, "--checkpoint={tmp}/nosuch", W], "does not exist"),
    ("checkpoint is a file", "evaluate", [*E, "--checkpoint={file}", W], "does not exist"),
    ("checkpoint dir holds no checkpoint", "evaluate", [*E, "--checkpoint={empty}", W], "no vlm_jax checkpoint"),
    ("checkpoint unreadable", "evaluate", [*E, "--checkpoint={fake}", W], "{fake}"),
    ("unknown evaluator kind", "evaluate", [*E, "--checkpoint={fake}", W, "--config.evals.zeroshot.kind=nosuch"],
     "unknown evaluator kind"),
    ("mesh does not divide devices", "evaluate", [*E, "--checkpoint={fake}", W, "--config.mesh.model=3"], "mesh"),
    ("output under a file", "evaluate", [*E, "--checkpoint={fake}", "--workdir={file}/sub"], "not writable"),
    ("unknown preset variant", "evaluate", ["--config=configs/eval/synthetic.py:nosuch", "--checkpoint={fake}", W],
     "nosuch"),
    ("bad config file path", "evaluate", ["--config=configs/eval/missing.py", "--checkpoint={fake}", W],
     "does not exist"),
    ("unknown key", "evaluate", [*E, "--checkpoint={fake}", W, "--config.nosuch=1"], "nosuch"),
    # --- weight conversion (the workdir is --output)
    ("no arguments", "convert", [], "--source"),
    ("both --source and --to", "convert", ["--source=hf", "--to=hf", "--input={fake}", "--output={w}"], "not both"),
    ("unknown source format", "convert", ["--source=nosuch", "--input={fake}", "--output={w}"], "nosuch"),
    ("input does not exist", "convert", ["--source=open_clip", "--input={tmp}/nosuch.pt", "--output={w}"],
     "does not exist"),
    ("missing --output", "convert", ["--source=hf", "--input={fake}"], "--output"),
    ("negative image size", "convert", ["--source=hf", "--input={fake}", "--output={w}", "--image_size=-3"],
     "image_size"),
    ("image size not an integer", "convert", ["--source=hf", "--input={fake}", "--output={w}", "--image_size=abc"],
     "image_size"),
    ("tokenizer file does not exist", "convert",
     ["--source=hf", "--input={fake}", "--output={w}", "--tokenizer_file={tmp}/spiece.model"], "does not exist"),
    ("import-only flag on export", "convert", ["--to=hf", "--input={fake}", "--output={w}", "--arch=RN50"],
     "only apply to an import"),
    ("export from a dir without checkpoint", "convert", ["--to=hf", "--input={empty}", "--output={w}"],
     "no vlm_jax checkpoint"),
    ("unknown flag", "convert", ["--nosuch"], "nosuch"),
]


def _entry(name: str):
  """The in-process function of entry point `name`, taking the argv `python -m …` would see."""
  if name == "pretrain":
    from vlm_jax import pretrain  # noqa: PLC0415
    return lambda argv: pretrain.run(["vlm_jax.pretrain", *argv])
  if name == "transfer":
    from vlm_jax.transfer import __main__ as transfer  # noqa: PLC0415
    return lambda argv: transfer.run(["vlm_jax.transfer", *argv])
  if name == "distill":
    from vlm_jax.distill import __main__ as distill  # noqa: PLC0415
    return lambda argv: distill.run(["vlm_jax.distill", *argv])
  if name == "evaluate":
    from vlm_jax.evaluate import cli  # noqa: PLC0415
    return lambda argv: cli.run(["vlm_jax.evaluate", *argv])
  from vlm_jax import convert  # noqa: PLC0415
  return convert.convert


@pytest.fixture
def places(tmp_path) -> dict:
  """The placeholders of CASES, created in tmp_path (the workdir itself is not)."""
  file = tmp_path / "a_file"
  file.write_text("not a checkpoint")
  (tmp_path / "empty").mkdir()
  (tmp_path / "fake" / "checkpoints" / "1" / "state").mkdir(parents=True)
  return {"w": str(tmp_path / "w"), "file": str(file), "empty": str(tmp_path / "empty"),
          "fake": str(tmp_path / "fake"), "tmp": str(tmp_path)}


def _fill(items: list[str], places: dict) -> list[str]:
  return [a.format(**places) for a in items]


def _check(code, stderr: str, fragment: str) -> str:
  """Exit code 2, one `error:` line (the last line of stderr) containing `fragment`, no traceback."""
  lines = [ln for ln in stderr.splitlines() if ln.strip()]
  errors = [ln for ln in lines if ln.startswith("error: ")]
  assert code == 2, (code, stderr[-2000:])
  assert "Traceback" not in stderr, stderr[-2000:]
  assert len(errors) == 1 and lines[-1] == errors[0], lines[-10:]
  assert fragment in errors[0], (fragment, errors[0])
  return errors[0]


def _row(case: str, entry: str, line: str) -> str:
  return f"| {case} | {entry} | `{line[:150]}` |"


@pytest.mark.parametrize("case,entry,argv,fragment", CASES, ids=[f"{e}:{c}" for c, e, _, _ in CASES])
def test_malformed_input_exits_2_with_one_line(case, entry, argv, fragment, places, capsys):
  argv, fragment = _fill(argv, places), fragment.format(**places)
  fn = _entry(entry)
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    fn(argv)
  line = _check(e.value.code, capsys.readouterr().err, fragment)
  assert not os.path.exists(places["w"]), os.listdir(places["w"])
  with capsys.disabled():
    print("\n" + _row(case, entry, line), end="")


@pytest.mark.parametrize("entry,argv", [
    ("pretrain", [*P, W, "--config.mesh.model=3"]),
    ("pretrain", [*P, W, "--config.frozen=.*"]),  # found only once the model is built: the run's own check
    ("evaluate", [*E, "--checkpoint={fake}", W, "--config.evals.zeroshot.kind=nosuch"]),
    ("convert", ["--source=hf", "--input={fake}", "--output={w}"]),  # a non-empty --output is the mistake
])
def test_existing_workdir_is_left_unchanged(entry, argv, places, capsys):
  """A workdir that existed (holding a file) is the same afterwards: no config.json, logs or folders added."""
  os.makedirs(places["w"])
  with open(os.path.join(places["w"], "notes.txt"), "w") as f:
    f.write("mine")
  with pytest.raises(SystemExit) as e:
    _entry(entry)(_fill(argv, places))
  _check(e.value.code, capsys.readouterr().err, "")
  assert sorted(os.listdir(places["w"])) == ["notes.txt"]


# one real command line per entry point (the in-process cases above share their code path)
SUBPROCESS = [
    ("pretrain", [*P, W, "--config.mesh.model=3"], "mesh"),
    ("pretrain", ["--config=configs/pretrain/clip.py:nosuchvariant", W], "unknown variant"),
    ("transfer", [*T, W, "--config.method.name=nosuch"], "unknown transfer method"),
    ("distill", [*D, W, "--config.proposals.kind=nosuch"], "proposals.kind"),
    ("evaluate", [*E, "--checkpoint={tmp}/nosuch", W], "does not exist"),
    ("convert", ["--source=open_clip", "--input={tmp}/nosuch.pt", "--output={w}"], "does not exist"),
]


@pytest.mark.faults
@pytest.mark.parametrize("entry,argv,fragment", SUBPROCESS, ids=[f"{e}:{a[-1]}" for e, a, _ in SUBPROCESS])
def test_subprocess_exits_2_with_one_line(entry, argv, fragment, places):
  r = th.run_cli([sys.executable, "-m", f"vlm_jax.{entry}", *_fill(argv, places)], timeout=300)
  _check(r.returncode, r.stderr, fragment)
  assert not os.path.exists(places["w"])
