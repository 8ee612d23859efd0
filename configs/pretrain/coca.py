"""CoCa pre-training (Yu et al. 2022, arXiv 2205.01917): contrastive loss on the attentional-pool / [CLS]
embeddings plus captioning loss of the multimodal decoder, weighted 1 : 2 as in the paper.

  --config=configs/pretrain/coca.py:tiny                       the embedded synthetic default (CPU)
  --config=configs/pretrain/coca.py:micro                      a seconds-long smoke run (tests)
  --config=configs/pretrain/coca.py:img=B/16,txt=B,res=224     ViT-B/16 CoCa on real shards (--config.data.shards)

Arguments: variant (tiny|micro|full), img (ViT variant), txt (decoder size; its depth is split into unimodal and
multimodal halves), res (image side), embed (joint dim), queries (captioning pooler queries; paper 256).
"""

import ml_collections

from vlm_jax import config_lib as cb


def get_config(arg: str = "tiny"):
  a = cb.parse_arg(arg, variants=("tiny", "micro", "full"), variant="full",
                   img="B/16", txt="B", res=224, embed=512, queries=256)
  c = cb.base_config()
  if a.variant == "tiny":
    c.update(cb.tiny_run())
    c.model = ml_collections.ConfigDict({
        "framework": "coca",
        "image": {"kind": "vit", "variant": "tiny/8", "image_size": 32, "stem": "conv", "pool_type": "gap"},
        "text": {"kind": "decoder", "variant": "tiny", "width": 64, "unimodal_depth": 1, "multimodal_depth": 2,
                 "num_heads": 2, "mlp_dim": 256},
        "embed_dim": 64, "n_queries": 16, "pooler_heads": 2})
    c.evals = ml_collections.ConfigDict({
        "captioning": {"kind": "captioning_synthetic", "num_images": 256, "captions_per_image": 5},
        "zeroshot": {"kind": "zeroshot_synthetic", "multilabel_images": 0},
        "retrieval": {"kind": "retrieval_synthetic", "num_images": 256, "captions_per_image": 5}})
  elif a.variant == "micro":
    c.update(cb.micro_run())
    c.model = ml_collections.ConfigDict({
        "framework": "coca",
        "image": {"kind": "vit", "variant": "mu/4", "image_size": 16, "pool_type": "gap"},
        "text": {"kind": "decoder", "variant": "tiny", "width": 32, "unimodal_depth": 1, "multimodal_depth": 1,
                 "num_heads": 2, "mlp_dim": 64},
        "embed_dim": 16, "n_queries": 4, "pooler_heads": 2})
  else:
    c.update(cb.full_run(a.res))
    c.model = ml_collections.ConfigDict({
        "framework": "coca",
        "image": {"kind": "vit", "variant": a.img, "image_size": a.res, "pool_type": "gap"},
        "text": {"kind": "decoder", "variant": a.txt, "vocab_size": 49408, "max_len": 77},
        "embed_dim": a.embed, "n_queries": a.queries})
    c.model.update({"scan": True, "remat": "dots_with_no_batch_dims_saveable", "dtype": "bfloat16"})
  c.model.logit_scale_init = cb.CLIP_LOGIT_SCALE_INIT
  c.objectives = {"clip": 1.0, "captioning": 2.0}
  c.objective_hparams = {"clip": {"impl": "dense"}, "captioning": {"label_smoothing": 0.0}}
  return c
