"""Tip-Adapter and Tip-Adapter-F (Zhang, Zhang, Fang, Gao, Li, Qiao & Li 2022, "Tip-Adapter: Training-free
Adaption of CLIP for Few-shot Classification", ECCV).

A key-value cache of the N·K k-shot training images (N classes, K shots; §3.1):

  F_train = normalise( mean_{p=1..10} f(aug_p(x)) )   [NK, E]   keys: image features averaged over 10 augmented
                                                                 passes (`frozen_features.augmented_embed`)
  L_train = one_hot(y)                                [NK, N]   values

and, for an image with L2-normalised feature f (eq. 5–6):

  logits = s · f W_cᵀ + α · φ(f F_trainᵀ) L_train,        φ(A) = exp(−β (1 − A))

W_c is the zero-shot classifier (the prompt ensemble of `zeroshot`), s the base's logit scale (the paper's 100
is CLIP's). α weighs the cache against the text classifier, β sharpens the affinities; α = 0 is zero-shot CLIP
exactly. `cache_logits` is the second term without α.

Tip-Adapter is training-free: its `fit` builds the cache and searches (α, β) over the reference's grid,
β ∈ {0.1 + i (7 − 0.1) / 200}, α ∈ {0.1 + i (3 − 0.1) / 20} (`method.beta_range`, `alpha_range` = (low, high,
steps)), on the k-shot VALIDATION split, top-1 with ties counted wrong, ties between settings → the first in
β-major order. The reference code searches on the test set (ImageNet) and keeps the best test epoch of -F; here
the test split is read only by the final evaluation.

Tip-Adapter-F makes the keys learnable (the reference's linear layer initialised to F_trainᵀ): `fit` builds the
cache and searches (α, β) as above (the settings training uses: the reference starts from fixed per-dataset
values); the one training loop fine-tunes the keys with cross-entropy of the logits above (values, α and β fixed:
their gradients are stopped; AdamW lr 1e-3, eps 1e-4, cosine, weight decay 0.01 on the keys as PyTorch's default);
validation keeps the epoch; then (α, β) are searched again on validation for the fine-tuned keys (`candidates`,
from the validation features `fit` computed). Results: fit/alpha, fit/beta (before training), alpha, beta (the
final ones), fit/val_top1_searched, fit/cache_size.

The cache lives in the method's params (keys [NK, E], values [NK, N], alpha, beta: sizes set by `fit`, declared
with `variable('params', …)` so that any cache size applies). The cache is class-specific: base-to-novel reports
no novel score (`method.class_specific = True` in the configs).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.errors import UserError
from vlm_jax.transfer.methods import Method, frozen_features
from vlm_jax.transfer.methods import prompting as pr


def cache_logits(f, keys, values, beta):
  """φ(f F_trainᵀ) L_train = exp(−β (1 − f keysᵀ)) values: [B, N] from f [B, E], keys [NK, E], values [NK, N]."""
  return jnp.exp(-beta * (1.0 - f @ keys.T)) @ values


class TipAdapter(nn.Module):
  """The frozen base, the zero-shot prompts and the cache (module docstring)."""
  base: nn.Module
  handcrafted: pr.HandCrafted

  def zeroshot_logits(self, f):
    """s · f W_cᵀ: zero-shot CLIP's logits of image embeddings f [B, E]."""
    return self.base.logit_scale() * f @ pr.handcrafted_weights(self.base, self.handcrafted).T

  @nn.compact
  def cache(self, dim: int):
    """(keys, values, α, β); values, α and β never train (gradients stopped)."""
    keys = self.variable("params", "keys", jnp.zeros, (0, dim), jnp.float32).value
    values = self.variable("params", "values", jnp.zeros, (0, self.handcrafted.n_classes), jnp.float32).value
    alpha = self.variable("params", "alpha", jnp.zeros, (), jnp.float32).value
    beta = self.variable("params", "beta", jnp.ones, (), jnp.float32).value
    sg = jax.lax.stop_gradient
    return keys, sg(values), sg(alpha), sg(beta)

  def classify(self, images):
    f = pr.image_embeddings(self.base, images)
    keys, values, alpha, beta = self.cache(f.shape[-1])
    return self.zeroshot_logits(f) + alpha * cache_logits(f, keys, values, beta)

  def __call__(self, batch, *, train: bool = False):
    return {"logits": self.classify(batch["image"])}


def grid(spec) -> np.ndarray:
  """The reference's search grid of (low, high, steps): low + i (high − low) / steps, i = 0 … steps − 1."""
  low, high, steps = float(spec[0]), float(spec[1]), int(spec[2])
  return np.asarray([low + i * (high - low) / steps for i in range(steps)], np.float32)


@jax.jit
def _accuracies(f, zs, keys, values, labels, alphas, betas):
  """[len(betas), len(alphas)] top-1 (ties with another class count as wrong) of zs + α cache(β)."""
  affinity = f @ keys.T
  onehot = jax.nn.one_hot(labels, zs.shape[1], dtype=bool)

  def per_beta(beta):
    cache = jnp.exp(-beta * (1.0 - affinity)) @ values
    logits = zs[None] + alphas[:, None, None] * cache[None]
    mine = jnp.sum(jnp.where(onehot[None], logits, 0.0), axis=-1)
    others = jnp.max(jnp.where(onehot[None], -jnp.inf, logits), axis=-1)
    return jnp.mean((mine > others).astype(jnp.float32), axis=-1)

  return jax.lax.map(per_beta, betas)


