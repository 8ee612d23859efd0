"""MaskCLIP+ pseudo-labels: the frozen teacher's dense MaskCLIP predictions, refined, as per-pixel training labels.

MaskCLIP (Zhou et al. 2022, "Extract Free Dense Labels from CLIP", ECCV, §3.2) scores the teacher's dense value-path
embeddings z(x) against the class text embeddings t_c (`evaluate.segmentation`; background by the centred-score
threshold δ, Otsu's cut of the objectness over the training images — label-free):

    s(x) = [δ, cos(z(x), t_c) − mean_k cos(z(x), t_k)]_{c=1..C}                                          (1)

and refines the predictions with two training-free steps (§3.2, "Key smoothing" and "Prompt denoising"), on
p(x) = softmax(100 · s(x)) over the labels:

  prompt denoising  a class whose confidence is below t_pd at every location of the image is taken to be absent
                    (a distractor prompt): its score is set to −∞,  p_c(x) < t_pd ∀x  ⇒  s_c(·) = −∞          (2)
  key smoothing     locations whose keys k(x) (the last attention's key projection of the feature map) are alike
                    should agree: p̃(x) = Σ_y cos(k(x), k(y)) · p(y), applied where max_c p_c(x) < t_ks
                    (t_ks = 1: everywhere)                                                                    (3)

The refined scores are upsampled bilinearly to the image (the evaluator's convention) and their argmax is the
pseudo-label: 0 = background, j + 1 = the j-th class of the given embeddings. With both steps off (`pd_thresh` 0,
`key_smoothing` False) this is exactly `evaluate.segmentation.predict_dense` (tested). MaskCLIP+ (§3.3) then trains
a segmenter on these labels of the training images; no annotation is read.

Keys: for CLIP's ModifiedResNet the attention pool's key projection k_proj of the final feature map (no positional
embedding, as the value path of the dense features); other towers raise `UserError` (set
`method.key_smoothing=False`).
"""

from __future__ import annotations

import functools

import numpy as np

from vlm_jax.errors import UserError
from vlm_jax.evaluate import segmentation as seg

SCALE = 100.0  # CLIP's logit scale on cosine scores, as MaskCLIP's refinement uses


def _softmax(x: np.ndarray) -> np.ndarray:
  x = x - x.max(axis=-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=-1, keepdims=True)


def prompt_denoise(scores: np.ndarray, pd_thresh: float) -> np.ndarray:
  """Eq. (2) on label scores [B, h, w, 1 + C] (label 0 = background, never removed)."""
  if pd_thresh <= 0:
    return scores
  p = _softmax(SCALE * scores)
  absent = p.reshape(len(p), -1, p.shape[-1]).max(axis=1) < pd_thresh  # [B, 1 + C]
  absent[:, 0] = False
  return np.where(absent[:, None, None, :], -np.inf, scores).astype(np.float32)


def key_smooth(scores: np.ndarray, keys: np.ndarray, ks_thresh: float = 1.0) -> np.ndarray:
  """Eq. (3): probabilities [B, h, w, 1 + C] smoothed by key similarity (keys [B, h, w, K])."""
  p = _softmax(SCALE * np.where(np.isfinite(scores), scores, -1e9))
  b, h, w, c = p.shape
  k = keys.reshape(b, h * w, -1).astype(np.float32)
  k = k / np.maximum(np.linalg.norm(k, axis=-1, keepdims=True), 1e-6)
  flat = p.reshape(b, h * w, c)
  smoothed = np.einsum("bij,bjc->bic", k @ k.transpose(0, 2, 1), flat)
  where = flat.max(axis=-1, keepdims=True) < ks_thresh
  return np.where(where, smoothed, flat).reshape(b, h, w, c)


def pseudo_labels(dense: np.ndarray, class_emb: np.ndarray, size, *, threshold: float, keys: np.ndarray | None = None,
                  pd_thresh: float = 0.0, key_smoothing: bool = False, ks_thresh: float = 1.0,
                  chunk: int = 16) -> np.ndarray:
  """Label maps int32 [B, H, W] (0 = background, j + 1 = row j of `class_emb`) from dense teacher embeddings
  [B, h, w, E] (module docstring); `size` = (H, W)."""
  if pd_thresh <= 0 and not key_smoothing:
    return seg.predict_dense(dense, class_emb, size, chunk=chunk, threshold=threshold)
  if key_smoothing and keys is None:
    raise ValueError("key smoothing needs the teacher's keys")
  out = []
  for i in range(0, len(dense), chunk):
    s = prompt_denoise(seg.scores_with_background(dense[i:i + chunk], class_emb, threshold=threshold), pd_thresh)
    s = key_smooth(s, keys[i:i + chunk], ks_thresh) if key_smoothing else np.where(np.isfinite(s), s, -1e9)
    out.append(seg.upsample_bilinear(s, size).argmax(axis=-1).astype(np.int32))
  return np.concatenate(out)


@functools.lru_cache(maxsize=4)
def _key_fn(model):
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  def keys(variables, images):
    x = model.apply(variables, images, method=lambda m, im: m.img(im, stages=True)["stages"][-1])
    kp = variables["params"]["img"]["attnpool"]["k_proj"]
    k = jnp.einsum("bhwc,cnd->bhwnd", x, kp["kernel"]) + kp["bias"]
    return k.reshape(k.shape[:3] + (-1,))
  return jax.jit(keys)


def teacher_keys(teacher, images_uint8: np.ndarray, size: int | None = None, batch: int = 64) -> np.ndarray:
  """Keys [B, h, w, K] of the teacher's last attention at the dense grid (module docstring)."""
  tt = teacher.model.model
  if getattr(tt.img, "num_patches", None) is not None or "attnpool" not in teacher.model.variables["params"]["img"]:
    raise UserError("MaskCLIP key smoothing needs a CLIP ResNet teacher (attention-pool keys); "
                    "set --config.method.key_smoothing=False for this teacher")
  x = teacher.normalize(teacher.resize(images_uint8, size))
  fn = _key_fn(tt)
  return np.concatenate([np.asarray(fn(teacher.model.variables, x[i:i + batch])) for i in range(0, len(x), batch)])
