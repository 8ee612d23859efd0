"""Classification distillation: a small two-tower student trained with CLIP's contrastive loss plus the soft
cross-entropy to a large frozen teacher's image-text logits over the batch (knowledge distillation, Hinton et al.
2015; the CLIP form of open_clip's `DistillClipLoss`). A distillation run of task 'classification'
(`distill.run.distill` dispatches here).

  python -m vlm_jax.distill --config=configs/distill/clip_kd.py:tiny --workdir=DIR [--config.teacher.checkpoint=M]

    L = L_CLIP(S) + λ · κ² · ½ [ H(softmax_row(T/κ), softmax_row(S/κ)) + H(softmax_col(T/κ), softmax_col(S/κ)) ]

with S = t_S z^I z^Tᵀ the student's and T = t_T u^I u^Tᵀ the teacher's logits over the global batch
(`vlm_jax.objectives.distillation.clip_kd_loss`, registered 'clip_kd'; λ = config.objectives.clip_kd, κ =
config.objective_hparams.clip_kd.temperature).

The teacher (`teacher.load_teacher`: any vlm_jax run or converted CLIP directory) is frozen and is not part of the
student at all: `TeacherTargets` wraps the student's pre-training data stream and adds, per row, the teacher's
normalised image and text embeddings and its logit scale (`teacher_zimg`, `teacher_ztxt`, `teacher_logit_scale`),
computed by the teacher's own inference model on the same images (re-normalised, and resized, to the teacher's
transform) and the same captions (re-tokenised with the teacher's tokenizer when it differs). So the student's
checkpoints hold the student only, no gradient can reach the teacher, and resuming replays the same teacher targets
(the wrapped iterator's state is the pipeline's).

Beside the method, the baseline 'no_teacher' (`baselines`) trains the same student from the same initialisation on
the same data for the same steps with the CLIP loss alone (DIR/baselines/no_teacher), and the teacher is evaluated
with the same evaluators. Last stdout line / DIR/results.json: `zeroshot/top1` (the student), `no_teacher/zeroshot/
top1`, `teacher/zeroshot/top1` (and every other evaluator metric under the same prefixes).
"""

from __future__ import annotations

import json
import os

import grain
import ml_collections
import numpy as np

from vlm_jax import config_lib
from vlm_jax.errors import UserError

BASELINES = ("no_teacher",)
OBJECTIVE = "clip_kd"


def check(config) -> None:
  """Preflight of a classification-distillation config: the KD objective, its settings and the baselines."""
  weights = config_lib.plain(config.objectives)
  if OBJECTIVE not in weights:
    raise UserError(f"a classification distillation config needs objectives.{OBJECTIVE} (the KD weight λ; 0 is "
                    "plain CLIP training)")
  if float(weights[OBJECTIVE]) < 0:
    raise UserError(f"objectives.{OBJECTIVE} must be >= 0, got {weights[OBJECTIVE]}")
  hp = dict(config_lib.plain(config.get("objective_hparams") or {}).get(OBJECTIVE) or {})
  if float(hp.get("temperature", 1.0)) <= 0:
    raise UserError(f"objective_hparams.{OBJECTIVE}.temperature must be > 0, got {hp['temperature']}")
  if hp.get("kind", "soft_ce") not in ("soft_ce", "kl"):
    raise UserError(f"objective_hparams.{OBJECTIVE}.kind must be 'soft_ce' or 'kl', got {hp['kind']!r}")
  unknown = [b for b in config.get("baselines") or () if b not in BASELINES]
  if unknown:
    raise UserError(f"unknown baseline(s) {unknown}; available: {list(BASELINES)}")


class TeacherTargets(grain.DatasetIterator):
  """The student's training iterator with the frozen teacher's outputs added to every batch (module docstring).
  `targets(batch) -> {'teacher_zimg', 'teacher_ztxt', 'teacher_logit_scale'}`; state and stats are the parent's."""

  def __init__(self, parent, targets):
    super().__init__(parent)
    self._targets = targets

  def __next__(self) -> dict:
    batch = dict(next(self._parent))
    batch.update(self._targets(batch))
    return batch

  def stats(self) -> dict:
    return self._parent.stats() if hasattr(self._parent, "stats") else {}

  def get_state(self) -> dict:
    return self._parent.get_state()

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state)


def teacher_inputs(images: np.ndarray, student_data, teacher) -> np.ndarray:
  """Student-normalised images [B, S, S, 3] -> the teacher's input (its mean/std, its image size)."""
  from vlm_jax.distill.teacher import crop_and_resize  # noqa: PLC0415
  mean_s, std_s = np.asarray(student_data.mean, np.float32), np.asarray(student_data.std, np.float32)
  raw = np.asarray(images, np.float32) * std_s + mean_s  # [0, 1]
  size = int(teacher.image_size)
  if raw.shape[1] != size or raw.shape[2] != size:
    full = np.asarray([[0, 0, raw.shape[2], raw.shape[1]]], np.float32)
    raw = crop_and_resize(raw, np.repeat(full[None], len(raw), 0), size)[:, 0]
  return (raw - np.asarray(teacher.mean, np.float32)) / np.asarray(teacher.std, np.float32)


