"""The 'render' tokenizer: text drawn as an image, for one-tower models that read pixels only (CLIPPO).

CLIPPO (Tschannen et al. 2023, "CLIPPO: Image-and-Language Understanding from Pixels Only", arXiv:2212.08045)
feeds text to the image encoder as an image of the rendered text. `RenderTokenizer(texts)` returns float32
[N, height, width, 3]: black text on a white background, drawn with Pillow's built-in font
(`ImageFont.load_default(font_size)`: FreeType's embedded font when Pillow has FreeType, else the bitmap font),
greedily word-wrapped into lines from the top left with a 1-pixel margin; words that do not fit a line are
broken, lines below the bottom edge are dropped (truncation, as CLIPPO truncates long text). Pixels are scaled to
[0, 1] and normalised with `mean`/`std` (CLIP's by default), exactly as the image pipeline normalises photos, so
the same encoder sees both. Rendering is deterministic for a given Pillow install (no randomness; the same
string always gives the same array) and memoised per string.

Deviation: CLIPPO renders with GNU Unifont at 16 px into the 224×224 image; the CPU-sized default here is a
smaller font in a wide strip, since the synthetic captions are short.

The tokenizer interface: a callable `str | list[str] -> array` plus `vocab_size` (0: no vocabulary),
`context_length` / `max_len` (0), `pad_id` / `sot_id` / `eot_id` (None) and `image_shape`.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from vlm_jax.errors import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@functools.lru_cache(maxsize=8)
def _font(size: int):
  from PIL import ImageFont, features  # noqa: PLC0415
  if features.check("freetype2"):
    return ImageFont.load_default(size)
  return ImageFont.load_default()


def _wrap(text: str, font, width: int) -> list[str]:
  """Greedy word wrap to lines whose drawn length is ≤ width (over-long words are broken)."""
  lines, line = [], ""
  for word in text.split():
    candidate = f"{line} {word}" if line else word
    if font.getlength(candidate) <= width:
      line = candidate
      continue
    if line:
      lines.append(line)
    line = ""
    for ch in word:
      if font.getlength(line + ch) > width and line:
        lines.append(line)
        line = ""
      line += ch
  if line:
    lines.append(line)
  return lines


@functools.lru_cache(maxsize=65536)
def render_uint8(text: str, height: int, width: int, font_size: int) -> np.ndarray:
  """uint8 [height, width] grey image of `text` (0 = ink, 255 = background); see the module docstring."""
  from PIL import Image, ImageDraw  # noqa: PLC0415
  font = _font(font_size)
  ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (font_size, 0)
  line_h = max(1, ascent + descent)
  img = Image.new("L", (width, height), 255)
  draw = ImageDraw.Draw(img)
  y = 1
  for line in _wrap(text, font, width - 2):
    if y + line_h > height + descent:  # the line's glyph bodies would leave the image
      break
    draw.text((1, y), line, fill=0, font=font)
    y += line_h
  out = np.asarray(img, np.uint8)
  out.setflags(write=False)
  return out


class RenderTokenizer:
  """Renders texts to normalised float32 images [N, height, width, 3] (module docstring)."""

  vocab_size = 0
  context_length = 0
  pad_id = sot_id = eot_id = None

  def __init__(self, height: int = 32, width: int = 128, font_size: int = 8, mean: Sequence[float] = CLIP_MEAN,
               std: Sequence[float] = CLIP_STD):
    if int(height) < 4 or int(width) < 4 or int(font_size) < 1:
      raise UserError(f"render tokenizer needs height, width >= 4 and font_size >= 1, got {height}, {width}, "
                      f"{font_size}")
    self.height, self.width, self.font_size = int(height), int(width), int(font_size)
    self.mean = np.asarray(mean, np.float32).reshape(3)
    self.std = np.asarray(std, np.float32).reshape(3)

  @property
  def max_len(self) -> int:
    return self.context_length

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.height, self.width, 3)

  def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
    del context_length  # no token rows
    if isinstance(texts, str):
      texts = [texts]
    grey = np.stack([render_uint8(str(t), self.height, self.width, self.font_size) for t in texts]) if len(
        texts) else np.zeros((0, self.height, self.width), np.uint8)
    x = grey.astype(np.float32)[..., None] / 255.0
    return ((x - self.mean) / self.std).astype(np.float32)

  def decode(self, ids) -> str:
    raise UserError("the render tokenizer draws text as pixels; it cannot decode")
