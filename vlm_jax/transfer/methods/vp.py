"""VP: visual prompting with a learned pixel border (Bahng, Jahanian, Sankaranarayanan & Isola 2022, "Exploring
Visual Prompts for Adapting Large-Scale Models").

What is learned: a "padding" prompt v, a frame of p pixels on every side of the (normalised) input image, added
to the image; nothing else. Everything of the two-tower base is frozen, and the classifier is the frozen CLIP
text head (the hand-crafted prompt ensemble of the dataset's templates, w_c; the paper uses the single prompt
"This is a photo of a {}"). With m the border mask (1 within p pixels of an edge, else 0):

  x' = x + m ⊙ v,         p(y = c | x) = softmax_c( exp(log τ⁻¹) · cos(f(x'), w_c) )          (VP §3, eq. 1–2)

trained with cross-entropy. p = round(30 · S / 224) for an S-pixel input (the paper's 30 pixels at 224, scaled
with the image size; `method.pad` overrides; 4 at the synthetic 32 px). The prompt has 4·p·(S − p)·3 values
(pad_up / pad_down [p, S, 3], pad_left / pad_right [S − 2p, p, 3], as the paper's `PadPrompter`), initialised
N(0, 1) like the paper's `torch.randn` (`method.init_std`). The paper trains with SGD at lr 40 for 1,000 epochs;
the synthetic recipe is in configs/transfer/vp.py. Works with any image tower (ViT or ResNet).

Config (`config.method`): pad (0: scale 30 px at 224), init_std, image_size (0: the base run's data.image_size).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.errors import UserError
from vlm_jax.transfer.methods import Method
from vlm_jax.transfer.methods import prompting as pr

PAPER_PAD, PAPER_SIZE = 30, 224


def pad_size(image_size: int, pad: int = 0) -> int:
  """Border width p: `pad` if given, else 30 px scaled from 224 to `image_size` (at least 1)."""
  p = int(pad) if pad else max(1, int(round(PAPER_PAD * int(image_size) / PAPER_SIZE)))
  if not 0 < 2 * p < int(image_size):
    raise UserError(f"a VP border of {p} px does not fit a {image_size} px image (needs 0 < 2·pad < size)")
  return p


class PadPrompter(nn.Module):
  """The learned border v (the paper's `PadPrompter`): `__call__(images)` returns x + m ⊙ v."""
  image_size: int
  pad: int
  init_std: float = 1.0

  @nn.compact
  def prompt(self) -> jax.Array:
    """m ⊙ v as a full [S, S, 3] image (zero inside the frame)."""
    s, p = self.image_size, self.pad
    init = nn.initializers.normal(self.init_std)
    up = self.param("pad_up", init, (p, s, 3), jnp.float32)
    down = self.param("pad_down", init, (p, s, 3), jnp.float32)
    left = self.param("pad_left", init, (s - 2 * p, p, 3), jnp.float32)
    right = self.param("pad_right", init, (s - 2 * p, p, 3), jnp.float32)
    middle = jnp.concatenate([left, jnp.zeros((s - 2 * p, s - 2 * p, 3), jnp.float32), right], axis=1)
    return jnp.concatenate([up, middle, down], axis=0)

  def __call__(self, images):
    if tuple(images.shape[1:3]) != (self.image_size, self.image_size):
      raise UserError(f"VP was built for {self.image_size} px images, got {tuple(images.shape[1:3])}")
    return images + self.prompt().astype(images.dtype)[None]


class VP(nn.Module):
  """The frozen base `base`, the learned border `prompter`, the fixed hand-crafted text head."""
  base: nn.Module
  handcrafted: pr.HandCrafted
  image_size: int
  pad: int
  init_std: float = 1.0

  def setup(self):
    self.prompter = PadPrompter(self.image_size, self.pad, self.init_std)

  def classify(self, images):
    """logits [B, C] = exp(log τ⁻¹) · cos(f(x + m ⊙ v), w_c) (gradients reach v through the frozen tower)."""
    z = self.base.encode_image(self.prompter(images), train=False)
    return self.base.logit_scale() * z @ pr.handcrafted_weights(self.base, self.handcrafted).T

  def __call__(self, batch, *, train: bool = False):
    return {"logits": self.classify(batch["image"])}


def base_image_size(cfg, base_config) -> int:
  """`method.image_size`, else the base run's (square) data.image_size."""
  size = int(cfg.get("image_size", 0) or 0) or int(np.ravel(base_config.data.image_size)[0])
  return size


def build(cfg, *, base_model, base_config, tokenizer, class_names, templates, descriptions=None) -> Method:
  size = base_image_size(cfg, base_config)
  hc = pr.make_handcrafted(tokenizer, class_names, templates, descriptions)
  module = VP(base_model, hc, size, pad_size(size, int(cfg.get("pad", 0) or 0)),
              float(cfg.get("init_std", 1.0)))
  return Method(module, pr.ce_loss, pr.classify_fn)
