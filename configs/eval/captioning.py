"""Captioning evaluation suite of the embedded synthetic default, on a CoCa / CapPa pre-training checkpoint:

  python -m vlm_jax.evaluate --config=configs/eval/captioning.py --workdir=DIR          (DIR: a pre-training run)
  python -m vlm_jax.evaluate --config=configs/eval/captioning.py:beam=4 --workdir=DIR  (beam search, 4 beams)

Greedy (or beam-search) captions of 1,024 held-out synthetic scenes scored by BLEU-4 and CIDEr-D against five
reference captions each, next to the most-frequent-training-caption baseline (`vlm_jax.evaluate.captioning`).
Writes DIR/eval/captioning.json and DIR/plots/captioning_samples.jsonl. `captioning.py:micro` is a
seconds-long version (tests).

Arguments: variant (standalone|micro), beam (beam size; 1: greedy), alpha (beam length normalisation).
"""

import ml_collections

from vlm_jax import config_lib as cb


def get_config(arg=None):
  a = cb.parse_arg(arg, variant="standalone", beam=1, alpha=1.0)
  c = cb.eval_suite("captioning")
  images = 32 if a.variant == "micro" else 1024
  c.evals = ml_collections.ConfigDict({"captioning": {
      "kind": "captioning_synthetic", "num_images": images, "captions_per_image": 5, "beam_size": a.beam,
      "alpha": a.alpha, "baseline_train_scenes": 256 if a.variant == "micro" else 4096}})
  return c
