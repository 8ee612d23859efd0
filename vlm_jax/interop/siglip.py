"""open_clip's SigLIP models (timm ViT trunk + open_clip text tower) <-> vlm_jax (config, variables), exact.

open_clip builds SigLIP (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training") as a `CustomTextCLIP`:
- `visual.trunk.*`: a timm `VisionTransformer` (`vit_base_patch16_siglip_224`, …) without class token: biased
  patch conv `patch_embed.proj`, learned `pos_embed`, blocks (`norm1`, fused `attn.qkv`, `attn.proj`, `norm2`,
  `mlp.fc1`, `mlp.fc2`), final `norm`, and the MAP head `attn_pool` (timm `AttentionPoolLatent`: `latent`, `q`,
  fused `kv`, `proj`, `norm`, `mlp`), whose output is the image embedding (`timm_proj: none`) — vlm_jax's
  `ViT(pool_type='map')` with `project_image=False`. The heads, activation and LayerNorm epsilon of the trunk are
  not in the weights: they are read from timm's definition of `timm_model_name`, instantiated on the `meta`
  device (no memory, no weights).
- `text.*`: open_clip's `TextTransformer` with `no_causal_mask` (bidirectional), `pool_type: last`, a biased
  `text_projection` Linear (`proj_bias`) and LayerNorm eps 1e-6 (`norm_kwargs`); blocks hold
  `nn.MultiheadAttention` (`attn.in_proj_weight` = [q; k; v]).
- `logit_scale` (log t; not clamped in vlm_jax, as in open_clip's forward) and `logit_bias`.

The arch is an open_clip model name (its JSON is read from the installed `open_clip/model_configs/`), a JSON path,
or the model-config dict itself. One vlm_jax extension: `vision_cfg.timm_model_kwargs` (a dict) is passed to timm
when reading the trunk's definition, for reduced models built as `timm.create_model(name, **kwargs)`.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import ml_collections
import numpy as np

from vlm_jax.errors import UserError
from vlm_jax.interop import layout

SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
_V, _T = "visual.trunk", "text"
_VIT_BLOCK = {"ln1": f"{_V}.blocks.{{i}}.norm1", "ln2": f"{_V}.blocks.{{i}}.norm2",
              "qkv": f"{_V}.blocks.{{i}}.attn.qkv", "out": f"{_V}.blocks.{{i}}.attn.proj",
              "fc1": f"{_V}.blocks.{{i}}.mlp.fc1", "fc2": f"{_V}.blocks.{{i}}.mlp.fc2"}
_TXT_BLOCK = {"ln1": f"{_T}.transformer.resblocks.{{i}}.ln_1", "ln2": f"{_T}.transformer.resblocks.{{i}}.ln_2",
              "qkv": f"{_T}.transformer.resblocks.{{i}}.attn.in_proj_{{wb}}",
              "out": f"{_T}.transformer.resblocks.{{i}}.attn.out_proj",
              "fc1": f"{_T}.transformer.resblocks.{{i}}.mlp.c_fc",
              "fc2": f"{_T}.transformer.resblocks.{{i}}.mlp.c_proj"}
_POOL_TO_VLM = {"last": "last", "argmax": "eot", "first": "first"}
_POOL_TO_OPEN_CLIP = {v: k for k, v in _POOL_TO_VLM.items()}


def arch_config(arch) -> tuple[str, dict]:
  """(name, open_clip model-config dict) for an arch name, a JSON path or a dict."""
  if isinstance(arch, Mapping):
    return str(arch.get("name", "custom")), json.loads(json.dumps(dict(arch)))
  if arch is None:
    raise UserError("open_clip SigLIP conversion needs --arch (e.g. ViT-B-16-SigLIP or a model-config JSON)")
  from vlm_jax.interop.open_clip import model_config_json  # noqa: PLC0415
  name, cfg = model_config_json(arch)
  if cfg is None:
    raise UserError(f"cannot read the open_clip model config of {arch!r}: install open-clip-torch or pass a "
                    "JSON path")
  return name, cfg


def _check_arch(name: str, cfg: Mapping) -> None:
  v, t = cfg.get("vision_cfg") or {}, cfg.get("text_cfg") or {}
  problems = []
  if not v.get("timm_model_name"):
    problems.append("vision_cfg has no timm_model_name (not a timm-trunk SigLIP)")
  if v.get("timm_pool", "avg") != "map":
    problems.append(f"timm_pool={v.get('timm_pool')!r} (only 'map')")
  if v.get("timm_proj", "linear") not in ("none", "linear") or v.get("timm_proj_bias"):
    problems.append(f"timm_proj={v.get('timm_proj')!r} bias={v.get('timm_proj_bias')} "
                    "(only 'none' or a bias-free 'linear')")
  if t.get("hf_model_name"):
    problems.append("an HF text encoder (hf_model_name)")
  if t.get("pool_type", "argmax") not in _POOL_TO_VLM:
    problems.append(f"text pool_type={t.get('pool_type')!r}")
  for k in ("embed_cls", "qk_norm", "ls_init_value", "scaled_cosine_attn", "scale_heads", "scale_attn",
            "scale_fc", "scale_attn_inner", "use_pad_mask"):
    if t.get(k):
      problems.append(f"text {k}")
  if problems:
    raise UserError(f"open_clip arch {name!r} is not supported by the SigLIP converter: " + "; ".join(problems))


def _timm_trunk_info(v: Mapping) -> dict:
  """Heads, activation, LayerNorm eps and pre-norm of the timm trunk, from its definition on the meta device."""
  try:
    import timm  # noqa: PLC0415
    import torch  # noqa: PLC0415
  except ImportError:
    raise UserError("reading a timm SigLIP trunk needs timm and torch: pip install 'vlm_jax[interop]'") from None
  kwargs = dict(v.get("timm_model_kwargs") or {})
  try:
    with torch.device("meta"):
      m = timm.create_model(v["timm_model_name"], pretrained=False, num_classes=0, global_pool="map", **kwargs)
  except (RuntimeError, TypeError, ValueError) as e:
    raise UserError(f"timm cannot build {v['timm_model_name']!r}: {str(e).splitlines()[0][:200]}") from None
  act = m.blocks[0].mlp.act
  kind = type(act).__name__
  if kind == "GELU":
    act_name = "gelu_tanh" if getattr(act, "approximate", "none") == "tanh" else "gelu"
  else:
    act_name = {"GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu"}.get(kind)
  if act_name is None:
    raise UserError(f"timm trunk activation {kind} has no vlm_jax equivalent")
  return {"num_heads": int(m.blocks[0].attn.num_heads), "act": act_name, "norm_eps": float(m.norm.eps),
          "shapes": {f"{_V}.{k}": tuple(p.shape) for k, p in m.state_dict().items()}}


def _dtype_name(x) -> str:
  return str(x.dtype).replace("torch.", "")


def _resize_posemb(table: np.ndarray, new_grid: int) -> np.ndarray:
  """timm's `resample_abs_pos_embed` (bicubic, antialiased) of a [1, N, D] table to a new square grid."""
  import torch  # noqa: PLC0415
  from timm.layers import resample_abs_pos_embed  # noqa: PLC0415
  old = int(round(table.shape[1] ** 0.5))
  out = resample_abs_pos_embed(torch.from_numpy(table), [new_grid, new_grid], [old, old], num_prefix_tokens=0)
  return out.numpy().astype(np.float32)


