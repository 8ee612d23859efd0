"""Transfer methods: the registry and the contract every method module follows.

A method is what is learned around a frozen base two-tower model (`vlm_jax.models.two_tower.TwoTower`), plus a
pure loss. The transfer run (`vlm_jax.transfer.run`) knows no method: it builds one by name,

  method = build_method(name, config.method, base_model=…, base_config=…, tokenizer=…, class_names=…,
                        templates=…)

and hands `method.module` / `method.loss_fn` to the one training loop (`vlm_jax.train.loop.train`) and
`method.logits_fn` to evaluation.

Registry: `METHODS` maps a config name to 'module:builder' (imported on first use, as `vlm_jax.objectives`).
A builder has the signature

  build(cfg: ConfigDict, *, base_model, base_config, tokenizer, class_names: list[str],
        templates: tuple[str, ...], descriptions: list[tuple[str, ...]] | None = None) -> Method

  cfg          `config.method` of the run (the method's hyper-parameters; `cfg.name` is the registry name)
  base_model   the frozen TwoTower, built from the base run's config with its BatchNorm frozen
               (`model.image.train_batch_stats = False` for a ResNet tower)
  base_config  the base run's config (image size, tokenizer, …)
  tokenizer    the base run's tokenizer (`tokenizer(list_of_str) -> int32 [N, L]`)
  class_names  the classes the method is trained on (base classes in a base-to-novel run)
  templates    hand-crafted prompt templates ('{}' = class name) of the dataset
  descriptions optional CuPL-style sentences per class (`vlm_jax.embedding.prompts.load_descriptions`): the
               hand-crafted text side (zero-shot head, KgCoOp / ProGrad targets) uses templates + descriptions

  Method(module, loss_fn, logits_fn):
    module     a Flax module holding the frozen base model as the submodule named `base` (its parameters live
               under params 'base/…'; the run sets config.frozen = '^base/', initialises 'base/…' from the base
               run with config.init.rename {'^base/': ''} and stores them by reference, checkpoint_frozen=False).
               `module(batch, *, train) -> outputs dict` (the loop calls `module.apply(variables, batch,
               train=True, mutable=[…])`); batch = {'image': float32 [B, H, W, 3] (normalised as the base run),
               'label': int32 [B]}. Methods call the base with train=False (frozen BatchNorm statistics).
    loss_fn    pure `loss_fn(outputs, batch) -> (scalar, metrics dict)` (for example cross-entropy of
               outputs['logits'] against batch['label']); metrics are scalars.
    logits_fn  `logits_fn(module, variables, images) -> [B, C]` class scores (via `module.apply`), what
               evaluation calls, for any class list: evaluation on other classes (novel classes of a base-to-
               novel run) rebuilds the method with those class names and the same trained variables, so
               parameters must not depend on the number of classes unless the method is class-specific
               (then novel evaluation is not defined for it and the protocol reports it as such).
               Multi-label methods (DualCoOp) return per-class scores the same way.
    fit        optional (default None), for a method in `TRAINING_FREE` that still chooses values on the k-shot
               data: `fit(variables, train, val) -> {'params': {...}, other scalars}`, train / val =
               `datasets.Split` with normalised float32 images; the returned params join the base variables for
               evaluation (so they also serve other class lists) and the scalars go to results.json as
               'fit/<key>'. Selection uses `val` only (CALIP searches its β on validation).
    pseudo_label  optional (default None), for an unsupervised method (UPL): `pseudo_label(variables, images,
               shots) -> (row indices, int labels)`. The run hands it the unlabelled training pool
               (`datasets.unlabelled_pool`, normalised float32, no labels: none is read) and the protocol's
               per-class budget `config.shots`, and trains the module on the rows it picked with the labels it
               made, without validation (the last step is kept); results record `labels_used: false`.
               A method that trains may have a `fit` too: its params are the loop's starting point (after the
               base is copied), e.g. fine-tuning's zero-shot head, LP-FT's linear probe, Tip-Adapter-F's cache.
               A fit's params may have sizes that depend on the data (Tip-Adapter's cache of the N·K training
               images): the module declares them with `self.variable('params', name, init)` (no shape check;
               the loop's state takes the sizes of the start), and gradients of what must not train are stopped.
    candidates optional (default None): `candidates(base_variables, trained) -> [(labels dict, variables)]`,
               variants of the selected variables (WiSE-FT's θ(α)); the run scores each on the validation split,
               keeps the best (ties → the first listed), records its labels in results (e.g. 'alpha') and, after
               selection, scores every candidate on the test split and the shifted task ('candidates').
               Also the place for hyper-parameters chosen after training: CLIP-Adapter's residual ratio r (one
               candidate per r), Tip-Adapter-F's (α, β) searched again for the fine-tuned keys.
    report     optional (default None): `report(results, workdir)`, after the results are complete: a method's own
               plots (WiSE-FT's `plots/wise_ft.png`).
    model_fn   optional (default None), for a method whose result is a full two-tower model (fine-tuning,
               LP-FT, WiSE-FT): `model_fn(variables) -> (model config, model variables, head)`, head =
               {'kernel' W [C, E], 'bias' b [C], 'logit_scale'} with logits = logit_scale · W f(x) + b. The run
               trains in DIR/train/ and stores the selected model as DIR's own checkpoint (`runs.save_model`
               layout) plus DIR/head.npz, so `inference.load(DIR)`, `evaluate --checkpoint=DIR` and `convert --to
               … --input DIR` read it.
  A method module may define `check(config)`: preflight's checks of its `config.method` keys (`check_config`).

Shared pieces a method may use (in this package, no utils module):
  prompting.py   `PromptText`: class names tokenised behind M context placeholders ('X X … X name.'), the
                 splice of learned context vectors into the token embeddings (class-token position end, middle,
                 front), `encode_prompts(base, ctx, …)` through `TwoTower.encode_text(embeddings=…,
                 eot_positions=…)`, `zeroshot_weights(...)` (the CLIP prompt-ensemble head, fixed), `ce_loss`.

Methods (paper + equation in each module's docstring):
  zeroshot   no training: the CLIP prompt-ensemble classifier (Radford et al. 2021)
  coop       CoOp (Zhou et al. 2022, IJCV)            cocoop   CoCoOp (Zhou et al. 2022, CVPR)
  kgcoop     KgCoOp (Yao et al. 2023)                 prograd  ProGrad (Zhu et al. 2023)
  vp         visual prompting (Bahng et al. 2022)    vpt      VPT shallow / deep (Jia et al. 2022)
  maple      MaPLe (Khattak et al. 2023)             dualcoop DualCoOp (Sun et al. 2022), multi-label
  plot       PLOT (Chen et al. 2023)
  finetune   full fine-tuning, zero-shot head init (Wortsman et al. 2022)    lp_ft  LP-FT (Kumar et al. 2022)
  wise_ft    WiSE-FT weight-space ensembles (Wortsman et al. 2022)
  upl        UPL (Huang et al. 2022), unsupervised   tpt      TPT (Shu et al. 2022), test-time
  calip      CALIP (Guo et al. 2023), training-free  vcd      descriptors (Menon & Vondrick 2023)
  linear_probe  L-BFGS probe on frozen features, λ on validation (Radford et al. 2021), training-free
  clip_adapter  CLIP-Adapter (Gao et al. 2021)        taskres  TaskRes (Yu et al. 2023)
  tip_adapter   Tip-Adapter, training-free; tip_adapter_f  Tip-Adapter-F (Zhang et al. 2022)
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, NamedTuple

from vlm_jax.errors import UserError


class Method(NamedTuple):
  module: Any                 # flax.linen.Module with the frozen base as submodule 'base'
  loss_fn: Callable           # fn(outputs, batch) -> (scalar, metrics)
  logits_fn: Callable         # fn(module, variables, images) -> [B, C]
  fit: Callable | None = None           # optional, training-free methods: fn(variables, train, val) -> dict
  pseudo_label: Callable | None = None  # optional, unsupervised methods: fn(variables, images, shots) -> (idx, y)
  candidates: Callable | None = None    # optional: fn(base_variables, trained) -> [(labels, variables)] (WiSE-FT)
  report: Callable | None = None        # optional: fn(results, workdir), the method's own plots
  model_fn: Callable | None = None      # optional, full-model methods: fn(variables) -> (config, variables, head)


METHODS: dict[str, Any] = {
    "zeroshot": "vlm_jax.transfer.methods.zeroshot:build",
    "coop": "vlm_jax.transfer.methods.coop:build",
    "cocoop": "vlm_jax.transfer.methods.cocoop:build",
    "kgcoop": "vlm_jax.transfer.methods.kgcoop:build",
    "prograd": "vlm_jax.transfer.methods.prograd:build",
    "vp": "vlm_jax.transfer.methods.vp:build",
    "vpt": "vlm_jax.transfer.methods.vpt:build",
    "maple": "vlm_jax.transfer.methods.maple:build",
    "dualcoop": "vlm_jax.transfer.methods.dualcoop:build",
    "plot": "vlm_jax.transfer.methods.plot:build",
    "finetune": "vlm_jax.transfer.methods.finetune:build",
    "lp_ft": "vlm_jax.transfer.methods.lp_ft:build",
    "wise_ft": "vlm_jax.transfer.methods.wise_ft:build",
    "upl": "vlm_jax.transfer.methods.upl:build",
    "tpt": "vlm_jax.transfer.methods.tpt:build",
    "calip": "vlm_jax.transfer.methods.calip:build",
    "vcd": "vlm_jax.transfer.methods.vcd:build",
    "linear_probe": "vlm_jax.transfer.methods.linear_probe:build",
    "clip_adapter": "vlm_jax.transfer.methods.clip_adapter:build",
    "tip_adapter": "vlm_jax.transfer.methods.tip_adapter:build",
    "tip_adapter_f": "vlm_jax.transfer.methods.tip_adapter:build_f",
    "taskres": "vlm_jax.transfer.methods.taskres:build",
}

# methods that learn nothing: the run evaluates them without calling the training loop
TRAINING_FREE = ("zeroshot", "tpt", "calip", "vcd", "linear_probe", "tip_adapter")


def get_builder(name: str) -> Callable[..., Method]:
  """The builder registered as `name` (its module imported on first use); `UserError` for an unknown name."""
  if name not in METHODS:
    raise UserError(f"unknown transfer method {name!r}; choose from {sorted(METHODS)}")
  fn = METHODS[name]
  if isinstance(fn, str):
    module, attr = fn.split(":")
    fn = METHODS[name] = getattr(importlib.import_module(module), attr)
  return fn


def build_method(name: str, cfg, **kwargs) -> Method:
  """`get_builder(name)(cfg, **kwargs)` (see the module docstring for the keyword arguments)."""
  return get_builder(name)(cfg, **kwargs)


def check_config(config) -> None:
  """Preflight of `config.method`: the method module's own `check(config)`, when it defines one."""
  spec = METHODS.get(str(config.method.get("name")))
  if spec is None:
    return
  module = spec.split(":")[0] if isinstance(spec, str) else spec.__module__
  check = getattr(importlib.import_module(module), "check", None)
  if check is not None:
    check(config)
