"""CoCoOp (Zhou et al. 2022, CVPR): M = 4 context vectors from "a photo of a" plus the meta-net bias.

The paper trains 10 epochs at batch 1 (SGD 2e-3); images are batched here (batch 8) and the classes chunked
(`method.class_chunk`, prompts per text-tower call = batch × class_chunk; 0 = all classes at once).
"""

from vlm_jax import config_lib


def get_config(arg=None):
  c = config_lib.transfer_config(arg, {"name": "cocoop", "n_ctx": 0, "init": "a photo of a",
                                       "class_specific": False, "position": "end", "init_std": 0.02,
                                       "class_chunk": 16, "meta_hidden": 0})
  c.batch_size = 8
  c.optimizer.wd_mask = r"(^|/)(ctx|kernel)$"
  return c
