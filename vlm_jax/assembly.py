"""Assembly: a run config → (tokenizer, model, loss function, example batch), the one place that does it.

  parts = assembly.assemble(config)        # Assembly(tokenizer, model, loss_fn, example)
  tokenizer, model = assembly.build(config)
  config = assembly.complete(config)       # model.text vocabulary and length from the tokenizer (for export)

The text tower's vocabulary size, context length and special-token ids (`sot_id`, `eot_id`, `pad_id`, where the
text encoder has those fields) come from the tokenizer here, where the model config leaves them out; a tower
smaller than its tokenizer is a `UserError`. A model config that is complete without the tokenizer (the full-size
configs, converted models) is built, and its mistakes reported, before the tokenizer is touched, so a missing
vocabulary file never hides a model error, and ahead-of-time compilation needs no vocabulary at all.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import numpy as np

from vlm_jax import config_lib
from vlm_jax.errors import UserError

class Assembly(NamedTuple):
  tokenizer: Any          # None for image-only models assembled without one
  model: Any              # flax.linen.Module
  loss_fn: Callable       # fn(outputs, batch) -> (loss, metrics)
  example: dict           # one example row per input: numpy zeros, for `model.init` and abstract compilation


def build_tokenizer(config):
  from vlm_jax.data import tokenizers  # noqa: PLC0415
  return tokenizers.get_tokenizer(**config_lib.plain(config.tokenizer))


def _text_fields() -> set[str]:
  from vlm_jax.models import encoder_class  # noqa: PLC0415
  return {f.name for f in dataclasses.fields(encoder_class("text"))}


def text_config(text: dict, tokenizer, *, special_ids: bool = True) -> dict:
  """The text tower config with the tokenizer's vocabulary size and length (and special ids) filled in."""
  text = dict(text)
  text.setdefault("vocab_size", tokenizer.vocab_size)
  text.setdefault("max_len", tokenizer.max_len)
  if special_ids and text.get("kind", "text") == "text":
    from vlm_jax.data.tokenizers import token_layout  # noqa: PLC0415
    fields = _text_fields()
    for key, value in token_layout(tokenizer).items():
      if key in fields and value is not None:
        text.setdefault(key, value)
  if text["vocab_size"] < tokenizer.vocab_size or text["max_len"] < tokenizer.max_len:
    raise UserError(f"text tower (vocab {text['vocab_size']}, length {text['max_len']}) is smaller than the "
                    f"tokenizer's (vocab {tokenizer.vocab_size}, length {tokenizer.max_len})")
  return text


def _self_contained(model_cfg: dict) -> bool:
  text = model_cfg.get("text")
  return text is None or {"vocab_size", "max_len"} <= set(text)


def build(config, *, tokenizer: bool = True):
  """(tokenizer, model) of a run config. `tokenizer=False` builds a self-contained model config without the
  tokenizer (then the tokenizer returned is None)."""
  from vlm_jax.models import build_model  # noqa: PLC0415
  model_cfg = config_lib.plain(config.model)
  model = build_model(model_cfg) if _self_contained(model_cfg) else None
  if not tokenizer:
    if model is None:
      raise UserError("this model config takes its text vocabulary from the tokenizer; build it with one")
    return None, model
  tok = build_tokenizer(config)
  if "text" in model_cfg:
    model_cfg["text"] = text_config(model_cfg["text"], tok)
    model = build_model(model_cfg)
  return tok, (model if model is not None else build_model(model_cfg))


def complete(config):
  """A copy of `config` whose `model.text` carries the tokenizer's vocabulary size and length where the run left
  them to the tokenizer (what exporters need; special ids are filled at build time)."""
  import ml_collections  # noqa: PLC0415
  config = ml_collections.ConfigDict(config_lib.plain(config))
  if "text" in config.model and not _self_contained(config_lib.plain(config.model)):
    config.model.text = ml_collections.ConfigDict(text_config(config_lib.plain(config.model.text),
                                                              build_tokenizer(config), special_ids=False))
  return config


def model_of(config):
  """The model of a run config, built without the tokenizer when the model config is self-contained (converted
  models: no vocabulary file needed), else with it."""
  return build(config, tokenizer=not _self_contained(config_lib.plain(config.model)))[1]


def abstract_variables(model, example: dict) -> dict:
  """`jax.eval_shape` of `model.init` on an example batch (`example_batch`): ShapeDtypeStructs of every
  collection, still boxed with their logical axis names (for `partitioning.logical_to_shardings`)."""
  import jax  # noqa: PLC0415
  rngs = {k: jax.random.PRNGKey(0) for k in ("params", "dropout", "mask")}
  return dict(jax.eval_shape(lambda: model.init(rngs, example, train=False)))


def check_variables(model, variables: dict, example: dict, *, what: str = "converted weights",
                    hint: str = "wrong --arch for this file?") -> dict:
  """`variables` as numpy in the dtypes `model` expects, after checking every path and shape of every
  collection against it. A missing, unexpected or differently shaped array raises `UserError` listing the first
  few (a converter fed the wrong architecture, or a checkpoint of another model)."""
  from flax import traverse_util  # noqa: PLC0415

  from vlm_jax.parallel import partitioning  # noqa: PLC0415
  want = traverse_util.flatten_dict(partitioning.unbox(abstract_variables(model, example)), sep="/")
  have = traverse_util.flatten_dict(config_lib.plain(variables), sep="/")
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


def build_loss_fn(config) -> Callable:
  """The weighted sum of `config.objectives` (`vlm_jax.objectives.make_loss_fn`) over the batch axes."""
  from vlm_jax import objectives  # noqa: PLC0415
  from vlm_jax.parallel.mesh import BATCH_AXES  # noqa: PLC0415
  return objectives.make_loss_fn(config_lib.plain(config.objectives), config_lib.plain(config.objective_hparams),
                                 mesh_axes=BATCH_AXES)


def example_batch(config, model=None, batch_size: int = 1) -> dict:
  """Zeros shaped like a training batch of `config` (image at `data.image_size`; token ids at the text tower's
  length when the model has one): what `model.init` and abstract compilation need."""
  size = np.ravel(config.data.image_size)
  h, w = (int(size[0]), int(size[-1]))
  batch = {"image": np.zeros((batch_size, h, w, 3), np.float32)}
  txt = getattr(model, "txt", None)
  length = getattr(txt, "max_len", None) or config_lib.plain(config.model).get("text", {}).get("max_len")
  if length:
    batch["text"] = np.zeros((batch_size, int(length)), np.int32)
  return batch


def assemble(config, *, tokenizer: bool = True) -> Assembly:
  """Tokenizer, model, loss function and example batch of a run config (see the module docstring)."""
  tok, model = build(config, tokenizer=tokenizer)
  return Assembly(tok, model, build_loss_fn(config), example_batch(config, model))
