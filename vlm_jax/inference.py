"""High-level inference on a vlm_jax checkpoint: preprocess, tokenize, encode, zero-shot classify.

  import vlm_jax.inference
  m = vlm_jax.inference.load("converted/vit_b32")          # converted (python -m vlm_jax.convert) or trained here
  x = m.preprocess([Image.open("cat.jpg")])                # PIL images / uint8 HWC arrays -> float32 NHWC
  z_img, z_txt = m.encode_image(x), m.encode_text(["a photo of a cat"])   # [B, D], L2-normalised
  probs = m.classify([Image.open("cat.jpg")], ["cat", "dog"])             # [B, C], rows sum to 1

Preprocessing is CLIP's eval transform as `vlm_jax.data.transforms` implements it, with the checkpoint's
`data.image_size` S, `data.mean`, `data.std`: every image → 8-bit RGB (`to_rgb`: alpha dropped, grayscale
repeated) → shorter side resized to S, bicubic, antialiased, then the central S×S crop (`resize_center_crop`)
→ (x/255 − mean)/std (`normalize`).

Encoding is batched: inputs are cut into batches of `batch_size` rows (the last one padded), a call with fewer
rows uses the next power of two, so each image / text shape compiles a handful of times at most
(`vlm_jax.embedding.batched.Embedder`, shared with evaluation). Batches are split over the mesh's data axes; the
parameters are placed on the mesh by the config's logical-axis rules (replicated on a data-only mesh; sharded
over `fsdp` / `model` when those axes are larger than 1). Without a mesh, the ambient one (`jax.set_mesh`) or all
devices on `data`. CPU, GPU and TPU alike.

Zero-shot classification (Radford et al. 2021, §3.1.4): each class's prompts (templates filled with its name)
are encoded, their normalised embeddings averaged and renormalised (the CLIP ensemble), and an image's
probabilities are softmax over classes of t·cos(z_img, z_class) (t = `logit_scale`). Softmax is used for SigLIP
models too (Zhai et al. 2023): its sigmoid is monotone in the same logits, so the ranking is the same, and a
softmax gives a distribution over the given classes; `classify(..., sigmoid=True)` returns SigLIP's own
independent per-class probabilities sigmoid(t·cos + b) instead.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from PIL import Image

from vlm_jax.errors import UserError

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def _as_list(images) -> list:
  if isinstance(images, Image.Image):
    return [images]
  if isinstance(images, np.ndarray):
    if images.ndim in (2, 3) and (images.ndim == 2 or images.shape[-1] in (1, 3, 4)):
      return [images]  # one HW / HWC image
    return list(images)
  return list(images)


def _to_pil(img) -> Image.Image:
  from vlm_jax.data import transforms  # noqa: PLC0415
  if isinstance(img, Image.Image):
    return transforms.to_rgb(img)
  arr = np.asarray(img)
  if arr.dtype != np.uint8:
    raise UserError(f"preprocess takes PIL images or uint8 arrays, got {arr.dtype} (float arrays are taken as "
                    "already preprocessed: pass them to encode_image)")
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  if arr.ndim == 3 and arr.shape[-1] == 4:
    arr = arr[..., :3]
  if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3)):
    raise UserError(f"an image array must be HW or HWC with 1, 3 or 4 channels, got shape {arr.shape}")
  return transforms.to_rgb(Image.fromarray(arr))


class InferenceModel:
  """A two-tower model with its tokenizer and eval transform; see the module docstring.

  Attributes: `config` (the run config), `variables` (on the mesh), `model` (the Flax module), `tokenizer`
  (built on first use), `image_size`, `mean`, `std`, `logit_scale` (float), `logit_bias` (float for SigLIP,
  else None), `mesh`, `batch_size`.
  """

  def __init__(self, config, variables: dict, *, mesh=None, batch_size: int = 64):
    from flax import traverse_util  # noqa: PLC0415

    from vlm_jax import assembly, runs  # noqa: PLC0415
    from vlm_jax.embedding import batched as embed  # noqa: PLC0415
    from vlm_jax.parallel import mesh as mesh_lib, partitioning  # noqa: PLC0415
    self.config = config
    self.model = assembly.model_of(config)
    self._tokenizer = None
    self.mesh = mesh if mesh is not None else embed.current_mesh()
    dp = mesh_lib.data_parallel_size(self.mesh)
    if int(batch_size) < 1:
      raise UserError(f"batch_size must be >= 1, got {batch_size}")
    self.batch_size = -(-int(batch_size) // dp) * dp  # a multiple of the data-parallel size
    example = assembly.example_batch(config, self.model)
    abstract = assembly.abstract_variables(self.model, example)
    host = assembly.check_variables(self.model, variables, example, what="checkpoint variables",
                                    hint="a checkpoint written by another version?")
    rules = partitioning.rules_from_config(config.get("partitioning", {}).get("rules"))
    shardings = partitioning.logical_to_shardings(abstract, self.mesh, rules)
    flat_shardings = traverse_util.flatten_dict(shardings, sep="/")
    flat = traverse_util.flatten_dict(host, sep="/")
    self.variables = traverse_util.unflatten_dict(
        {k: jax.device_put(v, flat_shardings[k]) for k, v in flat.items()}, sep="/")
    size = config.data.image_size
    if np.ndim(size) and len(set(size)) != 1:
      raise UserError(f"preprocessing needs a square data.image_size, got {list(size)}")
    self.image_size, self.mean, self.std = runs.image_transform(config)
    params = {"params": host["params"]}
    self.logit_scale = float(self.model.apply(params, method="logit_scale"))  # the model's own clamp
    self.logit_bias = float(host["params"]["logit_bias"]) if "logit_bias" in host["params"] else None
    self._embedders = {m: embed.Embedder(self.model, m, self.batch_size, self.mesh)
                       for m in ("encode_image", "encode_text", "encode_dense")}

  # --- inputs --------------------------------------------------------------------------------------------
  def preprocess(self, images) -> np.ndarray:
    """PIL images or uint8 HW/HWC arrays (a list, or an [N, H, W, C] uint8 batch) -> float32 [N, S, S, 3]."""
    from vlm_jax.data import transforms  # noqa: PLC0415
    items = _as_list(images)
    if not items:
      return np.zeros((0, self.image_size, self.image_size, 3), np.float32)
    crops = np.stack([transforms.resize_center_crop(_to_pil(img), self.image_size) for img in items])
    return transforms.normalize(crops, self.mean, self.std)

  @property
  def tokenizer(self):
    """The checkpoint's tokenizer, built on first use (a SentencePiece or BPE file is only needed for text)."""
    if self._tokenizer is None:
      from vlm_jax import assembly  # noqa: PLC0415
      tok, txt = assembly.build_tokenizer(self.config), self.model.txt
      if tok.vocab_size > txt.vocab_size or tok.max_len > txt.max_len:
        raise UserError(f"the text tower (vocab {txt.vocab_size}, length {txt.max_len}) is smaller than its "
                        f"tokenizer's (vocab {tok.vocab_size}, length {tok.max_len})")
      self._tokenizer = tok
    return self._tokenizer

  def tokenize(self, texts: str | Sequence[str]) -> np.ndarray:
    """Token ids int32 [N, context_length] (the checkpoint's tokenizer)."""
    return self.tokenizer(texts)

  # --- encoders ------------------------------------------------------------------------------------------
  def _run(self, method: str, x: np.ndarray) -> np.ndarray:
    n = len(x)
    if n == 0:
      return np.zeros((0, self.model.embed_dim), np.float32)
    if n < self.batch_size:  # pad to a power of two: few distinct shapes, each compiled once
      rows = min(self.batch_size, 1 << (n - 1).bit_length())
      x = np.concatenate([x, np.repeat(x[-1:], rows - n, axis=0)]) if rows > n else x
    return self._embedders[method](self.variables, x)[:n]

  def encode_image(self, x) -> np.ndarray:
    """Preprocessed images float32 [B, S, S, 3] (see `preprocess`) -> L2-normalised embeddings [B, D]."""
    if isinstance(x, (list, tuple, Image.Image)) or (isinstance(x, np.ndarray) and x.dtype == np.uint8):
      raise UserError("encode_image takes preprocessed float32 [B, H, W, 3] arrays: call m.preprocess(images) "
                      "first (or m.classify(images, …))")
    x = np.asarray(x, np.float32)
    if x.ndim != 4 or x.shape[-1] != 3:
      raise UserError(f"encode_image takes [B, H, W, 3] arrays, got shape {x.shape}")
    return self._run("encode_image", x)

  def encode_dense(self, x) -> np.ndarray:
    """Preprocessed images float32 [B, S, S, 3] -> L2-normalised MaskCLIP dense features [B, h, w, D] in the
    joint space (Zhou et al. 2022; `TwoTower.encode_dense`): per-location zero-shot scores are their dot
    products with `class_embeddings`."""
    x = np.asarray(x, np.float32)
    if x.ndim != 4 or x.shape[-1] != 3:
      raise UserError(f"encode_dense takes [B, H, W, 3] preprocessed arrays, got shape {x.shape}")
    if len(x) == 0:
      raise UserError("encode_dense needs at least one image")
    return self._run("encode_dense", x)

  def encode_text(self, texts) -> np.ndarray:
    """Strings (tokenized with `tokenize`) or int token ids [B, L] -> L2-normalised embeddings [B, D]."""
    if isinstance(texts, str) or (not isinstance(texts, np.ndarray) and texts and isinstance(texts[0], str)):
      ids = self.tokenize(texts)
    else:
      ids = np.asarray(texts)
      if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise UserError(f"encode_text takes strings or integer token ids, got {ids.dtype}")
      ids = ids.astype(np.int32).reshape((0, self.tokenizer.max_len) if ids.size == 0 else ids.shape)
      if ids.ndim != 2:
        raise UserError(f"token ids must be [B, L], got shape {ids.shape}")
    return self._run("encode_text", ids)

  # --- zero-shot -----------------------------------------------------------------------------------------
  def class_embeddings(self, class_names: Sequence[str], templates=None) -> np.ndarray:
    """Ensemble text classifier [C, D] (see the module docstring); `templates`: a list of strings with `{}`,
    a bundled set name ('clip_imagenet', 'generic', …) or a .txt path; default "a photo of a {}."."""
    from vlm_jax.embedding import classifier, prompts  # noqa: PLC0415
    if isinstance(class_names, str) or not len(class_names):
      raise UserError("class_names must be a non-empty list of strings")
    templates = prompts.load_templates(DEFAULT_TEMPLATES if templates is None else templates)
    return classifier.class_embeddings(self.encode_text, self.tokenizer, list(class_names), templates,
                                     batch_size=max(len(class_names) * len(templates), 1))

  def classify(self, images, class_names: Sequence[str], templates=None, *, sigmoid: bool = False) -> np.ndarray:
    """Zero-shot class probabilities [B, C] of raw images (PIL / uint8, preprocessed here) or preprocessed
    float32 arrays: softmax over classes of logit_scale·cos; `sigmoid=True` (SigLIP models): independent
    sigmoid(logit_scale·cos + logit_bias) per class."""
    arr = images if isinstance(images, np.ndarray) and images.dtype != np.uint8 else self.preprocess(images)
    logits = self.logit_scale * (self.encode_image(arr) @ self.class_embeddings(class_names, templates).T)
    if sigmoid:
      if self.logit_bias is None:
        raise UserError("sigmoid=True needs a SigLIP model (with a logit_bias); this one is trained with softmax")
      return 1.0 / (1.0 + np.exp(-(logits + self.logit_bias)))
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def load(directory: str, *, mesh=None, batch_size: int = 64, tokenizer: dict | None = None) -> InferenceModel:
  """The model of a vlm_jax checkpoint directory (converted, or a pre-training workdir / step folder).

  `tokenizer` overrides tokenizer options of the saved config, e.g. {'model_path': 'spiece.model'} for a SigLIP
  converted without its SentencePiece file.
  """
  from vlm_jax import assembly, runs  # noqa: PLC0415
  run = runs.load(directory)
  run.config.tokenizer.update(dict(tokenizer or {}))
  return InferenceModel(assembly.complete(run.config), run.variables, mesh=mesh, batch_size=batch_size)
