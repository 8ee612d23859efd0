"""Classification distillation (knowledge distillation, Hinton et al. 2015; open_clip's DistillClipLoss): a small
two-tower student trained with the CLIP loss plus the soft cross-entropy to a large frozen teacher's image-text
logits over the batch,  L = L_CLIP(S) + λ κ² ½ [H(σ_row(T/κ), σ_row(S/κ)) + H(σ_col(T/κ), σ_col(S/κ))].

  python -m vlm_jax.distill --config=configs/distill/clip_kd.py:tiny --workdir=DIR [--config.teacher.checkpoint=M]

Student: a one-block conv-stem ViT (width 64) + a one-block text transformer (width 32), joint dimension 64, on
the synthetic pre-training data; teacher: any vlm_jax run or converted model (default workdirs/demo, `make demo`).
Baseline 'no_teacher': the same student, seed, data and steps with λ = 0. `micro`: seconds, for tests.
Arguments: variant (tiny|micro), teacher (its directory). See vlm_jax/distill/classification.py.
"""

import ml_collections

from vlm_jax import config_lib as cb


def get_config(arg=None):
  a = cb.parse_arg(arg, variants=("tiny", "micro"), variant="tiny", teacher="workdirs/demo")
  c, _ = cb.two_tower("micro" if a.variant == "micro" else "tiny")
  c.task = "classification"
  c.name = "clip_kd"
  c.teacher = ml_collections.ConfigDict({"checkpoint": a.teacher, "templates": "synthetic", "batch_size": 256})
  c.objectives = {"clip": 1.0, "clip_kd": 1.0}  # λ = 1 as open_clip; 0 is plain CLIP training
  c.objective_hparams = {"clip": {"impl": "dense"}, "clip_kd": {"temperature": 1.0, "kind": "soft_ce"}}
  c.baselines = ("no_teacher",)
  if a.variant == "tiny":
    c.model.image = {"kind": "vit", "variant": "mu/4", "image_size": 32, "pool_type": "gap", "stem": "conv",
                     "width": 64, "depth": 1, "num_heads": 2, "mlp_dim": 128}
    c.model.text = {"kind": "text", "variant": "tiny", "width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64}
    c.data.synthetic = {"num_train": 32768, "shard_size": 4096}  # the pre-training fixtures' data
    c.batch_size, c.total_steps, c.log_every_steps = 128, 300, 50
    c.eval_every_steps, c.checkpoint_every_steps = 0, 100
    c.optimizer.warmup_steps = 30
    c.evals = {"zeroshot": {"kind": "zeroshot_synthetic", "plots": False}}
  else:  # micro
    c.evals = {"zeroshot": {"kind": "zeroshot_synthetic", "plots": False}}
  return c
