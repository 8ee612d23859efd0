"""LSeg (Li et al. 2022, "Language-driven Semantic Segmentation"): per-pixel embeddings f(x) trained with the
pixel-wise softmax over the text embeddings of the labelled BASE classes, logits = f(x)·t_c / τ (Eq. 1–2); novel
classes are added by name at test time.

  python -m vlm_jax.distill --config=configs/distill/lseg.py:tiny --workdir=DIR [--config.teacher.checkpoint=MODEL]

Student: the teacher's image tower (frozen, kept by reference; `--config.frozen=''` fine-tunes it) + FPN +
semantic-FPN head (`vlm_jax.models.segmentation.segmenter`), classifier = the teacher's fixed text embeddings + a
learned background; beside it the closed-set baseline (a linear head over background + base classes, novel mIoU 0
by construction). `tiny`: synthetic scenes at 64 px (novel objects present, labelled background in training);
`micro`: seconds, for tests. Every key: `vlm_jax.config_lib.segmentation_distill_config`, vlm_jax/distill/segmentation.py.
"""

from vlm_jax import config_lib as cb


def get_config(arg=None):
  a = cb.parse_arg(arg, variant="tiny", teacher="workdirs/demo")
  return cb.segmentation_distill_config("lseg", a.variant, a.teacher)
