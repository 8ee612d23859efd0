"""CLIPSeg training (Lüddecke & Ecker 2022, "Image Segmentation Using Text and Image Prompts", §3–4): per training
image K queries drawn from the labelled BASE classes (the base-class phrases; novel classes are only ever queried at
test time), each with its binary target mask, and the per-pixel binary cross-entropy of the decoder's mask logits:

    L = −1/(B K H W) Σ_{b,k,x} [ y_bk(x) log σ(m_bk(x)) + (1 − y_bk(x)) log(1 − σ(m_bk(x))) ],   y_bk = 1[label_b = q_bk]

Queries: the base classes present in the image (in random order, at most K) and, for the remaining slots, base
classes absent from it (negative queries, target all zero), drawn with a generator seeded by (seed, image index).
The model is `vlm_jax.models.segmentation.clipseg` (frozen ViT + FiLM-conditioned decoder); evaluation is the shared
base / novel / harmonic mIoU of `seg_evaluation` on its `segment` logits.

Conditioning (`method.conditioning`, §3 of the paper; `visual_prompts`): 'text' — the query's text embedding t_q
(rows carry class ids, the decoder looks t_q up); 'visual' — the teacher's image embedding v of an engineered visual
prompt of another training example of class q; 'mixed' — a · v + (1 − a) · t_q with a ~ U(0, 1) per query (the
paper's image-text interpolation). The visual and mixed rows carry these vectors as `conditions` [K, E]; a, the
support example and the queries are drawn by a generator seeded by (seed, image index), so resume stays exact. With
`method.visual_prompt.evaluate` the trained decoder is also evaluated with one visual prompt per test class
(`visual/segmentation/…`, next to the text-prompt `segmentation/…`).

Label maps with ignored pixels (−1, a mask folder's 255) add `valid` [H, W] to the rows, and the loss averages over
valid pixels only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.errors import UserError


CONDITIONINGS = ("text", "visual", "mixed")


def check(config) -> None:
  k = int(config.method.get("queries", 0))
  if k < 1:
    raise UserError(f"method.queries (CLIPSeg's queries per training image) must be >= 1, got {k}")
  cond = config.method.get("conditioning", "text")
  if cond not in CONDITIONINGS:
    raise UserError(f"method.conditioning must be one of {list(CONDITIONINGS)}, got {cond!r}")
  vp = dict(config.method.get("visual_prompt") or {})
  if not 0.0 <= float(vp.get("background", 0.1)) <= 1.0:
    raise UserError(f"method.visual_prompt.background (background intensity) must be in [0, 1], got {vp['background']}")
  for key in ("blur", "context"):
    if float(vp.get(key, 0.0)) < 0:
      raise UserError(f"method.visual_prompt.{key} must be >= 0, got {vp[key]}")
  for key in ("supports", "scan", "min_pixels"):
    if key in vp and int(vp[key]) < 1:
      raise UserError(f"method.visual_prompt.{key} must be >= 1, got {vp[key]}")


def prompt_banks(config, teacher, support_src, base: np.ndarray, test: np.ndarray) -> dict | None:
  """{'train': up to `supports` visual prompt embeddings per base class, 'eval': one per test class} (the
  `visual_prompts.bank`s), or None when neither training nor evaluation uses visual prompts."""
  from vlm_jax.distill import visual_prompts  # noqa: PLC0415
  vp = dict(config.method.get("visual_prompt") or {})
  cond = config.method.get("conditioning", "text")
  out = {}
  seed = int(config.seed)
  if cond != "text":
    out["train"] = visual_prompts.bank(teacher, support_src, base, vp, seed=seed, stream=1)
  if vp.get("evaluate", False):
    out["eval"] = visual_prompts.bank(teacher, support_src, test, {**vp, "supports": 1}, seed=seed, stream=2)
  return out or None


def conditions_fn(conditioning: str, class_emb: np.ndarray, train_bank: dict | None, seed: int):
  """fn(i, queries [K]) -> float32 [K, E] conditional vectors of image i's queries (module docstring), or None for
  'text' (the decoder's own class-embedding path)."""
  if conditioning == "text":
    return None
  t = np.asarray(class_emb, np.float32)
  t = t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-6)
  emb, images = train_bank["embeddings"], train_bank["images"]

  def fn(i: int, q: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng((int(seed), 15485863, int(i)))
    out = np.empty((len(q), t.shape[1]), np.float32)
    for j, c in enumerate(q):
      ok = np.nonzero((images[c] >= 0) & (images[c] != i))[0]  # another image's example of class c
      ok = ok if len(ok) else np.nonzero(images[c] >= 0)[0]
      v = emb[c, rng.choice(ok)] if len(ok) else t[c]  # no example of c found: its text embedding
      a = 1.0 if conditioning == "visual" else rng.uniform()
      out[j] = a * v + (1.0 - a) * t[c]
    return out
  return fn


def visual_evaluator(evaluator, eval_bank: dict):
  """fn(variables) -> {'visual/segmentation/…'}: `evaluator` (the text-prompt one, `seg_evaluation.make_evaluator`
  without plots) with every class's text embedding replaced by its one visual prompt embedding; a class without a
  support example cannot be predicted (left out of the decoder's test mask, still scored)."""
  emb = np.asarray(eval_bank["embeddings"][:, 0], np.float32)
  has = eval_bank["images"][:, 0] >= 0

  def run(variables) -> dict:
    v = dict(variables)
    const = dict(v["constants"])
    const["class_embeddings"] = emb
    const["test_mask"] = np.asarray(const["test_mask"], bool) & has
    v["constants"] = const
    return {f"visual/{k}": x for k, x in evaluator(v).items()}
  return run


def with_queries(make_row, base: np.ndarray, k: int, seed: int, *, conditions=None, ignore: bool = False):
  """make_row(i) -> {'image', 'labels'} turned into {'image', 'queries' int32 [K], 'targets' uint8 [K, H, W]}
  (+ 'conditions' float32 [K, E] from `conditions(i, queries)` when given, + 'valid' uint8 [H, W] = labels ≥ 0
  with `ignore`). `base` are the base class ids (vocabulary ids; labels hold class id + 1)."""
  base = np.asarray(base, np.int64)

  def row(i: int) -> dict:
    r = make_row(i)
    labels = np.asarray(r["labels"])
    rng = np.random.default_rng((int(seed), 7919, int(i)))
    present = np.intersect1d(np.unique(labels) - 1, base)
    absent = np.setdiff1d(base, present)
    q = rng.permutation(present)[:k]
    if len(q) < k:
      q = np.concatenate([q, rng.choice(absent, k - len(q), replace=False)])
    targets = (labels[None] == (q[:, None, None] + 1)).astype(np.uint8)
    out = {"image": r["image"], "queries": q.astype(np.int32), "targets": targets}
    if conditions is not None:
      out["conditions"] = conditions(i, q)
    if ignore:
      out["valid"] = (labels >= 0).astype(np.uint8)
    return out
  return row


def binary_mask_loss(outputs: dict, batch: dict) -> tuple[jax.Array, dict]:
  """(L, metrics) of the module docstring; mask logits resized bilinearly to the targets' size when they differ;
  with batch['valid'] [B, H, W] the mean runs over valid pixels only."""
  y = batch["targets"].astype(jnp.float32)
  m = outputs["mask_logits"]
  if m.shape != y.shape:
    m = jax.image.resize(m, y.shape, method="bilinear", antialias=False)
  bce = jnp.maximum(m, 0) - m * y + jnp.log1p(jnp.exp(-jnp.abs(m)))
  pred = m > 0
  if "valid" in batch:
    valid = jnp.broadcast_to(batch["valid"][:, None] > 0, y.shape)
    loss = jnp.where(valid, bce, 0.0).sum() / jnp.maximum(valid.sum(), 1)
    pred = pred & valid
  else:
    loss = jnp.mean(bce)
  inter = jnp.sum(pred & (y > 0.5))
  union = jnp.maximum(jnp.sum(pred | (y > 0.5)), 1)
  return loss, {"mask_bce": loss, "mask_iou": inter / union}
