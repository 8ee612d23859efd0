"""The small config library every config file imports: shared defaults and the `file.py:arg` parser.

Config files under `configs/` stay data: they call `base_config()` for the keys every entry point relies on and
set values. `parse_arg('tiny')` / `parse_arg('img=B/16,txt=B,res=224', variant='tiny')` turns the text after
the colon into a ConfigDict (the first bare word is the `variant`); `load_file('configs/…/x.py:tiny')` reads a
config file outside the command line (benchmarks, notebooks, tests).
"""

from __future__ import annotations

import copy
import math

import ml_collections

from vlm_jax.errors import UserError


def load_file(spec: str, *, root: str = "") -> ml_collections.ConfigDict:
  """'configs/pretrain/clip.py:tiny' -> that file's `get_config('tiny')`, as `--config=` reads it (no ':': the
  file's default argument). A relative path is taken from `root` (default: the working directory)."""
  import importlib.util  # noqa: PLC0415
  import os  # noqa: PLC0415
  path, _, arg = spec.partition(":")
  if root and not os.path.isabs(path):
    path = os.path.join(root, path)
  if not os.path.isfile(path):
    raise UserError(f"config file {path} not found")
  name = "vlm_jax_config_" + "".join(c if c.isalnum() else "_" for c in os.path.splitext(path)[0])
  mod_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def plain(cfg) -> dict:
  """A ConfigDict (or any mapping, or None) as a plain nested dict."""
  if cfg is None:
    return {}
  return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def parse_arg(arg: str | None, *, variants: tuple[str, ...] = (), **defaults) -> ml_collections.ConfigDict:
  """'tiny' or 'variant=tiny,img=B/16,res=224' -> ConfigDict over `defaults` (values keep the default's type).

  With `variants`, any other `variant` is a `UserError`: a misspelt variant must not silently become the full run."""
  out = dict(defaults)
  for i, part in enumerate(p for p in (arg or "").split(",") if p):
    if "=" not in part:
      if i == 0 and "variant" in out:
        out["variant"] = part
        continue
      raise UserError(f"config argument {part!r} is not key=value")
    key, value = part.split("=", 1)
    if key not in out:
      raise UserError(f"unknown config argument {key!r}; known: {sorted(out)}")
    default = out[key]
    try:
      out[key] = type(default)(value) if default is not None and not isinstance(default, bool) else (
          value.lower() in ("1", "true", "yes") if isinstance(default, bool) else value)
    except ValueError:
      raise UserError(f"config argument {key}={value!r} is not a {type(default).__name__}") from None
  if variants and out.get("variant") not in variants:
    raise UserError(f"unknown variant {out.get('variant')!r}; use one of {', '.join(variants)}")
  return ml_collections.ConfigDict(out)


def data_config(**overrides) -> ml_collections.ConfigDict:
  """Every data-pipeline option (`vlm_jax.data.pipeline.DEFAULTS`, so each can be set from the command line)
  with `overrides`; nested dicts (augment, synthetic) are merged key by key."""
  from vlm_jax.data.pipeline import DEFAULTS
  d = copy.deepcopy(DEFAULTS)
  for k, v in overrides.items():
    d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
  return ml_collections.ConfigDict(d)


def optimizer_config(**overrides) -> ml_collections.ConfigDict:
  """Every optimizer option (`vlm_jax.train.optim`), so each can be set from the command line, with `overrides`:
  AdamW (b1, b2, eps) or SGD (momentum, nesterov), decay on `wd_mask` paths, global-norm clipping, warm-up
  (linear from 0, or constant at `warmup_lr`) then `schedule`, per-group lr multipliers `lr_groups`
  (((regex, multiplier), …), first match wins)."""
  opt = {"name": "adamw", "lr": 1e-3, "b1": 0.9, "b2": 0.98, "eps": 1e-6, "momentum": 0.9, "nesterov": False,
         "weight_decay": 0.2, "wd_mask": r"(^|/)kernel$", "clip_norm": 1.0, "schedule": "cosine",
         "warmup": "linear", "warmup_lr": 1e-5, "warmup_steps": 100, "end_factor": 0.0, "lr_groups": (),
         "grad_accum_steps": 1}
  unknown = sorted(set(overrides) - set(opt))
  if unknown:
    raise UserError(f"unknown optimizer option(s) {unknown}; known: {sorted(opt)}")
  return ml_collections.ConfigDict({**opt, **overrides})


