"""Full fine-tuning of CLIP with the zero-shot head as initialisation (Wortsman et al. 2022, "Robust fine-tuning
of zero-shot models", CVPR, §2 end-to-end fine-tuning; the recipe of their Appendix: AdamW, cosine schedule with
warmup, a small learning rate, cross-entropy).

What is learned: the whole image tower θ_img of the two-tower base (`base/img/…`, `base/img_proj/…`) and a
linear head (W, b) on its L2-normalised embedding f(x; θ_img):

  logits(x) = exp(log τ⁻¹) · W f(x; θ_img) + b,        W ∈ R^{C×E}, b ∈ R^C
  L = CE(logits(x), y)

initialised at the zero-shot classifier (Radford et al. 2021 §3.1.4): W⁰ = the prompt ensemble
w_c = normalise(mean_p normalise(g(p))) of class c's hand-crafted prompts through the frozen text tower g, b⁰ = 0,
so at step 0 the model is exactly zero-shot CLIP. τ (the base's temperature) stays fixed. `method.head`:

  'learned'  (default) W and b are trained with the image tower (the reference implementation's end-to-end run)
  'frozen'   W, b stay at their initialisation (config.frozen also matches '^head/'; `configs/transfer/finetune.py:
             tiny,head=frozen`): only the image tower moves
  'text'     no separate head: W is the prompt ensemble recomputed in-graph through the text tower, which is
             trained too (config.frozen leaves '^base/txt' trainable; `…:tiny,head=text`)

LP-FT (`lp_ft.py`) is the same model with the head initialised by a linear probe, WiSE-FT (`wise_ft.py`) the same
model interpolated with its zero-shot point. The trained model is a full two-tower model: the run stores it as
a model directory (`model_fn`: the base's config and every variable of the fine-tuned base, plus the head
(W, b, τ) for `DIR/head.npz`), so `vlm_jax.inference.load(DIR)`, `python -m vlm_jax.evaluate --checkpoint=DIR`
and `python -m vlm_jax.convert --to open_clip --input DIR` read it.

Config (`config.method`): head ('learned' | 'frozen' | 'text'); lp_ft adds l2_grid; wise_ft adds alphas.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.errors import UserError
from vlm_jax.transfer.methods import Method
from vlm_jax.transfer.methods import prompting as pr

HEADS = ("learned", "frozen", "text")
IMAGE_TOWER = r"^base/(img|img_proj)/"   # the parameters of the base that fine-tuning trains (plus the head)


class Head(nn.Module):
  """The linear classifier (W [C, E], b [C]) on the normalised image embedding; zeros until the run's init hook
  writes the zero-shot (or linear-probe) head."""
  num_classes: int
  dim: int

  @nn.compact
  def __call__(self):
    w = self.param("kernel", nn.initializers.zeros, (self.num_classes, self.dim), jnp.float32)
    b = self.param("bias", nn.initializers.zeros, (self.num_classes,), jnp.float32)
    return w, b


class FineTune(nn.Module):
  """The base `base` with its image tower trained, plus the head (module docstring)."""
  base: nn.Module
  handcrafted: pr.HandCrafted
  head_mode: str = "learned"   # method.head

  def setup(self):
    if self.head_mode != "text":
      self.linear = Head(self.handcrafted.n_classes, self.base.embed_dim, name="head")

  def zeroshot_weights(self):
    """The zero-shot prompt-ensemble classifier [C, E] of the current text tower (no gradient)."""
    return pr.handcrafted_weights(self.base, self.handcrafted)

  def weights(self):
    """(W [C, E], b [C]) of the classifier: the head's parameters, or for head='text' the prompt ensemble through
    the (trained) text tower with b = 0."""
    if self.head_mode == "text":
      return pr.handcrafted_weights(self.base, self.handcrafted, stop_gradient=False), \
          jnp.zeros((self.handcrafted.n_classes,), jnp.float32)
    return self.linear()

  def features(self, images):
    """f(x; θ_img): L2-normalised image embeddings [B, E], with gradients (the tower is trained)."""
    return self.base.encode_image(images, train=False)

  def classify(self, images):
    w, b = self.weights()
    return self.base.logit_scale() * self.features(images) @ w.T + b

  def __call__(self, batch, *, train: bool = False):
    return {"logits": self.classify(batch["image"])}


def zeroshot_head(module: FineTune, variables: dict) -> dict:
  """{'kernel': W [C, E], 'bias': b [C]}: the zero-shot classifier (W = the prompt ensemble of the text tower in
  `variables`, b = 0)."""
  w = np.asarray(jax.jit(lambda v: module.apply(v, method=FineTune.zeroshot_weights))(variables))
  return {"kernel": w, "bias": np.zeros(w.shape[0], np.float32)}


def with_head(variables: dict, head: dict) -> dict:
  """`variables` with params 'head' replaced by `head` (a shallow copy)."""
  return {**variables, "params": {**variables["params"], "head": head}}


def zeroshot_fit(module: FineTune):
  """The `fit` hook of fine-tuning: the head starts at the zero-shot classifier of the base (the k-shot data is
  not needed); head='text' has no head to set."""

  def fit(variables, train, val) -> dict:
    del train, val
    return {"params": {} if module.head_mode == "text" else {"head": zeroshot_head(module, variables)}}

  return fit


def full_model(module: FineTune, base_config):
  """`model_fn(variables) -> (config, model variables, head)`: the fine-tuned two-tower model (every collection's
  'base' subtree) under the base run's config, and the classifier head {'kernel' W [C, E], 'bias' b [C],
  'logit_scale' exp(log τ⁻¹)} with logits = logit_scale · W f(x) + b."""

  def model_fn(variables: dict):
    model_vars = {c: tree["base"] for c, tree in variables.items() if "base" in tree}
    w, b = jax.jit(lambda v: module.apply(v, method=FineTune.weights))(variables)
    scale = jax.jit(lambda v: module.apply(v, method=lambda m: m.base.logit_scale()))(variables)
    head = {"kernel": np.asarray(w, np.float32), "bias": np.asarray(b, np.float32),
            "logit_scale": np.asarray(scale, np.float32)}
    return base_config, jax.device_get(model_vars), head

  return model_fn


def check(config) -> None:
  """Preflight: `method.head` and `config.frozen` agree (the image tower trainable; the head frozen exactly when
  head='frozen'; the text tower trainable exactly when head='text')."""
  head = str(config.method.get("head", "learned"))
  if head not in HEADS:
    raise UserError(f"unknown method.head {head!r}; use one of {HEADS}")
  rx = re.compile(str(config.get("frozen") or "(?!)"))
  if rx.search("base/img/x") or rx.search("base/img_proj/kernel"):
    raise UserError(f"{config.method.name} trains the image tower: config.frozen={config.frozen!r} must not match "
                    "'base/img/…' or 'base/img_proj/…'")
  if head != "text" and bool(rx.search("head/kernel")) != (head == "frozen"):
    raise UserError(f"method.head={head!r} needs config.frozen to {'match' if head == 'frozen' else 'leave'} "
                    f"'head/…' (use the config variant: {config.method.name}.py:tiny,head={head})")
  if config.get("protocol") == "base_to_novel" and head != "text":
    raise UserError(f"{config.method.name} with method.head={head!r} learns one weight row per base class, so it "
                    "has no classifier for novel classes: use protocol few_shot, or head=text (the text tower is the "
                    "classifier)")
  if (head == "text") == bool(rx.search("base/txt/x")):
    raise UserError(f"method.head={head!r} needs config.frozen to {'leave' if head == 'text' else 'match'} the "
                    f"text tower 'base/txt/…' (use the config variant: {config.method.name}.py:tiny,head={head})")


def build(cfg, *, base_model, base_config, tokenizer, class_names, templates, descriptions=None) -> Method:
  head = str(cfg.get("head", "learned"))
  if head not in HEADS:
    raise UserError(f"unknown method.head {head!r}; use one of {HEADS}")
  module = FineTune(base_model, pr.make_handcrafted(tokenizer, class_names, templates, descriptions), head)
  return Method(module, pr.ce_loss, pr.classify_fn, fit=zeroshot_fit(module), model_fn=full_model(module, base_config))
