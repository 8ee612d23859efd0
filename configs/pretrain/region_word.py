"""GLIP-style region-word alignment (Li et al. 2022) with CLIP's contrastive loss on a two-tower model.

  --config=configs/pretrain/region_word.py:tiny                      the embedded synthetic default (CPU)
  --config=configs/pretrain/region_word.py:micro                     a seconds-long smoke run (tests)
  --config=configs/pretrain/region_word.py:img=B/16,txt=B,res=224    ViT-B/16 on shards whose {key}.json has
                                                                    'objects' [{'box', 'phrase', 'class'}]

Batches carry up to `data.regions` boxes and their caption phrases; region features are RoIAlign-pooled from the
ViT's patch tokens (a token grid is needed: the tiny variant uses a 2-layer width-64 ViT with 8-px patches, a
4×4 grid at 32 px, batch 128) and scored against phrase features with a sigmoid focal loss over the global batch
(`vlm_jax.objectives.region_word`). Arguments: variant (tiny|micro|full), img, txt, res, embed.
"""

from vlm_jax import config_lib as cb


def get_config(arg: str = "tiny"):
  c, a = cb.two_tower(arg)
  c.model.region_features = True
  c.model.roi_size = 2
  c.data.regions = 3  # the synthetic scenes have at most 3 objects
  c.data.region_phrase_length = 8
  c.objectives = {"clip": 1.0, "region_word": 1.0}
  c.objective_hparams = {"clip": {"impl": "dense"}, "region_word": {"alpha": 0.25, "gamma": 2.0}}
  if a.variant == "tiny":
    c.model.image = {"kind": "vit", "variant": "tiny/8", "image_size": 32, "pool_type": "gap"}
    c.batch_size = 128  # each image adds up to 3 phrase encodings
    c.evals = {"region_word": {"kind": "region_word_synthetic", "num_images": 256},
               "zeroshot": {"kind": "zeroshot_synthetic"}}
  elif a.variant == "micro":
    c.evals = {}
  return c
