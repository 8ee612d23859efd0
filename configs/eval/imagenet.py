"""ImageNet evaluation suite (CLIP paper protocol) on a pre-training checkpoint or a converted model:

  python -m vlm_jax.evaluate --config=configs/eval/imagenet.py:data_dir=/data/tfds --workdir=DIR

Needs `imagenet2012` prepared locally with tfds in a random-access format (nothing is downloaded; tfds needs the
ILSVRC2012 tarballs placed in its manual_dir first):

  tfds build imagenet2012 --data_dir=/data/tfds --file_format=array_record

Evaluators:
  zeroshot      the 50,000 validation images over the 1,000 classes with CLIP's 80-template ensemble
                (top1, top5, mean per-class recall). tfds names the classes by WordNet id (n01440764 …):
                give `class_names=PATH` (one human-readable name a line, in label order, e.g. CLIP's
                curated list) via the `class_names` argument below for meaningful prompts.
  linear_probe  logistic regression on frozen image embeddings, λ chosen on a validation split carved from a
                subset of train (`train_limit` images spaced evenly over the split), refit, validation scored
                once — ImageNet has no public test labels, so its validation split is the test set here.
  fewshot       1/4/16-shot linear probes, 3 seeds, drawn from the same train subset.

Arguments (`:key=value,…`): data_dir, class_names, train_limit (100000), test_limit (0: all 50,000),
image_size (0: the checkpoint's data.image_size). Writes DIR/eval/imagenet.json and plots under DIR/plots/.
"""

import ml_collections

from vlm_jax import config_lib as cb


def get_config(arg=None):
  a = cb.parse_arg(arg, data_dir="", class_names="", train_limit=100_000, test_limit=0, image_size=0)
  c = cb.eval_suite("imagenet")
  common = {"data_dir": a.data_dir, "image_size": a.image_size, "batch_size": 256}
  probe = {"train_dataset": "tfds:imagenet2012:train", "test_dataset": "tfds:imagenet2012:validation",
           "train_limit": a.train_limit, "test_limit": a.test_limit, **common}
  c.evals = ml_collections.ConfigDict({
      # zero-shot: class names × CLIP's ImageNet prompt ensemble (templates/clip_imagenet.txt)
      "zeroshot": {"kind": "zeroshot", "dataset": "tfds:imagenet2012:validation", "templates": "clip_imagenet",
                   "class_names": a.class_names, "limit": a.test_limit, **common},
      # linear probe: CLIP app. A.3 (λ swept on a log grid, chosen on train-carved validation)
      "linear_probe": {"kind": "linear_probe", **probe},
      # few-shot: k images per class to fit, a disjoint k to choose λ (needs 2·16 per class in the subset)
      "fewshot": {"kind": "fewshot", "shots": (1, 4, 16), "seeds": 3, **probe},
  })
  return c
