"""Text tokenizers behind one factory: `get_tokenizer(name, **options)` (open_clip's `get_tokenizer` idea).

A tokenizer is a callable `str | list[str] -> np.int32 [N, context_length]` with attributes `vocab_size`,
`context_length` (= `max_len`), `sot_id`, `eot_id`, `pad_id` (each an int, or None where the tokenizer has no
such token; `token_layout(tokenizer)` gives the three) and a `decode(ids)`. The model assembly copies the three
ids into the text encoder (`model.text.sot_id` …), which finds EOT, words and padding from them
(`vlm_jax.models.tokens`). Every tokenizer but 'siglip' (below) follows the CLIP convention (Radford et al., 2021):
rows are `[SOT] tokens… [EOT]` padded with 0, and EOT has the LARGEST id in the vocabulary (so the old
`argmax(ids)` pooling of converted open_clip models agrees); truncation drops tokens before EOT, never EOT itself. Option `context_length` sets the row length (`max_len` is accepted
as its old name).

- 'words': lower-case, split on anything that is not a letter, one id per word of a fixed vocabulary (given,
  or the synthetic dataset's word list). Ids: pad 0, unk 1, sot 2, words 3…, eot = vocab_size − 1. Length 16.
- 'bytes': vocabulary-free UTF-8 bytes as in ByT5 (Xue et al., 2022): byte b -> b + 1, sot 257, eot 258,
  vocab 259. Length 128 (the synthetic captions are at most 99 bytes).
- 'sentencepiece': a SentencePiece model (Kudo & Richardson, 2018), option `model_path`; piece p -> p + 1,
  then sot, eot (vocab = pieces + 3). Length 64. Train one with `python -m vlm_jax.data.train_tokenizer`.
- 'clip_bpe' (alias 'clip'): OpenAI CLIP's byte-level BPE, equal to open_clip's ids (`vlm_jax.data.clip_bpe`).
  Length 77.
- 'siglip': SigLIP's (Zhai et al., 2023) Google SentencePiece model, option `model_path`, equal to Hugging
  Face's `SiglipTokenizer` ids (`vlm_jax.data.siglip_tokenizer`). Length 64. The one exception to the layout
  above: rows are `pieces… </s>` padded with `</s>` (pad_id == eot_id, 1 for Google's models), no SOT
  (`sot_id` None), EOT not the largest id — SigLIP's text tower pools at the last position, not at argmax.
- 'render': no ids at all — each text is drawn as an image, float32 [N, height, width, 3] normalised like the
  photos, for pixels-only one-tower models (CLIPPO, Tschannen et al. 2023; `vlm_jax.data.render_text`). Options
  height (32), width (128), font_size (8), mean, std; `vocab_size` and `context_length` are 0.
"""

from __future__ import annotations

import inspect
from typing import Iterable, Sequence

import numpy as np

from vlm_jax.errors import UserError


def read_bytes(path: str) -> bytes:
  """Contents of a local file or an fsspec URL (gs://, s3://, …); a missing file is a `UserError`."""
  import fsspec  # noqa: PLC0415
  try:
    with fsspec.open(path, "rb") as f:
      return f.read()
  except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
    raise UserError(f"cannot read {path}: {type(e).__name__}") from None


class Tokenizer:
  """Shared row layout: `[SOT] encode(text)… [EOT]`, truncated before EOT, padded with `pad_id` = 0.

  Subclasses set `sot_id`, `eot_id` (the largest id) and define `encode(text) -> list[int]` (no SOT/EOT)."""

  pad_id = 0
  sot_id: int
  eot_id: int

  def __init__(self, context_length: int, vocab_size: int):
    if int(context_length) < 2:
      raise UserError(f"tokenizer context_length must be >= 2 (SOT and EOT), got {context_length}")
    self.context_length = int(context_length)
    self.vocab_size = int(vocab_size)
    assert self.eot_id == self.vocab_size - 1, "EOT must be the largest id"

  @property
  def max_len(self) -> int:
    return self.context_length

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def encode_batch(self, texts: Sequence[str]) -> list[Sequence[int]]:
    return [self.encode(t) for t in texts]

  def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
    if isinstance(texts, str):
      texts = [texts]
    length = int(context_length or self.context_length)
    out = np.zeros((len(texts), length), np.int32)
    for row, ids in zip(out, self.encode_batch(list(texts))):
      ids = ids[:length - 2]
      row[0] = self.sot_id
      row[1:len(ids) + 1] = ids
      row[len(ids) + 1] = self.eot_id
    return out

  def _body(self, ids: Sequence[int]) -> list[int]:
    """The ids after SOT up to the first EOT, without padding."""
    out = []
    for i in ids:
      i = int(i)
      if i == self.eot_id:
        break
      if i not in (self.sot_id, self.pad_id):
        out.append(i)
    return out


