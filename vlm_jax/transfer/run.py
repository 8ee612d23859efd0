"""A transfer run from its config: base model, method, k-shot data, validation selection, the loop, the test.

  results = vlm_jax.transfer.run.transfer(config, workdir)

1. The base model: `config.init.checkpoint` (a vlm_jax run or converted model), its config read through
   `vlm_jax.runs`, built by `vlm_jax.assembly` with its BatchNorm frozen (a ResNet tower's
   `train_batch_stats = False`: running statistics, never updated).
2. The dataset (`datasets.py`), the k-shot training and validation sets of `config.seed`, the classes trained on
   (all; the base half with `config.protocol = 'base_to_novel'`).
3. The method (`methods.build_method(config.method.name, …)`): a module holding the base as 'base' plus a loss.
   Its base parameters are frozen (`config.frozen = '^base/'`), copied from the base run (`config.init`) and
   kept by reference (`config.checkpoint_frozen = False`: not in the checkpoints, fingerprint verified).
4. The one training loop (`vlm_jax.train.loop.train`) for `epochs` × ⌈N/B⌉ steps, the first `warmup_epochs`
   at the constant warmup lr, validating every `eval_every_epochs` (`protocol.Selector` keeps the best step).
5. The test split is read now, and only now: top-1 of the selected parameters and of zero-shot CLIP (and base /
   novel / harmonic mean for base-to-novel). `DIR/results.json` holds them; the return value too.
"""

from __future__ import annotations

import json
import math
import os

import jax
import ml_collections
import numpy as np

from vlm_jax import assembly, config_lib, runs
from vlm_jax.errors import UserError
from vlm_jax.train import loop
from vlm_jax.transfer import datasets, protocol
from vlm_jax.transfer.methods import TRAINING_FREE, build_method

PROTOCOLS = ("few_shot", "base_to_novel")


def load_base(checkpoint: str):
  """(base config, tokenizer, frozen-BatchNorm base model, variables) of a base run; `UserError` when missing."""
  if not checkpoint:
    raise UserError("no base model: pass --config.init.checkpoint=MODEL_DIR (a vlm_jax run or converted model)")
  if not os.path.isdir(checkpoint):
    hint = " (run `make demo` first)" if os.path.normpath(checkpoint) == os.path.join("workdirs", "demo") else ""
    raise UserError(f"base model {checkpoint} not found{hint}: run `make demo` or pass "
                    f"--config.init.checkpoint=MODEL_DIR")
  run = runs.load(checkpoint)
  cfg = ml_collections.ConfigDict(config_lib.plain(run.config))
  if cfg.model.get("image", {}).get("kind") == "resnet":
    cfg.model.image.train_batch_stats = False
  tokenizer, model = assembly.build(cfg)
  return cfg, tokenizer, model, run.variables


def nest_base(base_variables: dict, trainable: dict | None = None) -> dict:
  """Method variables: every collection of the base under 'base', plus the method's trainable params."""
  out = {c: {"base": tree} for c, tree in base_variables.items()}
  out["params"] = {**(trainable or {}), **out.get("params", {})}
  return out


def _steps(config, n_train: int, batch: int) -> dict:
  per_epoch = max(1, math.ceil(n_train / batch))
  total = int(config.epochs) * per_epoch
  every = max(1, int(config.eval_every_epochs) * per_epoch)
  return {"per_epoch": per_epoch, "total": total, "warmup": int(config.warmup_epochs) * per_epoch,
          "eval_every": every}


def _accuracy(method, variables, split: datasets.Split, mean, std, batch: int) -> float:
  fn = jax.jit(lambda v, x: method.logits_fn(method.module, v, x))
  return protocol.top1(fn, variables, datasets.normalize(split.images, mean, std), split.labels, batch)


