"""MAE pre-training (He et al. 2022): mask 75 % of the patches, encode the visible ones, reconstruct the masked
patches' normalised pixels with a light decoder; or, with `target=clip`, regress a frozen CLIP image tower's patch
features (EVA, Fang et al. 2022; MVP, Wei et al. 2022). Image-only: the model config has no text tower.

  --config=configs/pretrain/mae.py:tiny                   the embedded synthetic default (CPU)
  --config=configs/pretrain/mae.py:img=B/16,res=224       ViT-B/16 MAE on real shards (--config.data.shards)
  --config=configs/pretrain/mae.py:tiny,target=clip --config.init.checkpoint=DIR
      feature targets from a CLIP run's ViT image tower (e.g. clip.py:micro, whose tower `teacher` matches; for
      the full size a ViT-B/16 CLIP, e.g. converted with `python -m vlm_jax.convert`)

Arguments: variant (tiny|micro|full), img (ViT variant), res (image side), target (pixels|clip), teacher (the
teacher's ViT variant; default: clip.py's image tower of the same size class).
"""

import ml_collections

from vlm_jax.errors import UserError

from vlm_jax import config_lib as cb


def _vit(variant: str, res: int, **kw) -> dict:
  return {"kind": "vit", "variant": variant, "image_size": res, **kw}


def get_config(arg: str = "tiny"):
  a = cb.parse_arg(arg, variants=("tiny", "micro", "full"), variant="full",
                   img="B/16", res=224, target="pixels", teacher="")
  c = cb.base_config()
  if a.variant == "tiny":
    c.update(cb.tiny_run())
    c.model = ml_collections.ConfigDict({
        "framework": "mae", "mask_ratio": 0.75, "norm_pix_loss": True,
        "image": _vit("S/4", 32, width=96, depth=3, mlp_dim=384, num_heads=3, posemb="sincos2d",
                      pool_type="gap"),
        "decoder": {"width": 64, "depth": 2, "num_heads": 2, "mlp_dim": 256},
        "scan": False, "remat": "none", "dtype": "float32", "param_dtype": "float32"})
    c.optimizer.update(lr=2e-3, b2=0.95, warmup_steps=50)
    c.total_steps, c.eval_every_steps = 500, 250  # the masked-patch loss flattens by then
    c.evals = {"reconstruction": {"kind": "reconstruction_synthetic", "num_images": 256},
               "linear_probe": {"kind": "linear_probe_synthetic", "train_per_class": 16}}
    teacher = _vit(a.teacher or "mu/4", 16, pool_type="gap")  # clip.py:micro's image tower
  elif a.variant == "micro":
    c.update(cb.micro_run())
    c.model = ml_collections.ConfigDict({
        "framework": "mae", "mask_ratio": 0.75, "norm_pix_loss": True,
        "image": _vit("mu/4", 16, posemb="sincos2d", pool_type="gap"),
        "decoder": {"width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64},
        "scan": False, "remat": "none", "dtype": "float32", "param_dtype": "float32"})
    teacher = _vit(a.teacher or "mu/4", 16, pool_type="gap")
  else:
    c.update(cb.full_run(a.res))
    # MAE's ImageNet recipe: batch 4096, AdamW(0.9, 0.95), lr 1.5e-4 · B/256, wd 0.05, 40 warm-up epochs,
    # random-resized crop (0.2, 1) + flip
    c.batch_size = 4096
    c.optimizer.update(lr=1.5e-4 * 4096 / 256, b2=0.95, weight_decay=0.05, warmup_steps=12_500)
    c.total_steps = 250_000
    c.data.augment = {"crop_scale": (0.2, 1.0), "crop_ratio": (3 / 4, 4 / 3), "flip": True}
    c.model = ml_collections.ConfigDict({
        "framework": "mae", "mask_ratio": 0.75, "norm_pix_loss": True,
        "image": _vit(a.img, a.res, posemb="sincos2d", pool_type="cls"),
        "decoder": {"width": 512, "depth": 8, "num_heads": 16, "mlp_dim": 2048},
        "scan": True, "remat": "dots_with_no_batch_dims_saveable", "dtype": "bfloat16", "param_dtype": "float32"})
    teacher = _vit(a.teacher or a.img, a.res, pool_type="cls", pre_norm=True)  # clip.py's image tower
  c.objectives = {"mae": 1.0}
  c.objective_hparams = {}
  if a.target == "clip":
    c.model.teacher = teacher
    c.objectives = {"mim_feature": 1.0}
    c.objective_hparams = {"mim_feature": {"distance": "cosine"}}
    c.frozen = r"^teacher/"
    c.init.checkpoint = ""       # required: the CLIP run whose image tower is the teacher
    c.init.params = r"^teacher/"
    c.init.rename = {"^teacher/": "img/"}
    c.init.required = True
  elif a.target != "pixels":
    raise UserError(f"mae target must be 'pixels' or 'clip', got {a.target!r}")
  return c
