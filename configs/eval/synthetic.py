"""Evaluation suite of the embedded synthetic default, on a pre-training checkpoint:

  python -m vlm_jax.evaluate --config=configs/eval/synthetic.py --workdir=DIR      (DIR: a pre-training run)

Zero-shot classification of held-out seen / unseen (shape, colour) pairs (+ multi-label mAP on multi-object
images), image-text retrieval with five captions per image, linear probe and 1/4-shot linear probes. The model,
tokenizer and data options come from the checkpoint's saved config; `data` here overrides data options.
Writes DIR/eval/synthetic.json and plots under DIR/plots/. `synthetic.py:micro` is a seconds-long version
(tests).
"""

from vlm_jax import config_lib as cb


def get_config(arg=None):
  a = cb.parse_arg(arg, variant="standalone")
  c = cb.eval_suite("synthetic")
  c.evals = cb.synthetic_evals(a.variant)
  return c