def base_config() -> ml_collections.ConfigDict:
  """Keys shared by every entry point (pre-training, transfer, distillation)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 256            # global, over all processes and devices
  c.total_steps = 1000
  c.log_every_steps = 10
  c.eval_every_steps = 0        # 0: evaluate only at the end
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 2
  c.checkpoint_frozen = True    # False: frozen weights are not stored, rebuilt from config.init (runs.reference)
  # loss-spike guard (train/step.py): skip a step whose loss > factor × median of the last `window` finite
  # losses, counted in metric spike_skipped_steps; 0 = off (no extra state)
  c.loss_spike_factor = 0.0
  c.loss_spike_window = 32
  c.profile_steps = ""          # 'START,END': a jax.profiler trace of those steps under DIR/profile/ (train/profiling)
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})
  c.partitioning = ml_collections.ConfigDict({"rules": None})  # None: vlm_jax.parallel.partitioning.DEFAULT_RULES
  c.frozen = ""                 # regex over '/'-joined parameter paths; matches get no gradient (LiT)
  # initialise from checkpoints (LiT, teachers, transfer): vlm_jax.runs.init; more sources in init.sources
  c.init = ml_collections.ConfigDict({"checkpoint": "", "params": "", "rename": {}, "required": False,
                                      "sources": ()})
  c.optimizer = optimizer_config()
  c.objectives = ml_collections.ConfigDict({"clip": 1.0})
  c.objective_hparams = ml_collections.ConfigDict()
  c.data = data_config(image_size=224)
  c.tokenizer = ml_collections.ConfigDict({"name": "words", "context_length": 16})
  c.evals = ml_collections.ConfigDict()   # {name: {'kind': …, …}}; see vlm_jax.evaluate
  return c


CLIP_LOGIT_SCALE_INIT = math.log(1 / 0.07)
SIGLIP_LOGIT_SCALE_INIT = math.log(10.0)
SIGLIP_LOGIT_BIAS_INIT = -10.0


def tiny_run() -> dict:
  """Run settings of the embedded synthetic default (2-core CPU, `make demo`)."""
  return dict(
      batch_size=256, total_steps=900, log_every_steps=20, eval_every_steps=450, checkpoint_every_steps=300,
      # the procedural default, rendered once into 16 shards of 4,096 samples (3.5 epochs in 900 steps);
      # no crop or flip: captions name positions ("on the left") and shapes whose aspect ratio matters
      data=data_config(
          name="synthetic", image_size=32, synthetic={"num_train": 1 << 16, "shard_size": 4096},
          augment={"crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0), "flip": False},
          shuffle_buffer=2048, cycle_length=4, workers=0),
      tokenizer=ml_collections.ConfigDict({"name": "words", "context_length": 24}),  # the longest captions fit
      optimizer=optimizer_config(weight_decay=0.05),
      evals=synthetic_evals())


def eval_suite(name: str) -> ml_collections.ConfigDict:
  """The head of a standalone evaluation config (`configs/eval/*.py`): its name, the mesh, and `data`, the
  overrides of the evaluated checkpoint's data config; the file adds `evals`."""
  return ml_collections.ConfigDict({"name": name, "mesh": {"data": -1, "fsdp": 1, "model": 1}, "data": {}})


