"""Weight conversion between vlm_jax and open_clip / OpenAI CLIP / Hugging Face.

A converter returns `(config, variables)`: `config` holds `model` (what `build_model` takes), `tokenizer`,
`data` (`image_size`, `mean`, `std`: the eval transform) and `source` (provenance); `variables` is a nested dict
of numpy arrays, {'params': …} plus {'batch_stats': …} for ResNets. `save_converted` checks them against the
model the config describes (`assembly.check_variables`) and writes an ordinary run directory through
`vlm_jax.runs.save_model` (the layout pre-training writes), so `runs.load(DIR)`, `python -m vlm_jax.evaluate
--checkpoint=DIR`, `vlm_jax.inference.load` and `--config.init.checkpoint=DIR` read it like a pre-training run.
`load_converted(DIR)` reads any run directory back as `(config, variables)` with the text tower completed from
the tokenizer, the form the exporters take.

`convert(source, path)` and `export(to, config, variables, path)` dispatch to the format modules, imported on
first use (they need torch / safetensors / transformers: the `interop` extra): `SOURCES` = open_clip and openai
(`interop.open_clip`; the two share tensor names, OpenAI's models use QuickGELU) and hf (`interop.hf`);
`EXPORTERS` = open_clip (a state-dict file) and hf (a `CLIPModel` / `SiglipModel` directory).
`with_image_size` re-targets a model to another input resolution.
"""

from __future__ import annotations

import importlib
import inspect
import os
from typing import Callable

import numpy as np

from vlm_jax import config_lib
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


def _config_dict(config):
  """A ConfigDict copy of a ConfigDict or a plain nested dict."""
  import ml_collections  # noqa: PLC0415
  return ml_collections.ConfigDict(config_lib.plain(config))


def _hw(size) -> tuple[int, int]:
  return (int(size), int(size)) if np.ndim(size) == 0 else tuple(int(s) for s in size)


def save_converted(out_dir: str, config, variables: dict, *, model=None) -> str:
  """Writes a converter's `(config, variables)` (or any vlm_jax model's) as a run directory; returns it.

  `config` is a converter's config (`model`, `tokenizer`, `data`, `source`: completed by
  `config_lib.model_run_config`) or a full run config; `variables` are checked against the model the config
  describes and cast to its parameter dtypes (OpenAI's float16 weights become float32). `out_dir` must be new or
  empty."""
  from vlm_jax import assembly, runs  # noqa: PLC0415
  config = _config_dict(config)
  config = config_lib.model_run_config(config) if "optimizer" not in config else config
  model = assembly.model_of(config) if model is None else model
  variables = assembly.check_variables(model, variables, assembly.example_batch(config, model))
  return runs.save_model(out_dir, config, variables)


def load_converted(directory: str):
  """`(config, variables)` of a converted model or any run directory (see `vlm_jax.runs.resolve`), the config's
  text tower completed from the tokenizer where the run left it to the tokenizer; variables are numpy."""
  from vlm_jax import assembly, runs  # noqa: PLC0415
  run = runs.load(directory)
  return assembly.complete(run.config), run.variables


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
    from vlm_jax.runs import check_output_dir  # noqa: PLC0415
    check_output_dir(output)
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

  from vlm_jax import assembly  # noqa: PLC0415
  from vlm_jax.models import resnet, vit  # noqa: PLC0415
  from vlm_jax.parallel import partitioning  # noqa: PLC0415
  image_size = int(image_size)
  kind = config.model.image.get("kind")
  old_tower = assembly.model_of(config).img
  stride = 32 if kind == "resnet" else int(getattr(old_tower, "patch_size", 1))
  if image_size < stride or image_size % stride:
    raise UserError(f"--image_size {image_size} must be a positive multiple of {stride} for this {kind} tower")
  config = _config_dict(config)
  config.model.image.image_size = image_size
  config.data.image_size = image_size
  model = assembly.model_of(config)
  abstract = assembly.abstract_variables(model, assembly.example_batch(config, model))
  want = traverse_util.flatten_dict(partitioning.unbox(abstract), sep="/")
  flat = traverse_util.flatten_dict(config_lib.plain(variables), sep="/")
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
