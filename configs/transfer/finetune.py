"""Full fine-tuning from the zero-shot head (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"):

  python -m vlm_jax.transfer --config=configs/transfer/finetune.py:tiny --workdir=DIR [--config.init.checkpoint=MODEL]
  python -m vlm_jax.transfer --config=configs/transfer/finetune.py:tiny,head=frozen …   # head kept at zero-shot
  python -m vlm_jax.transfer --config=configs/transfer/finetune.py:tiny,head=text …     # the text tower trained too

The whole image tower and a linear head initialised at the zero-shot prompt-ensemble classifier are trained with
cross-entropy (`vlm_jax.transfer.methods.finetune`). DIR is then a full model: `vlm_jax.inference.load(DIR)`,
`python -m vlm_jax.evaluate --checkpoint=DIR`, `python -m vlm_jax.convert --to open_clip --input DIR`; the head is
DIR/head.npz, the training run DIR/train/. Paper recipe (ViT-B, ImageNet): AdamW lr 3e-5, weight decay 0.1,
batch 512, 10 epochs, 500 warmup steps, cosine; tiny: lr 1e-4, batch 32, 10 epochs, one warmup epoch.
"""

from vlm_jax import config_lib


def get_config(arg=None):
  return config_lib.finetune_config(arg, {"name": "finetune"})