def synthetic_evals(variant: str = "train") -> ml_collections.ConfigDict:
  """The evaluators of the synthetic default (see `vlm_jax.evaluate`) on held-out procedural images.

  'train' (inside the tiny pre-training run, a few seconds on 2 cores): zero-shot classification, retrieval and
  linear probe; 'standalone' (configs/eval/synthetic.py) adds the multi-label mAP, more retrieval images,
  1/4-shot linear probes and zero-shot segmentation; 'micro': a seconds-long 'standalone' for tests.
  """
  sizes = {"train": (0, 256, 16, ()), "standalone": (512, 1024, 16, (1, 4)), "micro": (32, 32, 4, (1, 2))}
  if variant not in sizes:
    raise UserError(f"unknown synthetic eval variant {variant!r}; use one of {sorted(sizes)}")
  multilabel, retrieval, per_class, shots = sizes[variant]
  evals = {"zeroshot": {"kind": "zeroshot_synthetic", "multilabel_images": multilabel},
           "retrieval": {"kind": "retrieval_synthetic", "num_images": retrieval, "captions_per_image": 5},
           "linear_probe": {"kind": "linear_probe_synthetic", "train_per_class": per_class}}
  if shots:
    evals["fewshot"] = {"kind": "fewshot_synthetic", "shots": shots, "seeds": 3, "train_per_class": per_class}
    # zero-shot segmentation: MaskCLIP dense features vs the global embedding broadcast to every pixel
    evals["segmentation"] = {"kind": "segmentation_synthetic", "num_images": 128 if variant == "standalone" else 8}
  return ml_collections.ConfigDict(evals)


def tiny_model(image_size: int = 32) -> ml_collections.ConfigDict:
  """A CPU-sized two-tower: a tiny CLIP ModifiedResNet (convolutions learn shape fast on CPU) and a small
  causal text transformer. (A conv-stem ViT of Xiao et al. 2021 reached ~40 % seen in the same time.)"""
  return ml_collections.ConfigDict({
      # BatchNorm trains: batch statistics of the global batch, running averages for evaluation (CLIP's ResNets)
      "image": {"kind": "resnet", "variant": "tiny", "image_size": image_size, "train_batch_stats": True},
      "text": {"kind": "text", "variant": "tiny", "width": 64, "depth": 2, "num_heads": 2, "mlp_dim": 256},
      "embed_dim": 64, "logit_scale_init": CLIP_LOGIT_SCALE_INIT, "logit_bias_init": None,
      # dtype 'auto': float32 on CPU, bfloat16 on GPU / TPU (models.dtype_of); attention 'auto': cuDNN flash
      # attention on an NVIDIA GPU in bfloat16, XLA elsewhere (models.transformer.attention_implementation)
      "simclr_head": None, "flip_mask_ratio": 0.0, "scan": False, "remat": "none", "dtype": "auto",
      "param_dtype": "float32", "attention": "auto"})


def micro_run() -> dict:
  """A seconds-long smoke run on the synthetic data: 16 px, batch 16, 6 steps, no evaluation."""
  run = tiny_run()
  run.update(batch_size=16, total_steps=6, log_every_steps=1, checkpoint_every_steps=1000,
             evals=ml_collections.ConfigDict())
  run["data"].update({"image_size": 16, "synthetic": {"num_train": 512, "shard_size": 64},
                      "shuffle_buffer": 64})
  run["optimizer"].warmup_steps = 2
  return run


