"""Knowledge distillation of a two-tower student from a frozen teacher's image-text logits (Hinton et al. 2015,
"Distilling the Knowledge in a Neural Network"; the CLIP form of open_clip's `DistillClipLoss`).

Over a global batch of B pairs the student's logits S and the frozen teacher's logits T are

    S_ij = t_S · z^I_i · z^T_j              (student: outputs 'zimg', 'ztxt', 'logit_scale')
    T_ij = t_T · u^I_i · u^T_j              (teacher: batch 'teacher_zimg', 'teacher_ztxt', 'teacher_logit_scale')

and the distillation term is the soft cross-entropy of the student's softmax against the teacher's, in both
directions (rows: image → text, columns: text → image), at the KD temperature κ (Hinton et al. 2015, Eq. 2: the
gradient of the softened term scales as 1/κ², so the term is multiplied by κ²):

    L_KD = κ² · ½ [ (1/B) Σ_i H(softmax_j(T_i·/κ), softmax_j(S_i·/κ)) + (1/B) Σ_j H(softmax_i(T_·j/κ), softmax_i(S_·j/κ)) ]
    H(p, q) = −Σ_k p_k log q_k                                     (`kind='soft_ce'`, open_clip's `dist_loss`)
    KL(p ‖ q) = H(p, q) − H(p, p)                                  (`kind='kl'`: the same gradient, 0 at S = T)

The training objective of classification distillation is `{'clip': 1, 'clip_kd': λ}`: L = L_CLIP + λ · L_KD
(open_clip adds both with weight 1). The teacher never enters the student's parameters: its normalised embeddings
and its logit scale are part of the batch (computed outside the step by the frozen teacher,
`vlm_jax.distill.classification`), so no gradient reaches it. `teacher_logit_scale` is a per-row copy of the
teacher's scalar t_T (every row holds the same value), so it shards with the batch; row i of T uses t_T of row i.
Logits follow `contrastive.similarity_logits` (float32, HIGHEST precision, rows sharded over `mesh_axes`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from vlm_jax.errors import UserError
from vlm_jax.objectives.contrastive import constrain_rows, similarity_logits
from vlm_jax.objectives.ring import f32

KINDS = ("soft_ce", "kl")
TEACHER_KEYS = ("teacher_zimg", "teacher_ztxt", "teacher_logit_scale")


def _soft_ce(teacher_logits: jax.Array, student_logits: jax.Array, axis: int, kind: str) -> jax.Array:
  """Per anchor along `axis`: H(softmax(T), softmax(S)) (soft_ce) or KL(softmax(T) ‖ softmax(S)) (kl)."""
  log_p = jax.nn.log_softmax(teacher_logits, axis=axis)
  log_q = jax.nn.log_softmax(student_logits, axis=axis)
  p = jnp.exp(log_p)
  out = -jnp.sum(p * log_q, axis=axis)
  if kind == "kl":
    out = out + jnp.sum(p * log_p, axis=axis)
  return out


def clip_kd_loss(outputs: Mapping[str, Any], batch: Mapping[str, Any], *,
                 mesh_axes: str | Sequence[str] | None = None, temperature: float = 1.0,
                 kind: str = "soft_ce") -> tuple[jax.Array, dict[str, jax.Array]]:
  """L_KD of the module docstring (κ = `temperature`, `kind` 'soft_ce' or 'kl'). Metrics: 'clip_kd/loss',
  'clip_kd/agreement' (fraction of image rows whose student and teacher argmax agree), 'clip_kd/teacher_scale'."""
  if kind not in KINDS:
    raise UserError(f"clip_kd kind must be one of {list(KINDS)}, got {kind!r}")
  if float(temperature) <= 0:
    raise UserError(f"clip_kd temperature must be > 0, got {temperature}")
  missing = [k for k in TEACHER_KEYS if k not in batch]
  if missing:
    raise UserError(f"the 'clip_kd' objective needs the teacher's outputs {missing} in the batch: train it through "
                    "`python -m vlm_jax.distill` with configs/distill/clip_kd.py (it adds them)")
  kappa = float(temperature)
  student = similarity_logits(outputs["zimg"], outputs["ztxt"], outputs["logit_scale"], mesh_axes=mesh_axes)
  t_rows = jax.lax.stop_gradient(f32(batch["teacher_logit_scale"]).reshape(-1, 1))
  teacher = jax.lax.stop_gradient(similarity_logits(batch["teacher_zimg"], batch["teacher_ztxt"], 1.0,
                                                    mesh_axes=mesh_axes))
  teacher = constrain_rows(t_rows * teacher, mesh_axes)
  s, t = student / kappa, teacher / kappa
  loss_i2t = jnp.mean(_soft_ce(t, s, axis=1, kind=kind))
  loss_t2i = jnp.mean(_soft_ce(t, s, axis=0, kind=kind))
  loss = kappa ** 2 * 0.5 * (loss_i2t + loss_t2i)
  agree = jnp.mean((jnp.argmax(student, axis=1) == jnp.argmax(teacher, axis=1)).astype(jnp.float32))
  return loss, {"clip_kd/loss": loss, "clip_kd/agreement": jax.lax.stop_gradient(agree),
                "clip_kd/teacher_scale": jnp.mean(t_rows)}
