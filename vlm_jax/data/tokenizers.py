"""Text tokenizers behind one factory: `get_tokenizer(name, **options)` (open_clip's `get_tokenizer` idea).

A tokenizer is a callable `list[str] -> np.int32 [N, max_len]` with attributes `vocab_size`, `max_len`,
`pad_id`, `sot_id`, `eot_id`. Every tokenizer follows the CLIP convention (Radford et al., 2021): sequences are
`[SOT] tokens… [EOT]` padded with 0, and EOT has the LARGEST id in the vocabulary, so a text encoder can pool
at `argmax(ids)`; truncation drops tokens before EOT, never EOT itself.

Implemented: 'words' — lower-case, split on anything that is not a letter, one id per word of a fixed
vocabulary (given, or the synthetic dataset's word list), unknown words -> `unk_id`. Ids: pad 0, unk 1,
sot 2, words 3…, eot = vocab_size − 1.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from vlm_jax.errors import UserError


class WordTokenizer:
  """Whole-word tokenizer over a fixed vocabulary (see the module docstring for the id layout)."""

  pad_id = 0
  unk_id = 1
  sot_id = 2

  def __init__(self, vocab: Iterable[str] | None = None, max_len: int = 16):
    from vlm_jax.data import synthetic  # the default vocabulary is the synthetic dataset's
    words = list(dict.fromkeys(vocab if vocab is not None else synthetic.vocabulary()))
    if max_len < 2:
      raise UserError(f"tokenizer max_len must be >= 2 (SOT and EOT), got {max_len}")
    self.words = tuple(words)
    self._ids = {w: i + 3 for i, w in enumerate(words)}
    self.vocab_size = len(words) + 4
    self.eot_id = self.vocab_size - 1
    self.max_len = int(max_len)

  def encode(self, text: str) -> list[int]:
    """Ids of one text: SOT, words (truncated to max_len − 2), EOT; no padding."""
    from vlm_jax.data.synthetic import tokenize_words
    ids = [self._ids.get(w, self.unk_id) for w in tokenize_words(text)][:self.max_len - 2]
    return [self.sot_id, *ids, self.eot_id]

  def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
    if isinstance(texts, str):
      texts = [texts]
    out = np.zeros((len(texts), self.max_len), np.int32)
    for i, t in enumerate(texts):
      ids = self.encode(t)
      out[i, :len(ids)] = ids
    return out

  def decode(self, ids: Sequence[int]) -> str:
    inv = {i: w for w, i in self._ids.items()}
    return " ".join(inv.get(int(i), "<unk>") for i in ids
                    if int(i) not in (self.pad_id, self.sot_id, self.eot_id))


_TOKENIZERS = {"words": WordTokenizer}


def get_tokenizer(name: str, **options):
  """Builds tokenizer `name` ('words'); unknown names raise `UserError`."""
  if name not in _TOKENIZERS:
    raise UserError(f"unknown tokenizer {name!r}; available: {sorted(_TOKENIZERS)}")
  return _TOKENIZERS[name](**options)