def micro_model() -> ml_collections.ConfigDict:
  """One-layer towers of width 32 (a patch-4 ViT and a causal text transformer), joint dimension 16."""
  m = tiny_model()
  m.image = {"kind": "vit", "variant": "mu/4", "image_size": 16, "pool_type": "gap"}
  m.text = {"kind": "text", "variant": "tiny", "width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64}
  m.embed_dim = 16
  return m


def full_run(res: int) -> dict:
  """Run settings at scale (open_clip / big_vision conventions): global batch 32k, bf16 compute, shards."""
  return dict(
      batch_size=32768, total_steps=100_000, log_every_steps=50, eval_every_steps=2000,
      checkpoint_every_steps=2000, keep_checkpoints=3,
      data=data_config(name="shards", image_size=res, shuffle_buffer=10_000, cycle_length=8, workers=8),
      tokenizer=ml_collections.ConfigDict({"name": "clip_bpe", "context_length": 77}),
      optimizer=optimizer_config(lr=5e-4, warmup_steps=10_000),
      evals=ml_collections.ConfigDict())


def vit_text_model(img: str, txt: str, res: int, embed: int) -> ml_collections.ConfigDict:
  """ViT image tower + CLIP text tower, scanned and rematerialised, bf16 compute with fp32 params.

  The image tower is OpenAI CLIP's (Radford et al. 2021): class token, LayerNorm before the blocks, a patch
  embedding without bias — the architecture open_clip builds for the same names."""
  return ml_collections.ConfigDict({
      "image": {"kind": "vit", "variant": img, "image_size": res, "pool_type": "cls", "pre_norm": True,
                "patch_bias": False},
      "text": {"kind": "text", "variant": txt, "vocab_size": 49408, "max_len": 77},
      "embed_dim": embed, "logit_scale_init": CLIP_LOGIT_SCALE_INIT, "logit_bias_init": None,
      "simclr_head": None, "flip_mask_ratio": 0.0, "scan": True, "remat": "dots_with_no_batch_dims_saveable",
      "dtype": "bfloat16", "param_dtype": "float32", "attention": "auto"})


def two_tower(arg: str | None, *, embed: int = 512):
  """(config, args) of a two-tower run from a config file's argument.

  'tiny' gives the synthetic CPU default, 'micro' a seconds-long smoke run (tests); otherwise
  'img=B/16,txt=B,res=224,embed=512' picks the towers.
  """
  a = parse_arg(arg, variant="full", img="B/16", txt="B", res=224, embed=embed)
  c = base_config()
  if a.variant == "tiny":
    c.update(tiny_run())
    c.model = tiny_model()
  elif a.variant == "micro":
    c.update(micro_run())
    c.model = micro_model()
  elif a.variant != "full":  # a misspelt variant must not silently become a full-size run
    raise UserError(f"unknown variant {a.variant!r}; use tiny, micro, full or img=…,txt=…,res=…,embed=…")
  else:
    c.update(full_run(a.res))
    c.model = vit_text_model(a.img, a.txt, a.res, a.embed)
  return c, a


MODEL_CONFIG_KEYS = ("model", "tokenizer", "data")


def model_run_config(model_config) -> ml_collections.ConfigDict:
  """The full run config of a model described by {'model', 'tokenizer', 'data', 'source'?, …} (a weight
  converter's output): `base_config()` with `model`, `tokenizer` (replaced), `data` (merged: image_size, mean,
  std) and `source`. A SigLIP model (one with a `logit_bias_init`) gets the sigmoid objective, so fine-tuning
  from it uses the loss it was trained with. Any other key given wins."""
  from vlm_jax.data import pipeline  # noqa: PLC0415
  conv = plain(model_config)
  missing = [k for k in MODEL_CONFIG_KEYS if k not in conv]
  if missing:
    raise ValueError(f"a model config needs the keys {list(MODEL_CONFIG_KEYS)}; missing {missing}")
  unknown = sorted(set(plain(conv["data"])) - set(pipeline.DEFAULTS))
  if unknown:
    raise ValueError(f"model data options {unknown} are not data options; valid: {sorted(pipeline.DEFAULTS)}")
  c = base_config()
  c.model = ml_collections.ConfigDict(plain(conv.pop("model")))
  c.tokenizer = ml_collections.ConfigDict(plain(conv.pop("tokenizer")))
  c.data.update(plain(conv.pop("data")))
  c.source = ml_collections.ConfigDict(plain(conv.pop("source", None)) or {})
  if c.model.get("logit_bias_init") is not None:
    c.objectives = ml_collections.ConfigDict({"siglip": 1.0})
  for key, value in conv.items():
    c[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
  return c


FINETUNE_FROZEN = {  # config.frozen of fine-tuning per method.head: what is NOT trained
    "learned": r"^base/(?!img/|img_proj/)",           # the text tower and τ: the image tower and the head train
    "frozen": r"^base/(?!img/|img_proj/)|^head/",      # … and the zero-shot / probe head
    "text": r"^base/(log_logit_scale|logit_bias)$",   # only τ (and a SigLIP bias): both towers train
}


def finetune_config(arg: str | None, method: dict) -> ml_collections.ConfigDict:
  """A fine-tuning transfer config (full fine-tuning, LP-FT, WiSE-FT; `vlm_jax.transfer.methods.finetune`):
  `transfer_config` with the image tower (and the head / text tower by `head`) trained, every weight stored in
  the checkpoints (`checkpoint_frozen = True`), and the recipe of Wortsman et al. 2022 scaled to the tiny model:
  AdamW (β = 0.9, 0.999, weight decay 0.1 on kernels), one epoch of linear warmup, cosine decay, a small lr.
  `arg`: 'tiny' | 'full', optionally ',head=learned|frozen|text'."""
  a = parse_arg(arg, variant="tiny", head="learned")
  if a.head not in FINETUNE_FROZEN:
    raise UserError(f"unknown head {a.head!r}; use one of {sorted(FINETUNE_FROZEN)}")
  c = transfer_config(a.variant, {**method, "head": a.head})
  c.frozen = FINETUNE_FROZEN[a.head]
  c.checkpoint_frozen = True
  c.optimizer.update({"name": "adamw", "lr": 1e-4, "b1": 0.9, "b2": 0.999, "weight_decay": 0.1,
                      "wd_mask": r"(^|/)kernel$", "warmup": "linear"})
  return c


def transfer_config(arg: str | None, method: dict, **overrides) -> ml_collections.ConfigDict:
  """A transfer run config (`python -m vlm_jax.transfer`): `base_config()` with the base model frozen under
  'base/' and initialised from `init.checkpoint` (kept by reference), CoOp's recipe (SGD 2e-3, cosine, one
  constant warmup epoch at 1e-5, batch 32), `method` as `config.method`, then `overrides`.

  `arg`: 'tiny' (default: base = the `make demo` run workdirs/demo, synthetic shift task) or 'full' (no base
  default: pass --config.init.checkpoint). Epoch counts are converted to steps by the run (`epochs`,
  `warmup_epochs`, `eval_every_epochs`)."""
  a = parse_arg(arg, variant="tiny")
  if a.variant not in ("tiny", "full"):
    raise UserError(f"unknown transfer variant {a.variant!r}; use tiny or full")
  c = base_config()
  c.method = ml_collections.ConfigDict(method)
  c.dataset = "shifted_hues" if a.variant == "tiny" else "tfds:imagenet2012"
  c.protocol = "few_shot"         # or 'base_to_novel'
  c.shots = 16
  c.seed = 1
  c.val_shots = -1                # -1: min(shots, 4) per class, from the training split
  c.test_per_class = 16           # synthetic tasks only
  c.templates = ""                # '': the dataset's own; a bundled set name ('coop:dtd', 'clip:dtd'), a .txt path
  c.classnames = ""               # folder:/tfds: datasets: a shipped class-name file ('oxford_pets'), a .txt path
  c.descriptions = ""             # CuPL JSON {class: [sentences]}: added to the hand-crafted text side
  c.shift_dataset = ""            # a dataset with the same classes, scored at test time too (robustness, WiSE-FT)
  c.flip = False                  # random horizontal flip in training
  c.epochs = 10 if a.variant == "tiny" else 50
  c.warmup_epochs = 1
  c.eval_every_epochs = 1         # validation (model selection) schedule
  c.select = "val"                # 'val': the best validation step; 'last'
  c.eval_batch_size = 256
  c.batch_size = 32
  c.log_every_steps = 10
  c.checkpoint_every_steps = 100
  c.keep_checkpoints = 1
  c.optimizer = ml_collections.ConfigDict({
      "name": "sgd", "lr": 2e-3, "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4,
      "wd_mask": r"(^|/)(ctx|kernel)$", "clip_norm": 0.0, "schedule": "cosine", "warmup": "constant",
      "warmup_lr": 1e-5, "warmup_steps": 0, "end_factor": 0.0, "grad_accum_steps": 1})
  c.frozen = "^base/"
  c.checkpoint_frozen = False
  c.init = ml_collections.ConfigDict({
      "checkpoint": "workdirs/demo" if a.variant == "tiny" else "", "params": "^base/",
      "rename": {"^base/": ""}, "required": True, "sources": ()})
  c.objectives = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict({"image_size": 0})   # 0: the base model's
  c.evals = ml_collections.ConfigDict()
  for key, value in overrides.items():
    c[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
  return c


def segmentation_distill_config(method: str, variant: str, teacher: str) -> ml_collections.ConfigDict:
  """The shared layout of configs/distill/maskclip_plus.py and lseg.py (task 'segmentation',
  `vlm_jax.distill.segmentation`); `variant` 'tiny' or 'micro'."""
  c = base_config()
  c.task = "segmentation"
  c.name = method
  c.teacher = ml_collections.ConfigDict({"checkpoint": teacher, "templates": "synthetic", "batch_size": 256})
  # temperature τ of the text classifier; MaskCLIP's refinements of the teacher's dense predictions (pseudo-labels
  # and `teacher_refined/`): prompt denoising threshold (0: off), key smoothing (+ its threshold, 1: everywhere);
  # background: the centred-score threshold δ ('otsu' over the training images, or a number); dense_size: the
  # side the teacher sees (its dense grid is dense_size / 32 for a ResNet)
  c.method = ml_collections.ConfigDict({"name": method, "temperature": 0.07, "pd_thresh": 0.5,
                                        "key_smoothing": True, "ks_thresh": 1.0, "threshold": "otsu",
                                        "dense_size": 64})
  # MaskCLIP+ self-training: rounds on the student's own predictions after the teacher's pseudo-labels (0: off)
  c.method.self_training = ml_collections.ConfigDict({"rounds": 0, "steps": 300})
  c.teacher_cache = ml_collections.ConfigDict({"dir": "", "chunk": 256})
  c.baselines = ("closed_set",) if method == "lseg" else ()
  c.data = ml_collections.ConfigDict({"image_size": 64, "num_train": 1024, "num_eval": 128, "seed": 0,
                                      "objects": (2, 4), "p_novel": 0.35, "eval_split": "val"})
  # real data instead of the scenes (vlm_jax.distill.seg_folder): masks 'IMAGES:LABELS:CLASSES' (PNG label maps,
  # value i = class i, 255 = ignore), eval_masks (same form; empty: the last num_eval maps are held out),
  # novel_classes: comma-separated names or a count (empty: a seeded quarter of the classes)
  c.data.masks, c.data.eval_masks, c.data.novel_classes = "", "", ""
  # the student (vlm_jax.models.segmentation.segmenter.build); image 'teacher': the teacher's image tower
  c.model = ml_collections.ConfigDict({"image": "teacher", "pyramid_channels": 64, "head_channels": 64})
  c.init.sources = ({"checkpoint": "teacher", "params": r"^backbone/", "rename": {r"^backbone/": "img/"},
                     "required": True},)
  c.frozen = r"^backbone/"
  c.checkpoint_frozen = False
  c.batch_size = 16
  c.total_steps = 600
  c.log_every_steps = 20
  c.eval_every_steps = 0
  c.checkpoint_every_steps = 200
  c.optimizer = optimizer_config(lr=2e-3, b2=0.999, eps=1e-8, weight_decay=1e-4, warmup_steps=50)
  c.objectives = ml_collections.ConfigDict()
  c.evals = ml_collections.ConfigDict({"segmentation": {"num_images": 128, "batch_size": 32, "plots": True}})
  if variant == "micro":
    c.data.num_train, c.data.num_eval = 64, 32
    c.total_steps, c.batch_size, c.log_every_steps, c.checkpoint_every_steps = 40, 8, 5, 10
    c.optimizer.warmup_steps = 5
    c.evals.segmentation.num_images, c.evals.segmentation.batch_size = 32, 16
    c.teacher_cache.chunk = 32
  elif variant != "tiny":
    raise UserError(f"unknown variant {variant!r} of configs/distill/{method}.py; use tiny or micro")
  return c
