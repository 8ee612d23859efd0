"""Zero-shot text classifiers: prompts per class and the CLIP prompt-ensemble class embeddings.

Radford et al. 2021 (CLIP, §3.1.4): a class's text embedding is the mean of the L2-normalised embeddings of its
prompts (templates filled with the class name, optionally CuPL descriptions, Pratt et al. 2023), renormalised:

  w_c = normalise( (1/|P_c|) Σ_{p ∈ P_c} normalise(f_T(p)) )

Shared by the evaluators, `vlm_jax.inference` and the transfer methods (the zero-shot head CoOp, Tip-Adapter,
WiSE-FT start from), so none of them imports another's module.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from vlm_jax.embedding import prompts

EncodeFn = Callable[[np.ndarray], np.ndarray]


def _article_fix(text: str) -> str:
  """'a orange …' -> 'an orange …' (the synthetic templates are written with 'a')."""
  words = text.split(" ")
  for i in range(len(words) - 1):
    if words[i] == "a" and words[i + 1][:1] in tuple("aeiou"):
      words[i] = "an"
  return " ".join(words)


def embed_chunked(fn: EncodeFn, x: np.ndarray, batch_size: int) -> np.ndarray:
  """`fn` over `x` in chunks of `batch_size` rows, concatenated as float32."""
  out = [np.asarray(fn(x[i:i + batch_size]), np.float32) for i in range(0, len(x), batch_size)]
  return np.concatenate(out, axis=0)


def l2_normalize_rows(x: np.ndarray) -> np.ndarray:
  """Rows divided by their L2 norm (floored at 1e-12)."""
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def class_prompts(class_names: Sequence[str], templates: Sequence[str] = (),
                  descriptions: Sequence[Sequence[str]] | None = None,
                  fix_articles: bool = False) -> list[list[str]]:
  """Per class: its templates filled with the name, then its description sentences (if any)."""
  if not templates and descriptions is None:
    raise ValueError("zero-shot classification needs templates, descriptions or both")
  out = []
  for i, name in enumerate(class_names):
    texts = [prompts.fill(t, name) for t in templates]
    if fix_articles:
      texts = [_article_fix(t) for t in texts]
    out.append(texts + list(descriptions[i] if descriptions is not None else ()))
  return out


def class_embeddings(encode_text_fn: EncodeFn, tokenizer, class_names: Sequence[str],
                     templates: Sequence[str] = (), batch_size: int = 256, *,
                     descriptions: Sequence[Sequence[str]] | None = None,
                     fix_articles: bool = False) -> np.ndarray:
  """Ensemble text classifier [C, D]: per class, the mean of its prompts' normalised embeddings, renormalised."""
  per_class = class_prompts(class_names, templates, descriptions, fix_articles)
  flat = [t for texts in per_class for t in texts]
  z = l2_normalize_rows(embed_chunked(encode_text_fn, tokenizer(flat), batch_size))
  owner = np.repeat(np.arange(len(per_class)), [len(t) for t in per_class])
  sums = np.zeros((len(per_class), z.shape[1]), np.float64)
  np.add.at(sums, owner, z)
  return l2_normalize_rows((sums / np.bincount(owner, minlength=len(per_class))[:, None]).astype(np.float32))
