"""open_clip / OpenAI CLIP checkpoints <-> vlm_jax `(config, variables)`, for the CLIP families.

Covers CLIP ViTs (Radford et al. 2021; the LAION/DataComp open_clip models of Cherti et al. 2023 and Gadre et al.
2023, incl. `-quickgelu` names) and CLIP's ModifiedResNet (RN50, RN101, RN50x4, …). SigLIP (Zhai et al. 2023)
arch names dispatch to `vlm_jax.interop.siglip`. The architecture comes from the open_clip model-config JSON
(read as data from the installed package, never importing it) and from the tensor shapes, which must agree.

Tensor mapping (torch name -> vlm_jax variable; every map is a transpose/reshape/split, so both directions are
exact):
- fused `attn.in_proj_{weight,bias}` [3D, D] -> q/k/v `kernel` [D, heads, D/heads] (+ bias [heads, D/heads]);
  `attn.out_proj` -> `out` kernel [heads, D/heads, D]; Linear (out, in) -> Dense (in, out); convs OIHW -> HWIO;
- ViT: `class_embedding` -> `cls`; `positional_embedding` row 0 -> `cls_pos_embedding`, rows 1: -> `pos_embedding`
  (the [CLS] token's own position, `ViT.cls_posemb=True`); `ln_pre`; `ln_post` -> `Transformer/ln_final`;
  `visual.proj` -> `img_proj`;
- ModifiedResNet: `attnpool.{positional_embedding, q_proj, k_proj, v_proj, c_proj}`; BatchNorm weight/bias ->
  params scale/bias, running mean/var -> 'batch_stats' (`num_batches_tracked` is recorded in `source`);
- text: token/positional embeddings, causal mask, EOT pooling at the argmax id ('eot'), `ln_final`,
  `text_projection` -> `txt_proj`; `logit_scale` (already a log) -> `log_logit_scale`.
QuickGELU (x * sigmoid(1.702 x)) is used where open_clip uses it: `quick_gelu` in the JSON (the `-quickgelu`
names) and OpenAI's original checkpoints (`from_openai`); otherwise exact GELU.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from typing import Mapping

import ml_collections
import numpy as np
from flax import traverse_util

from vlm_jax.errors import UserError
from vlm_jax.interop.torch_weights import load_state_dict, to_numpy

__all__ = ["from_open_clip", "from_openai", "to_open_clip", "open_clip_model_config", "load_state_dict",
           "model_config_json", "is_siglip"]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IGNORED_KEYS = ("attn_mask", "text.attn_mask", "input_resolution", "context_length", "vocab_size")
# open_clip config keys that do not change the converted network (training-only or tokenizer details)
_INERT = {"patch_dropout", "output_tokens", "attn_pooler_queries", "attn_pooler_heads", "timm_pool", "timm_proj",
          "timm_model_pretrained", "timm_drop", "timm_drop_path", "timm_proj_bias", "hf_model_pretrained",
          "hf_proj_type", "hf_pooler_type", "hf_tokenizer_name", "tokenizer_kwargs", "tokenizer_mode",
          "pad_id", "eos_id", "pos_embed_type", "init_logit_scale", "nonscalar_logit_scale", "preprocess_cfg",
          "custom_text", "quick_gelu", "embed_dim", "vision_cfg", "text_cfg", "head_width", "mlp_ratio",
          "layers", "width", "heads", "patch_size", "image_size", "context_length", "vocab_size"}
_ACCEPTED = {("vision_cfg", "pool_type"): ("tok",), ("text_cfg", "pool_type"): ("argmax", "first", "last"),
             ("text_cfg", "proj_type"): ("linear",), ("vision_cfg", "block_type"): ("default",),
             ("text_cfg", "block_type"): ("default",), ("text_cfg", "no_causal_mask"): (True, False),
             ("vision_cfg", "norm_kwargs"): ({"eps": 1e-5},), ("text_cfg", "norm_kwargs"): ({"eps": 1e-5},)}

# (forward, inverse) array maps; forward: torch layout -> vlm_jax layout
ID = (lambda x: x, lambda x: x)
T = (lambda x: x.T, lambda x: x.T)
CONV = (lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1))
TOKEN = (lambda x: x.reshape(1, 1, -1), lambda x: x.reshape(-1))
GRID = (lambda x: x[None], lambda x: x[0])


def _heads_in(h):  # Linear [out, in] -> [in, heads, head_dim]
  return (lambda w: w.T.reshape(w.shape[1], h, -1), lambda k: k.reshape(k.shape[0], -1).T)


def _heads_bias(h):
  return (lambda b: b.reshape(h, -1), lambda b: b.reshape(-1))


def _heads_out(h):  # Linear [out, in] -> [heads, head_dim, out]
  return (lambda w: w.T.reshape(h, -1, w.shape[0]), lambda k: k.reshape(-1, k.shape[-1]).T)


# --- model-config JSON ------------------------------------------------------------------------------------------

def _open_clip_config_dir() -> str | None:
  spec = importlib.util.find_spec("open_clip")  # locates the package without importing it (no torch import)
  if spec is None or not spec.submodule_search_locations:
    return None
  return os.path.join(list(spec.submodule_search_locations)[0], "model_configs")


def model_config_json(arch: str | None) -> tuple[str | None, dict | None]:
  """(name, open_clip model-config dict) for an arch name or a JSON path; (None, None) for arch=None.

  A name is looked up in the installed open_clip's `model_configs/` (read as data; open_clip is not imported).
  """
  if arch is None:
    return None, None
  arch = os.fspath(arch)
  if arch.endswith(".json") or os.path.isfile(arch):
    if not os.path.isfile(arch):
      raise UserError(f"no such open_clip model-config file: {arch}")
    try:
      with open(arch) as f:
        return os.path.splitext(os.path.basename(arch))[0], json.load(f)
    except json.JSONDecodeError as e:
      raise UserError(f"{arch} is not valid JSON: {e}") from None
  name = arch.replace("/", "-")
  directory = _open_clip_config_dir()
  if directory is None:
    raise UserError(f"arch name {arch!r} needs open_clip installed to read its model config "
                    f"(pip install 'vlm_jax[interop]'), or pass the path of its model-config JSON")
  path = os.path.join(directory, name + ".json")
  if not os.path.isfile(path):
    known = sorted(f[:-5] for f in os.listdir(directory) if f.endswith(".json"))
    close = [k for k in known if k.lower().startswith(name.lower().split("-")[0].lower())][:12]
    raise UserError(f"unknown open_clip arch {arch!r}; e.g. {', '.join(close or known[:12])} "
                    f"(or pass a model-config JSON path)")
  with open(path) as f:
    return name, json.load(f)


def is_siglip(arch: str | None, cfg: Mapping | None = None, state_dict: Mapping | None = None) -> bool:
  """True for open_clip SigLIP models (timm trunk + logit bias), which `vlm_jax.interop.siglip` converts."""
  if arch is not None and "siglip" in os.path.basename(os.fspath(arch)).lower():
    return True
  if cfg and (cfg.get("init_logit_bias") is not None or
              "siglip" in str((cfg.get("vision_cfg") or {}).get("timm_model_name") or "").lower()):
    return True
  return bool(state_dict) and ("logit_bias" in state_dict
                               or any(k.startswith("visual.trunk.") for k in state_dict))


def _check_supported(arch: str, cfg: Mapping) -> None:
  """UserError for open_clip options that change the network in a way vlm_jax's CLIP does not implement."""
  for section, sub in (("", cfg), ("vision_cfg", cfg.get("vision_cfg") or {}),
                       ("text_cfg", cfg.get("text_cfg") or {})):
    for k, v in sub.items():
      accepted = _ACCEPTED.get((section, k))
      if v and not (v in accepted if accepted else k in _INERT):
        raise UserError(f"open_clip arch {arch!r} uses {section}{'.' if section else ''}{k}={json.dumps(v)[:60]}, "
                        f"which the vlm_jax CLIP converter does not support")


