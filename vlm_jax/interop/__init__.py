"""Weight conversion between vlm_jax and open_clip / OpenAI CLIP / Hugging Face: the converted-checkpoint format.

A converter returns `(config, variables)`: `config` holds `model` (what `build_model` takes), `tokenizer`,
`data` (`image_size`, `mean`, `std`: the eval transform) and `source` (provenance); `variables` is a nested dict
of numpy arrays, {'params': …} plus {'batch_stats': …} for ResNets. `save_converted` writes them as an
ordinary vlm_jax checkpoint directory, the layout pre-training writes:

  DIR/config.json                     the full run config (human-readable copy)
  DIR/checkpoints/0/state             orbax TrainState subset: step, params, extra (= {'batch_stats'}: ResNets)
  DIR/checkpoints/0/config            the full run config (`config_base.base_config()` + the converter's keys)

so `checkpoint.load_variables(DIR)`, `python -m vlm_jax.evaluate --checkpoint=DIR`, `vlm_jax.inference.load`
and LiT (`--config.init.checkpoint=DIR`) read it like a pre-training run. `load_converted(DIR)` reads any of
them back as `(config, variables)`.

`convert(source, path)` and `export(to, config, variables, path)` dispatch to the format modules, imported on
first use (they need torch / safetensors / transformers: the `interop` extra): `SOURCES` = open_clip and openai
(`interop.open_clip`; the two share tensor names, OpenAI's models use QuickGELU) and hf (`interop.hf`);
`EXPORTERS` = open_clip (a state-dict file) and hf (a `CLIPModel` / `SiglipModel` directory).
`with_image_size` re-targets a model to another input resolution.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from typing import Any, Callable

import numpy as np

from vlm_jax.errors import UserError

# name -> (module, function); `convert` / `export` below import them lazily.
SOURCES: dict[str, tuple[str, str]] = {
    "open_clip": ("vlm_jax.interop.open_clip", "from_open_clip"),
    "openai": ("vlm_jax.interop.open_clip", "from_openai"),   # same names; QuickGELU
    "hf": ("vlm_jax.interop.hf", "from_hf"),
}
EXPORTERS: dict[str, tuple[str, str]] = {
    "open_clip": ("vlm_jax.interop.open_clip", "to_open_clip"),
    "hf": ("vlm_jax.interop.hf", "to_hf"),
}
_OPTIONAL = ("torch", "safetensors", "transformers", "open_clip", "timm")
_CONVERTER_KEYS = ("model", "tokenizer", "data")


def _import(module: str):
  """`importlib.import_module`; a missing optional package becomes a `UserError` naming the `interop` extra."""
  try:
    return importlib.import_module(module)
  except ModuleNotFoundError as e:
    if (e.name or "").split(".")[0] in _OPTIONAL:
      raise UserError(f"weight conversion needs the package {e.name!r}: pip install -e '.[interop]'") from None
    raise


def _function(module: str, name: str) -> Callable:
  return getattr(_import(module), name)


def _plain(tree) -> Any:
  return tree.to_dict() if hasattr(tree, "to_dict") else tree


def _config_dict(config):
  """A ConfigDict copy of a ConfigDict or a plain nested dict."""
  import ml_collections  # noqa: PLC0415
  return ml_collections.ConfigDict(_plain(config))


# ---------------------------------------------------------------------------------------------------------
# The model a config describes, and variables checked against it.
# ---------------------------------------------------------------------------------------------------------

def build(config):
  """The `TwoTower` of a (converted or run) config; the text vocabulary and length come from the tokenizer
  when the model config leaves them out, as in pre-training (`runner.build`)."""
  from vlm_jax.models import build_model  # noqa: PLC0415
  text = dict(_plain(config.model).get("text") or {})
  if "vocab_size" in text and "max_len" in text:
    return build_model(config.model)
  from vlm_jax import runner  # noqa: PLC0415
  return runner.build(config)[1]


def _hw(size) -> tuple[int, int]:
  return (int(size), int(size)) if np.ndim(size) == 0 else tuple(int(s) for s in size)


def abstract_variables(model) -> dict:
  """`jax.eval_shape` of `model.init` at the model's own resolution and text length: ShapeDtypeStructs, still
  boxed with their logical axis names (for `partitioning.logical_to_shardings`)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  h, w = _hw(getattr(model.img, "image_size", 224))
  batch = {"image": jnp.zeros((1, h, w, 3), jnp.float32),
           "text": jnp.zeros((1, int(getattr(model.txt, "max_len", 77))), jnp.int32)}
  rngs = {k: jax.random.PRNGKey(0) for k in ("params", "dropout", "mask")}
  return dict(jax.eval_shape(lambda: model.init(rngs, batch, train=False)))


