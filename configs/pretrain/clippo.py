"""One-tower contrastive pre-training: CLIPPO (Tschannen et al. 2023) — one ViT, all weights shared, reads photos
and text rendered as images (tokenizer 'render'); or `mode=shared` — one transformer with shared blocks over image
patches and text tokens, separate embeddings and heads (CLIPPO's 1T-CLIP baseline; VATT's modality-agnostic
backbone, Akbari et al. 2021). Both train with CLIP's contrastive loss.

  --config=configs/pretrain/clippo.py:tiny                 CLIPPO on the embedded synthetic default (CPU)
  --config=configs/pretrain/clippo.py:tiny,mode=shared     the shared-weights one-tower on the same data
  --config=configs/pretrain/clippo.py:img=B/16,res=224     ViT-B/16 CLIPPO on real shards (--config.data.shards)

Arguments: variant (tiny|micro|full), mode (clippo|shared), img (ViT variant), res (image side), embed (joint dim).
"""

import math

import ml_collections

from vlm_jax.errors import UserError
from vlm_jax import config_lib as cb


def get_config(arg: str = "tiny"):
  a = cb.parse_arg(arg, variants=("tiny", "micro", "full"), variant="full",
                   mode="clippo", img="B/16", res=224, embed=768)
  if a.mode not in ("clippo", "shared"):
    raise UserError(f"clippo.py mode must be 'clippo' or 'shared', got {a.mode!r}")
  c = cb.base_config()
  if a.variant == "tiny":
    c.update(cb.tiny_run())
    c.total_steps, c.eval_every_steps = 600, 300
    image = {"kind": "vit", "variant": "tiny/4", "depth": 3, "image_size": 32, "posemb": "sincos2d",
             "pool_type": "gap"}
    # two lines of ~27 characters (7 px font): 6 × 24 = 144 text patches beside the photos' 64
    render = {"name": "render", "height": 24, "width": 96, "font_size": 7}
    embed, scale_init = 64, cb.CLIP_LOGIT_SCALE_INIT
  elif a.variant == "micro":
    c.update(cb.micro_run())
    image = {"kind": "vit", "variant": "mu/4", "image_size": 16, "posemb": "sincos2d", "pool_type": "gap"}
    render = {"name": "render", "height": 16, "width": 64, "font_size": 6}
    embed, scale_init = 16, cb.CLIP_LOGIT_SCALE_INIT
  else:
    # CLIPPO's recipe: ViT-B/16 with a MAP head, batch 10,240, text rendered with a 16 px font into the
    # res × res image, learned temperature initialised at 10 (Tschannen et al. 2023, §3)
    c.update(cb.full_run(a.res))
    c.batch_size = 10_240
    image = {"kind": "vit", "variant": a.img, "image_size": a.res, "pool_type": "map"}
    render = {"name": "render", "height": a.res, "width": a.res, "font_size": 16}
    embed, scale_init = a.embed, math.log(10.0)
  c.model = ml_collections.ConfigDict({
      "framework": "one_tower", "mode": a.mode, "image": image, "embed_dim": embed,
      "logit_scale_init": scale_init, "logit_bias_init": None, "scan": a.variant not in ("tiny", "micro"),
      "remat": "none" if a.variant in ("tiny", "micro") else "dots_with_no_batch_dims_saveable",
      "dtype": "float32" if a.variant in ("tiny", "micro") else "bfloat16", "param_dtype": "float32"})
  if a.mode == "clippo":
    c.tokenizer = ml_collections.ConfigDict(render)
  else:
    c.model.text = {}  # vocab_size / max_len come from the tokenizer
  c.objectives = {"clip": 1.0}
  c.objective_hparams = {"clip": {"impl": "dense"}}
  return c
