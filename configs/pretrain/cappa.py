"""CapPa pre-training (Tschannen et al. 2023, "Image Captioners Are Scalable Vision Learners Too",
arXiv 2306.07915): a ViT encoder and a cross-attending text decoder trained by captioning, 75 % of the examples
with parallel prediction (all-[MASK] inputs, non-causal attention), the rest autoregressive.

  --config=configs/pretrain/cappa.py:tiny                      the embedded synthetic default (CPU)
  --config=configs/pretrain/cappa.py:micro                     a seconds-long smoke run (tests)
  --config=configs/pretrain/cappa.py:img=B/16,res=224          ViT-B/16 CapPa on real shards (--config.data.shards)

Arguments: variant (tiny|micro|full), img (ViT variant), txt (decoder size), depth (decoder layers; paper 6),
res (image side), parallel (fraction of parallel-prediction examples; paper 0.75).
"""

import ml_collections

from vlm_jax import config_lib as cb


def get_config(arg: str = "tiny"):
  a = cb.parse_arg(arg, variants=("tiny", "micro", "full"), variant="full",
                   img="B/16", txt="L", depth=6, res=224, parallel=0.75)
  c = cb.base_config()
  if a.variant == "tiny":
    c.update(cb.tiny_run())
    c.model = ml_collections.ConfigDict({
        "framework": "cappa",
        "image": {"kind": "vit", "variant": "tiny/8", "image_size": 32, "stem": "conv", "pool_type": "gap"},
        "text": {"kind": "decoder", "variant": "tiny", "width": 64, "depth": 3, "num_heads": 2, "mlp_dim": 256}})
    c.evals = ml_collections.ConfigDict({
        "captioning": {"kind": "captioning_synthetic", "num_images": 256, "captions_per_image": 5},
        "linear_probe": {"kind": "linear_probe_synthetic", "train_per_class": 16}})
  elif a.variant == "micro":
    c.update(cb.micro_run())
    c.model = ml_collections.ConfigDict({
        "framework": "cappa",
        "image": {"kind": "vit", "variant": "mu/4", "image_size": 16, "pool_type": "gap"},
        "text": {"kind": "decoder", "variant": "tiny", "width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64}})
  else:
    c.update(cb.full_run(a.res))
    c.batch_size = 8192  # the paper's batch size
    c.model = ml_collections.ConfigDict({
        "framework": "cappa",
        "image": {"kind": "vit", "variant": a.img, "image_size": a.res, "pool_type": "gap"},
        # 'L' text size = width 768, 12 heads, MLP 3072: the ViT-B decoder width of the paper, `depth` layers
        "text": {"kind": "decoder", "variant": a.txt, "depth": a.depth, "vocab_size": 49408, "max_len": 77}})
    c.model.update({"scan": True, "remat": "dots_with_no_batch_dims_saveable", "dtype": "bfloat16"})
  c.model.parallel_fraction = a.parallel
  c.objectives = {"captioning": 1.0}
  c.objective_hparams = {"captioning": {"label_smoothing": 0.0}}
  return c
