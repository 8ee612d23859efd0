"""CapPa: captioning with parallel prediction (Tschannen et al. 2023, "Image Captioners Are Scalable Vision
Learners Too", arXiv 2306.07915) — the 'cappa' framework of `vlm_jax.models.FRAMEWORKS`.

  memory = ViT(image) patch tokens [B, N, D_img]        (no pooling: the decoder cross-attends to every patch)
  logits = Decoder(inputs, memory)                      (self-attention, cross-attention, MLP per block)
  in training, a random `parallel_fraction` of the examples (paper: 0.75) use parallel prediction: every decoder
  input is the [MASK] token and self-attention is full (non-causal), so all tokens are predicted at once from
  the image alone; the others are autoregressive with teacher forcing (inputs text[:, :-1], causal mask).
  L_CapPa = Σ_{b,l} m_bl · −log p(text[b, l+1] | inputs_b, image_b) / Σ m   (targets text[:, 1:],
  m_bl = 1 for the targets up to and including EOT)

Deviation: the paper (big_vision) draws the parallel/autoregressive choice per example as a Bernoulli variable;
here exactly round(fraction · B) examples of each global batch are chosen uniformly at random (rng stream 'mask'),
which has the same expected fraction and less variance. Evaluation and `vlm_jax.decoding` are autoregressive.
outputs: img (the ViT dict), caption = {'logits', 'targets', 'mask', 'parallel' bool [B]}. `encode_image` gives
the ViT's pooled features (linear probe).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.errors import UserError
from vlm_jax.models.decoder import TextDecoder, decoder_kwargs

Dtype = Any


def parallel_flags(rng: jax.Array, batch_size: int, fraction: float) -> jax.Array:
  """bool [B] with exactly round(fraction · B) True entries at uniformly random positions."""
  k = int(round(fraction * batch_size))
  chosen = jax.random.permutation(rng, batch_size)[:k]
  return jnp.zeros((batch_size,), bool).at[chosen].set(True)


class CapPa(nn.Module):
  """ViT encoder `img` + `TextDecoder` `decoder` (mask_token=True, no unimodal layers); see the module docstring."""
  img: nn.Module
  decoder: TextDecoder
  parallel_fraction: float = 0.75

  def encode_image(self, images, *, train: bool = False):
    """The image encoder's pooled features [B, D_img] (float32), for the linear probe."""
    return self.img(images, train=train)["pooled"].astype(jnp.float32)

  def decode_memory(self, images, *, train: bool = False):
    """Cross-attention memory: the ViT's patch tokens [B, N, D_img]."""
    return self.img(images, train=train)["tokens"]

  def decode_logits(self, ids, memory, *, decode: bool = False, train: bool = False):
    """Autoregressive next-token logits [B, T, V]; decode=True uses/creates the KV cache."""
    return self.decoder(ids, memory, decode=decode, train=train)["logits"]

  def __call__(self, batch, *, train: bool = False):
    """batch {'image' [B,H,W,3], 'text' int [B,L]} -> {'img', 'caption'}."""
    img = self.img(batch["image"], train=train)
    text = batch["text"]
    inputs, targets = text[:, :-1], text[:, 1:]
    b = text.shape[0]
    if train and self.parallel_fraction > 0:
      parallel = parallel_flags(self.make_rng("mask"), b, self.parallel_fraction)
    else:
      parallel = jnp.zeros((b,), bool)
    logits = self.decoder(inputs, img["tokens"], parallel=parallel, train=train)["logits"]
    return {"img": img, "caption": {"logits": logits, "targets": targets, "mask": self.decoder.target_mask(text),
                                    "parallel": parallel}}


def build(cfg: dict) -> CapPa:
  """The 'cappa' framework's builder. Keys: image (a ViT dict), text (decoder dict: variant, width, depth,
  mlp_dim, num_heads, vocab_size, max_len; every layer cross-attends), parallel_fraction (0.75), dtype, …."""
  from vlm_jax.models import build_encoder, common_defaults  # noqa: PLC0415
  cfg = dict(cfg)
  defaults = common_defaults(cfg)
  if not cfg.get("image") or not cfg.get("text"):
    raise UserError("a 'cappa' model config needs `image` (ViT) and `text` (decoder) dicts")
  known = {"framework", "image", "text", "parallel_fraction", "scan", "remat", "dtype", "param_dtype", "attention"}
  unknown = sorted(set(cfg) - known)
  if unknown:
    raise UserError(f"unknown cappa model option(s) {unknown}; valid: {sorted(known)}")
  fraction = float(cfg.get("parallel_fraction", 0.75))
  if not 0.0 <= fraction <= 1.0:
    raise UserError(f"parallel_fraction must be in [0, 1], got {fraction}")
  image = build_encoder(cfg["image"], defaults, ("vit",))
  kw = decoder_kwargs(cfg["text"], default_unimodal=0)
  if kw["multimodal_depth"] < 1:
    raise UserError("CapPa needs at least one decoder layer")
  decoder = TextDecoder(mask_token=True, dtype=defaults["dtype"], param_dtype=defaults["param_dtype"], **kw)
  return CapPa(img=image, decoder=decoder, parallel_fraction=fraction)
