"""CALIP (Guo, Zhang, Qiu, Ma, Miao, He & Cui 2023, "CALIP: Zero-Shot Enhancement of CLIP with Parameter-free
Attention", AAAI): a parameter-free, training-free cross-attention between the image's spatial features and the
class text features.

With F_s ∈ R^{HW×E} the L2-normalised spatial visual features (the base's dense features, `local_features`:
the projected patch tokens of a mean-pooled ViT, MaskCLIP dense features otherwise), F_v ∈ R^E the global image
embedding and F_t ∈ R^{C×E} the zero-shot class embeddings (the prompt ensemble of `zeroshot`):

  A     = F_s F_tᵀ                                   (HW × C attention, no projection: parameter-free)
  F_sᵃ  = SoftMax_C(A / α_t) F_t                     (text-aware spatial features)
  F_tᵃ  = SoftMax_HW(Aᵀ / α_s) F_s                   (visual-guided text features)
  F_vᵃ  = Pool(F_sᵃ)                                 (mean over the HW positions)
  logits = exp(log τ⁻¹) · (β₁ F_v F_tᵀ + β₂ F_v F_tᵃᵀ + β₃ F_vᵃ F_tᵀ)          (CALIP eq. 2–5)

F_tᵃ and F_vᵃ are L2-normalised before the dot products; β₁ = 1, so β₂ = β₃ = 0 is exactly zero-shot CLIP.
Nothing is learned: β₂, β₃ are chosen by grid search on the k-shot validation split only (`fit`; the paper
reports per-dataset values; the reference re-implementations search on the test set — not here), then stored as
the method's (non-trained) variables 'beta' [3], so evaluation on any class list uses them.

Config (`config.method`): alpha_t, alpha_s (the softmax temperatures; 2 as in the paper's code), beta2_grid,
beta3_grid (the search grids; a single value fixes it), local ('auto' | 'tokens' | 'dense').
"""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.errors import UserError
from vlm_jax.transfer.methods import Method, local_features
from vlm_jax.transfer.methods import prompting as pr
from vlm_jax.transfer.methods.zeroshot import zero_loss


class CALIP(nn.Module):
  """The frozen base, the zero-shot prompts and the weights β = (β₁, β₂, β₃) (see the module docstring)."""
  base: nn.Module
  handcrafted: pr.HandCrafted
  local: str = "tokens"
  alpha_t: float = 2.0
  alpha_s: float = 2.0

  def setup(self):
    self.beta = self.param("beta", lambda _: jnp.asarray([1.0, 0.0, 0.0], jnp.float32))

  def terms(self, images):
    """The three logit terms [3, B, C] before β and the temperature: F_v F_tᵀ, F_v F_tᵃᵀ, F_vᵃ F_tᵀ."""
    f_v = pr.image_embeddings(self.base, images)                          # [B, E]
    f_s = local_features.local_embeddings(self.base, images, self.local)  # [B, R, E]
    f_t = pr.handcrafted_weights(self.base, self.handcrafted)             # [C, E]
    a = jnp.einsum("bre,ce->brc", f_s, f_t)
    f_s_a = jnp.einsum("brc,ce->bre", jax.nn.softmax(a / self.alpha_t, axis=-1), f_t)
    f_t_a = pr.l2_normalize(jnp.einsum("brc,bre->bce", jax.nn.softmax(a / self.alpha_s, axis=1), f_s))
    f_v_a = pr.l2_normalize(jnp.mean(f_s_a, axis=1))
    return jnp.stack([f_v @ f_t.T, jnp.einsum("be,bce->bc", f_v, f_t_a), f_v_a @ f_t.T])

  def classify(self, images):
    """logits [B, C] = exp(log τ⁻¹) · Σ_i β_i · term_i (CALIP eq. 5)."""
    return self.base.logit_scale() * jnp.einsum("i,ibc->bc", self.beta, self.terms(images))

  def __call__(self, batch, *, train: bool = False):
    return {"logits": self.classify(batch["image"])}


def search(terms: np.ndarray, labels: np.ndarray, beta2_grid, beta3_grid) -> tuple[tuple[float, float], float]:
  """((β₂, β₃), top-1) maximising top-1 of Σ β_i term_i on (validation) terms [3, N, C]; ties keep the earlier
  grid point (the grids list (0, 0) first, so zero-shot wins any tie)."""
  best, best_acc = (0.0, 0.0), -1.0
  for b2, b3 in itertools.product(beta2_grid, beta3_grid):
    logits = terms[0] + b2 * terms[1] + b3 * terms[2]
    acc = float(np.mean(np.argmax(logits, axis=1) == labels))
    if acc > best_acc:
      best, best_acc = (float(b2), float(b3)), acc
  return best, best_acc


def check(config) -> None:
  """Preflight of `config.method`: temperatures > 0, grids of numbers ≥ 0, a known local feature kind."""
  m = config.method
  if float(m.get("alpha_t", 2.0)) <= 0 or float(m.get("alpha_s", 2.0)) <= 0:
    raise UserError("calip needs method.alpha_t > 0 and method.alpha_s > 0")
  for key in ("beta2_grid", "beta3_grid"):
    grid = m.get(key, (0.0,))
    if isinstance(grid, (int, float)) or any(float(b) < 0 for b in grid):
      raise UserError(f"method.{key}={grid!r}: give a list of weights >= 0")
  if str(m.get("local", "auto")) not in local_features.KINDS:
    raise UserError(f"unknown method.local {m.get('local')!r}; use one of {local_features.KINDS}")


def build(cfg, *, base_model, base_config, tokenizer, class_names, templates, descriptions=None) -> Method:
  del base_config
  hc = pr.make_handcrafted(tokenizer, class_names, templates, descriptions)
  module = CALIP(base_model, hc, local=local_features.resolve(str(cfg.get("local", "auto")), base_model),
                 alpha_t=float(cfg.get("alpha_t", 2.0)), alpha_s=float(cfg.get("alpha_s", 2.0)))
  grids = [sorted({0.0, *map(float, cfg.get(k, (0.0,)))}) for k in ("beta2_grid", "beta3_grid")]

  def fit(variables, train, val):
    """β₂, β₃ by grid search on the validation split (the training split is not used: CALIP is zero-shot)."""
    del train
    from vlm_jax.embedding.batched import apply_batched, current_mesh  # noqa: PLC0415
    fn = jax.jit(lambda v, x: jnp.moveaxis(module.apply(v, x, method=CALIP.terms), 0, 1))  # [B, 3, C]
    params = {**variables["params"], "beta": jnp.asarray([1.0, 0.0, 0.0], jnp.float32)}
    terms = np.moveaxis(apply_batched(fn, {**variables, "params": params}, val.images, 256, current_mesh()), 1, 0)
    (b2, b3), acc = search(terms, np.asarray(val.labels), *grids)
    return {"params": {"beta": np.asarray([1.0, b2, b3], np.float32)}, "beta2": b2, "beta3": b3,
            "val_top1_searched": acc}

  return Method(module, zero_loss, pr.classify_fn, fit=fit)
