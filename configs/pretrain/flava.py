"""FLAVA pre-training (Singh et al. 2022): a two-leg model with MIM + MLM + MCM + ITM + contrastive objectives.

  --config=configs/pretrain/flava.py:tiny                          the embedded synthetic default (CPU)
  --config=configs/pretrain/flava.py:micro                         seconds-long smoke run (tests)
  --config=configs/pretrain/flava.py:img=B/16,txt=B,res=224        FLAVA sizes: ViT-B/16 image and text encoders,
                                                                   a 6-layer ViT-B-wide merged fusion encoder
  --config=configs/pretrain/flava.py:tiny,style=albef              ALBEF-style (Li et al. 2021): cross-attention
                                                                   fusion, objectives clip + ITM + fused MLM

Arguments: variant (tiny|micro|full), style (flava|albef), img (ViT variant), txt (text variant), res (image
side), embed (joint dim). FLAVA weighs its losses equally (full size; tiny/micro scale all but ITM down, see
get_config); ITM negatives are mined from the in-batch similarity as in ALBEF (full size; tiny/micro draw them
uniformly, see `_model`); the masking follows the papers (15 % of the text
tokens, BERT 80/10/10; 40 % of the image patches, dropped MAE-style, see `vlm_jax.models.two_leg`). Deviation:
FLAVA's MIM/MCM predict dVAE tokens; here the normalised pixels of the masked patches are regressed.
"""

import ml_collections

from vlm_jax.errors import UserError
from vlm_jax import config_lib as cb


def _model(a) -> ml_collections.ConfigDict:
  if a.variant == "tiny":
    # a patch-stem ViT (patch dropping needs one; a conv stem would leak masked pixels into visible tokens)
    image = {"kind": "vit", "variant": "tiny/8", "image_size": 32, "pool_type": "cls"}
    text = {"kind": "text", "variant": "tiny", "width": 64, "depth": 2, "num_heads": 2, "mlp_dim": 256}
    fusion = {"variant": "tiny", "width": 64, "depth": 1, "num_heads": 2, "mlp_dim": 256}
    embed, decoder = 64, {"width": 64, "depth": 1, "num_heads": 2}
  elif a.variant == "micro":
    image = {"kind": "vit", "variant": "mu/4", "image_size": 16, "pool_type": "cls"}
    text = {"kind": "text", "variant": "tiny", "width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64}
    fusion = {"variant": "mu", "width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64}
    embed, decoder = 16, {"width": 16, "depth": 1, "num_heads": 2}
  else:
    image = {"kind": "vit", "variant": a.img, "image_size": a.res, "pool_type": "cls"}
    text = {"kind": "text", "variant": a.txt, "vocab_size": 49408, "max_len": 77}
    fusion = {"variant": "B", "depth": 6}
    embed, decoder = a.embed, {"width": 512, "depth": 8, "num_heads": 16}
  albef = a.style == "albef"
  fusion["kind"] = "cross" if albef else "merged"
  return ml_collections.ConfigDict({
      "framework": "two_leg", "image": image, "text": text, "fusion": fusion, "embed_dim": embed,
      "tasks": ("itm", "mlm") if albef else ("itm", "mlm", "mim", "mcm"), "mlm_fused": albef,
      "mlm_ratio": 0.15, "mim_ratio": 0.4, "decoder": decoder, "logit_scale_init": cb.CLIP_LOGIT_SCALE_INIT,
      # ALBEF/FLAVA mine every ITM negative from the in-batch similarity (1.0). On the synthetic data the
      # contrastive heads soon rank captions of the same shapes/colours (synonyms, other templates) highest, so
      # (presumably) many mined "negatives" are false ones, and ITM sat at its 1:2 label prior for all 500 tiny
      # steps;
      # tiny/micro draw their negatives uniformly from the batch instead (measured: itm/balanced_accuracy 0.69
      # after 150 steps with 0.0, 0.50 throughout with 1.0 and, up to step 140, with 0.5).
      "itm_hard_fraction": 0.0 if a.variant in ("tiny", "micro") else 1.0,
      "scan": a.variant == "full", "remat": "dots_with_no_batch_dims_saveable" if a.variant == "full" else "none",
      "dtype": "bfloat16" if a.variant == "full" else "float32", "param_dtype": "float32"})


def get_config(arg: str = "tiny"):
  a = cb.parse_arg(arg, variants=("tiny", "micro", "full"), variant="full",
                   style="flava", img="B/16", txt="B", res=224, embed=768)
  if a.style not in ("flava", "albef"):
    raise UserError(f"unknown flava style {a.style!r}; use flava or albef")
  c = cb.base_config()
  if a.variant == "tiny":
    c.update(cb.tiny_run())
    c.batch_size, c.total_steps, c.eval_every_steps = 128, 500, 0
    c.optimizer.warmup_steps = 50
    c.evals.itm_rerank = {"kind": "itm_rerank_synthetic", "num_images": 128, "top_k": 8}
  elif a.variant == "micro":
    c.update(cb.micro_run())
  else:
    c.update(cb.full_run(a.res))
  c.model = _model(a)
  # FLAVA and ALBEF weigh their losses equally. In the short CPU runs (tiny, micro) the other losses then dominate
  # the shared encoders' early gradients and ITM sits at its constant prior (1 positive : 2 negatives) for
  # hundreds of steps, so there ITM keeps weight 1 and the rest are scaled down.
  small = a.variant in ("tiny", "micro")
  w = 0.2 if small else 1.0
  if a.style == "albef":
    c.objectives = {"clip": w, "itm": 1.0, "mlm": 2.5 * w if small else 1.0}
  else:
    c.objectives = {"clip": w, "itm": 1.0, "mlm": 2.5 * w if small else 1.0, "mae": 2.5 * w if small else 1.0,
                    "mcm": 2.5 * w if small else 1.0}
  c.objective_hparams = {"clip": {"impl": "dense"}, "mcm": {"image_weight": 1.0, "text_weight": 1.0}}
  return c
