"""KgCoOp (Yao et al. 2023): CoOp's context ("a photo of a", M = 4) + λ·||w − w_clip||², λ = 8."""

from vlm_jax import config_lib


def get_config(arg=None):
  return config_lib.transfer_config(arg, {"name": "kgcoop", "n_ctx": 0, "init": "a photo of a",
                                          "class_specific": False, "position": "end", "init_std": 0.02,
                                          "weight": 8.0})
