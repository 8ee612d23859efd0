"""Evaluators inside pre-training (metrics.jsonl keys, plots) and the standalone `python -m vlm_jax.evaluate`
on a micro checkpoint: JSON last line, eval/<name>.json, one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import sys

import pytest

from tests import train_helpers as th
from vlm_jax import config_lib as cb

EVAL = [sys.executable, "-m", "vlm_jax.evaluate", "--config=configs/eval/synthetic.py:micro"]
KEYS = ["zeroshot/top1", "zeroshot/top5", "zeroshot/mean_per_class_recall", "zeroshot/seen_top1",
        "zeroshot/unseen_top1", *[f"retrieval/{d}_R@{k}" for d in ("image_to_text", "text_to_image")
                                  for k in (1, 5, 10)], "linear_probe/top1", "fewshot/1shot_top1",
        "fewshot/1shot_top1_std", "fewshot/2shot_top1"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A micro pre-training run with the micro evaluator set every 3 of its 6 steps."""
  from vlm_jax import runner
  workdir = str(tmp_path_factory.mktemp("eval_run"))
  config = th.micro_config(eval_every_steps=3)
  config.evals = cb.synthetic_evals("micro")
  runner.pretrain(config, workdir, quiet=True)
  return workdir


def test_evaluators_run_inside_pretraining(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    rows = [json.loads(ln) for ln in f if ln.strip()]
  evals = {r["step"]: r for r in rows if "zeroshot/top1" in r}
  assert sorted(evals) == [3, 6]
  for row in evals.values():
    missing = [k for k in KEYS if k not in row]
    assert not missing, missing
    assert all(0.0 <= row[k] <= 1.0 for k in KEYS)
  for png in ("zeroshot_confusion.png", "retrieval_synthetic_top.png", "linear_probe_l2.png"):
    assert os.path.getsize(os.path.join(run_dir, "plots", png)) > 1000, png


def _last_json(stdout: str) -> dict:
  lines = [ln for ln in stdout.splitlines() if ln.strip()]
  assert lines, stdout
  return json.loads(lines[-1])


def test_standalone_on_a_workdir(run_dir):
  r = th.run_cli([*EVAL, f"--workdir={run_dir}"], timeout=400)
  assert r.returncode == 0, r.stderr[-3000:]
  metrics = _last_json(r.stdout)
  assert metrics["step"] == 6 and all(k in metrics for k in KEYS + ["zeroshot/mean_average_precision"])
  with open(os.path.join(run_dir, "eval", "synthetic.json")) as f:
    saved = json.load(f)
  assert {k: saved[k] for k in metrics} == metrics
  assert "zeroshot: " in r.stdout  # the human summary above the JSON line


def test_standalone_on_a_step_folder_writes_to_workdir(run_dir, tmp_path):
  out = tmp_path / "out"
  r = th.run_cli([*EVAL, f"--checkpoint={run_dir}/checkpoints/6", f"--workdir={out}",
                  "--config.evals.fewshot.shots=(1,)", "--config.evals.zeroshot.multilabel_images=0"], timeout=400)
  assert r.returncode == 0, r.stderr[-3000:]
  metrics = _last_json(r.stdout)
  assert "fewshot/2shot_top1" not in metrics and "zeroshot/mean_average_precision" not in metrics
  assert (out / "eval" / "synthetic.json").exists() and (out / "plots" / "zeroshot_confusion.png").exists()


def _assert_user_error(r, fragment: str):
  assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
  lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
  assert lines[-1].startswith("error: ") and fragment in lines[-1], lines[-1]
  assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args,fragment", [
    ([], "--workdir"),
    (["--checkpoint=/nonexistent/run"], "does not exist"),
    (["--workdir={tmp}"], "no vlm_jax checkpoint"),
    (["--workdir={run}", "--config.evals.zeroshot.kind=nosuch"], "unknown evaluator kind"),
    (["--workdir={run}", "--config.evals.retrieval.nosuch=1"], "nosuch"),
])
def test_bad_input_exits_2_with_one_line(run_dir, tmp_path, args, fragment):
  args = [a.format(tmp=tmp_path, run=run_dir) for a in args]
  _assert_user_error(th.run_cli([*EVAL, *args], timeout=300), fragment)