# --- shape inference --------------------------------------------------------------------------------------------

def _count(sd: Mapping, prefix: str) -> int:
  rx = re.compile(re.escape(prefix) + r"(\d+)\.")
  idx = {int(m.group(1)) for k in sd for m in [rx.match(k)] if m}
  return max(idx) + 1 if idx else 0


def _get(sd: Mapping, key: str, what: str) -> np.ndarray:
  if key not in sd:
    raise UserError(f"state dict has no {key!r} ({what}); is it an open_clip/OpenAI CLIP checkpoint?")
  return sd[key]


def _infer(sd: Mapping, t: str) -> dict:
  """Architecture numbers read off the tensor shapes (OpenAI `build_model` style)."""
  s = {"vit": "visual.proj" in sd}
  if s["vit"]:
    w = _get(sd, "visual.conv1.weight", "patch embedding")
    n = _get(sd, "visual.positional_embedding", "position embedding").shape[0] - 1
    s.update(v_width=w.shape[0], patch_size=w.shape[-1], v_layers=_count(sd, "visual.transformer.resblocks."),
             v_grid=n, embed_dim=sd["visual.proj"].shape[1],
             v_mlp=_get(sd, "visual.transformer.resblocks.0.mlp.c_fc.weight", "vision MLP").shape[0])
  else:
    pos = _get(sd, "visual.attnpool.positional_embedding", "ModifiedResNet attention pool")
    s.update(v_layers=[_count(sd, f"visual.layer{i}.") for i in range(1, 5)],
             v_width=_get(sd, "visual.layer1.0.conv1.weight", "ResNet stage 1").shape[0], v_grid=pos.shape[0] - 1,
             embed_dim=_get(sd, "visual.attnpool.c_proj.weight", "attention pool").shape[0])
  emb = _get(sd, t + "token_embedding.weight", "token embedding")
  s.update(vocab_size=emb.shape[0], t_width=emb.shape[1], t_layers=_count(sd, t + "transformer.resblocks."),
           context_length=_get(sd, t + "positional_embedding", "text positions").shape[0],
           t_mlp=_get(sd, t + "transformer.resblocks.0.mlp.c_fc.weight", "text MLP").shape[0],
           t_embed=_get(sd, t + "text_projection", "text projection").shape[1])
  if s["t_embed"] != s["embed_dim"]:
    raise UserError(f"text projection width {s['t_embed']} != image embedding width {s['embed_dim']}")
  return s


