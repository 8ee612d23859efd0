"""Corpus captioning metrics BLEU-4 and CIDEr-D, computed exactly as the coco-caption toolkit (pycocoevalcap) does.

Inputs are already tokenised captions (words joined by single spaces; `normalize_caption` lower-cases and keeps
letter runs, the tokenisation of the synthetic captions). For image i: one hypothesis h_i, references R_i.

BLEU (Papineni et al. 2002, "BLEU: a method for automatic evaluation of machine translation"), corpus level:
  p_n  = (Σ_i Σ_{g ∈ n-grams(h_i)} min(c_h(g), max_{r ∈ R_i} c_r(g)) + 1e-15) / (Σ_i max(0, |h_i| − n + 1) + 1e-9)
  BLEU-N = BP · Π_{n≤N} p_n^{1/N},  BP = exp(1 − r/c) if c < r else 1,
  c = Σ_i |h_i|,  r = Σ_i |ref of R_i whose length is closest to |h_i|| (ties: the shorter) — coco-caption's
  'closest' option with its smoothing constants (tiny 1e-15, small 1e-9), so scores match it to rounding.
CIDEr-D (Vedantam et al. 2015, "CIDEr: Consensus-based image description evaluation", §3 and the CIDEr-D variant
  of the coco-caption server): for n = 1..4, g^n(s) is the tf-idf vector of the n-grams of sentence s with
  tf = raw count and idf = log(N_images) − log(max(1, df(g))), df counted over the reference sets;
  CIDEr-D_n(h_i, R_i) = (10 / |R_i|) Σ_{r ∈ R_i} exp(−(ℓ(h_i) − ℓ(r))² / (2σ²)) ·
                        Σ_g min(g^n_h, g^n_r) g^n_r / (‖g^n_h‖ ‖g^n_r‖),   σ = 6 (clipping: min)
  CIDEr-D = mean_i mean_n CIDEr-D_n. As in coco-caption, the length ℓ(s) is the number of 2-grams of s (its
  `length` counter), i.e. words − 1 for non-empty sentences, and a zero norm leaves the dot product undivided.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Mapping, Sequence

_WORDS = re.compile(r"[a-z]+")


def normalize_caption(text: str) -> str:
  """Lower-case words of letters joined by single spaces (the synthetic tokenizer's word split)."""
  return " ".join(_WORDS.findall(text.lower()))


def ngram_counts(sentence: str, n: int = 4) -> Counter:
  """Counts of every k-gram (k = 1..n) of a whitespace-tokenised sentence, keyed by word tuples."""
  words = sentence.split()
  counts: Counter = Counter()
  for k in range(1, n + 1):
    for i in range(len(words) - k + 1):
      counts[tuple(words[i:i + k])] += 1
  return counts


def _check(hyps: Mapping, refs: Mapping) -> list:
  if set(hyps) != set(refs):
    raise ValueError("hypotheses and references must cover the same image ids")
  for key in refs:
    if not refs[key]:
      raise ValueError(f"image {key!r} has no reference caption")
  return list(refs)


def bleu(hyps: Mapping[object, str], refs: Mapping[object, Sequence[str]], n: int = 4) -> list[float]:
  """Corpus BLEU-1..n of {id: hypothesis} against {id: [references]} (coco-caption `Bleu(n)`, option 'closest')."""
  keys = _check(hyps, refs)
  tiny, small = 1e-15, 1e-9
  correct, guess = [0] * n, [0] * n
  test_len = ref_len = 0
  for key in keys:
    hyp_words = len(hyps[key].split())
    ref_lens = [len(r.split()) for r in refs[key]]
    max_ref: dict = {}
    for r in refs[key]:
      for g, c in ngram_counts(r, n).items():
        max_ref[g] = max(max_ref.get(g, 0), c)
    for g, c in ngram_counts(hyps[key], n).items():
      correct[len(g) - 1] += min(max_ref.get(g, 0), c)
    for k in range(n):
      guess[k] += max(0, hyp_words - k)
    test_len += hyp_words
    ref_len += min((abs(length - hyp_words), length) for length in ref_lens)[1]
  scores, prod = [], 1.0
  for k in range(n):
    prod *= (correct[k] + tiny) / (guess[k] + small)
    scores.append(prod ** (1.0 / (k + 1)))
  ratio = (test_len + tiny) / (ref_len + small)
  if ratio < 1:
    scores = [s * math.exp(1 - 1 / ratio) for s in scores]
  return scores


def bleu4(hyps: Mapping[object, str], refs: Mapping[object, Sequence[str]]) -> float:
  """Corpus BLEU-4 (see `bleu`)."""
  return bleu(hyps, refs, 4)[3]


def _tfidf(counts: Counter, df: Mapping, log_n_images: float, n: int):
  vec = [dict() for _ in range(n)]
  norm = [0.0] * n
  length = 0
  for g, tf in counts.items():
    k = len(g) - 1
    w = float(tf) * (log_n_images - math.log(max(1.0, df.get(g, 0.0))))
    vec[k][g] = w
    norm[k] += w * w
    if k == 1:  # coco-caption's length counter: the 2-grams
      length += tf
  return vec, [math.sqrt(x) for x in norm], length


def cider_d_per_image(hyps: Mapping[object, str], refs: Mapping[object, Sequence[str]], n: int = 4,
                      sigma: float = 6.0) -> dict:
  """{id: CIDEr-D score} (coco-caption `Cider`; idf from the references of all images given)."""
  keys = _check(hyps, refs)
  ref_counts = {key: [ngram_counts(r, n) for r in refs[key]] for key in keys}
  df: Counter = Counter()
  for key in keys:
    df.update({g for c in ref_counts[key] for g in c})
  log_n = math.log(float(len(keys)))
  out = {}
  for key in keys:
    vh, nh, lh = _tfidf(ngram_counts(hyps[key], n), df, log_n, n)
    total = [0.0] * n
    for rc in ref_counts[key]:
      vr, nr, lr = _tfidf(rc, df, log_n, n)
      penalty = math.exp(-float(lh - lr) ** 2 / (2 * sigma ** 2))
      for k in range(n):
        val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
        if nh[k] != 0 and nr[k] != 0:
          val /= nh[k] * nr[k]
        total[k] += val * penalty
    out[key] = 10.0 * (sum(total) / n) / len(refs[key])
  return out


def cider_d(hyps: Mapping[object, str], refs: Mapping[object, Sequence[str]], n: int = 4,
            sigma: float = 6.0) -> float:
  """Corpus CIDEr-D: the mean of `cider_d_per_image`."""
  per = cider_d_per_image(hyps, refs, n, sigma)
  return float(sum(per.values()) / len(per))
