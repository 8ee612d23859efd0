"""Pre-flight checks: a run config's mistakes found before anything is written (one `UserError`, exit 2).

  preflight.pretrain(config, flags)     # what `python -m vlm_jax.pretrain` checks before the run starts
  preflight.transfer(config, flags)     # … `python -m vlm_jax.transfer`
  preflight.distill(config, flags)      # … `python -m vlm_jax.distill`
  preflight.evaluate(suite, flags)      # … `python -m vlm_jax.evaluate`

`cli.ConfigCommand` calls the entry point's check after parsing and before the run function, so a bad size,
a mesh the devices or the batch cannot take, an unknown optimizer / schedule / data source / method / evaluator
name, a shard pattern matching nothing, an init checkpoint that is not there, or a workdir under a file fails
before the workdir exists. The checks reuse the validators the run itself calls later (mesh shape, optimizer,
data options, shard expansion, init sources, the `frozen` split of the abstract parameters), so the two never
disagree. What only the run can tell (an unreadable or mismatched init checkpoint, a transfer base's or
distillation teacher's parameters) still fails inside it; `ConfigCommand.run` then removes a workdir it created
that holds no checkpoint and no logged step (a workdir that existed may then keep the run's config.json).
"""

from __future__ import annotations

import os
import re
from typing import Mapping

from vlm_jax import config_lib
from vlm_jax.errors import UserError

# loop keys: (name, smallest valid value)
_LOOP_INTS = (("batch_size", 1), ("total_steps", 0), ("log_every_steps", 0), ("eval_every_steps", 0),
              ("checkpoint_every_steps", 1), ("keep_checkpoints", 1))


def integer(config, key: str, low: int, where: str = "") -> int:
  """`config[key]` as an int >= `low`; anything else is a `UserError` naming `where + key`."""
  value = config.get(key)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
    raise UserError(f"{where}{key}={value!r} must be an integer >= {low}")
  if value < low:
    raise UserError(f"{where}{key}={value!r} must be an integer >= {low}")
  return int(value)


def regex(pattern, where: str) -> None:
  try:
    re.compile(str(pattern or ""))
  except re.error as e:
    raise UserError(f"{where}={pattern!r} is not a regular expression ({e})") from None


def writable(path: str | None, what: str = "workdir") -> None:
  """`path` exists as a writable directory, or could be created: its nearest existing ancestor is a writable
  directory. Creates nothing."""
  if not path:
    return
  path = os.path.abspath(path)
  probe = path
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise UserError(f"{what} {path} is not writable: {probe} is not a directory")
  if not os.access(probe, os.W_OK | os.X_OK):
    raise UserError(f"{what} {path} is not writable: no write permission on {probe}")


def mesh(sizes: Mapping | None):
  """The config's mesh over this job's devices (`UserError` when the sizes cannot make one)."""
  from vlm_jax.parallel import mesh as mesh_lib  # noqa: PLC0415
  sizes = config_lib.plain(sizes) or {"data": -1}
  bad = {k: v for k, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool) or (v < 1 and v != -1)}
  if bad:
    raise UserError(f"mesh sizes {bad} must be positive integers (or -1: the remaining devices)")
  return mesh_lib.make_mesh(sizes)


def loop(config, *, batch: bool = True, init: bool = True) -> None:
  """Keys of the training loop (`vlm_jax.train.loop`), shared by pre-training, transfer and distillation:
  sizes and schedules, the mesh (and the batch over it when `batch`), the optimizer, the `frozen` regex and the
  init sources (their checkpoints exist, when `init`; the distillation placeholder 'teacher' is skipped)."""
  from vlm_jax import runs  # noqa: PLC0415
  from vlm_jax.train import loop as loop_lib  # noqa: PLC0415
  from vlm_jax.train import profiling  # noqa: PLC0415
  from vlm_jax.train.optim import make_optimizer  # noqa: PLC0415
  for key, low in _LOOP_INTS:
    integer(config, key, low)
  m = mesh(config.get("mesh"))
  accum = integer(config.optimizer, "grad_accum_steps", 1, "optimizer.") if "grad_accum_steps" in \
      config.optimizer else 1
  if batch:
    loop_lib.check_batch_size(int(config.batch_size), m, accum)
  make_optimizer(config.optimizer, max(int(config.total_steps), 1))
  loop_lib.spike_guard_settings(config)
  profiling.parse(config.get("profile_steps"))
  regex(config.get("frozen"), "frozen")
  for src in runs.sources(config.get("init")) if init else ():
    regex(src["params"], "init.params")
    if src["checkpoint"] != "teacher":
      runs.resolve(src["checkpoint"])


