"""LP-FT (Kumar et al. 2022): a linear probe, then full fine-tuning from that head.

  python -m vlm_jax.transfer --config=configs/transfer/lp_ft.py:tiny --workdir=DIR [--config.init.checkpoint=MODEL]

Step 1 is the evaluation suite's L-BFGS probe (`vlm_jax.evaluate.linear_probe`) on the base's image embeddings of
the k-shot training images, its L2 penalty chosen on the k-shot validation split (`method.l2_grid`); step 2 is
fine-tuning (configs/transfer/finetune.py's recipe) from it. DIR is a full model, as for fine-tuning.
"""

from vlm_jax import config_lib

L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # the evaluation suite's grid (linear_probe.L2_GRID)


def get_config(arg=None):
  return config_lib.finetune_config(arg, {"name": "lp_ft", "l2_grid": L2_GRID})
