"""UPL: Unsupervised Prompt Learning (Huang, Chu & Wei 2022, "Unsupervised Prompt Learning for Vision-Language
Models", arXiv 2204.03649). No label is used anywhere.

1. Pseudo-labels: zero-shot CLIP (the prompt ensemble of `zeroshot`) labels every image of the unlabelled
   training pool, ŷ(x) = argmax_c p(c | x), with confidence p(ŷ | x).
2. Confidence-based selection (UPL §3.2, to counter CLIP's class imbalance): for every class c, the K images
   pseudo-labelled c with the highest confidence (all of them if fewer than K are labelled c); K = the
   protocol's shots (UPL: 16).
3. Prompt representation ensemble (UPL §3.3): N CoOp contexts [V]^n_1 … [V]^n_M (unified, class token at the
   end), initialised differently, each trained with cross-entropy on the pseudo-labelled set,

     L = Σ_n CE(p_n(· | x), ŷ(x)),   p_n(y = c | x) = softmax_c(exp(log τ⁻¹) · cos(f(x), g(t^n_c)))   (CoOp eq. 2)

   (the N losses are independent: summing them trains N separate prompt sets in one run), and the prediction
   averages their logits, logits(x) = (1 / N) Σ_n exp(log τ⁻¹) · cos(f(x), g(t^n_c)).

Model selection: choosing an epoch on a labelled validation split would use labels, so UPL keeps the last step
(the run has no labelled validation for a method with `pseudo_label`; results say `labels_used: false`). The
paper trains 50 epochs with SGD 2e-3 (CoOp's recipe), M = 16, N = 16 randomly initialised prompts, and can also
ensemble the pseudo-labels of several CLIP backbones (one base model here). Initialisation: N(0, init_std²)
(`method.init = ''`), or a phrase's embeddings plus N(0, init_std²) noise per prompt set (identical sets would
receive identical gradients).

Config (`config.method`): n_prompts (N), top_k (K; 0 = config.shots), as CoOp's: n_ctx, init, position,
init_std.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.errors import UserError
from vlm_jax.transfer.methods import Method
from vlm_jax.transfer.methods import prompting as pr
from vlm_jax.transfer.methods.coop import prompt_options
from vlm_jax.transfer.methods.zeroshot import ZeroShot


class UPL(nn.Module):
  """The frozen base and N learned contexts `ctx` [N, M, D] (see the module docstring)."""
  base: nn.Module
  prompt: pr.PromptText
  n_prompts: int = 4
  init_phrase: tuple | None = None
  init_std: float = 0.02

  def setup(self):
    self.ctx = self.param("ctx", nn.initializers.normal(self.init_std),
                          (self.n_prompts, self.prompt.n_ctx, self.base.txt.width), jnp.float32)

  def text_features(self):
    """L2-normalised g(t^n_c) [N, C, E]."""
    ctx = pr.context_value(self.base, self.ctx, self.init_phrase)  # the phrase (if any) added to every set
    return pr.encode_prompt_sets(self.base, self.prompt, ctx)

  def logits_per_prompt(self, images):
    """[N, B, C] = exp(log τ⁻¹) · cos(f(x), g(t^n_c))."""
    z = pr.image_embeddings(self.base, images)
    return self.base.logit_scale() * jnp.einsum("be,nce->nbc", z, self.text_features())

  def classify(self, images):
    """The ensemble's logits [B, C]: the mean over the N prompt sets."""
    return jnp.mean(self.logits_per_prompt(images), axis=0)

  def __call__(self, batch, *, train: bool = False):
    return {"logits_per_prompt": self.logits_per_prompt(batch["image"])}


def ensemble_loss(outputs: dict, batch: dict):
  """Σ_n CE(logits_n, pseudo-label) over the N prompt sets (module docstring, step 3)."""
  per = outputs["logits_per_prompt"]
  ces, accs = zip(*(pr.cross_entropy(per[n], batch["label"]) for n in range(per.shape[0])))
  _, acc = pr.cross_entropy(jnp.mean(per, axis=0), batch["label"])
  return sum(ces), {"ce": sum(ces) / len(ces), "pseudo_top1": acc}


def select_confident(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(row indices, pseudo-labels) of UPL's selection from zero-shot probabilities [P, C]: per class c, the (up
  to) k rows with ŷ = c of highest confidence (ties: lower row first); rows sorted."""
  pred = np.argmax(probs, axis=1)
  conf = probs[np.arange(len(probs)), pred]
  rows = []
  for c in range(probs.shape[1]):
    mine = np.flatnonzero(pred == c)
    rows.append(mine[np.lexsort((mine, -conf[mine]))][:k])
  rows = np.sort(np.concatenate(rows)).astype(np.int64) if rows else np.zeros((0,), np.int64)
  return rows, pred[rows].astype(np.int32)


def check(config) -> None:
  """Preflight of `config.method` (n_prompts ≥ 1, top_k ≥ 0, unified context) and of the protocol: UPL learns
  from unlabelled images, so few-shot on a single-label dataset, and no labelled validation (select 'last')."""
  m = config.method
  if int(m.get("n_prompts", 4)) < 1 or int(m.get("top_k", 0) or 0) < 0:
    raise UserError(f"upl needs method.n_prompts >= 1 (got {m.get('n_prompts')}) and method.top_k >= 0 "
                    f"(got {m.get('top_k')}; 0 = config.shots)")
  if bool(m.get("class_specific", False)):
    raise UserError("upl learns unified contexts: set method.class_specific=False")
  if config.get("protocol", "few_shot") != "few_shot":
    raise UserError("upl learns from unlabelled images: use protocol few_shot")
  if config.get("select", "last") != "last":
    raise UserError("upl has no labelled validation to select on: use select='last'")


def build(cfg, *, base_model, base_config, tokenizer, class_names, templates, descriptions=None) -> Method:
  del base_config
  opts = prompt_options(cfg, tokenizer, class_names)
  module = UPL(base_model, opts["prompt"], n_prompts=int(cfg.get("n_prompts", 4)),
               init_phrase=opts["init_phrase"], init_std=opts["init_std"])
  zeroshot = ZeroShot(base_model, pr.make_handcrafted(tokenizer, class_names, templates, descriptions))

  def pseudo_label(variables, images, shots):
    """UPL steps 1–2 on the unlabelled pool: zero-shot pseudo-labels, the top-K most confident per class."""
    from vlm_jax.embedding.batched import apply_batched, current_mesh  # noqa: PLC0415
    k = int(cfg.get("top_k", 0) or 0) or int(shots)
    fn = jax.jit(lambda v, x: jax.nn.softmax(zeroshot.apply(v, x, method=ZeroShot.classify), axis=-1))
    return select_confident(apply_batched(fn, variables, images, 256, current_mesh()), k)

  return Method(module, ensemble_loss, pr.classify_fn, pseudo_label=pseudo_label)
