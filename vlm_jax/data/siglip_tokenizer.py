"""SigLIP's text tokenizer ('siglip'): Google's SentencePiece model, id-for-id equal to Hugging Face's
`SiglipTokenizer(text, padding='max_length', truncation=True, max_length=L)`.

SigLIP (Zhai et al., 2023, "Sigmoid Loss for Language Image Pre-Training") tokenizes text with a SentencePiece
unigram model (Kudo & Richardson, 2018) — for the English models T5's 32,000-piece `c4_en` vocabulary (Raffel et
al., 2020), whose special pieces are `<pad>` 0, `</s>` 1, `<unk>` 2 — and feeds the text tower fixed-length rows
that it reads at the LAST position (`pool_type='last'` in `vlm_jax.models.text`). The steps, in order:

1. canonicalise, as big_vision's zero-shot prompt engineering and Hugging Face's `SiglipTokenizer` do: the
   character `▁` (U+2581, SentencePiece's space mark) becomes a space; lower-case (`str.lower`; option
   `lower_case`, HF's `do_lower_case`, default on); delete the 32 ASCII punctuation characters
   (`string.punctuation`; other punctuation such as `“` or `。` stays); collapse every run of unicode
   whitespace to one space; strip;
2. encode with the model as it is: its own normaliser (NFKC for Google's models) and its dummy `▁` prefix;
   pieces are the model's ids unchanged (no offset);
3. append `</s>`; truncate to the context length keeping `</s>` last (big_vision's `eos='sticky'`); pad with
   `</s>` — SigLIP pads with EOS (HF `pad_token='</s>'`, big_vision `pad_value=1`), not with the model's
   `<pad>` piece. There is no start token.

Layout differs from the other vlm_jax tokenizers: `pad_id == eot_id` (1 for Google's models) and `sot_id` is
None, so SigLIP rows are exempt from the CLIP convention "EOT has the largest id, pool at argmax(ids)"; a
SigLIP text tower must pool 'last' (or 'first'/'mean'), never 'eot'.

Where it differs from Hugging Face: HF splits the literal strings `</s>` and `<unk>` out of the text as special
tokens (and then appends no second `</s>` after a text ending in `</s>`); here they are ordinary text
(punctuation removed: `</s>` reads as `s`), as SentencePiece itself, and so big_vision, never turns input text
into control pieces. HF also forces the leading `▁` for a model whose normaliser disables the dummy prefix;
here the model's own setting holds (the T5 / mT5 SentencePiece models SigLIP uses enable it: no difference).
"""

from __future__ import annotations

import re
import string
from typing import Sequence

import numpy as np

from vlm_jax.data.tokenizers import Tokenizer, read_bytes
from vlm_jax.errors import UserError

EOS_PIECE = "</s>"
_DELETE_PUNCTUATION = str.maketrans("", "", string.punctuation)
_WHITESPACE = re.compile(r"\s+")


def canonicalize(text: str, lower_case: bool = True) -> str:
  """Step 1 of the module docstring: `▁` -> space, lower-case, no ASCII punctuation, single spaces, stripped."""
  text = text.replace("\u2581", " ")
  if lower_case:
    text = text.lower()
  return _WHITESPACE.sub(" ", text.translate(_DELETE_PUNCTUATION)).strip()


class SiglipTokenizer(Tokenizer):
  """Rows `pieces… </s> </s>…` of length `context_length` (64, SigLIP's) from Google's SentencePiece model at
  `model_path` (a local path or fsspec URL; the `spiece.model` of a Hugging Face SigLIP repository).

  Attributes: `vocab_size` (the model's piece count, 32,000 for `c4_en`), `context_length` = `max_len`,
  `eot_id` (the model's EOS piece, `</s>`), `pad_id` (= `eot_id`), `unk_id`, and `sot_id = None` (no start
  token). EOT is not the largest id: see the module docstring."""

  sot_id = None

  def __init__(self, model_path: str | None = None, context_length: int = 64, lower_case: bool = True):
    # The base class's __init__ asserts the CLIP layout (EOT largest, room for SOT), which SigLIP rows do not
    # follow; the attributes it sets are set here.
    if not model_path:
      raise UserError("the siglip tokenizer needs tokenizer.model_path=/path/to/spiece.model: Google's SentencePiece "
                      "model, the spiece.model file of the Hugging Face SigLIP repository (e.g. "
                      "google/siglip-base-patch16-224 or timm/ViT-B-16-SigLIP)")
    if int(context_length) < 1:
      raise UserError(f"tokenizer context_length must be >= 1 (room for </s>), got {context_length}")
    try:
      import sentencepiece  # noqa: PLC0415  (optional: only SentencePiece tokenizers need it)
    except ImportError:
      raise UserError("the siglip tokenizer needs the package sentencepiece: pip install sentencepiece") from None
    self.model_path = model_path
    self.lower_case = bool(lower_case)
    self.context_length = int(context_length)
    try:
      self.processor = sentencepiece.SentencePieceProcessor(model_proto=read_bytes(model_path))
    except (RuntimeError, OSError) as e:
      raise UserError(f"{model_path} is not a SentencePiece model: {' '.join(str(e).split())}") from None
    self.vocab_size = self.processor.get_piece_size()
    eos = self.processor.eos_id()
    if eos < 0:  # a model trained without an EOS piece may still hold a piece named </s>
      eos = self.processor.piece_to_id(EOS_PIECE)
      if self.processor.id_to_piece(eos) != EOS_PIECE:
        raise UserError(f"{model_path} has no end-of-sequence piece ({EOS_PIECE}); SigLIP rows end with it")
    self.eot_id = self.pad_id = int(eos)
    self.unk_id = int(self.processor.unk_id())

  def __getstate__(self):  # picklable for data-loader workers
    return {"model_path": self.model_path, "context_length": self.context_length, "lower_case": self.lower_case}

  def __setstate__(self, state):
    self.__init__(**state)

  def encode(self, text: str) -> list[int]:
    """Piece ids of the canonicalised text, without `</s>`."""
    return self.processor.encode(canonicalize(text, self.lower_case))

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self.processor.encode([canonicalize(t, self.lower_case) for t in texts])

  def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
    if isinstance(texts, str):
      texts = [texts]
    length = int(context_length or self.context_length)
    out = np.full((len(texts), length), self.pad_id, np.int32)
    for row, ids in zip(out, self.encode_batch(list(texts))):
      ids = ids[:length - 1]
      row[:len(ids)] = ids
      row[len(ids)] = self.eot_id
    return out

  def decode(self, ids: Sequence[int]) -> str:
    """Text of a row up to its first `</s>` (canonicalised text: lower-case, no ASCII punctuation)."""
    body = []
    for i in ids:
      if int(i) == self.eot_id:
        break
      body.append(int(i))
    return self.processor.decode(body)
