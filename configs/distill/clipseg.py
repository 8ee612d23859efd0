"""CLIPSeg (Lüddecke & Ecker 2022, "Image Segmentation Using Text and Image Prompts"): a light transformer decoder
over the frozen CLIP ViT's intermediate activations (`model.layers`), conditioned on a class's text embedding by
FiLM, x ← (W_γ t_c) ⊙ x + W_β t_c, one binary mask per (image, query); trained with the per-pixel binary
cross-entropy on base-class queries only, tested on every class (novel ones by name).

  python -m vlm_jax.distill --config=configs/distill/clipseg.py:tiny --workdir=DIR --config.teacher.checkpoint=VIT_RUN

The teacher must have a ViT image tower (kept frozen, by reference). `tiny`: synthetic scenes at 64 px; `micro`:
seconds, for tests. Shared keys: `vlm_jax.config_lib.segmentation_distill_config`; vlm_jax/distill/clipseg.py,
vlm_jax/models/segmentation/clipseg.py.
"""

import ml_collections

from vlm_jax import config_lib as cb


def get_config(arg=None):
  a = cb.parse_arg(arg, variant="tiny", teacher="workdirs/demo")
  c = cb.segmentation_distill_config("clipseg", a.variant, a.teacher)
  # decoder over blocks `layers` of the teacher's ViT (negative: from the end; the tiny fixtures have 2 blocks,
  # CLIPSeg's ViT-B/16 uses blocks 3, 6, 9), reduce dimension d, one pre-LN block per layer; θ: mask threshold
  c.model = ml_collections.ConfigDict({"image": "teacher", "layers": (0, 1), "reduce_dim": 64, "num_heads": 4,
                                       "mlp_dim": 128, "threshold": 0.5})
  c.method.key_smoothing = False  # the MaskCLIP reference numbers (teacher/…): key smoothing needs a ResNet teacher
  c.method.queries = 4  # base-class queries per training image (present ones first, then absent negatives)
  # the decoder's conditional vector in training (§3): 'text' (class name), 'visual' (image embedding of a support
  # example's visual prompt) or 'mixed' (a·visual + (1 − a)·text, a ~ U(0, 1), the paper's interpolation)
  c.method.conditioning = "text"
  # visual prompt engineering (their best: background at 10 % intensity and blurred, crop to the object + 10 %
  # context); up to `supports` examples per base class for training, found among `scan` training images where the
  # class covers >= min_pixels; evaluate: also report visual/segmentation/… (one support example per test class)
  c.method.visual_prompt = ml_collections.ConfigDict({"background": 0.1, "blur": 1.0, "context": 0.1, "supports": 8,
                                                      "scan": 512, "min_pixels": 16, "evaluate": True})
  if a.variant == "tiny":
    c.total_steps = 300  # the decoder is light: ~15 min on 2 idle cores with the evaluation
  c.evals.segmentation.batch_size = 4  # every image is decoded once per class: keep the evaluation batch small
  return c
