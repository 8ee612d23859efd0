"""Tip-Adapter-F (Zhang et al. 2022): Tip-Adapter's cache keys fine-tuned by the training loop; α and β searched on
the k-shot validation split before training and again after it.

  python -m vlm_jax.transfer --config=configs/transfer/tip_adapter_f.py:tiny --workdir=DIR [--config.init.checkpoint=MODEL]

Recipe of the reference: AdamW lr 1e-3, eps 1e-4, weight decay 0.01 (PyTorch's default) on the keys, cosine
schedule without warmup, batch 256, 20 epochs.
"""

from vlm_jax import config_lib


def get_config(arg=None):
  return config_lib.transfer_config(arg, {
      "name": "tip_adapter_f", "class_specific": True, "augment_passes": 10, "augment_seed": 0,
      "alpha_range": (0.1, 3.0, 20), "beta_range": (0.1, 7.0, 200)},
      epochs=20, warmup_epochs=0, batch_size=256, optimizer={
          "name": "adamw", "lr": 1e-3, "b1": 0.9, "b2": 0.999, "eps": 1e-4, "weight_decay": 0.01,
          "wd_mask": r"(^|/)keys$", "clip_norm": 0.0, "schedule": "cosine", "warmup": "constant",
          "warmup_lr": 1e-5, "warmup_steps": 0, "end_factor": 0.0, "grad_accum_steps": 1})