def check_variables(model, variables: dict, *, what: str = "converted weights",
                    hint: str = "wrong --arch for this file?", abstract: dict | None = None) -> dict:
  """`variables` as numpy in the dtypes `model` expects, after checking every path and shape against it.

  A missing, unexpected or differently shaped array raises `UserError` listing the first few (a converter fed
  the wrong architecture, or a checkpoint of another model). `abstract`: `abstract_variables(model)`, if
  already computed."""
  from flax import traverse_util  # noqa: PLC0415

  from vlm_jax.parallel import partitioning  # noqa: PLC0415
  abstract = abstract_variables(model) if abstract is None else abstract
  want = traverse_util.flatten_dict(partitioning.unbox(abstract), sep="/")
  have = traverse_util.flatten_dict(_plain(variables), sep="/")
  problems = [f"missing {k} {tuple(v.shape)}" for k, v in want.items() if k not in have]
  problems += [f"unexpected {k} {tuple(np.shape(v))}" for k, v in have.items() if k not in want]
  problems += [f"{k} has shape {tuple(np.shape(have[k]))}, the model needs {tuple(want[k].shape)}"
               for k in want if k in have and tuple(np.shape(have[k])) != tuple(want[k].shape)]
  if problems:
    more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
    raise UserError(f"{what} do not fit the model the config describes ({hint}): "
                    + "; ".join(problems[:4]) + more)
  out = {k: np.asarray(have[k]).astype(want[k].dtype, copy=False) for k in want}
  return traverse_util.unflatten_dict(out, sep="/")


# ---------------------------------------------------------------------------------------------------------
# Converted config <-> full run config; checkpoint directory write / read.
# ---------------------------------------------------------------------------------------------------------