def make_targets(config, teacher, student_tokenizer):
  """fn(batch) -> the teacher's outputs of a student batch (its images and captions)."""
  same_tokens = config_lib.plain(config.tokenizer) == config_lib.plain(teacher.model.config.tokenizer)
  scale = np.float32(teacher.model.logit_scale)

  def targets(batch: dict) -> dict:
    text = batch["text"]
    if not same_tokens:  # the caption back from the student's tokens, in the teacher's
      text = teacher.model.tokenize([student_tokenizer.decode([int(t) for t in row if t]) for row in text])
    n = len(batch["image"])
    return {"teacher_zimg": teacher.model.encode_image(teacher_inputs(batch["image"], config.data, teacher)),
            "teacher_ztxt": teacher.model.encode_text(np.asarray(text)),
            "teacher_logit_scale": np.full((n,), scale, np.float32)}
  return targets


def baseline_config(config, name: str) -> ml_collections.ConfigDict:
  """'no_teacher': the method's config with λ = 0 (the CLIP loss alone), same student, data, seed and steps."""
  if name not in BASELINES:
    raise UserError(f"unknown baseline {name!r}; available: {list(BASELINES)}")
  c = ml_collections.ConfigDict(config_lib.plain(config))
  c.name = name
  c.objectives = ml_collections.ConfigDict({k: (0.0 if k == OBJECTIVE else v)
                                            for k, v in config_lib.plain(config.objectives).items()})
  return c


def train_one(config, workdir: str, *, teacher, quiet: bool) -> dict:
  """One loop run of the student into `workdir` (with the teacher's targets in every batch when `teacher` is
  given, whatever λ); its final metrics."""
  from vlm_jax import assembly  # noqa: PLC0415
  from vlm_jax.data import pipeline  # noqa: PLC0415
  from vlm_jax.evaluate import make_evaluators  # noqa: PLC0415
  from vlm_jax.train import loop  # noqa: PLC0415
  parts = assembly.assemble(config)
  targets = None if teacher is None else make_targets(config, teacher, parts.tokenizer)

  def make_data(process_index: int, process_count: int):
    it = pipeline.make_train_iterator(config.data, global_batch_size=config.batch_size, seed=config.seed,
                                      tokenizer=parts.tokenizer, process_index=process_index,
                                      process_count=process_count, quiet=quiet)
    return it if targets is None else TeacherTargets(it, targets)

  evaluators = make_evaluators(config.get("evals"), model=parts.model, tokenizer=parts.tokenizer,
                               data_config=config.data, plot_dir=os.path.join(workdir, "plots"))
  return loop.train(config, workdir, make_data=make_data, model=parts.model, loss_fn=parts.loss_fn,
                    evaluators=evaluators, quiet=quiet)


def teacher_metrics(config, teacher) -> dict:
  """The teacher's metrics under the student's evaluators (same held-out data, the teacher's own transform)."""
  from vlm_jax.evaluate import make_evaluators  # noqa: PLC0415
  data = ml_collections.ConfigDict(config_lib.plain(config.data))
  data.image_size, data.mean, data.std = int(teacher.image_size), tuple(teacher.mean), tuple(teacher.std)
  evaluators = make_evaluators(config.get("evals"), model=teacher.model.model, tokenizer=teacher.tokenizer,
                               data_config=data, plot_dir=None)
  out = {}
  for fn in evaluators.values():
    out.update(fn(teacher.model.variables))
  return out


def distill(config, workdir: str, *, quiet: bool = False) -> dict:
  """Runs (or resumes) the KD student and its baselines, evaluates the teacher; returns the merged metrics."""
  from vlm_jax.distill import teacher as teacher_lib  # noqa: PLC0415
  check(config)
  teacher = teacher_lib.load_teacher(config.teacher)
  d = config_lib.plain(config)
  d["teacher"]["checkpoint"] = teacher.path
  config = ml_collections.ConfigDict(d)
  result = {f"teacher/{k}": v for k, v in teacher_metrics(config, teacher).items()}
  for name in config.get("baselines") or ():
    metrics = train_one(baseline_config(config, name), os.path.join(workdir, "baselines", name), teacher=None,
                        quiet=quiet)
    result.update({f"{name}/{k}": v for k, v in metrics.items()
                   if "/" in k and not k.startswith(("train", "data/"))})
  metrics = train_one(config, workdir, teacher=teacher, quiet=quiet)
  result = {**metrics, **result}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"method": OBJECTIVE, **{k: v for k, v in result.items() if isinstance(v, (int, float, str))}}, f,
              indent=2, sort_keys=True)
  return result
