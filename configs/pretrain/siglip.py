"""SigLIP pre-training (Zhai et al. 2023): pairwise sigmoid loss with learned temperature and bias.

  --config=configs/pretrain/siglip.py:tiny                         the embedded synthetic default (CPU)
  --config=configs/pretrain/siglip.py:img=B/16,txt=B,res=224       SigLIP B/16 (MAP head, t=10, b=-10 at init)

Temperature: t = exp(t') is left unclamped (`model.max_log_logit_scale = None`), as in the paper's big_vision
code (`out["t"] = jnp.exp(t)`), not clamped at ln 100 as open_clip clamps every model. Why: the sigmoid loss's
learned bias b, not a cap on t, keeps the many negative logits in range; released SigLIP checkpoints carry
t > 100 (about 110–120), and a converted one (`vlm_jax.interop`, also unclamped) must score as trained. Set
`--config.model.max_log_logit_scale=4.605` for open_clip's clamp.
"""

from vlm_jax import config_lib as cb


def get_config(arg: str = "tiny"):
  c, a = cb.two_tower(arg, embed=768)
  c.objectives = {"siglip": 1.0}
  c.objective_hparams = {"siglip": {"impl": "dense"}}  # "ring": memory-linear in the batch (Inf-CL)
  c.model.logit_scale_init = cb.SIGLIP_LOGIT_SCALE_INIT
  c.model.logit_bias_init = cb.SIGLIP_LOGIT_BIAS_INIT
  c.model.max_log_logit_scale = None     # unclamped t, as big_vision's SigLIP (see the docstring)
  if a.variant != "tiny":
    c.model.image.pool_type = "map"       # SigLIP's image tower pools with a MAP head
    c.model.image.patch_bias = True
    c.optimizer.lr, c.optimizer.weight_decay, c.optimizer.b2 = 1e-3, 1e-4, 0.95
  return c
