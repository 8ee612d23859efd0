"""A transfer run from its config: base model, method, k-shot data, validation selection, the loop, the test.

  results = vlm_jax.transfer.run.transfer(config, workdir)

1. The base model: `config.init.checkpoint` (a vlm_jax run or converted model), its config read through
   `vlm_jax.runs`, built by `vlm_jax.assembly` with its BatchNorm frozen (a ResNet tower's
   `train_batch_stats = False`: running statistics, never updated).
2. The dataset (`datasets.py`), the k-shot training and validation sets of `config.seed`, the classes trained on
   (all; the base half with `config.protocol = 'base_to_novel'`). A multi-label dataset ('scenes') has multi-hot
   labels, batches carry 'labels' [B, C] and the metric is mAP (`metric: "mAP"`); only multi-label methods
   (`MULTI_LABEL`: DualCoOp) and zero-shot run on it, and multi-label methods on nothing else (`UserError`).
3. The method (`methods.build_method(config.method.name, …)`): a module holding the base as 'base' plus a loss.
   Its base parameters are frozen (`config.frozen = '^base/'`), copied from the base run (`config.init`) and
   kept by reference (`config.checkpoint_frozen = False`: not in the checkpoints, fingerprint verified).
4. The one training loop (`vlm_jax.train.loop.train`) for `epochs` × ⌈N/B⌉ steps, the first `warmup_epochs`
   at the constant warmup lr, validating every `eval_every_epochs` (`protocol.Selector` keeps the best step).
   `epochs = 0` evaluates the method at its initialisation (the loop's initial parameters: step 0).
5. The test split is read now, and only now: the metric (`metric`: 'top1', or 'mAP' for a multi-label dataset)
   of the selected parameters and of zero-shot CLIP (`zeroshot/<metric>`; multi-label: its cosine logits per
   class as scores), and `chance` (1/C; multi-label: the mean class frequency of the test split, ≈ the mAP
   of random scores); base / novel / harmonic mean for base-to-novel. `DIR/results.json` holds them (with method,
   dataset, shots, seed); the return value too.
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
MULTI_LABEL = ("dualcoop",)   # methods that need multi-hot labels; every other needs single labels
ANY_LABEL = ("zeroshot",)     # runs on both kinds


def check_labels(method: str, dataset: str, protocol: str) -> bool:
  """Whether `dataset` is multi-label; `UserError` when `method` or `protocol` cannot run on it."""
  multilabel = datasets.is_multilabel(dataset)
  if multilabel and method not in MULTI_LABEL + ANY_LABEL:
    raise UserError(f"{method} is a single-label method and dataset {dataset!r} is multi-label: use "
                    f"{' or '.join(MULTI_LABEL + ANY_LABEL)}, or a single-label dataset")
  if not multilabel and method in MULTI_LABEL:
    raise UserError(f"{method} is a multi-label method and dataset {dataset!r} is single-label: use "
                    f"--config.dataset=scenes")
  if multilabel and protocol != "few_shot":
    raise UserError(f"protocol {protocol!r} is single-label only; use few_shot on dataset {dataset!r}")
  return multilabel


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


def _score(method, variables, split: datasets.Split, mean, std, batch: int, metric: str = "top1") -> float:
  fn = jax.jit(lambda v, x: method.logits_fn(method.module, v, x))
  return protocol.METRICS[metric](fn, variables, datasets.normalize(split.images, mean, std), split.labels, batch)


def initial_trainable(method, example: dict, seed: int) -> dict:
  """The method's parameters at step 0, as the loop initialises them (`vlm_jax.train.state.init_rngs`)."""
  from vlm_jax.parallel import partitioning  # noqa: PLC0415
  from vlm_jax.train.state import init_rngs  # noqa: PLC0415
  rngs, _ = init_rngs(jax.random.PRNGKey(int(seed)))
  params = jax.jit(lambda: partitioning.unbox(method.module.init(rngs, example, train=False))["params"])()
  return {k: x for k, x in jax.device_get(params).items() if k != "base"}


def transfer(config, workdir: str, *, quiet: bool = False) -> dict:
  """Runs (or resumes) one transfer run; writes and returns its results (module docstring)."""
  config = ml_collections.ConfigDict(config_lib.plain(config))
  if config.protocol not in PROTOCOLS:
    raise UserError(f"unknown protocol {config.protocol!r}; use one of {PROTOCOLS}")
  name = str(config.method.name)
  multilabel = check_labels(name, str(config.dataset), str(config.protocol))
  metric = "mAP" if multilabel else "top1"
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
  if multilabel:
    train, val = datasets.few_shot_multilabel(ds, shots=int(config.shots), seed=int(config.seed),
                                              val_shots=int(config.val_shots))
  else:
    train, val = datasets.few_shot(ds, shots=int(config.shots), seed=int(config.seed),
                                   val_shots=int(config.val_shots), classes=classes)
  eval_bs = int(config.eval_batch_size)
  zeroshot = make("zeroshot", classes)
  base_variables = nest_base(base_vars)
  results = {"method": name, "dataset": ds.name, "shots": int(config.shots), "seed": int(config.seed),
             "protocol": str(config.protocol), "metric": metric, "classes": len(classes),
             "chance": 1.0 / len(classes), "train_images": len(train.labels), "val_images": len(val.labels),
             f"zeroshot/val_{metric}": _score(zeroshot, base_variables, val, mean, std, eval_bs, metric)}
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
                                 frozen=str(config.frozen), steps=evals, resume_step=resume, batch_size=eval_bs,
                                 metric=metric)

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
                    f"val/{metric}": selector.history.get(int(step), float("nan")),
                    "final/train_loss": float(last.get("loss", float("nan")))})
  elif name not in TRAINING_FREE:  # epochs = 0: the method as initialised
    example = {"image": datasets.normalize(train.images[:1], mean, std).astype(np.float32),
               "labels" if multilabel else "label": train.labels[:1]}
    selected = nest_base(base_vars, initial_trainable(method, example, int(config.seed)))
    results.update({"steps": 0, "selected_step": 0,
                    f"val/{metric}": _score(method, selected, val, mean, std, eval_bs, metric)})
  else:
    results.update({"steps": 0, "selected_step": 0, f"val/{metric}": results[f"zeroshot/val_{metric}"]})

  # --- the test split: read here, after training and selection, and nowhere else ---
  test = ds.load("test")
  if multilabel:
    results["chance"] = float(np.mean(test.labels))  # mean class frequency ≈ the mAP of random scores
    results["test_images"] = len(test.labels)
  groups = {"": classes} if config.protocol == "few_shot" else {"base/": classes, "novel/": novel}
  for prefix, idx in groups.items():
    split = test if multilabel else datasets.restrict(test, idx)
    zs = make("zeroshot", idx) if idx != classes else zeroshot
    results[f"zeroshot/{prefix}{metric}"] = _score(zs, base_variables, split, mean, std, eval_bs, metric)
    if prefix == "novel/" and config.method.get("class_specific", False):
      results[f"{prefix}top1"] = float("nan")  # class-specific context has nothing for unseen classes
    else:
      m = method if idx == classes else make(name, idx)
      results[f"{prefix}{metric}"] = _score(m, selected, split, mean, std, eval_bs, metric)
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