def transfer(config, workdir: str, *, quiet: bool = False) -> dict:
  """Runs (or resumes) one transfer run; writes and returns its results (module docstring)."""
  config = ml_collections.ConfigDict(config_lib.plain(config))
  if config.protocol not in PROTOCOLS:
    raise UserError(f"unknown protocol {config.protocol!r}; use one of {PROTOCOLS}")
  name = str(config.method.name)
  base_cfg, tokenizer, base_model, base_vars = load_base(str(config.init.checkpoint))
  size, mean, std = runs.image_transform(base_cfg)
  if int(config.data.get("image_size", 0) or 0):
    size = int(config.data.image_size)
  ds = datasets.open_dataset(str(config.dataset), image_size=size, templates=config.templates,
                             test_per_class=int(config.test_per_class),
                             classnames=str(config.get("classnames", "") or ""))
  classes = list(range(ds.num_classes))
  novel: list[int] = []
  if config.protocol == "base_to_novel":
    classes, novel = datasets.base_novel(ds.num_classes)
  descriptions = None
  if config.descriptions:
    from vlm_jax.embedding.prompts import load_descriptions  # noqa: PLC0415
    descriptions = load_descriptions(str(config.descriptions), ds.class_names)

  def make(method_name, class_idx):
    return build_method(method_name, config.method, base_model=base_model, base_config=base_cfg,
                        tokenizer=tokenizer, class_names=[ds.class_names[c] for c in class_idx],
                        templates=ds.templates,
                        descriptions=[descriptions[c] for c in class_idx] if descriptions else None)

  method = make(name, classes)
  train, val = datasets.few_shot(ds, shots=int(config.shots), seed=int(config.seed),
                                 val_shots=int(config.val_shots), classes=classes)
  eval_bs = int(config.eval_batch_size)
  zeroshot = make("zeroshot", classes)
  base_variables = nest_base(base_vars)
  results = {"method": name, "dataset": ds.name, "shots": int(config.shots), "seed": int(config.seed),
             "protocol": str(config.protocol), "classes": len(classes), "chance": 1.0 / len(classes),
             "train_images": len(train.labels), "val_images": len(val.labels),
             "zeroshot/val_top1": _accuracy(zeroshot, base_variables, val, mean, std, eval_bs)}
  workdir = loop.prepare_workdir(workdir)
  selected = base_variables

  if name not in TRAINING_FREE and int(config.epochs) > 0:
    dp = jax.device_count()
    batch = min(int(config.batch_size), max(dp, len(train.labels) // dp * dp))
    s = _steps(config, len(train.labels), batch)
    run_cfg = ml_collections.ConfigDict(config_lib.plain(config))
    run_cfg.batch_size, run_cfg.total_steps = batch, s["total"]
    run_cfg.optimizer.warmup_steps = s["warmup"]
    run_cfg.eval_every_steps = s["eval_every"]
    ckpt_dir = os.path.join(workdir, "checkpoints")
    resume = max(runs.steps(ckpt_dir), default=0) if os.path.isdir(ckpt_dir) else 0
    evals = [m for m in range(s["eval_every"], s["total"], s["eval_every"]) if m > resume] + [s["total"]]
    jitted = jax.jit(lambda v, x: method.logits_fn(method.module, v, x))
    selector = protocol.Selector(workdir, jitted, datasets.normalize(val.images, mean, std), val.labels,
                                 frozen=str(config.frozen), steps=evals, resume_step=resume, batch_size=eval_bs)

    def make_data(process_index, process_count):
      return datasets.train_iterator(train, batch_size=batch, seed=int(config.seed), mean=mean, std=std,
                                     flip=bool(config.flip), process_index=process_index,
                                     process_count=process_count)

    last = loop.train(run_cfg, workdir, make_data=make_data, model=method.module, loss_fn=method.loss_fn,
                      evaluators={"val": selector}, quiet=quiet)
    if config.select == "val":
      step, trainable = selector.load_best()
    else:
      step = s["total"]
      trainable = last_trainable(workdir, run_cfg)
    selected = nest_base(base_vars, trainable)
    results.update({"steps": s["total"], "batch_size": batch, "selected_step": int(step),
                    "val/top1": selector.history.get(int(step), float("nan")),
                    "final/train_loss": float(last.get("loss", float("nan")))})
  else:
    results.update({"steps": 0, "selected_step": 0, "val/top1": results["zeroshot/val_top1"]})

  # --- the test split: read here, after training and selection, and nowhere else ---
  test = ds.load("test")
  groups = {"": classes} if config.protocol == "few_shot" else {"base/": classes, "novel/": novel}
  for prefix, idx in groups.items():
    split = datasets.restrict(test, idx)
    zs = make("zeroshot", idx) if idx != classes else zeroshot
    results[f"zeroshot/{prefix}top1"] = _accuracy(zs, base_variables, split, mean, std, eval_bs)
    if prefix == "novel/" and config.method.get("class_specific", False):
      results[f"{prefix}top1"] = float("nan")  # class-specific context has nothing for unseen classes
    else:
      m = method if idx == classes else make(name, idx)
      results[f"{prefix}top1"] = _accuracy(m, selected, split, mean, std, eval_bs)
  if config.protocol == "base_to_novel":
    results["harmonic_mean"] = protocol.harmonic_mean(results["base/top1"], results["novel/top1"])
    results["zeroshot/harmonic_mean"] = protocol.harmonic_mean(results["zeroshot/base/top1"],
                                                               results["zeroshot/novel/top1"])
    results["top1"] = results["harmonic_mean"]
    results["zeroshot/top1"] = results["zeroshot/harmonic_mean"]
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=2, sort_keys=True)
  return results


def last_trainable(workdir: str, run_cfg) -> dict:
  """The trainable params of the newest checkpoint (`select = 'last'`)."""
  variables = runs.load(workdir).variables
  return {k: v for k, v in variables["params"].items() if k != "base"}
