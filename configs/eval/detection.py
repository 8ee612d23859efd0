"""Open-vocabulary detection on held-out synthetic scenes (base and novel objects labelled), COCO-style:

  python -m vlm_jax.evaluate --config=configs/eval/detection.py --workdir=DIR

DIR: a detector run — a distillation run (`python -m vlm_jax.distill`; its closed-set baseline is
DIR/baselines/closed_set) or any run whose model has a `detect` method. Kind 'detection'
(`vlm_jax.evaluate.detection`): AP, AP50, AP75, AP_base / AP50_base, AP_novel / AP50_novel and APr (= AP_novel,
the analogue of LVIS' rare-class AP), plots/detections.png and COCO JSON. The model is rebuilt from the run's saved
config (a distillation student with its classifier, `model.open_vocab`, and text embeddings), the scenes from its
data config (seed, image size, the teacher's mean/std): on the same images a distillation run's own evaluator
scored (`detection.py:micro` and `configs/distill/vild.py:micro`: the 32 'val' scenes) the metrics are the ones
that run reported for that step (`vild.py:tiny` scores 128: add `--config.evals.detection.num_images=128`).
`detection.py:micro` evaluates 32 images (tests); the default, 512. Synthetic scenes only: a run on COCO-format
data (`data.coco`) is refused with one `error:` line.
"""

import ml_collections

from vlm_jax import config_lib as cb


def get_config(arg=None):
  a = cb.parse_arg(arg, variants=("standalone", "micro"), variant="standalone")
  c = cb.eval_suite("detection")
  n = {"standalone": 512, "micro": 32}
  c.evals = ml_collections.ConfigDict({"detection": {"kind": "detection", "split": "val", "num_images": n[a.variant]}})
  return c
