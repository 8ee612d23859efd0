"""Multi-teacher MaskCLIP+ (`vlm_jax/distill/multi_teacher.py`): several frozen teachers' MaskCLIP pseudo-labels train
one student segmenter with a projection head per teacher (head k classifies against teacher k's fixed class text
embeddings),  L = Σ_x Σ_k w_k(x) · CE(ℓ_k(x), ŷ_k(x)),  w fixed (π) or per-pixel confidence weights
w_k(x) = π_k exp(c_k(x)/T) / Σ_j π_j exp(c_j(x)/T).

  python -m vlm_jax.distill --config=configs/distill/multi_teacher.py:tiny --workdir=DIR \
      --config.teacher.checkpoints='("RUN_A", "RUN_B")' [--config.method.weighting=confidence] \
      [--config.method.teacher_weights='(2.0, 1.0)'] [--config.method.single_baselines=False]

Teachers: any vlm_jax runs or converted CLIP/SigLIP directories that can name the same classes; default the demo run
(`make demo`) and a second pre-training run, e.g. `python -m vlm_jax.pretrain --config=configs/pretrain/siglip.py:tiny
--workdir=workdirs/demo_siglip`. The student's backbone is the first teacher's image tower (frozen, by reference).
Key smoothing is off (it needs a ResNet teacher's attention-pool keys; a ViT teacher cannot supply them).
`single_baselines`: the same student trained on each teacher alone for the same steps (`single_k/…`). `tiny`:
synthetic scenes at 64 px; `micro`: seconds, for tests. Shared keys: `vlm_jax.config_lib.segmentation_distill_config`.
"""

from vlm_jax import config_lib as cb


def get_config(arg=None):
  a = cb.parse_arg(arg, variant="tiny")
  c = cb.segmentation_distill_config("multi_teacher", a.variant, "workdirs/demo")
  c.teacher.checkpoints = ("workdirs/demo", "workdirs/demo_siglip")  # teacher 1 gives the student's backbone
  c.method.weighting = "fixed"              # 'fixed' (w = π) or 'confidence' (per-pixel softmax of c_k / T, prior π)
  c.method.teacher_weights = (1.0, 1.0)     # π, one non-negative weight per teacher (normalised)
  c.method.weight_temperature = 0.1         # T of the confidence weighting (c_k ∈ [0, 1])
  c.method.single_baselines = True          # also train the student on each teacher alone (single_k/…)
  c.method.key_smoothing = False            # needs a ResNet teacher's keys; the default pair may hold a ViT
  if a.variant == "tiny":
    c.total_steps = 300                     # × (1 + K) trainings with the single-teacher baselines: ~15 min on CPU
  return c
