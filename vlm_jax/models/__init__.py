"""Model construction from config: `build_model(config.model) -> nn.Module`.

`config.model.framework` picks the model family (default 'two_tower'; see `FRAMEWORKS`): two-tower contrastive
models (CLIP/SigLIP/LiT/SLIP/FLIP/FILIP), CoCa/CapPa image-to-text models, MAE, two-leg fusion models (FLAVA-style
ITM/MLM/MCM) and one-tower models (CLIPPO). Each framework module exposes `build(cfg: dict) -> nn.Module`.
`config.model.image` / `config.model.text` name an encoder kind and a size variant (decoded in
`variants.py`); every other key in them overrides a field of the encoder module. Encoder and framework modules are
imported by name on first use, so a kind's module is only needed when a config asks for it.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any, Mapping

import jax.numpy as jnp

from vlm_jax.errors import UserError
from vlm_jax.models import variants

# kind -> (module, class); imported lazily.
ENCODERS: dict[str, tuple[str, str]] = {
    "vit": ("vlm_jax.models.vit", "ViT"),
    "resnet": ("vlm_jax.models.resnet", "ModifiedResNet"),
    "text": ("vlm_jax.models.text", "TextTransformer"),
}
IMAGE_KINDS = ("vit", "resnet")
TEXT_KINDS = ("text",)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# framework -> module exposing `build(cfg: dict) -> nn.Module`; imported lazily.
FRAMEWORKS: dict[str, str] = {
    "two_tower": "vlm_jax.models.two_tower",
    "coca": "vlm_jax.models.coca",
    "cappa": "vlm_jax.models.cappa",
    "mae": "vlm_jax.models.mae",
    "two_leg": "vlm_jax.models.two_leg",
    "one_tower": "vlm_jax.models.one_tower",
    "detector": "vlm_jax.models.detection.detector",
    "segmenter": "vlm_jax.models.segmentation.segmenter",
}
_VARIANT_DECODERS = {"vit": variants.vit_variant, "resnet": variants.resnet_variant,
                     "text": variants.text_variant}


def encoder_class(kind: str):
  """The encoder module class for a config `kind` ('vit', 'resnet', 'text')."""
  if kind not in ENCODERS:
    raise UserError(f"unknown encoder kind {kind!r}; valid choices: {', '.join(ENCODERS)}")
  module, name = ENCODERS[kind]
  return getattr(importlib.import_module(module), name)


def _plain(cfg) -> dict:
  if cfg is None:
    return {}
  if hasattr(cfg, "to_dict"):
    cfg = cfg.to_dict()
  if not isinstance(cfg, Mapping):
    raise UserError(f"expected a dict-like model config, got {type(cfg).__name__}")
  return dict(cfg)


def dtype_of(name) -> Any:
  """'float32' | 'bfloat16' | 'float16' | 'auto' (or a dtype) -> jnp dtype; unknown names raise `UserError`.

  'auto' is the platform's compute dtype: bfloat16 on TPU and GPU (their matrix units run it at full rate, and
  the losses compute in float32 regardless), float32 on CPU (where bfloat16 matmuls are emulated and slower).
  It is meant for `model.dtype`; parameters stay `param_dtype` = float32 (the optimizer's precision).
  """
  if not isinstance(name, str):
    return name
  if name == "auto":
    import jax  # noqa: PLC0415
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  if name not in DTYPES:
    raise UserError(f"unknown dtype {name!r}; valid choices: {', '.join(DTYPES)}, auto")
  return DTYPES[name]


def _fields(cls) -> set[str]:
  return {f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")}


def build_encoder(cfg, defaults: Mapping[str, Any] | None = None, allowed_kinds=None):
  """Builds one encoder from {'kind', 'variant', **overrides}; `defaults` apply where the class has the field."""
  cfg = _plain(cfg)
  kind = cfg.pop("kind", None)
  if allowed_kinds is not None and kind not in allowed_kinds:
    raise UserError(f"encoder kind {kind!r} is not valid here; valid choices: {', '.join(allowed_kinds)}")
  cls = encoder_class(kind)
  fields = _fields(cls)
  variant = cfg.pop("variant", None)
  kw = {k: v for k, v in dict(defaults or {}).items() if k in fields}
  if variant is not None:
    kw.update(_VARIANT_DECODERS[kind](variant))
  unknown = sorted(set(cfg) - fields)
  if unknown:
    raise UserError(f"unknown {kind} option(s) {unknown}; valid: {sorted(fields)}")
  kw.update({k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})
  for k in ("dtype", "param_dtype"):
    if k in kw:
      kw[k] = dtype_of(kw[k])
  return cls(**kw)


def common_defaults(cfg: Mapping[str, Any]) -> dict:
  """Encoder defaults every framework passes down from the model config: scan, remat, dtype, param_dtype and the
  attention kernel (`attention`: 'auto' | 'xla' | 'cudnn', resolved for this platform and dtype by
  `transformer.attention_implementation`)."""
  from vlm_jax.models.transformer import attention_implementation  # noqa: PLC0415
  dtype = dtype_of(cfg.get("dtype", "float32"))
  return dict(scan=bool(cfg.get("scan", False)), remat=cfg.get("remat", "none"), dtype=dtype,
              param_dtype=dtype_of(cfg.get("param_dtype", "float32")),
              attention=attention_implementation(str(cfg.get("attention", "auto")), dtype))


def build_model(config):
  """The model of `config.model` (ConfigDict or dict): `FRAMEWORKS[config.model.framework].build(cfg)`."""
  cfg = _plain(config)
  name = cfg.pop("framework", "two_tower") or "two_tower"
  if name not in FRAMEWORKS:
    raise UserError(f"unknown model framework {name!r}; valid choices: {', '.join(FRAMEWORKS)}")
  return importlib.import_module(FRAMEWORKS[name]).build(cfg)


def build_two_tower(config):
  """`TwoTower` model from a 'two_tower' model config (ConfigDict or dict); see CONTRACTS.md for the keys.

  `token_embeddings` (default False) adds FILIP's per-token embeddings to the outputs; `region_features` (default
  False; `roi_size` RoIAlign bins per side, default 2) adds GLIP-style region and phrase embeddings for batches
  with boxes. Options for converted SigLIP
  checkpoints: `project_image` (default True; a ResNet decides from its
  `output_dim`), `text_proj_bias` (default False) and `max_log_logit_scale` (default ln 100; None: unclamped).
  """
  from vlm_jax.models.two_tower import TwoTower  # noqa: PLC0415 (keeps `import vlm_jax.models` light)

  cfg = _plain(config)
  cfg.pop("framework", None)
  embed_dim = int(cfg.get("embed_dim", 512))
  defaults = common_defaults(cfg)
  dtype, param_dtype = defaults["dtype"], defaults["param_dtype"]
  image_cfg, text_cfg = _plain(cfg.get("image")), _plain(cfg.get("text"))
  if not image_cfg or not text_cfg:
    raise UserError("model config needs both `image` and `text` encoder dicts")
  project_image, image_defaults = bool(cfg.get("project_image", True)), defaults
  if image_cfg.get("kind") == "resnet":
    image_cfg.setdefault("output_dim", embed_dim)  # open_clip: the attention pool projects to embed_dim
    project_image = int(image_cfg["output_dim"]) != embed_dim
    image_defaults = dict(defaults, remat=defaults["remat"] != "none")  # ModifiedResNet.remat is a bool
  image = build_encoder(image_cfg, image_defaults, IMAGE_KINDS)
  if not project_image and getattr(image, "width", embed_dim) != embed_dim and image_cfg.get("kind") == "vit":
    raise UserError(f"project_image=False needs the ViT width ({image.width}) to equal embed_dim ({embed_dim})")
  text = build_encoder(text_cfg, defaults, TEXT_KINDS)

  ratio = float(cfg.get("flip_mask_ratio", 0.0) or 0.0)
  if not 0.0 <= ratio < 1.0:
    raise UserError(f"flip_mask_ratio must be in [0, 1), got {ratio}")
  if ratio > 0 and image_cfg.get("kind") != "vit":
    raise UserError("flip_mask_ratio > 0 needs a ViT image tower (kind='vit')")
  head = _plain(cfg.get("simclr_head"))
  bias = cfg.get("logit_bias_init")
  max_log_scale = cfg.get("max_log_logit_scale", math.log(100.))
  return TwoTower(
      img=image, txt=text, embed_dim=embed_dim,
      logit_scale_init=float(cfg.get("logit_scale_init", math.log(1 / 0.07))),
      logit_bias_init=None if bias is None else float(bias),
      project_image=project_image, text_proj_bias=bool(cfg.get("text_proj_bias", False)),
      max_log_logit_scale=None if max_log_scale is None else float(max_log_scale),
      simclr_hidden=int(head.get("hidden", 0)) if head else 0,
      simclr_out=int(head.get("out", 0)) if head else 0,
      flip_mask_ratio=ratio, token_embeddings=bool(cfg.get("token_embeddings", False)),
      region_features=bool(cfg.get("region_features", False)), roi_size=int(cfg.get("roi_size", 2)),
      dtype=dtype, param_dtype=param_dtype)
