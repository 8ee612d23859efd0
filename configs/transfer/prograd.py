"""ProGrad (Zhu et al. 2023): CoOp's context ("a photo of a", M = 4), the cross-entropy gradient projected away
from the KL-to-zero-shot gradient when they conflict (λ = 1, KL temperature 1)."""

from vlm_jax import config_lib


def get_config(arg=None):
  return config_lib.transfer_config(arg, {"name": "prograd", "n_ctx": 0, "init": "a photo of a",
                                          "class_specific": False, "position": "end", "init_std": 0.02,
                                          "lam": 1.0, "temperature": 1.0})
