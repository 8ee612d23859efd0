"""Open-vocabulary detection on held-out synthetic scenes (base and novel objects labelled), COCO-style:

  python -m vlm_jax.evaluate --config=configs/eval/detection.py --workdir=DIR      (DIR: a detector run)

Kind 'detection' (`vlm_jax.evaluate.detection`): AP, AP50, AP75, AP_base / AP50_base, AP_novel / AP50_novel and
APr (= AP_novel, the analogue of LVIS' rare-class AP), plots/detections.png and COCO JSON. The model is rebuilt
from the run's saved config and must have a `detect` method. A distillation run (`python -m vlm_jax.distill`) is
re-evaluated by rerunning its own command on its workdir: it resumes at the last step and runs these evaluators.
`detection.py:micro` evaluates 32 images (tests).
"""

import ml_collections

from vlm_jax import config_lib as cb


def get_config(arg=None):
  a = cb.parse_arg(arg, variants=("standalone", "micro"), variant="standalone")
  c = cb.eval_suite("detection")
  n = {"standalone": 512, "micro": 32}
  c.evals = ml_collections.ConfigDict({"detection": {"kind": "detection", "split": "val", "num_images": n[a.variant]}})
  return c