def search(f, zs, keys, values, labels, alphas, betas) -> tuple[float, float, float]:
  """(α, β, validation top-1) of the best setting on the given (validation) features; ties → the first in
  β-major order (the reference keeps a setting only when it is strictly better)."""
  acc = np.asarray(_accuracies(jnp.asarray(f), jnp.asarray(zs), jnp.asarray(keys), jnp.asarray(values),
                               jnp.asarray(labels, jnp.int32), jnp.asarray(alphas), jnp.asarray(betas)))
  b, a = np.unravel_index(int(np.argmax(acc)), acc.shape)  # argmax: the first maximum, row-major
  return float(alphas[a]), float(betas[b]), float(acc[b, a])


def build_cache(module: TipAdapter, variables: dict, train, *, passes: int, seed: int) -> tuple[np.ndarray, ...]:
  """(keys [NK, E], values [NK, N]) of the k-shot training split (normalised images)."""
  keys = frozen_features.augmented_embed(module.base, variables, train.images, passes=passes, seed=seed)
  keys = keys / np.maximum(np.linalg.norm(keys, axis=-1, keepdims=True), 1e-12)
  values = np.eye(module.handcrafted.n_classes, dtype=np.float32)[np.asarray(train.labels)]
  return keys.astype(np.float32), values


def validation_features(module: TipAdapter, variables: dict, val) -> tuple[np.ndarray, np.ndarray]:
  """(f [M, E], zero-shot logits [M, N]) of the validation split."""
  f = frozen_features.embed(module.base, variables, val.images)
  zs = jax.jit(lambda v, x: module.apply(v, x, method=TipAdapter.zeroshot_logits))(variables, f)
  return f, np.asarray(zs)


def check(config) -> None:
  """Preflight of `config.method` (augment_passes ≥ 1, grids (low, high, steps) with steps ≥ 1)."""
  m = config.method
  if int(m.get("augment_passes", 10)) < 1:
    raise UserError(f"method.augment_passes={m.get('augment_passes')!r} must be ≥ 1")
  for key in ("alpha_range", "beta_range"):
    spec = tuple(m.get(key, ()) or ())
    if len(spec) != 3 or int(spec[2]) < 1:
      raise UserError(f"method.{key}={spec!r}: give (low, high, steps) with steps ≥ 1")


def _build(cfg, base_model, tokenizer, class_names, templates, descriptions, *, fine_tune: bool) -> Method:
  hc = pr.make_handcrafted(tokenizer, class_names, templates, descriptions)
  module = TipAdapter(base_model, hc)
  passes, seed = int(cfg.get("augment_passes", 10)), int(cfg.get("augment_seed", 0))
  alphas = grid(cfg.get("alpha_range", (0.1, 3.0, 20)))
  betas = grid(cfg.get("beta_range", (0.1, 7.0, 200)))
  held = {}  # the validation features `fit` computed, for -F's search after training (`candidates`)

  def fit(variables, train, val):
    """The cache of the training split and (α, β) searched on the validation split."""
    keys, values = build_cache(module, variables, train, passes=passes, seed=seed)
    f, zs = validation_features(module, variables, val)
    held.update(f=f, zs=zs, labels=np.asarray(val.labels))
    alpha, beta, acc = search(f, zs, keys, values, held["labels"], alphas, betas)
    params = {"keys": keys, "values": values, "alpha": np.float32(alpha), "beta": np.float32(beta)}
    return {"params": params, "alpha": alpha, "beta": beta, "val_top1_searched": acc, "cache_size": len(keys)}

  def candidates(base_variables, trained):
    """Tip-Adapter-F after training: (α, β) searched again on validation for the fine-tuned keys."""
    del base_variables
    if not held:
      raise RuntimeError("Tip-Adapter-F's candidates need its fit (the validation features) first")
    p = trained["params"]
    alpha, beta, _ = search(held["f"], held["zs"], p["keys"], p["values"], held["labels"], alphas, betas)
    params = {**p, "alpha": jnp.asarray(alpha, jnp.float32), "beta": jnp.asarray(beta, jnp.float32)}
    return [({"alpha": alpha, "beta": beta}, {**trained, "params": params})]

  return Method(module, pr.ce_loss, pr.classify_fn, fit=fit, candidates=candidates if fine_tune else None)


def build(cfg, *, base_model, base_config, tokenizer, class_names, templates, descriptions=None) -> Method:
  """Tip-Adapter: training-free (registered in `TRAINING_FREE`)."""
  del base_config
  return _build(cfg, base_model, tokenizer, class_names, templates, descriptions, fine_tune=False)


def build_f(cfg, *, base_model, base_config, tokenizer, class_names, templates, descriptions=None) -> Method:
  """Tip-Adapter-F: the keys fine-tuned by the training loop."""
  del base_config
  return _build(cfg, base_model, tokenizer, class_names, templates, descriptions, fine_tune=True)
