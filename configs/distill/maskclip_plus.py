"""MaskCLIP+ (Zhou et al. 2022, "Extract Free Dense Labels from CLIP", §3.3), annotation-free: the frozen teacher's
MaskCLIP predictions on the training images (dense value-path embeddings vs the class text embeddings, with key
smoothing and prompt denoising) are the pixel pseudo-labels of a student segmenter whose classifier is the teacher's
fixed text embeddings:  min_θ Σ_x CE(ℓ_θ(x), ŷ_MaskCLIP(x)),  ℓ_θ(x) = [cos(f_θ(x), t_bg), cos(f_θ(x), t_c)] / τ.

  python -m vlm_jax.distill --config=configs/distill/maskclip_plus.py:tiny --workdir=DIR [--config.teacher.checkpoint=M]

No mask label is read in training. Student: the teacher's image tower (frozen, kept by reference; `--config.frozen=''`
fine-tunes it as MaskCLIP+'s DeepLab does) + FPN + semantic-FPN head (`vlm_jax.models.segmentation.segmenter`).
Pseudo-labels are cached by teacher fingerprint + settings. `tiny`: synthetic scenes at 64 px; `micro`: seconds, for
tests. Every key: `vlm_jax.config_lib.segmentation_distill_config`, vlm_jax/distill/segmentation.py.
"""

from vlm_jax import config_lib as cb


def get_config(arg=None):
  a = cb.parse_arg(arg, variant="tiny", teacher="workdirs/demo")
  return cb.segmentation_distill_config("maskclip_plus", a.variant, a.teacher)
