"""Hugging Face `CLIPModel` / `SiglipModel` directories <-> vlm_jax (config, variables), exact both ways.

`from_hf(directory)` reads config.json (through `transformers.AutoConfig`, so omitted fields take the
library's defaults) and the weights (model.safetensors, or pytorch_model.bin loaded with
`torch.load(weights_only=True)`; sharded `*.index.json` layouts too); `to_hf(config, variables, out_dir)`
writes config.json + model.safetensors (+ preprocessor_config.json) that `CLIPModel.from_pretrained` /
`SiglipModel.from_pretrained` load. vlm_jax -> HF -> vlm_jax is bit-exact.

Architectures (the networks are the same; only tensor layout and names change, see `layout.py`):
- CLIP (Radford et al. 2021, HF `CLIPModel`): ViT with a class token that owns the first row of the position
  table (`cls_posemb`), `pre_layrnorm` = `ln_pre`, bias-free patch conv, final `post_layernorm` applied to the
  class token (vlm_jax normalises every token, then takes the class token: the same pooled value); causal text
  tower pooled at the EOT token; bias-free projections; `logit_scale` = `log_logit_scale`. HF pools text at the
  first `eos_token_id` (argmax of the ids when `eos_token_id == 2`, the pre-2023 configs); vlm_jax pools at
  argmax, which is the same position whenever EOS is the largest id in the row — true for the CLIP BPE
  tokenizer (EOT 49407) and for every vlm_jax tokenizer (EOT = vocab_size - 1).
- SigLIP (Zhai et al. 2023, HF `SiglipModel`): ViT without class token, learned positions, biased patch conv,
  `post_layernorm`, MAP head (`head.probe`, `head.attention` = `nn.MultiheadAttention` with packed in_proj,
  `head.layernorm`, `head.mlp`) whose output is the image embedding (no image projection); bidirectional text
  tower pooled at the LAST position, then `head` (a Linear WITH bias); `logit_scale` (log t, not clamped) and
  `logit_bias`. LayerNorm epsilon 1e-6; activation `gelu_pytorch_tanh` = vlm_jax 'gelu_tanh'.

Tokenizer: CLIP directories use the CLIP BPE ('clip_bpe'). SigLIP uses a SentencePiece model (`spiece.model`)
with its own row layout — lower-cased text without punctuation, raw piece ids, EOS (`</s>`) appended, padded
with `</s>` to the context length, no start token — which the text tower reads at the last position; the
config names it {'name': 'siglip', 'model_path': …, 'context_length': …}.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping

import ml_collections
import numpy as np

from vlm_jax.errors import UserError
from vlm_jax.interop import layout
from vlm_jax.interop.torch_weights import load_state_dict

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
CLIP_EOT = 49407
_HF_TO_ACT = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
              "gelu_new": "gelu_tanh", "relu": "relu"}
_ACT_TO_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}
_BLOCK_NAMES = {"ln1": "{p}.layers.{{i}}.layer_norm1", "ln2": "{p}.layers.{{i}}.layer_norm2",
                "q": "{p}.layers.{{i}}.self_attn.q_proj", "k": "{p}.layers.{{i}}.self_attn.k_proj",
                "v": "{p}.layers.{{i}}.self_attn.v_proj", "out": "{p}.layers.{{i}}.self_attn.out_proj",
                "fc1": "{p}.layers.{{i}}.mlp.fc1", "fc2": "{p}.layers.{{i}}.mlp.fc2"}


def _block_names(prefix: str) -> dict[str, str]:
  return {k: v.format(p=prefix) for k, v in _BLOCK_NAMES.items()}


# ----------------------------------------------------------------------------------------------- reading


def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def load_weights(directory: str) -> tuple[dict, str]:
  """{name: numpy array} of an HF model directory and the file it came from (safetensors preferred; `.bin`
  through `torch.load(weights_only=True)`, see `torch_weights.load_state_dict`)."""
  for name in ("model.safetensors", "pytorch_model.bin"):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return load_state_dict(path), name
    index = path + ".index.json"
    if os.path.isfile(index):
      files = sorted(set(_read_json(index)["weight_map"].values()))
      tensors = {}
      for f in files:
        tensors.update(load_state_dict(os.path.join(directory, f)))
      return tensors, os.path.basename(index)
  raise UserError(f"{directory} has no model.safetensors or pytorch_model.bin (a Hugging Face model directory?)")


def _hf_config(directory: str):
  try:
    import transformers  # noqa: PLC0415
  except ImportError:
    raise UserError("converting Hugging Face models needs transformers: pip install 'vlm_jax[interop]'") from None
  try:
    return transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
  except (OSError, ValueError, KeyError) as e:
    raise UserError(f"cannot read the Hugging Face config in {directory}: {str(e).splitlines()[0][:200]}") from None


def _act(name: str, where: str) -> str:
  if name not in _HF_TO_ACT:
    raise UserError(f"{where}.hidden_act={name!r} has no vlm_jax equivalent; supported: {sorted(_HF_TO_ACT)}")
  return _HF_TO_ACT[name]


def _size(v, what: str) -> int:
  if isinstance(v, (list, tuple)):
    if len(set(v)) != 1:
      raise UserError(f"non-square {what} {v} is not supported")
    v = v[0]
  return int(v)


def _tower_cfgs(hf, model_type: str) -> tuple[dict, dict]:
  v, t = hf.vision_config, hf.text_config
  image = dict(kind="vit", width=v.hidden_size, depth=v.num_hidden_layers, mlp_dim=v.intermediate_size,
               num_heads=v.num_attention_heads, patch_size=_size(v.patch_size, "patch_size"),
               image_size=_size(v.image_size, "image_size"), posemb="learn", stem="patch",
               act=_act(v.hidden_act, "vision_config"), norm_eps=float(v.layer_norm_eps))
  text = dict(kind="text", vocab_size=t.vocab_size, max_len=t.max_position_embeddings, width=t.hidden_size,
              depth=t.num_hidden_layers, mlp_dim=t.intermediate_size, num_heads=t.num_attention_heads,
              act=_act(t.hidden_act, "text_config"), norm_eps=float(t.layer_norm_eps))
  if getattr(v, "num_channels", 3) != 3:
    raise UserError(f"vision_config.num_channels={v.num_channels}: vlm_jax images are RGB (3 channels)")
  if model_type == "clip":
    image.update(pool_type="cls", cls_posemb=True, pre_norm=True, patch_bias=False)
    text.update(causal=True, pool_type="eot")
  else:
    image.update(pool_type="map", pre_norm=False, patch_bias=True)
    text.update(causal=False, pool_type="last")
  return image, text


def _check_clip_eos(t) -> None:
  eos = t.eos_token_id
  if eos == 2 or eos == t.vocab_size - 1 or eos == CLIP_EOT:
    return
  raise UserError(f"text_config.eos_token_id={eos!r}: Hugging Face pools at the first EOS, vlm_jax at the largest "
                  "id; they agree only when EOS is the largest id a row can hold (2 = legacy argmax, "
                  f"{CLIP_EOT} = CLIP BPE EOT, or vocab_size - 1)")


def _data_cfg(directory: str, image_size: int, siglip: bool) -> tuple[dict, str]:
  path = os.path.join(directory, "preprocessor_config.json")
  pre = _read_json(path) if os.path.isfile(path) else {}
  mean = pre.get("image_mean", SIGLIP_MEAN if siglip else CLIP_MEAN)
  std = pre.get("image_std", SIGLIP_STD if siglip else CLIP_STD)
  return {"image_size": image_size, "mean": [float(x) for x in mean], "std": [float(x) for x in std]}, (
      json.dumps(pre) if pre else "")


def _scalar(x) -> np.ndarray:
  x = np.asarray(x, np.float32)
  if x.size != 1:
    raise UserError(f"expected a scalar logit scale/bias, got shape {x.shape}")
  return x.reshape(())


def _vision_params(sd: layout.StateDict, image: dict, siglip: bool) -> dict:
  p = "vision_model"
  heads, depth = image["num_heads"], image["depth"]
  pos = sd.take(f"{p}.embeddings.position_embedding.weight")
  out = {"embedding": layout.conv(sd.take(f"{p}.embeddings.patch_embedding.weight"),
                                  sd.take(f"{p}.embeddings.patch_embedding.bias") if siglip else None)}
  enc = layout.encoder_blocks(sd.take, depth, heads, _block_names(f"{p}.encoder"), fused_qkv=False)
  enc["ln_final"] = layout.layer_norm(sd.take(f"{p}.post_layernorm.weight"), sd.take(f"{p}.post_layernorm.bias"))
  out["Transformer"] = enc
  if siglip:
    out["pos_embedding"] = pos[None]
    h = f"{p}.head"
    q, k, v = layout.split_rows(sd.take(f"{h}.attention.in_proj_weight"), sd.take(f"{h}.attention.in_proj_bias"), 3)
    out["MAPHead"] = {
        "probe": sd.take(f"{h}.probe"),
        "attn": layout.attention(q, k, v, (sd.take(f"{h}.attention.out_proj.weight"),
                                           sd.take(f"{h}.attention.out_proj.bias")), heads),
        "ln": layout.layer_norm(sd.take(f"{h}.layernorm.weight"), sd.take(f"{h}.layernorm.bias")),
        "mlp": {n: layout.dense(sd.take(f"{h}.mlp.{n}.weight"), sd.take(f"{h}.mlp.{n}.bias"))
                for n in ("fc1", "fc2")}}
  else:
    out["pos_embedding"] = pos[None, 1:]
    out["cls_pos_embedding"] = pos[None, :1]
    out["cls"] = sd.take(f"{p}.embeddings.class_embedding").reshape(1, 1, -1)
    out["ln_pre"] = layout.layer_norm(sd.take(f"{p}.pre_layrnorm.weight"), sd.take(f"{p}.pre_layrnorm.bias"))
  return out


def _text_params(sd: layout.StateDict, text: dict) -> dict:
  p = "text_model"
  enc = layout.encoder_blocks(sd.take, text["depth"], text["num_heads"], _block_names(f"{p}.encoder"),
                              fused_qkv=False)
  enc["ln_final"] = layout.layer_norm(sd.take(f"{p}.final_layer_norm.weight"),
                                     sd.take(f"{p}.final_layer_norm.bias"))
  return {"token_embedding": {"embedding": sd.take(f"{p}.embeddings.token_embedding.weight")},
          "pos_embedding": sd.take(f"{p}.embeddings.position_embedding.weight"), "Transformer": enc}


def from_hf(directory: str) -> tuple[ml_collections.ConfigDict, dict]:
  """Converts a Hugging Face `CLIPModel` or `SiglipModel` directory to vlm_jax `(config, variables)`.

  `config` has `model` (for `build_model`), `tokenizer`, `data` ({'image_size', 'mean', 'std'}, from
  preprocessor_config.json when present) and `source` (provenance, incl. the original HF JSON so `to_hf` can
  write the same token ids and processor settings back). Parameters are float32 numpy arrays.
  """
  directory = os.path.abspath(directory)
  if not os.path.isfile(os.path.join(directory, "config.json")):
    raise UserError(f"{directory} has no config.json (a Hugging Face model directory?)")
  hf = _hf_config(directory)
  model_type = hf.model_type
  if model_type not in ("clip", "siglip"):
    raise UserError(f"Hugging Face model_type {model_type!r} is not supported; supported: 'clip', 'siglip'")
  siglip = model_type == "siglip"
  image, text = _tower_cfgs(hf, model_type)
  tensors, weights_file = load_weights(directory)
  sd = layout.StateDict(tensors, f"{directory}/{weights_file}", ignore=(r"position_ids$",))
  params = {"img": _vision_params(sd, image, siglip), "txt": _text_params(sd, text)}
  log_scale = _scalar(sd.take("logit_scale"))
  model = dict(image=image, text=text, logit_scale_init=float(log_scale), scan=False, remat="none",
               dtype="float32", param_dtype="float32")
  if siglip:
    if not getattr(hf.vision_config, "vision_use_head", True):
      raise UserError("SigLIP vision_use_head=False has no pooled image embedding; use a model with the MAP head")
    embed = int(getattr(hf.text_config, "projection_size", None) or text["width"])
    if embed != image["width"]:
      raise UserError(f"SigLIP text projection_size {embed} != vision hidden_size {image['width']}")
    params["txt_proj"] = layout.dense(sd.take("text_model.head.weight"), sd.take("text_model.head.bias"))
    params["logit_bias"] = _scalar(sd.take("logit_bias"))
    model.update(embed_dim=embed, project_image=False, text_proj_bias=True, max_log_logit_scale=None,
                 logit_bias_init=float(params["logit_bias"]))
    spm = os.path.join(directory, "spiece.model")
    tokenizer = {"name": "siglip", "model_path": spm if os.path.isfile(spm) else "",
                 "context_length": text["max_len"]}
  else:
    _check_clip_eos(hf.text_config)
    params["img_proj"] = layout.dense(sd.take("visual_projection.weight"))
    params["txt_proj"] = layout.dense(sd.take("text_projection.weight"))
    model.update(embed_dim=int(hf.projection_dim), logit_bias_init=None)
    tokenizer = {"name": "clip_bpe", "context_length": text["max_len"]}
  params["log_logit_scale"] = log_scale
  sd.check_consumed()
  data, pre_json = _data_cfg(directory, image["image_size"], siglip)
  dtypes = sorted({str(x.dtype) for x in tensors.values() if x.dtype.kind in "fV"})
  source = {"format": "hf", "model_type": model_type, "path": directory, "file": weights_file,
            "dtype": ",".join(dtypes),
            "hf_config": json.dumps(_read_json(os.path.join(directory, "config.json"))),
            "hf_preprocessor": pre_json}
  config = ml_collections.ConfigDict({"model": model, "tokenizer": tokenizer, "data": data, "source": source})
  return config, {"params": params}


# ----------------------------------------------------------------------------------------------- writing


def _problems(model, siglip: bool) -> list[str]:
  img, txt = model.img, model.txt
  want_img = dict(stem="patch", pool_type="map" if siglip else "cls", patch_bias=siglip, pre_norm=not siglip)
  want_txt = dict(causal=not siglip, pool_type="last" if siglip else "eot")
  out = [f"image {k}={getattr(img, k, None)!r} (HF needs {v!r})" for k, v in want_img.items()
         if getattr(img, k, None) != v]
  out += [f"text {k}={getattr(txt, k)!r} (HF needs {v!r})" for k, v in want_txt.items() if getattr(txt, k) != v]
  if type(img).__name__ != "ViT":
    out.append(f"image tower {type(img).__name__} (HF needs a ViT)")
  for name, act in (("image", getattr(img, "act", None)), ("text", txt.act)):
    if act not in _ACT_TO_HF:
      out.append(f"{name} act={act!r} (HF supports {sorted(_ACT_TO_HF)})")
  if not model.project_text:
    out.append("project_text=False")
  if siglip:
    if model.project_image:
      out.append("an image projection (HF SigLIP's image embedding is the MAP head output)")
    if model.embed_dim != getattr(img, "width", None):
      out.append(f"embed_dim {model.embed_dim} != image width {getattr(img, 'width', None)}")
  else:
    if not model.project_image:
      out.append("project_image=False")
    if model.text_proj_bias or model.logit_bias_init is not None:
      out.append("a text projection bias or logit bias (HF CLIPModel has neither)")
  if not isinstance(getattr(img, "image_size", None), int) and len(set(img.image_size)) != 1:
    out.append(f"non-square image_size {img.image_size}")
  return out


def _posemb_table(img, params: Mapping) -> np.ndarray:
  grid = (img.image_size // img.patch_size,) * 2 if isinstance(img.image_size, int) else tuple(
      s // img.patch_size for s in img.image_size)
  if img.posemb == "learn":
    return np.asarray(params["pos_embedding"], np.float32)[0]
  from vlm_jax.models.vit import posemb_sincos_2d  # noqa: PLC0415
  return np.asarray(posemb_sincos_2d(grid[0], grid[1], img.width))[0]


def _vision_tensors(img, params: Mapping, siglip: bool) -> dict:
  p = "vision_model"
  enc = layout.unrolled(params["Transformer"], img.depth, img.scan)
  out = layout.encoder_blocks_torch(enc, img.depth, _block_names(f"{p}.encoder"), fused_qkv=False)
  out[f"{p}.post_layernorm.weight"], out[f"{p}.post_layernorm.bias"] = layout.layer_norm_torch(enc["ln_final"])
  w, b = layout.conv_torch(params["embedding"])
  out[f"{p}.embeddings.patch_embedding.weight"] = w
  table = _posemb_table(img, params)
  if siglip:
    out[f"{p}.embeddings.patch_embedding.bias"] = b
    out[f"{p}.embeddings.position_embedding.weight"] = table
    h, m = f"{p}.head", params["MAPHead"]
    a = layout.attention_torch(m["attn"])
    out[f"{h}.probe"] = np.asarray(m["probe"])
    out[f"{h}.attention.in_proj_weight"], out[f"{h}.attention.in_proj_bias"] = layout.join_rows(
        [a["q"], a["k"], a["v"]])
    out[f"{h}.attention.out_proj.weight"], out[f"{h}.attention.out_proj.bias"] = a["out"]
    out[f"{h}.layernorm.weight"], out[f"{h}.layernorm.bias"] = layout.layer_norm_torch(m["ln"])
    for n in ("fc1", "fc2"):
      out[f"{h}.mlp.{n}.weight"], out[f"{h}.mlp.{n}.bias"] = layout.linear(m["mlp"][n])
  else:
    cls = np.asarray(params["cls"], np.float32).reshape(-1)
    cls_pos = (np.asarray(params["cls_pos_embedding"], np.float32).reshape(1, -1) if img.cls_posemb
               else np.zeros((1, cls.size), np.float32))
    out[f"{p}.embeddings.class_embedding"] = cls
    out[f"{p}.embeddings.position_embedding.weight"] = np.concatenate([cls_pos, table], axis=0)
    out[f"{p}.pre_layrnorm.weight"], out[f"{p}.pre_layrnorm.bias"] = layout.layer_norm_torch(params["ln_pre"])
  return out


def _text_tensors(txt, params: Mapping) -> dict:
  p = "text_model"
  enc = layout.unrolled(params["Transformer"], txt.depth, txt.scan)
  out = layout.encoder_blocks_torch(enc, txt.depth, _block_names(f"{p}.encoder"), fused_qkv=False)
  out[f"{p}.final_layer_norm.weight"], out[f"{p}.final_layer_norm.bias"] = layout.layer_norm_torch(enc["ln_final"])
  out[f"{p}.embeddings.token_embedding.weight"] = np.asarray(params["token_embedding"]["embedding"])
  out[f"{p}.embeddings.position_embedding.weight"] = np.asarray(params["pos_embedding"])
  return out


def _effective_log_scale(model, params: Mapping) -> np.float32:
  """log t as the vlm_jax model uses it (HF does not clamp, so a clamped value is written clamped)."""
  s = np.float32(np.asarray(params["log_logit_scale"]))
  return s if model.max_log_logit_scale is None else np.minimum(s, np.float32(model.max_log_logit_scale))


def _hf_json(config, model, siglip: bool) -> dict:
  src = config.get("source") or {}
  model_type = "siglip" if siglip else "clip"
  base = json.loads(src["hf_config"]) if src.get("hf_config") and src.get("model_type") == model_type else {}
  for stale in ("text_config_dict", "vision_config_dict", "torch_dtype"):  # old keys that override text_config
    base.pop(stale, None)
  img, txt = model.img, model.txt
  vision = dict(base.get("vision_config") or {}, hidden_size=img.width, intermediate_size=img.mlp_dim,
                num_hidden_layers=img.depth, num_attention_heads=img.num_heads, num_channels=3,
                image_size=img.image_size if isinstance(img.image_size, int) else img.image_size[0],
                patch_size=img.patch_size, hidden_act=_ACT_TO_HF[img.act], layer_norm_eps=img.norm_eps)
  text = dict(base.get("text_config") or {}, vocab_size=txt.vocab_size, hidden_size=txt.width,
              intermediate_size=txt.mlp_dim, num_hidden_layers=txt.depth, num_attention_heads=txt.num_heads,
              max_position_embeddings=txt.max_len, hidden_act=_ACT_TO_HF[txt.act], layer_norm_eps=txt.norm_eps)
  if not base:  # token ids of the vlm_jax conventions: pad 0, SOT = V - 2, EOT = V - 1 (SigLIP: pad = EOS = 1)
    v = txt.vocab_size
    text.update(dict(pad_token_id=1, eos_token_id=1, bos_token_id=None) if siglip else
                dict(pad_token_id=0, bos_token_id=v - 2, eos_token_id=v - 1))
  out = dict(base, model_type=model_type, architectures=["SiglipModel" if siglip else "CLIPModel"],
             text_config=text, vision_config=vision, dtype="float32")
  if siglip:
    text["projection_size"] = model.embed_dim
    vision["vision_use_head"] = True
  else:
    text["projection_dim"] = vision["projection_dim"] = out["projection_dim"] = model.embed_dim
  return out


def _preprocessor_json(config, siglip: bool, image_size: int) -> dict:
  src = config.get("source") or {}
  if src.get("hf_preprocessor") and src.get("model_type") == ("siglip" if siglip else "clip"):
    return json.loads(src["hf_preprocessor"])
  data = config.get("data") or {}
  mean = list(data.get("mean") or (SIGLIP_MEAN if siglip else CLIP_MEAN))
  std = list(data.get("std") or (SIGLIP_STD if siglip else CLIP_STD))
  common = dict(do_resize=True, resample=3, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                image_mean=mean, image_std=std)
  if siglip:  # SigLIP resizes to the square input ("squash"), bicubic
    return dict(common, image_processor_type="SiglipImageProcessor", size={"height": image_size,
                                                                            "width": image_size})
  return dict(common, image_processor_type="CLIPImageProcessor", size={"shortest_edge": image_size},
              do_center_crop=True, crop_size={"height": image_size, "width": image_size}, do_convert_rgb=True)


def to_hf(config, variables: Mapping[str, Any], out_dir: str) -> None:
  """Writes a Hugging Face `CLIPModel` / `SiglipModel` directory for a vlm_jax model: config.json,
  model.safetensors (float32), preprocessor_config.json, and spiece.model for SigLIP when the config's
  tokenizer names one. The family follows the image pooling ('cls' -> CLIP, 'map' -> SigLIP); a model the HF
  class cannot represent exactly raises a `UserError` listing why. A SLIP SimCLR head is not exported.
  """
  from vlm_jax.models import build_model  # noqa: PLC0415
  model_cfg = config["model"]
  model = build_model(model_cfg)
  siglip = getattr(model.img, "pool_type", None) == "map"
  problems = _problems(model, siglip)
  if problems:
    raise UserError(f"cannot export to a Hugging Face {'SiglipModel' if siglip else 'CLIPModel'}: "
                    + "; ".join(problems))
  params = variables["params"]
  tensors = {**_vision_tensors(model.img, params["img"], siglip), **_text_tensors(model.txt, params["txt"])}
  log_scale = _effective_log_scale(model, params)
  if siglip:
    w, b = layout.linear(params["txt_proj"])
    tensors["text_model.head.weight"] = w
    tensors["text_model.head.bias"] = b if b is not None else np.zeros(w.shape[0], np.float32)
    tensors["logit_scale"] = np.asarray(log_scale, np.float32).reshape(1)
    bias = params.get("logit_bias")
    tensors["logit_bias"] = np.asarray(0. if bias is None else bias, np.float32).reshape(1)
  else:
    tensors["visual_projection.weight"] = layout.linear(params["img_proj"])[0]
    tensors["text_projection.weight"] = layout.linear(params["txt_proj"])[0]
    tensors["logit_scale"] = np.asarray(log_scale, np.float32).reshape(())
  from safetensors.numpy import save_file  # noqa: PLC0415
  os.makedirs(out_dir, exist_ok=True)
  save_file({k: np.array(v, np.float32, order="C") for k, v in tensors.items()},
            os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  hf_json = _hf_json(config, model, siglip)
  if not siglip:
    hf_json["logit_scale_init_value"] = float(log_scale)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_json, f, indent=2, sort_keys=True)
  image_size = hf_json["vision_config"]["image_size"]
  with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
    json.dump(_preprocessor_json(config, siglip, image_size), f, indent=2, sort_keys=True)
  spm = ((config.get("tokenizer") or {}).get("model_path") or "") if siglip else ""
  if spm and os.path.isfile(spm):
    shutil.copyfile(spm, os.path.join(out_dir, "spiece.model"))
