"""BLEU-4 and CIDEr-D (vlm_jax.evaluate.caption_metrics): hand-computed cases, and equality with coco-caption's
scorers (pycocoevalcap, interop) on caption sets drawn from the synthetic caption sampler."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vlm_jax.evaluate import caption_metrics as cm
from vlm_jax.evaluate.captioning import most_frequent_caption, score_captions


def test_bleu_hand_computed():
  # clipped n-gram precisions 4/5, 3/4, 2/3, 1/2; equal lengths: no brevity penalty
  got = cm.bleu({0: "a b c d e"}, {0: ["a b c d f"]})
  want = [(4 / 5 * 3 / 4 * 2 / 3 * 1 / 2 if k == 4 else np.prod([4 / 5, 3 / 4, 2 / 3][:k])) ** (1 / k)
          for k in (1, 2, 3, 4)]
  np.testing.assert_allclose(got, want, rtol=1e-8)
  # brevity penalty exp(1 - r/c) with r = 6, c = 4; every precision 1
  np.testing.assert_allclose(cm.bleu4({0: "a b c d"}, {0: ["a b c d e f"]}), math.exp(1 - 6 / 4), rtol=1e-8)
  # 'closest' reference length, ties to the shorter: c = 5 between refs of 4 and 6 words -> r = 4, BP = 1
  assert cm.bleu({0: "a b c d e"}, {0: ["a b c d", "a b c d e f"]})[0] == pytest.approx(1.0)
  # clipping: "the the the" against "the cat" has unigram precision 1/3
  assert cm.bleu({0: "the the the"}, {0: ["the cat"]})[0] == pytest.approx(1 / 3)
  # corpus level: counts are summed over images before the ratio
  two = cm.bleu({0: "a b", 1: "c d"}, {0: ["a b"], 1: ["c x"]})
  assert two[0] == pytest.approx(3 / 4) and two[1] == pytest.approx(math.sqrt(3 / 4 * 1 / 2))


def test_cider_d_hand_computed():
  # two images, disjoint words: every n-gram has df 1, idf = log 2; 1- and 2-gram cosines are 1, 3- and 4-grams
  # are empty (0); no length difference -> 10 * mean(1, 1, 0, 0) = 5
  assert cm.cider_d({0: "a b", 1: "c d"}, {0: ["a b"], 1: ["c d"]}) == pytest.approx(5.0)
  # an n-gram in every image's references has idf 0 and contributes nothing
  per = cm.cider_d_per_image({0: "x a", 1: "x c"}, {0: ["x a"], 1: ["x c"]})
  # 1-grams: hyp vec {x: 0, a: log2} = ref vec -> cosine 1; 2-grams {x a: log 2} -> 1
  assert per[0] == pytest.approx(5.0) and per[1] == pytest.approx(5.0)
  # Gaussian length penalty on the 2-gram counts (coco-caption): hyp 2 words, ref 4 words -> delta 2
  got = cm.cider_d_per_image({0: "a b", 1: "z"}, {0: ["a b c d"], 1: ["z"]})[0]
  lg2 = math.log(2)
  cos1 = (2 * lg2 * lg2) / (math.sqrt(2) * lg2 * 2 * lg2)  # hyp {a, b}, ref {a, b, c, d}, all weight log 2
  cos2 = (lg2 * lg2) / (lg2 * math.sqrt(3) * lg2)          # hyp {a b}, ref {a b, b c, c d}
  want = 10 * (cos1 + cos2) / 4 * math.exp(-(1 - 3) ** 2 / 72)
  assert got == pytest.approx(want, rel=1e-9)


def test_normalisation_and_baseline_helpers():
  assert cm.normalize_caption("A Photo of a RED circle, on the left.") == "a photo of a red circle on the left"
  assert most_frequent_caption(["a b", "c", "A B.", "c", "a b"]) == "a b"
  perfect = score_captions(["a red circle on the left"], [["a red circle on the left", "a red circle"]])
  assert perfect["bleu4"] == pytest.approx(1.0)


def _caption_sets(n_images: int = 40, seed: int = 0):
  from vlm_jax.data.synthetic import SyntheticShapes
  src = SyntheticShapes("eval_retrieval", image_size=32, num_samples=n_images)
  rng = np.random.default_rng(seed)
  refs, hyps = {}, {}
  for i in range(n_images):
    caps = [cm.normalize_caption(c) for c in src.captions(src.scene(i), 5, np.random.default_rng((seed, i)))]
    refs[i] = caps
    other = cm.normalize_caption(src.scene((i + 1) % n_images).caption)
    hyps[i] = [caps[0], other, " ".join(caps[1].split()[:3]), "a"][rng.integers(4)]  # exact, wrong, short, 1 word
  return hyps, refs


@pytest.mark.interop
def test_equal_to_pycocoevalcap():
  pytest.importorskip("pycocoevalcap")
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  for seed in range(3):
    hyps, refs = _caption_sets(seed=seed)
    ref_bleu, _ = Bleu(4).compute_score(refs, {k: [v] for k, v in hyps.items()}, verbose=0)
    ref_cider, ref_per = Cider().compute_score(refs, {k: [v] for k, v in hyps.items()})
    np.testing.assert_allclose(cm.bleu(hyps, refs), ref_bleu, rtol=0, atol=1e-6)
    assert abs(cm.cider_d(hyps, refs) - ref_cider) < 1e-6
    per = cm.cider_d_per_image(hyps, refs)
    np.testing.assert_allclose([per[k] for k in refs], ref_per, atol=1e-6)