def _agree(arch: str, what: str, expected, found) -> None:
  if expected is not None and expected != found:
    raise UserError(f"open_clip arch {arch!r} has {what} {expected}, but the state dict has {found} "
                    f"(wrong --arch?)")


def _resolve(arch: str | None, cfg: dict | None, s: dict) -> dict:
  """Full architecture: the JSON's numbers checked against the shapes; heads from the JSON (with open_clip's
  defaults: head_width 64, text heads 8) or, without a JSON, width // 64 (OpenAI's `build_model`)."""
  default_text_heads = 8 if cfg is not None else s["t_width"] // 64
  cfg = cfg or {}
  v, t, a = cfg.get("vision_cfg") or {}, cfg.get("text_cfg") or {}, arch or "?"
  if v.get("layers") is not None and isinstance(v["layers"], (list, tuple)) == s["vit"]:
    raise UserError(f"open_clip arch {a!r} is a {'ResNet' if s['vit'] else 'ViT'}, the state dict is not")
  _agree(a, "embed_dim", cfg.get("embed_dim"), s["embed_dim"])
  _agree(a, "vision width", v.get("width"), s["v_width"])
  _agree(a, "vision layers", None if v.get("layers") is None else
         (list(v["layers"]) if isinstance(v["layers"], (list, tuple)) else v["layers"]), s["v_layers"])
  head_width = int(v.get("head_width", 64))
  size = v.get("image_size")
  size = tuple(size) if isinstance(size, (list, tuple)) else ((size, size) if size else None)
  if s["vit"]:
    _agree(a, "patch_size", v.get("patch_size"), s["patch_size"])
    p = s["patch_size"]
    if size is None:
      g = int(round(math.sqrt(s["v_grid"])))
      size = (g * p, g * p)
    _agree(a, "number of patches", (size[0] // p) * (size[1] // p), s["v_grid"])
    if "mlp_ratio" in v:
      _agree(a, "vision MLP width", int(s["v_width"] * v["mlp_ratio"]), s["v_mlp"])
    v_heads = s["v_width"] // head_width
  else:
    if size is None:
      g = int(round(math.sqrt(s["v_grid"])))
      size = (g * 32, g * 32)
    _agree(a, "attention-pool grid", (size[0] // 32) * (size[1] // 32), s["v_grid"])
    if size[0] != size[1]:
      raise UserError(f"open_clip arch {a!r}: ModifiedResNet needs a square image_size, got {list(size)}")
    v_heads = s["v_width"] * 32 // head_width
  for key, k in (("width", "t_width"), ("layers", "t_layers"), ("context_length", "context_length"),
                 ("vocab_size", "vocab_size")):
    _agree(a, f"text {key}", t.get(key), s[k])
  if "mlp_ratio" in t:
    _agree(a, "text MLP width", int(s["t_width"] * t["mlp_ratio"]), s["t_mlp"])
  return dict(s, image_size=size, v_heads=v_heads, t_heads=int(t.get("heads", default_text_heads)),
              causal=not t.get("no_causal_mask", False),
              t_pool={"argmax": "eot", "first": "first", "last": "last"}[t.get("pool_type", "argmax")])


# --- tensor rules -----------------------------------------------------------------------------------------------

def _ln(tp: str, fp: tuple) -> list:
  return [(tp + ".weight", ("params",) + fp + ("scale",), ID), (tp + ".bias", ("params",) + fp + ("bias",), ID)]


def _block(tp: str, fp: tuple, heads: int) -> list:
  r = _ln(tp + "ln_1", fp + ("ln1",)) + _ln(tp + "ln_2", fp + ("ln2",))
  for n, f in (("q", "query"), ("k", "key"), ("v", "value")):
    r += [(f"{tp}attn.in_proj_weight.{n}", ("params",) + fp + ("attn", f, "kernel"), _heads_in(heads)),
          (f"{tp}attn.in_proj_bias.{n}", ("params",) + fp + ("attn", f, "bias"), _heads_bias(heads))]
  r += [(tp + "attn.out_proj.weight", ("params",) + fp + ("attn", "out", "kernel"), _heads_out(heads)),
        (tp + "attn.out_proj.bias", ("params",) + fp + ("attn", "out", "bias"), ID)]
  for tn, fn in (("c_fc", "fc1"), ("c_proj", "fc2")):
    r += [(f"{tp}mlp.{tn}.weight", ("params",) + fp + ("mlp", fn, "kernel"), T),
          (f"{tp}mlp.{tn}.bias", ("params",) + fp + ("mlp", fn, "bias"), ID)]
  return r


def _bn(tp: str, fp: tuple) -> list:
  return [(tp + ".weight", ("params",) + fp + ("scale",), ID), (tp + ".bias", ("params",) + fp + ("bias",), ID),
          (tp + ".running_mean", ("batch_stats",) + fp + ("mean",), ID),
          (tp + ".running_var", ("batch_stats",) + fp + ("var",), ID)]


def _rules(a: dict, t: str) -> list:
  """(torch name, vlm_jax variable path, (forward, inverse)) for every tensor of the architecture `a`."""
  r = []
  if a["vit"]:
    r += [("visual.conv1.weight", ("params", "img", "embedding", "kernel"), CONV),
          ("visual.class_embedding", ("params", "img", "cls"), TOKEN),
          ("visual.positional_embedding.cls", ("params", "img", "cls_pos_embedding"), TOKEN),
          ("visual.positional_embedding.grid", ("params", "img", "pos_embedding"), GRID),
          ("visual.proj", ("params", "img_proj", "kernel"), ID)]
    r += _ln("visual.ln_pre", ("img", "ln_pre")) + _ln("visual.ln_post", ("img", "Transformer", "ln_final"))
    for i in range(a["v_layers"]):
      r += _block(f"visual.transformer.resblocks.{i}.", ("img", "Transformer", f"block_{i}"), a["v_heads"])
  else:
    for i in (1, 2, 3):
      r += [(f"visual.conv{i}.weight", ("params", "img", f"conv{i}", "kernel"), CONV)]
      r += _bn(f"visual.bn{i}", ("img", f"bn{i}"))
    for s, n in enumerate(a["v_layers"], start=1):
      for b in range(n):
        tp, fp = f"visual.layer{s}.{b}.", ("img", f"layer{s}_{b}")
        for i in (1, 2, 3):
          r += [(f"{tp}conv{i}.weight", ("params",) + fp + (f"conv{i}", "kernel"), CONV)]
          r += _bn(f"{tp}bn{i}", fp + (f"bn{i}",))
        if b == 0:  # CLIP's first block of every stage changes width (and stride): avgpool-conv-BN shortcut
          r += [(f"{tp}downsample.0.weight", ("params",) + fp + ("downsample_conv", "kernel"), CONV)]
          r += _bn(f"{tp}downsample.1", fp + ("downsample_bn",))
    h, ap = a["v_heads"], ("params", "img", "attnpool")
    r += [("visual.attnpool.positional_embedding", ap + ("positional_embedding",), ID)]
    for n in ("q_proj", "k_proj", "v_proj"):
      r += [(f"visual.attnpool.{n}.weight", ap + (n, "kernel"), _heads_in(h)),
            (f"visual.attnpool.{n}.bias", ap + (n, "bias"), _heads_bias(h))]
    r += [("visual.attnpool.c_proj.weight", ap + ("c_proj", "kernel"), _heads_out(h)),
          ("visual.attnpool.c_proj.bias", ap + ("c_proj", "bias"), ID)]
  r += [(t + "token_embedding.weight", ("params", "txt", "token_embedding", "embedding"), ID),
        (t + "positional_embedding", ("params", "txt", "pos_embedding"), ID),
        (t + "text_projection", ("params", "txt_proj", "kernel"), ID),
        ("logit_scale", ("params", "log_logit_scale"), (lambda x: x.reshape(()), lambda x: x))]
  r += _ln(t + "ln_final", ("txt", "Transformer", "ln_final"))
  for i in range(a["t_layers"]):
    r += _block(f"{t}transformer.resblocks.{i}.", ("txt", "Transformer", f"block_{i}"), a["t_heads"])
  return r


def _split_fused(sd: Mapping, vit: bool) -> dict:
  """Splits fused in_proj tensors into .q/.k/.v and the ViT position table into .cls/.grid (virtual names)."""
  out = {}
  for k, v in sd.items():
    if k.endswith((".attn.in_proj_weight", ".attn.in_proj_bias")):
      if v.shape[0] % 3:
        raise UserError(f"{k} has {v.shape[0]} rows, not 3 x width")
      out.update({f"{k}.{n}": part for n, part in zip("qkv", np.split(v, 3, axis=0))})
    elif vit and k == "visual.positional_embedding":
      out[k + ".cls"], out[k + ".grid"] = v[0], v[1:]
    else:
      out[k] = v
  return out


def _join_fused(sd: dict) -> dict:
  out = {}
  for k, v in sd.items():
    if k.endswith((".in_proj_weight.q", ".in_proj_bias.q")):
      base = k[:-2]
      out[base] = np.concatenate([v, sd[base + ".k"], sd[base + ".v"]], axis=0)
    elif k == "visual.positional_embedding.cls":
      out["visual.positional_embedding"] = np.concatenate([v[None], sd["visual.positional_embedding.grid"]])
    elif not k.endswith((".in_proj_weight.k", ".in_proj_weight.v", ".in_proj_bias.k", ".in_proj_bias.v",
                         "positional_embedding.grid")):
      out[k] = v
  return out


def _resize_pos(sd: dict, a: dict, image_size: int) -> tuple[dict, dict]:
  """Resizes the patch/attention-pool position grid for another input resolution (bicubic, as open_clip)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from vlm_jax.models.resnet import resize_positional_embedding  # noqa: PLC0415
  stride = a["patch_size"] if a["vit"] else 32
  if image_size % stride:
    what = "patch size" if a["vit"] else "ResNet stride"
    raise UserError(f"image_size {image_size} is not a multiple of the {what} {stride}")
  g = image_size // stride
  old = (a["image_size"][0] // stride, a["image_size"][1] // stride)
  if a["vit"] and old != (g, g):
    grid = sd["visual.positional_embedding.grid"].astype(np.float32).reshape(old + (-1,))
    grid = jax.image.resize(jnp.asarray(grid), (g, g, grid.shape[-1]), "bicubic", antialias=True)
    sd["visual.positional_embedding.grid"] = np.asarray(grid).reshape(g * g, -1)
  elif not a["vit"] and old != (g, g):
    pos = jnp.asarray(sd["visual.attnpool.positional_embedding"].astype(np.float32))
    sd["visual.attnpool.positional_embedding"] = np.asarray(resize_positional_embedding(pos, (g, g)))
  return sd, dict(a, image_size=(image_size, image_size), v_grid=g * g)


def _size(a: dict):
  """An int for square images (as configs write it), else [h, w]."""
  h, w = a["image_size"]
  return h if h == w else [h, w]


def _model_config(a: dict, act: str, logit_scale: float) -> dict:
  if a["vit"]:
    image = dict(kind="vit", width=a["v_width"], depth=a["v_layers"], mlp_dim=a["v_mlp"], num_heads=a["v_heads"],
                 patch_size=a["patch_size"], image_size=_size(a), pool_type="cls", pre_norm=True,
                 patch_bias=False, cls_posemb=True, act=act)
  else:
    image = dict(kind="resnet", layers=list(a["v_layers"]), width=a["v_width"], heads=a["v_heads"],
                 output_dim=a["embed_dim"], image_size=a["image_size"][0])
  text = dict(kind="text", vocab_size=a["vocab_size"], max_len=a["context_length"], width=a["t_width"],
              depth=a["t_layers"], mlp_dim=a["t_mlp"], num_heads=a["t_heads"], causal=a["causal"],
              pool_type=a["t_pool"], act=act)
  return dict(image=image, text=text, embed_dim=a["embed_dim"], logit_scale_init=logit_scale,
              logit_bias_init=None, simclr_head=None, flip_mask_ratio=0.0, scan=False, remat="none",
              dtype="float32", param_dtype="float32")


def _check_against_model(config: ml_collections.ConfigDict, variables: dict) -> None:
  """Converted variables must have exactly the structure and shapes `build_model(config.model).init` makes."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import flax.linen as nn  # noqa: PLC0415
  from vlm_jax.models import build_model  # noqa: PLC0415
  model = build_model(config.model)
  size, length = np.broadcast_to(config.data.image_size, 2), config.model.text.max_len
  batch = {"image": jax.ShapeDtypeStruct((1, int(size[0]), int(size[1]), 3), jnp.float32),
           "text": jax.ShapeDtypeStruct((1, length), jnp.int32)}
  abstract = nn.meta.unbox(jax.eval_shape(lambda b: model.init(jax.random.key(0), b), batch))
  want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract, sep="/").items()}
  got = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(variables, sep="/").items()}
  if want != got:
    diff = sorted(set(want.items()) ^ set(got.items()))[:6]
    raise AssertionError(f"converted variables do not match the vlm_jax model: {diff}")


def from_open_clip(state_dict, arch: str | None = None, *, image_size: int | None = None,
                   quick_gelu: bool | None = None, source_format: str = "open_clip",
                   check: bool = True) -> tuple[ml_collections.ConfigDict, dict]:
  """An open_clip CLIP state dict (or a path to one) -> (config, variables) for `vlm_jax.models.build_model`.

  Args:
    state_dict: {torch name: array/tensor}, or a weight-file path (read with `load_state_dict`).
    arch: open_clip model name ('ViT-B-32', 'RN50', 'ViT-B-32-quickgelu', …), a model-config JSON path, or None
      to infer everything from the shapes (heads = width // 64). SigLIP names go to `vlm_jax.interop.siglip`.
    image_size: convert for another input resolution: the position grid is resized bicubically (open_clip's
      `resize_pos_embed` recipe); the round trip is then no longer the identity.
    quick_gelu: force QuickGELU on/off; default: the JSON's `quick_gelu` (the `-quickgelu` names), else GELU.
    source_format: 'open_clip' or 'openai' (recorded in `config.source`).
    check: verify the variables against `build_model(config.model)` shapes (abstract init, no compute).
  Returns:
    config with keys model, tokenizer, data, source (see CONTRACTS.md); variables {'params'[, 'batch_stats']}
    of float32 numpy arrays (fp16/bf16 sources are upcast exactly; their dtypes are recorded in `source`).
  """
  file = None
  if isinstance(state_dict, (str, os.PathLike)):
    file, state_dict = os.fspath(state_dict), load_state_dict(state_dict)
  sd = {k: to_numpy(v) for k, v in state_dict.items()}
  siglip = is_siglip(arch, None, sd)
  name, cfg = (None, None) if siglip else model_config_json(arch)
  if siglip or is_siglip(None, cfg):
    from vlm_jax.interop import siglip as siglip_interop  # noqa: PLC0415  (open_clip's SigLIP: helper module)
    kw = {} if image_size is None else {"image_size": image_size}
    return siglip_interop.from_open_clip_siglip(state_dict, arch, **kw)
  if cfg is not None:
    _check_supported(name, cfg)
  t = "text." if "text.token_embedding.weight" in sd else ""
  a = _resolve(name, cfg, _infer(sd, t))
  if quick_gelu is None:
    quick_gelu = bool((cfg or {}).get("quick_gelu", source_format == "openai"))

  dtypes: dict[str, list[str]] = {}
  nbt_values = []
  nbt_keys = [k for k in sd if k.endswith(".num_batches_tracked")]
  for k in nbt_keys:
    v = int(np.asarray(sd.pop(k)).reshape(()))
    if v:
      nbt_values.append([k, v])
  for k in IGNORED_KEYS:
    sd.pop(k, None)
  logit_shape = list(np.shape(_get(sd, "logit_scale", "logit scale")))
  for k, v in list(sd.items()):
    if np.issubdtype(v.dtype, np.floating) or v.dtype.name == "bfloat16":
      if v.dtype != np.float32:
        dtypes.setdefault(v.dtype.name, []).append(k)
      sd[k] = v.astype(np.float32)
  sd = _split_fused(sd, a["vit"])
  if image_size is not None:
    sd, a = _resize_pos(sd, a, int(image_size))

  flat = {}
  for tk, path, (fwd, _) in _rules(a, t):
    if tk not in sd:
      raise UserError(f"state dict has no {tk!r} needed by open_clip arch {name or '(inferred)'!r}")
    flat[path] = np.array(fwd(sd.pop(tk)), order="C")
  if sd:
    raise UserError(f"state dict has {len(sd)} tensor(s) the {name or 'inferred'} CLIP architecture has no place "
                    f"for, e.g. {sorted(sd)[:4]} (another architecture?)")
  variables = traverse_util.unflatten_dict(flat)

  pre = ((cfg or {}).get("preprocess_cfg") or {})
  config = ml_collections.ConfigDict({
      "model": _model_config(a, "quick_gelu" if quick_gelu else "gelu", float(flat["params", "log_logit_scale"])),
      "tokenizer": {"name": "clip_bpe", "context_length": a["context_length"]},
      "data": {"image_size": _size(a), "mean": list(pre.get("mean", OPENAI_MEAN)),
               "std": list(pre.get("std", OPENAI_STD))},
      "source": {"format": source_format, "arch": name, "file": file, "quick_gelu": quick_gelu,
                 "text_prefix": t, "dtypes": dtypes, "logit_scale_shape": logit_shape,
                 "num_batches_tracked": bool(nbt_keys), "num_batches_tracked_nonzero": nbt_values,
                 "resized_to": image_size},
  })
  if check:
    _check_against_model(config, variables)
  return config, variables


def from_openai(state_dict, arch: str | None = None, *, image_size: int | None = None, quick_gelu: bool = True,
                check: bool = True) -> tuple[ml_collections.ConfigDict, dict]:
  """OpenAI's original CLIP checkpoints (same tensor names as open_clip; trained with QuickGELU); a TorchScript
  archive path is read without executing it. Arguments as `from_open_clip`."""
  return from_open_clip(state_dict, arch, image_size=image_size, quick_gelu=quick_gelu, source_format="openai",
                        check=check)


def _plain(config) -> dict:
  return config.to_dict() if hasattr(config, "to_dict") else json.loads(json.dumps(dict(config)))


def _towers(config: dict):
  """The built TwoTower (fields resolved from variants) after checking open_clip's CLIP can hold it."""
  from vlm_jax.models import build_model  # noqa: PLC0415
  m = build_model(config["model"])
  img, txt = m.img, m.txt
  if m.simclr_hidden or m.logit_bias_init is not None or not m.project_text:
    raise UserError("open_clip's CLIP has no SimCLR head / logit bias / unprojected text tower")
  acts = {txt.act} | ({img.act} if hasattr(img, "act") else set())
  if len(acts) != 1 or not acts <= {"gelu", "quick_gelu"}:
    raise UserError(f"open_clip CLIP uses one activation, GELU or QuickGELU, for both towers; got {sorted(acts)}")
  if txt.pool_type not in ("eot", "first", "last"):
    raise UserError(f"open_clip's text tower cannot pool {txt.pool_type!r}")
  if hasattr(img, "patch_size"):  # ViT
    need = (("pool_type", "cls"), ("pre_norm", True), ("patch_bias", False), ("posemb", "learn"),
            ("stem", "patch"))
    bad = [f"{k}={getattr(img, k)!r}" for k, ok in need if getattr(img, k) != ok]
    if bad or not m.project_image:
      raise UserError(f"open_clip's CLIP ViT needs pool_type='cls', pre_norm=True, patch_bias=False, "
                      f"posemb='learn', stem='patch'; this model has {', '.join(bad) or 'no image projection'}")
  elif m.project_image:
    raise UserError("open_clip's ModifiedResNet projects inside its attention pool: needs output_dim == embed_dim")
  return m, img, txt


def _arch(m, img, txt) -> dict:
  vit = hasattr(img, "patch_size")
  size = img.image_size if isinstance(img.image_size, (list, tuple)) else (img.image_size, img.image_size)
  a = dict(vit=vit, image_size=tuple(int(s) for s in size), embed_dim=m.embed_dim, vocab_size=txt.vocab_size,
           context_length=txt.max_len, t_width=txt.width, t_layers=txt.depth, t_mlp=txt.mlp_dim,
           t_heads=txt.num_heads, causal=txt.causal, t_pool=txt.pool_type)
  if vit:
    a.update(v_width=img.width, v_layers=img.depth, v_mlp=img.mlp_dim, v_heads=img.num_heads,
             patch_size=img.patch_size)
  else:
    a.update(v_width=img.width, v_layers=list(img.layers), v_heads=img.heads)
  return a


def _unstack(variables: dict) -> dict:
  """Scanned encoders ('blocks' with a leading layers axis) -> unrolled 'block_i' (numpy); boxes unwrapped."""
  import flax.linen as nn  # noqa: PLC0415
  flat = traverse_util.flatten_dict(nn.meta.unbox(dict(variables)))
  out = {}
  for path, v in flat.items():
    if "blocks" in path:
      i = path.index("blocks")
      for layer in range(np.shape(v)[0]):
        out[path[:i] + (f"block_{layer}",) + path[i + 1:]] = np.asarray(v)[layer]
    else:
      out[path] = v
  return out


def to_open_clip(config, variables: dict, *, dtype: str | None = None) -> dict[str, np.ndarray]:
  """vlm_jax (config, variables) -> an open_clip CLIP state dict {torch name: numpy array}.

  The inverse of `from_open_clip`: tensor names, layouts and (from `config.source`) dtypes, logit-scale shape,
  text prefix and BatchNorm `num_batches_tracked` are restored, so `to_open_clip(*from_open_clip(sd))` equals `sd`
  tensor for tensor. Models trained in vlm_jax export too when open_clip's CLIP can hold them (see `_towers`); a
  ViT without `cls_posemb` gets a zero class position row (the same network). `dtype` ('float16', …) casts every
  floating tensor; load the result with `open_clip.CLIP(**open_clip_model_config(config))`.
  """
  cfg = _plain(config)
  src = cfg.get("source") or {}
  model_cfg = cfg.get("model") or {}
  if model_cfg.get("logit_bias_init") is not None or is_siglip(src.get("arch")):
    from vlm_jax.interop import siglip  # noqa: PLC0415
    return siglip.to_open_clip_siglip(config, variables, **({"dtype": dtype} if dtype else {}))
  m, img, txt = _towers(cfg)
  flat = _unstack(variables)
  a = _arch(m, img, txt)
  if a["vit"] and not img.cls_posemb:
    flat["params", "img", "cls_pos_embedding"] = np.zeros((1, 1, a["v_width"]), np.float32)
  t = src.get("text_prefix", "")
  sd = {}
  for tk, path, (_, inv) in _rules(a, t):
    if path not in flat:
      raise UserError(f"variables lack {'/'.join(path)} (not a vlm_jax CLIP of this architecture?)")
    sd[tk] = np.array(inv(np.asarray(flat.pop(path))), order="C")
  if flat:
    raise UserError(f"variables hold {len(flat)} array(s) open_clip's CLIP has no place for, e.g. "
                    f"{['/'.join(k) for k in sorted(flat)[:4]]}")
  sd = _join_fused(sd)
  sd["logit_scale"] = sd["logit_scale"].reshape(src.get("logit_scale_shape") or ())
  cast = {k: dt for dt, keys in (src.get("dtypes") or {}).items() for k in keys}
  for k, v in sd.items():
    target = dtype or cast.get(k)
    if target:
      import ml_dtypes  # noqa: PLC0415
      sd[k] = v.astype(ml_dtypes.bfloat16 if target == "bfloat16" else np.dtype(target))
  if not a["vit"] and src.get("num_batches_tracked", True):
    nonzero = dict((k, v) for k, v in src.get("num_batches_tracked_nonzero") or [])
    for k in [k[:-len(".running_mean")] for k in sd if k.endswith(".running_mean")]:
      sd[k + ".num_batches_tracked"] = np.asarray(nonzero.get(k + ".num_batches_tracked", 0), np.int64)
  return sd


def open_clip_model_config(config) -> dict:
  """The open_clip model-config dict (`open_clip.CLIP(**cfg)` / a model_configs JSON) for a vlm_jax CLIP config."""
  cfg = _plain(config)
  m, img, txt = _towers(cfg)
  a = _arch(m, img, txt)
  size = _size(a)
  if a["vit"]:
    vision = dict(image_size=size, layers=a["v_layers"], width=a["v_width"], patch_size=a["patch_size"],
                  head_width=a["v_width"] // a["v_heads"], mlp_ratio=a["v_mlp"] / a["v_width"])
  else:
    vision = dict(image_size=size, layers=a["v_layers"], width=a["v_width"], patch_size=None,
                  head_width=a["v_width"] * 32 // a["v_heads"])
  text = dict(context_length=a["context_length"], vocab_size=a["vocab_size"], width=a["t_width"],
              heads=a["t_heads"], layers=a["t_layers"], mlp_ratio=a["t_mlp"] / a["t_width"])
  if not a["causal"]:
    text["no_causal_mask"] = True
  if a["t_pool"] != "eot":
    text["pool_type"] = a["t_pool"]
  out = dict(embed_dim=a["embed_dim"], quick_gelu=txt.act == "quick_gelu", vision_cfg=vision, text_cfg=text)
  for part, width, mlp in (("vision_cfg", a["v_width"], a.get("v_mlp")), ("text_cfg", a["t_width"], a["t_mlp"])):
    if mlp is not None and int(width * out[part]["mlp_ratio"]) != mlp:
      raise UserError(f"MLP width {mlp} is not expressible as int(width * mlp_ratio) for open_clip")
  if (cfg.get("source") or {}).get("text_prefix"):
    out["custom_text"] = True
  return out