def _vision(sd: layout.StateDict, info: dict, image_size: int | None) -> tuple[dict, dict]:
  """(params, ViT config) of the timm trunk `visual.trunk.*` with its `attn_pool` MAP head."""
  patch_w = sd.take(f"{_V}.patch_embed.proj.weight")
  width, patch = patch_w.shape[0], patch_w.shape[-1]
  pos = sd.take(f"{_V}.pos_embed")
  grid = int(round(pos.shape[1] ** 0.5))
  if grid * grid != pos.shape[1]:
    raise UserError(f"{_V}.pos_embed has {pos.shape[1]} rows, not a square grid (class/register tokens?)")
  if image_size is not None and image_size != grid * patch:
    if image_size % patch:
      raise UserError(f"image_size {image_size} is not a multiple of the patch size {patch}")
    pos, grid = _resize_posemb(pos, image_size // patch), image_size // patch
  depth = sum(1 for k in sd.tensors if k.startswith(f"{_V}.blocks.") and k.endswith(".norm1.weight"))
  heads = info["num_heads"]
  params = {"embedding": layout.conv(patch_w, sd.take(f"{_V}.patch_embed.proj.bias")), "pos_embedding": pos}
  enc = layout.encoder_blocks(sd.take, depth, heads, _VIT_BLOCK, fused_qkv=True)
  enc["ln_final"] = layout.layer_norm(sd.take(f"{_V}.norm.weight"), sd.take(f"{_V}.norm.bias"))
  params["Transformer"] = enc
  pre_norm = f"{_V}.norm_pre.weight" in sd
  if pre_norm:
    params["ln_pre"] = layout.layer_norm(sd.take(f"{_V}.norm_pre.weight"), sd.take(f"{_V}.norm_pre.bias"))
  a = f"{_V}.attn_pool"
  k, v = layout.split_rows(sd.take(f"{a}.kv.weight"), sd.take(f"{a}.kv.bias"), 2)
  head = {"probe": sd.take(f"{a}.latent"),
          "attn": layout.attention((sd.take(f"{a}.q.weight"), sd.take(f"{a}.q.bias")), k, v,
                                   (sd.take(f"{a}.proj.weight"), sd.take(f"{a}.proj.bias")), heads),
          "ln": layout.layer_norm(sd.take(f"{a}.norm.weight"), sd.take(f"{a}.norm.bias")),
          "mlp": {n: layout.dense(sd.take(f"{a}.mlp.{n}.weight"), sd.take(f"{a}.mlp.{n}.bias"))
                  for n in ("fc1", "fc2")}}
  params["MAPHead"] = head
  mlp_dim = enc["block_0"]["mlp"]["fc1"]["kernel"].shape[1]
  if head["mlp"]["fc1"]["kernel"].shape[1] != mlp_dim or head["probe"].shape[1] != 1:
    raise UserError("the MAP head's MLP width or latent count differs from the trunk's: not representable")
  image = dict(kind="vit", width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads, patch_size=patch,
               image_size=grid * patch, pool_type="map", posemb="learn", stem="patch", patch_bias=True,
               pre_norm=pre_norm, act=info["act"], norm_eps=info["norm_eps"])
  return params, image


def _text(sd: layout.StateDict, cfg: Mapping) -> tuple[dict, dict, dict]:
  """(params, projection params, text config) of open_clip's `TextTransformer` `text.*`."""
  t = cfg["text_cfg"]
  tok, pos = sd.take(f"{_T}.token_embedding.weight"), sd.take(f"{_T}.positional_embedding")
  depth = sum(1 for k in sd.tensors if k.startswith(f"{_T}.transformer.resblocks.") and k.endswith(".ln_1.weight"))
  heads = int(t.get("heads", 8))  # open_clip's CLIPTextCfg default
  enc = layout.encoder_blocks(sd.take, depth, heads, _TXT_BLOCK, fused_qkv=True)
  enc["ln_final"] = layout.layer_norm(sd.take(f"{_T}.ln_final.weight"), sd.take(f"{_T}.ln_final.bias"))
  if t.get("proj_bias", False):
    proj = layout.dense(sd.take(f"{_T}.text_projection.weight"), sd.take(f"{_T}.text_projection.bias"))
  else:
    proj = {"kernel": sd.take(f"{_T}.text_projection")}  # a [width, embed] Parameter: x @ P
  if cfg.get("quick_gelu", False):
    act = "quick_gelu"
  else:
    act = "gelu_tanh" if (t.get("act_kwargs") or {}).get("approximate") == "tanh" else "gelu"
  text = dict(kind="text", vocab_size=tok.shape[0], max_len=pos.shape[0], width=tok.shape[1], depth=depth,
              mlp_dim=enc["block_0"]["mlp"]["fc1"]["kernel"].shape[1], num_heads=heads,
              causal=not t.get("no_causal_mask", False), pool_type=_POOL_TO_VLM[t.get("pool_type", "argmax")],
              act=act, norm_eps=float((t.get("norm_kwargs") or {}).get("eps", 1e-5)))
  return {"token_embedding": {"embedding": tok}, "pos_embedding": pos, "Transformer": enc}, proj, text


def from_open_clip_siglip(state_dict: Mapping[str, Any], arch=None, *, image_size: int | None = None
                          ) -> tuple[ml_collections.ConfigDict, dict]:
  """open_clip SigLIP state dict {name: tensor/array} -> vlm_jax (config, variables) (float32 numpy params).

  `arch`: an open_clip model name, a model-config JSON path or dict (see the module docstring). `image_size`
  converts for another input resolution (timm's bicubic position-table resampling); the round trip is then no
  longer the identity. Tensors the architecture does not use are a `UserError`.
  """
  name, cfg = arch_config(arch)
  _check_arch(name, cfg)
  v = cfg["vision_cfg"]
  info = _timm_trunk_info(v)
  for k, shape in info["shapes"].items():
    if k in state_dict and tuple(state_dict[k].shape) != shape:
      raise UserError(f"{k} has shape {tuple(state_dict[k].shape)}, {v['timm_model_name']} needs {shape}"
                      " (another arch?)")
  dtypes = sorted({_dtype_name(x) for x in state_dict.values() if "float" in _dtype_name(x)})
  sd = layout.StateDict(state_dict, f"open_clip {name} state dict", ignore=(r"^text\.attn_mask$",))
  img_p, image = _vision(sd, info, image_size)
  txt_p, txt_proj, text = _text(sd, cfg)
  params = {"img": img_p, "txt": txt_p, "txt_proj": txt_proj, "log_logit_scale": sd.take("logit_scale").reshape(())}
  project_image = v.get("timm_proj", "linear") == "linear"
  if project_image:
    params["img_proj"] = layout.dense(sd.take("visual.head.proj.weight"))
  has_bias = "logit_bias" in sd
  if has_bias:
    params["logit_bias"] = sd.take("logit_bias").reshape(())
  sd.check_consumed()

  model = dict(image=image, text=text, embed_dim=int(cfg.get("embed_dim", txt_proj["kernel"].shape[1])),
               project_image=project_image, text_proj_bias="bias" in txt_proj,
               logit_scale_init=float(params["log_logit_scale"]), max_log_logit_scale=None,
               logit_bias_init=float(params["logit_bias"]) if has_bias else None,
               scan=False, remat="none", dtype="float32", param_dtype="float32")
  pre = cfg.get("preprocess_cfg") or {}
  data = {"image_size": image["image_size"], "mean": [float(x) for x in pre.get("mean", SIGLIP_MEAN)],
          "std": [float(x) for x in pre.get("std", SIGLIP_STD)]}
  tokenizer = {"name": "siglip", "model_path": "", "context_length": text["max_len"]}
  source = {"format": "open_clip", "arch": name, "arch_config": json.dumps(cfg),
            "hf_tokenizer_name": str(cfg["text_cfg"].get("hf_tokenizer_name") or ""),
            "dtype": dtypes[0] if len(dtypes) == 1 else "float32",
            "logit_scale_shape": list(np.shape(state_dict["logit_scale"]))}
  config = ml_collections.ConfigDict({"model": model, "tokenizer": tokenizer, "data": data, "source": source})
  return config, {"params": params}


def _checked_towers(config):
  from vlm_jax.models import build_model  # noqa: PLC0415
  m = build_model(config["model"])
  img, txt = m.img, m.txt
  problems = []
  if type(img).__name__ != "ViT":
    problems.append(f"image tower {type(img).__name__} (timm trunk needs a ViT)")
  else:
    for k, want in (("pool_type", "map"), ("stem", "patch"), ("patch_bias", True)):
      if getattr(img, k) != want:
        problems.append(f"image {k}={getattr(img, k)!r} (needs {want!r})")
  if txt.pool_type not in _POOL_TO_OPEN_CLIP:
    problems.append(f"text pool_type={txt.pool_type!r}")
  if not m.project_text:
    problems.append("project_text=False")
  if problems:
    raise UserError("cannot export to an open_clip SigLIP model: " + "; ".join(problems))
  return m, img, txt


def to_open_clip_siglip(config, variables: Mapping[str, Any], *, dtype: str | None = None) -> dict[str, np.ndarray]:
  """vlm_jax (config, variables) -> open_clip SigLIP state dict {torch name: numpy array}.

  The inverse of `from_open_clip_siglip` (bit-exact for float32 sources); `dtype` ('float16', 'bfloat16', …)
  casts every floating tensor, default: the source's dtype recorded in `config.source`, else float32. A
  'sincos2d' position table is written out as the learned table it equals.
  """
  m, img, txt = _checked_towers(config)
  params = variables["params"]
  src = config.get("source") or {}
  ip, tp = params["img"], params["txt"]
  sd = {}
  w, b = layout.conv_torch(ip["embedding"])
  sd[f"{_V}.patch_embed.proj.weight"], sd[f"{_V}.patch_embed.proj.bias"] = w, b
  if img.posemb == "learn":
    sd[f"{_V}.pos_embed"] = np.asarray(ip["pos_embedding"])
  else:
    from vlm_jax.models.vit import posemb_sincos_2d  # noqa: PLC0415
    g = img.image_size // img.patch_size
    sd[f"{_V}.pos_embed"] = np.asarray(posemb_sincos_2d(g, g, img.width))
  enc = layout.unrolled(ip["Transformer"], img.depth, img.scan)
  sd.update(layout.encoder_blocks_torch(enc, img.depth, _VIT_BLOCK, fused_qkv=True))
  sd[f"{_V}.norm.weight"], sd[f"{_V}.norm.bias"] = layout.layer_norm_torch(enc["ln_final"])
  if img.pre_norm:
    sd[f"{_V}.norm_pre.weight"], sd[f"{_V}.norm_pre.bias"] = layout.layer_norm_torch(ip["ln_pre"])
  a, h = f"{_V}.attn_pool", ip["MAPHead"]
  att = layout.attention_torch(h["attn"])
  sd[f"{a}.latent"] = np.asarray(h["probe"])
  sd[f"{a}.q.weight"], sd[f"{a}.q.bias"] = att["q"]
  sd[f"{a}.kv.weight"], sd[f"{a}.kv.bias"] = layout.join_rows([att["k"], att["v"]])
  sd[f"{a}.proj.weight"], sd[f"{a}.proj.bias"] = att["out"]
  sd[f"{a}.norm.weight"], sd[f"{a}.norm.bias"] = layout.layer_norm_torch(h["ln"])
  for n in ("fc1", "fc2"):
    sd[f"{a}.mlp.{n}.weight"], sd[f"{a}.mlp.{n}.bias"] = layout.linear(h["mlp"][n])

  sd[f"{_T}.token_embedding.weight"] = np.asarray(tp["token_embedding"]["embedding"])
  sd[f"{_T}.positional_embedding"] = np.asarray(tp["pos_embedding"])
  t_enc = layout.unrolled(tp["Transformer"], txt.depth, txt.scan)
  sd.update(layout.encoder_blocks_torch(t_enc, txt.depth, _TXT_BLOCK, fused_qkv=True))
  sd[f"{_T}.ln_final.weight"], sd[f"{_T}.ln_final.bias"] = layout.layer_norm_torch(t_enc["ln_final"])
  if m.text_proj_bias:
    sd[f"{_T}.text_projection.weight"], sd[f"{_T}.text_projection.bias"] = layout.linear(params["txt_proj"])
  else:
    sd[f"{_T}.text_projection"] = np.asarray(params["txt_proj"]["kernel"])
  if m.project_image:
    sd["visual.head.proj.weight"] = layout.linear(params["img_proj"])[0]
  log_scale = np.float32(np.asarray(params["log_logit_scale"]))
  if m.max_log_logit_scale is not None:
    log_scale = np.minimum(log_scale, np.float32(m.max_log_logit_scale))
  shape = tuple(src.get("logit_scale_shape") or ())
  sd["logit_scale"] = np.asarray(log_scale, np.float32).reshape(shape)
  if "logit_bias" in params:
    sd["logit_bias"] = np.asarray(params["logit_bias"], np.float32).reshape(shape)
  return _cast(sd, dtype or src.get("dtype") or "float32")


def _cast(sd: dict, dtype: str) -> dict[str, np.ndarray]:
  if dtype == "bfloat16":
    import ml_dtypes  # noqa: PLC0415
    target = np.dtype(ml_dtypes.bfloat16)
  else:
    try:
      target = np.dtype(dtype)
    except TypeError:
      raise UserError(f"unknown dtype {dtype!r}") from None
  return {k: np.array(np.asarray(x, np.float32).astype(target), order="C") for k, x in sd.items()}


def model_config(config) -> dict:
  """The open_clip model-config dict of a converted SigLIP (`config.source.arch_config`), for
  `open_clip.model.CustomTextCLIP(**cfg)` after the export."""
  src = config.get("source") or {}
  if not src.get("arch_config"):
    raise UserError("this model was not converted from open_clip, so no open_clip arch is recorded; pass the "
                    "open_clip model name whose shapes it matches")
  return json.loads(src["arch_config"])