def pretrain(config, flags: Mapping) -> None:
  """`python -m vlm_jax.pretrain`: the loop keys, the model (tokenizer, towers, objectives: `assembly`, as the
  run builds them; the `frozen` split of its abstract parameters), the data source (options, image size, shard
  patterns)."""
  from vlm_jax import assembly  # noqa: PLC0415
  from vlm_jax.data import pipeline, shards  # noqa: PLC0415
  from vlm_jax.train.optim import split_frozen  # noqa: PLC0415
  writable(flags.get("workdir"))
  loop(config)
  for tower in ("image", "text"):
    spec = config.get("model", {}).get(tower)
    if hasattr(spec, "get") and spec.get("image_size") is not None:
      integer(spec, "image_size", 1, f"model.{tower}.")
  pipeline._image_size({"image_size": config.data.get("image_size")}, None)  # noqa: SLF001 (the pipeline's check)
  parts = assembly.assemble(config)
  data = pipeline._options(config.data)  # noqa: SLF001 (the pipeline's own option check)
  if data["name"] == "shards":
    shards.expand_shards(data["shards"])
  if data["name"] == "image_folder" and not os.path.isdir(str(data["image_folder"])):
    raise UserError(f"data.image_folder {data['image_folder']} is not a directory")
  if config.get("frozen"):  # LiT-style freezing: the regex against the model's parameter paths (abstract init)
    split_frozen(assembly.abstract_variables(parts.model, parts.example)["params"], str(config.frozen))


def transfer(config, flags: Mapping) -> None:
  """`python -m vlm_jax.transfer`: protocol, method, selection, shots and epochs, before the base is loaded."""
  from vlm_jax.transfer.methods import METHODS  # noqa: PLC0415
  from vlm_jax.transfer.run import PROTOCOLS  # noqa: PLC0415
  writable(flags.get("workdir"))
  if config.get("protocol") not in PROTOCOLS:
    raise UserError(f"unknown protocol {config.get('protocol')!r}; use one of {PROTOCOLS}")
  if config.method.get("name") not in METHODS:
    raise UserError(f"unknown transfer method {config.method.get('name')!r}; choose from {sorted(METHODS)}")
  if config.get("select") not in ("val", "last"):
    raise UserError(f"unknown select {config.get('select')!r}; use 'val' or 'last'")
  for key, low in (("shots", 1), ("epochs", 0), ("warmup_epochs", 0), ("eval_every_epochs", 1),
                   ("eval_batch_size", 1), ("test_per_class", 1)):
    integer(config, key, low)
  if config.get("val_shots", -1) != -1:
    integer(config, "val_shots", 1)
  integer(config.data, "image_size", 0, "data.")
  from vlm_jax.transfer.datasets import is_multilabel  # noqa: PLC0415
  if config.get("shift_dataset") and (config.protocol != "few_shot" or is_multilabel(str(config.dataset))):
    raise UserError("shift_dataset (robustness on a shifted task) needs protocol few_shot on a single-label dataset")
  from vlm_jax.transfer.methods import check_config  # noqa: PLC0415
  check_config(config)  # the method module's own checks of config.method
  loop(config, batch=False, init=False)  # the run picks its batch; the base model is checked when loaded


def distill(config, flags: Mapping) -> None:
  """`python -m vlm_jax.distill`: the loop keys, proposals, pseudo-box scorer, baselines and data sizes."""
  writable(flags.get("workdir"))
  loop(config)
  if config.get("task", "detection") == "classification":
    from vlm_jax.distill import classification  # noqa: PLC0415
    classification.check(config)  # the KD objective and its settings, the baselines
    return
  if config.get("task", "detection") == "segmentation":
    from vlm_jax.distill import segmentation  # noqa: PLC0415
    segmentation.check(config)  # method, baselines, MaskCLIP refinement settings, image size
    for key, low in (("image_size", 32), ("num_train", 1), ("num_eval", 1)):
      integer(config.data, key, low, "data.")
    return
  from vlm_jax.distill import proposals  # noqa: PLC0415
  proposals.check(config)  # the kind, and the closed-set baseline that kind 'rpn' takes its proposals from
  if config.pseudo_boxes.get("scorer") not in ("dense", "crops"):
    raise UserError(f"unknown pseudo_boxes.scorer {config.pseudo_boxes.get('scorer')!r}; use 'dense' or 'crops'")
  unknown = [b for b in config.get("baselines") or () if b != "closed_set"]
  if unknown:
    raise UserError(f"unknown baseline(s) {unknown}; available: closed_set")
  for key, low in (("image_size", 8), ("num_train", 1), ("num_eval", 1)):
    integer(config.data, key, low, "data.")
  integer(config.proposals, "per_image", 1, "proposals.")
  if (config.method.get("detpro") or {}).get("enabled"):
    from vlm_jax.distill import detpro  # noqa: PLC0415
    detpro.check(config)  # DetPro's settings, and the crop cache it learns from


def evaluate(suite, flags: Mapping) -> None:
  """`python -m vlm_jax.evaluate`: evaluator kinds, the mesh and the output directory."""
  from vlm_jax.evaluate import KINDS  # noqa: PLC0415
  writable(flags.get("workdir"))
  for name, cfg in (suite.get("evals") or {}).items():
    kind = cfg.get("kind") if hasattr(cfg, "get") else None
    if kind not in KINDS:
      raise UserError(f"unknown evaluator kind {kind!r} for evals.{name}; available: {sorted(KINDS)}")
  mesh(suite.get("mesh"))
