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
   Training-free methods (`TRAINING_FREE`) skip the loop; one with a `fit` hook (CALIP's β) gets the k-shot
   train / validation sets (normalised) and returns the values it keeps. An unsupervised method (`pseudo_label`
   hook, UPL) never sees a label: it labels the unlabelled training pool itself (`pseudo_labelled`), there is
   no labelled validation (the last step is kept) and results say `labels_used: false`. A method that trains and
   has a `fit` hook starts the loop from the params it returns (fine-tuning's zero-shot head, LP-FT's probe).
   A `candidates` hook (WiSE-FT's θ(α)) offers variants of the selected parameters: the best on validation is
   kept (ties → the first listed).
5. The test split is read now, and only now: the metric (`metric`: 'top1', or 'mAP' for a multi-label dataset)
   of the selected parameters and of zero-shot CLIP (`zeroshot/<metric>`; multi-label: its cosine logits per
   class as scores), and `chance` (1/C; multi-label: the mean class frequency of the test split, ≈ the mAP
   of random scores); base / novel / harmonic mean for base-to-novel. `DIR/results.json` holds them (with method,
   dataset, shots, seed); the return value too. With `config.shift_dataset` (a dataset of the same classes), its
   test split is scored too (`shift/<metric>`, `zeroshot/shift/<metric>`; every candidate in 'candidates').
6. A method with a `model_fn` hook (fine-tuning, LP-FT, WiSE-FT) yields a full two-tower model: the loop ran in
   DIR/train/, and DIR's own checkpoint (`runs.save_model` layout, `store_model`) is the selected model, with its
   classifier head in DIR/head.npz — `inference.load(DIR)`, `evaluate --checkpoint=DIR` and `convert --to … --input
   DIR` read it. A `report` hook then writes the method's plots.
"""

from __future__ import annotations

import functools
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
  return runs.merge_trees(out, {"params": trainable or {}})  # a fine-tuned base ('base/img/…') replaces the base's


def _steps(config, n_train: int, batch: int) -> dict:
  per_epoch = max(1, math.ceil(n_train / batch))
  total = int(config.epochs) * per_epoch
  every = max(1, int(config.eval_every_epochs) * per_epoch)
  return {"per_epoch": per_epoch, "total": total, "warmup": int(config.warmup_epochs) * per_epoch,
          "eval_every": every}


@functools.lru_cache(maxsize=32)
def _jitted_logits(module, logits_fn):
  """One compiled `logits_fn` per method module (WiSE-FT scores 11 candidates on three splits with it)."""
  return jax.jit(lambda v, x: logits_fn(module, v, x))


def _score(method, variables, split: datasets.Split, mean, std, batch: int, metric: str = "top1") -> float:
  fn = _jitted_logits(method.module, method.logits_fn)
  return protocol.METRICS[metric](fn, variables, datasets.normalize(split.images, mean, std), split.labels, batch)


def initial_trainable(method, example: dict, seed: int) -> dict:
  """The method's parameters at step 0, as the loop initialises them (`vlm_jax.train.state.init_rngs`)."""
  from vlm_jax.parallel import partitioning  # noqa: PLC0415
  from vlm_jax.train.state import init_rngs  # noqa: PLC0415
  rngs, _ = init_rngs(jax.random.PRNGKey(int(seed)))
  params = jax.jit(lambda: partitioning.unbox(method.module.init(rngs, example, train=False))["params"])()
  return {k: x for k, x in jax.device_get(params).items() if k != "base"}


def pseudo_labelled(method, ds, base_variables, config, mean, std) -> datasets.Split:
  """The training set of an unsupervised method (`Method.pseudo_label`, UPL): the unlabelled training pool
  (`datasets.unlabelled_pool`: images only, the labels are never read) labelled by the method itself."""
  if config.protocol != "few_shot" or datasets.is_multilabel(str(config.dataset)):
    raise UserError(f"{config.method.name} learns from unlabelled images: use protocol few_shot on a "
                    f"single-label dataset")
  images = datasets.unlabelled_pool(ds)
  idx, labels = method.pseudo_label(base_variables, datasets.normalize(images, mean, std).astype(np.float32),
                                    int(config.shots))
  return datasets.Split(images[np.asarray(idx)], np.asarray(labels, np.int32))


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
  eval_bs = int(config.eval_batch_size)
  zeroshot = make("zeroshot", classes)
  base_variables = nest_base(base_vars)
  if method.pseudo_label is not None:  # unsupervised (UPL): the training labels are never read
    train, val = pseudo_labelled(method, ds, base_variables, config, mean, std), None
  elif multilabel:
    train, val = datasets.few_shot_multilabel(ds, shots=int(config.shots), seed=int(config.seed),
                                              val_shots=int(config.val_shots))
  else:
    train, val = datasets.few_shot(ds, shots=int(config.shots), seed=int(config.seed),
                                   val_shots=int(config.val_shots), classes=classes)
  results = {"method": name, "dataset": ds.name, "shots": int(config.shots), "seed": int(config.seed),
             "protocol": str(config.protocol), "metric": metric, "classes": len(classes),
             "chance": 1.0 / len(classes), "train_images": len(train.labels),
             "val_images": 0 if val is None else len(val.labels),
             # whether the result depends on a training label (a label-free method's val score is a report only)
             "labels_used": val is not None and not (name in TRAINING_FREE and method.fit is None),
             f"zeroshot/val_{metric}": float("nan") if val is None else
             _score(zeroshot, base_variables, val, mean, std, eval_bs, metric)}
  workdir = loop.prepare_workdir(workdir)
  selected = base_variables
  # a method whose result is a full model (`model_fn`) trains in DIR/train: DIR's own checkpoint is that model
  train_dir = os.path.join(workdir, "train") if method.model_fn is not None else workdir
  start = {}  # a training method's `fit`: its starting point (fine-tuning's zero-shot head, LP-FT's probe)
  if name not in TRAINING_FREE and method.fit is not None:
    fitted = method.fit(base_variables, _normalized(train, mean, std), _normalized(val, mean, std))
    start = fitted.pop("params", {})
    results.update({f"fit/{k}": v for k, v in fitted.items()})

  if name not in TRAINING_FREE and int(config.epochs) > 0:
    dp = jax.device_count()
    batch = min(int(config.batch_size), max(dp, len(train.labels) // dp * dp))
    s = _steps(config, len(train.labels), batch)
    run_cfg = ml_collections.ConfigDict(config_lib.plain(config))
    run_cfg.batch_size, run_cfg.total_steps = batch, s["total"]
    run_cfg.optimizer.warmup_steps = s["warmup"]
    run_cfg.eval_every_steps = s["eval_every"]
    ckpt_dir = os.path.join(train_dir, "checkpoints")
    resume = max(runs.steps(ckpt_dir), default=0) if os.path.isdir(ckpt_dir) else 0
    evals = [m for m in range(s["eval_every"], s["total"], s["eval_every"]) if m > resume] + [s["total"]]
    jitted = jax.jit(lambda v, x: method.logits_fn(method.module, v, x))
    selector = None if val is None else protocol.Selector(
        train_dir, jitted, datasets.normalize(val.images, mean, std), val.labels, frozen=str(config.frozen),
        steps=evals, resume_step=resume, batch_size=eval_bs, metric=metric)

    def make_data(process_index, process_count):
      return datasets.train_iterator(train, batch_size=batch, seed=int(config.seed), mean=mean, std=std,
                                     flip=bool(config.flip), process_index=process_index,
                                     process_count=process_count)

    init_fn = None
    if start:
      base_init = runs.initializer(run_cfg.init)
      init_fn = lambda v: runs.merge_trees(base_init(v), {"params": start})  # noqa: E731
    last = loop.train(run_cfg, train_dir, make_data=make_data, model=method.module, loss_fn=method.loss_fn,
                      evaluators={"val": selector} if selector else {}, init_fn=init_fn, quiet=quiet)
    if config.select == "val" and selector is not None:  # no labelled validation (UPL): the last step
      step, trainable = selector.load_best()
    else:
      step = s["total"]
      trainable = last_trainable(train_dir, run_cfg)
    selected = nest_base(base_vars, trainable)
    results.update({"steps": s["total"], "batch_size": batch, "selected_step": int(step),
                    f"val/{metric}": selector.history.get(int(step), float("nan")) if selector else float("nan"),
                    "final/train_loss": float(last.get("loss", float("nan")))})
  elif name not in TRAINING_FREE:  # epochs = 0: the method as initialised
    example = {"image": datasets.normalize(train.images[:1], mean, std).astype(np.float32),
               "labels" if multilabel else "label": train.labels[:1]}
    selected = nest_base(base_vars, runs.merge_trees(initial_trainable(method, example, int(config.seed)), start))
    results.update({"steps": 0, "selected_step": 0, f"val/{metric}": float("nan") if val is None else
                    _score(method, selected, val, mean, std, eval_bs, metric)})
  else:  # training-free: `fit` (if any) chooses the method's values on the k-shot sets (CALIP's β: validation)
    if method.fit is not None:
      fitted = method.fit(base_variables, _normalized(train, mean, std), _normalized(val, mean, std))
      selected = nest_base(base_vars, fitted.pop("params", {}))
      results.update({f"fit/{k}": v for k, v in fitted.items()})
    results.update({"steps": 0, "selected_step": 0, f"val/{metric}": results[f"zeroshot/val_{metric}"]
                    if name == "zeroshot" else _score(method, selected, val, mean, std, eval_bs, metric)})

  candidates = []
  if method.candidates is not None:  # variants of the selected variables (WiSE-FT's θ(α)), chosen on validation
    if val is None:
      raise UserError(f"{name} chooses among candidates on the validation split, and this run has none")
    for labels, variables in method.candidates(base_variables, selected):
      candidates.append((labels, variables, _score(method, variables, val, mean, std, eval_bs, metric)))
    best = max(range(len(candidates)), key=lambda i: (candidates[i][2], -i))  # ties: the first listed
    labels, selected, score = candidates[best]
    results.update({**labels, f"val/{metric}": score})

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
  shift = str(config.get("shift_dataset", "") or "")
  shift_test = None
  if shift:  # the robustness evaluation: the same classes under another distribution (its test split)
    sds = datasets.open_dataset(shift, image_size=size, templates=config.templates,
                                test_per_class=int(config.test_per_class),
                                classnames=str(config.get("classnames", "") or ""))
    if list(sds.class_names) != list(ds.class_names):
      raise UserError(f"shift_dataset {shift!r} must have the classes of {config.dataset!r} in the same order")
    shift_test = sds.load("test")
    results["shift_dataset"] = sds.name
    results[f"zeroshot/shift/{metric}"] = _score(zeroshot, base_variables, shift_test, mean, std, eval_bs, metric)
    results[f"shift/{metric}"] = _score(method, selected, shift_test, mean, std, eval_bs, metric)
  if candidates:
    results["candidates"] = [
        {**labels, f"val/{metric}": score, metric: _score(method, variables, test, mean, std, eval_bs, metric),
         **({f"shift/{metric}": _score(method, variables, shift_test, mean, std, eval_bs, metric)}
            if shift_test is not None else {})}
        for labels, variables, score in candidates]
  if method.model_fn is not None:
    store_model(workdir, method, selected, [ds.class_names[c] for c in classes], int(results["selected_step"]))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=2, sort_keys=True)
    if method.report is not None:
      method.report(results, workdir)
  return results


def _normalized(split, mean, std):
  """`split` with normalised float32 images (what `fit` hooks get); None stays None."""
  if split is None:
    return None
  return datasets.Split(datasets.normalize(split.images, mean, std).astype(np.float32), split.labels)


def store_model(workdir: str, method, variables: dict, class_names: list, step: int) -> str:
  """Writes the full model of a `model_fn` method as DIR's own checkpoint: `runs.save_model` into a fresh
  folder, whose checkpoints/ and config.json then replace DIR's (the training checkpoints live in DIR/train/),
  and the classifier head as DIR/head.npz (kernel [C, E], bias [C], logit_scale, class_names; logits =
  logit_scale · kernel f(x) + bias). Returns DIR."""
  import shutil  # noqa: PLC0415
  config, model_vars, head = method.model_fn(variables)
  target, head_path = os.path.join(workdir, "checkpoints"), os.path.join(workdir, "head.npz")
  if os.path.isdir(target) and not os.path.exists(head_path):
    raise UserError(f"{target} holds checkpoints that are not a model this run wrote; use a new workdir")
  staging = os.path.join(workdir, "model.tmp")
  if jax.process_index() == 0:
    shutil.rmtree(staging, ignore_errors=True)
  runs.save_model(staging, config, model_vars, step=step)
  if jax.process_index() == 0:
    if os.path.isdir(target):
      shutil.rmtree(target)
    os.replace(os.path.join(staging, "checkpoints"), target)
    os.replace(os.path.join(staging, "config.json"), os.path.join(workdir, "config.json"))
    shutil.rmtree(staging, ignore_errors=True)
    np.savez(head_path, **head, class_names=np.asarray(class_names))
  return workdir


def last_trainable(workdir: str, run_cfg) -> dict:
  """The trainable params (those `config.frozen` does not match) of the newest checkpoint (`select = 'last'`)."""
  from flax import traverse_util  # noqa: PLC0415
  variables = runs.load(workdir).variables
  return traverse_util.unflatten_dict(protocol.trainable_of(variables, str(run_cfg.frozen)), sep="/")
