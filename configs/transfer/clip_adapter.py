"""CLIP-Adapter (Gao et al. 2021): a bottleneck adapter c → c/4 → c (ReLU, no bias) blended into the frozen image
(and/or text) features with residual ratio r; trained at method.ratio, r then chosen on the k-shot validation
split among method.ratio_grid.

  python -m vlm_jax.transfer --config=configs/transfer/clip_adapter.py:tiny --workdir=DIR [--config.init.checkpoint=MODEL]

Optimiser: AdamW lr 1e-2, no weight decay, cosine after one constant warmup epoch, batch 32, 10 epochs (tiny).
Chosen on validation top-1 with the ViT test fixture at 16 shots (shifted_hues): the CoOp recipe (SGD 2e-3) 15.2 %,
AdamW 1e-3 19.9 %, AdamW 1e-2 23.4 % (zero-shot 14.5 %).
"""

from vlm_jax import config_lib


def get_config(arg=None):
  return config_lib.transfer_config(arg, {
      "name": "clip_adapter", "side": "image", "reduction": 4, "ratio": 0.2,
      "ratio_grid": (0.0, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0)}, optimizer={
          "name": "adamw", "lr": 1e-2, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.0,
          "wd_mask": r"(^|/)kernel$", "clip_norm": 0.0, "schedule": "cosine", "warmup": "constant",
          "warmup_lr": 1e-5, "warmup_steps": 0, "end_factor": 0.0, "grad_accum_steps": 1})