def full_config(converted):
  """The run config of a converted model: `config_base.base_config()` with the converter's `model`,
  `tokenizer` (replaced), `data` (merged: image_size, mean, std) and `source`. A SigLIP model (one with a
  `logit_bias_init`) gets the sigmoid objective, so fine-tuning from it uses the loss it was trained with."""
  import ml_collections  # noqa: PLC0415

  from vlm_jax.data import pipeline  # noqa: PLC0415
  from vlm_jax.train import config_base  # noqa: PLC0415
  conv = dict(_plain(converted))
  missing = [k for k in _CONVERTER_KEYS if k not in conv]
  if missing:
    raise ValueError(f"a converter's config needs the keys {list(_CONVERTER_KEYS)}; missing {missing}")
  unknown = sorted(set(_plain(conv["data"])) - set(pipeline.DEFAULTS))
  if unknown:
    raise ValueError(f"converted data options {unknown} are not data options; valid: {sorted(pipeline.DEFAULTS)}")
  c = config_base.base_config()
  c.model = ml_collections.ConfigDict(_plain(conv.pop("model")))
  c.tokenizer = ml_collections.ConfigDict(_plain(conv.pop("tokenizer")))
  c.data.update(_plain(conv.pop("data")))
  c.source = ml_collections.ConfigDict(_plain(conv.pop("source", None)) or {})
  if c.model.get("logit_bias_init") is not None:
    c.objectives = ml_collections.ConfigDict({"siglip": 1.0})
  for key, value in conv.items():  # anything else the converter sets (objectives, …) wins
    c[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
  return c


def _check_output_dir(out_dir: str) -> str:
  out_dir = os.path.abspath(out_dir)
  if os.path.isfile(out_dir):
    raise UserError(f"output {out_dir} is a file; give a directory for the converted checkpoint")
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise UserError(f"output directory {out_dir} is not empty; choose a new directory")
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create {out_dir}: {e.strerror or e}") from None
  return out_dir


def save_converted(out_dir: str, config, variables: dict, *, model=None) -> str:
  """Writes `(config, variables)` of a converter (or any vlm_jax model) as a checkpoint directory; returns it.

  `config` is a converter's config (`model`, `tokenizer`, `data`, `source`) or a full run config; `variables`
  are checked against the model the config describes and cast to its parameter dtypes (OpenAI's float16
  weights become float32). `out_dir` must be new or empty.
  """
  from vlm_jax.train import checkpoint  # noqa: PLC0415
  config = _config_dict(config)
  config = full_config(config) if "optimizer" not in config else config
  model = build(config) if model is None else model
  variables = check_variables(model, variables)
  out_dir = _check_output_dir(out_dir)
  state = {"step": np.int32(0), "params": variables.pop("params")}
  if variables:  # other collections: a ResNet's batch_stats, stored as pre-training stores them
    state["extra"] = variables
  config_json = config.to_json_best_effort(indent=2, sort_keys=True)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    f.write(config_json)
  ckpt = checkpoint.Checkpointer(os.path.join(out_dir, "checkpoints"), keep=1, async_save=False)
  try:
    ckpt.save(0, state, config=json.loads(config_json), force=True)
  finally:
    ckpt.close()
  return out_dir


def load_converted(directory: str):
  """`(config, variables)` of a converted model or a pre-training run: `directory` may be a workdir, its
  `checkpoints/` folder or one step folder (the newest step otherwise). The config's text tower gets the
  tokenizer's vocabulary size and length where the run left them to the tokenizer; variables are numpy."""
  from vlm_jax.evaluate.cli import load_run  # noqa: PLC0415
  config, _, variables = load_run(directory)
  text = config.model.text
  if "vocab_size" not in text or "max_len" not in text:
    from vlm_jax import runner  # noqa: PLC0415
    tokenizer = runner.build_tokenizer(config)
    for key, value in (("vocab_size", tokenizer.vocab_size), ("max_len", tokenizer.max_len)):
      if key not in text:
        text[key] = int(value)
  return config, variables


# ---------------------------------------------------------------------------------------------------------
# Sources, exporters, resolution change.
# ---------------------------------------------------------------------------------------------------------

def convert(source: str, path: str, *, arch: str | None = None, image_size: int | None = None):
  """`(config, variables)` of the checkpoint at `path` in format `source` (see `SOURCES`).

  `image_size` converts for another input resolution: by the converter when it offers it (open_clip's bicubic
  position-table resampling), else by `with_image_size`.
  """
  if source not in SOURCES:
    raise UserError(f"unknown source {source!r}; available: {sorted(SOURCES)}")
  if not os.path.exists(path):
    raise UserError(f"input {path} does not exist")
  if source == "hf":
    if arch:
      raise UserError("--arch is read from the Hugging Face directory's config.json; leave it out")
    if not os.path.isdir(path):
      raise UserError(f"a Hugging Face checkpoint is a directory (config.json + *.safetensors); got {path}")
  elif os.path.isdir(path):
    raise UserError(f"an {source} checkpoint is a file (.pt, .bin, .safetensors); got the directory {path}")
  fn = _function(*SOURCES[source])
  kwargs = {}
  if image_size and "image_size" in inspect.signature(fn).parameters:
    kwargs["image_size"] = int(image_size)
  config, variables = fn(path, **kwargs) if source == "hf" else fn(path, arch, **kwargs)
  if image_size and _hw(config.data.image_size) != _hw(image_size):
    config, variables = with_image_size(config, variables, image_size)
  return config, variables


def export(to: str, config, variables: dict, output: str) -> str:
  """Writes a vlm_jax model in format `to` (see `EXPORTERS`); returns the path written.

  'open_clip': a state-dict file at `output`, safetensors when it ends in `.safetensors`, else `torch.save`
  of tensors (`.pt` / `.bin`), loadable with `model.load_state_dict(...)`. 'hf': a directory.
  """
  if to not in EXPORTERS:
    raise UserError(f"unknown export format {to!r}; available: {sorted(EXPORTERS)}")
  output = os.path.abspath(output)
  if to == "hf":
    to_hf = _function(*EXPORTERS["hf"])
    created = not os.path.exists(output)
    _check_output_dir(output)
    try:
      to_hf(config, variables, output)
    except BaseException:
      if created and not os.listdir(output):  # leave no empty directory behind
        os.rmdir(output)
      raise
    return output
  if os.path.isdir(output):
    raise UserError(f"--to open_clip writes one file (.safetensors, .pt or .bin); {output} is a directory")
  state_dict = _function(*EXPORTERS["open_clip"])(config, variables)
  os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
  if output.endswith(".safetensors"):
    save_file = _function("safetensors.numpy", "save_file")
    save_file({k: np.asarray(v, order="C") for k, v in state_dict.items()}, output)  # keeps 0-d arrays
  else:
    torch = _import("torch")
    torch.save({k: torch.from_numpy(np.array(v, order="C")) for k, v in state_dict.items()}, output)
  return output


def with_image_size(config, variables: dict, image_size: int):
  """The model at another input resolution: the image tower's position embeddings resized once (ViT:
  bilinear, `vit.resize_posemb`; ModifiedResNet attention pool: bicubic, `resnet.resize_positional_embedding`:
  the same functions the towers apply at call time to other inputs; Dosovitskiy et al. 2021, §3.2), and
  `model.image.image_size` and `data.image_size` set to `image_size`. Returns `(config, variables)`."""
  from flax import traverse_util  # noqa: PLC0415

  from vlm_jax.models import resnet, vit  # noqa: PLC0415
  from vlm_jax.parallel import partitioning  # noqa: PLC0415
  image_size = int(image_size)
  kind = config.model.image.get("kind")
  old_tower = build(config).img
  stride = 32 if kind == "resnet" else int(getattr(old_tower, "patch_size", 1))
  if image_size < stride or image_size % stride:
    raise UserError(f"--image_size {image_size} must be a positive multiple of {stride} for this {kind} tower")
  config = _config_dict(config)
  config.model.image.image_size = image_size
  config.data.image_size = image_size
  want = traverse_util.flatten_dict(partitioning.unbox(abstract_variables(build(config))), sep="/")
  flat = traverse_util.flatten_dict(_plain(variables), sep="/")
  for key, target in want.items():
    value = flat.get(key)
    if value is None or tuple(value.shape) == tuple(target.shape):
      continue
    if key.endswith("pos_embedding"):  # ViT [1, gh*gw, D]
      old_grid = old_tower.grid_size(_hw(old_tower.image_size))
      new_grid = old_tower.grid_size((image_size, image_size))
      flat[key] = np.asarray(vit.resize_posemb(value, old_grid, new_grid))
    elif key.endswith("positional_embedding"):  # ModifiedResNet attention pool [1 + g*g, C]
      g = int(round(np.sqrt(target.shape[0] - 1)))
      flat[key] = np.asarray(resnet.resize_positional_embedding(value, (g, g)))
    else:
      raise UserError(f"cannot change the resolution of {key} {tuple(value.shape)} -> {tuple(target.shape)}")
  return config, traverse_util.unflatten_dict(flat, sep="/")