class WordTokenizer(Tokenizer):
  """Whole-word tokenizer over a fixed vocabulary (see the module docstring for the id layout)."""

  unk_id = 1
  sot_id = 2

  def __init__(self, vocab: Iterable[str] | None = None, context_length: int = 16):
    from vlm_jax.data import synthetic  # noqa: PLC0415  (the default vocabulary is the synthetic dataset's)
    words = list(dict.fromkeys(vocab if vocab is not None else synthetic.vocabulary()))
    self.words = tuple(words)
    self._ids = {w: i + 3 for i, w in enumerate(words)}
    self.eot_id = len(words) + 3
    super().__init__(context_length, vocab_size=len(words) + 4)

  def encode(self, text: str) -> list[int]:
    from vlm_jax.data.synthetic import tokenize_words  # noqa: PLC0415
    return [self._ids.get(w, self.unk_id) for w in tokenize_words(text)]

  def decode(self, ids: Sequence[int]) -> str:
    inv = {i: w for w, i in self._ids.items()}
    return " ".join(inv.get(i, "<unk>") for i in self._body(ids))


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes, no vocabulary (ByT5, Xue et al., 2022): byte b -> b + 1, sot 257, eot 258, pad 0."""

  sot_id = 257
  eot_id = 258

  def __init__(self, context_length: int = 128):
    super().__init__(context_length, vocab_size=259)

  def encode(self, text: str) -> list[int]:
    return [b + 1 for b in text.encode("utf-8", errors="replace")]

  def decode(self, ids: Sequence[int]) -> str:
    """Text of a row; a multi-byte character cut by truncation decodes to U+FFFD."""
    return bytes(i - 1 for i in self._body(ids) if i <= 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
  """A trained SentencePiece model (Kudo & Richardson, 2018, "SentencePiece: A simple and language independent
  subword tokenizer and detokenizer for Neural Text Processing"); its own normalisation (NFKC by default) is
  the only cleaning. Ids: piece p -> p + 1 (pad 0 is free), sot = pieces + 1, eot = pieces + 2."""

  def __init__(self, model_path: str | None = None, context_length: int = 64):
    if not model_path:
      raise UserError("the sentencepiece tokenizer needs tokenizer.model_path=/path/to/model.model "
                      "(train one with `python -m vlm_jax.data.train_tokenizer`)")
    try:
      import sentencepiece  # noqa: PLC0415  (optional: only this tokenizer needs it)
    except ImportError:
      raise UserError("the sentencepiece tokenizer needs the package sentencepiece: "
                      "pip install sentencepiece") from None
    self.model_path = model_path
    self._proto = read_bytes(model_path)
    try:
      self.processor = sentencepiece.SentencePieceProcessor(model_proto=self._proto)
    except (RuntimeError, OSError) as e:
      raise UserError(f"{model_path} is not a SentencePiece model: {' '.join(str(e).split())}") from None
    pieces = self.processor.get_piece_size()
    self.sot_id, self.eot_id = pieces + 1, pieces + 2
    super().__init__(context_length, vocab_size=pieces + 3)

  def __getstate__(self):  # picklable for data-loader workers
    return {"model_path": self.model_path, "context_length": self.context_length}

  def __setstate__(self, state):
    self.__init__(**state)

  def encode(self, text: str) -> list[int]:
    return [p + 1 for p in self.processor.encode(text)]

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [[p + 1 for p in ids] for ids in self.processor.encode(list(texts))]

  def decode(self, ids: Sequence[int]) -> str:
    return self.processor.decode([i - 1 for i in self._body(ids)])


LAYOUT_KEYS = ("sot_id", "eot_id", "pad_id")


def token_layout(tokenizer) -> dict:
  """{'sot_id', 'eot_id', 'pad_id'} of a tokenizer: ints, or None where it has no such token ('siglip' has no
  SOT; 'render' has no ids at all)."""
  out = {}
  for key in LAYOUT_KEYS:
    value = getattr(tokenizer, key, None)
    out[key] = None if value is None else int(value)
  return out


def _clip_bpe():
  from vlm_jax.data.clip_bpe import ClipBpeTokenizer  # noqa: PLC0415  (needs ftfy/regex and a vocab file)
  return ClipBpeTokenizer


def _siglip():
  from vlm_jax.data.siglip_tokenizer import SiglipTokenizer  # noqa: PLC0415  (needs sentencepiece)
  return SiglipTokenizer


def _render():
  from vlm_jax.data.render_text import RenderTokenizer  # noqa: PLC0415  (needs Pillow only)
  return RenderTokenizer


_TOKENIZERS = {
    "words": lambda: WordTokenizer,
    "bytes": lambda: ByteTokenizer,
    "sentencepiece": lambda: SentencePieceTokenizer,
    "clip_bpe": _clip_bpe,
    "clip": _clip_bpe,
    "siglip": _siglip,
    "render": _render,
}


def get_tokenizer(name: str, **options) -> Tokenizer:
  """Builds tokenizer `name` (see the module docstring) with its options; `max_len` is an alias of
  `context_length`. Unknown names or options raise `UserError`."""
  if name not in _TOKENIZERS:
    raise UserError(f"unknown tokenizer {name!r}; available: {sorted(_TOKENIZERS)}")
  if "max_len" in options:
    max_len = options.pop("max_len")
    if options.setdefault("context_length", max_len) != max_len:
      raise UserError(f"tokenizer options max_len={max_len} and context_length={options['context_length']} "
                      "disagree (max_len is the old name of context_length)")
  cls = _TOKENIZERS[name]()
  accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
  unknown = sorted(set(options) - set(accepted))
  if unknown:
    raise UserError(f"tokenizer {name!r} has no option(s) {unknown}; its options: {accepted}")
  return cls(**options)
