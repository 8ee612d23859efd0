"""OpenAI CLIP's byte-level BPE text tokenizer ('clip_bpe'), id-for-id equal to open_clip's `SimpleTokenizer`.

CLIP (Radford et al., 2021, "Learning Transferable Visual Models From Natural Language Supervision", §2.4)
encodes "a lower-cased byte pair encoding (BPE) representation of the text with a 49,152 vocab size",
bracketed with [SOS] and [EOS]; the text feature is read at [EOS]. The BPE is Sennrich et al. (2016), "Neural
Machine Translation of Rare Words with Subword Units", applied to UTF-8 bytes as in GPT-2 (Radford et al.,
2019): every byte is first mapped to a printable unicode character, so any text encodes without an unknown
token. The steps, in order:

1. clean: `ftfy.fix_text` (repairs mojibake, Speer 2019), `html.unescape` twice, collapse runs of whitespace
   to one space, strip, lower-case;
2. pre-tokenize with the pattern `<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|
   [^\\s\\p{L}\\p{N}]+` (case-insensitive, the `regex` package for the unicode classes): contractions, runs of
   letters, single digits, runs of other symbols; the two special-token names in the text become their ids,
   as in CLIP;
3. map each pre-token's UTF-8 bytes to characters, mark its last symbol with `</w>`, and apply the merges of
   `bpe_simple_vocab_16e6.txt.gz` in rank order (the first 48,894: 49,152 − 256 bytes − 2 special tokens).

Ids: the 256 byte characters, the same with `</w>`, one id per merge, then `<start_of_text>` (49406) and
`<end_of_text>` (49407): vocab 49,408 with EOT the largest id. Rows are `[SOT] ids… [EOT]` padded with 0 and
truncated to the context length (77 by default) keeping EOT last. As in CLIP, pad 0 is also the id of `!`:
a row's text ends at its EOT.

The vocabulary file is not bundled: it is `vocab_path`, else `$VLM_JAX_CLIP_VOCAB`, else the copy inside an
installed `open_clip` (or OpenAI `clip`) package, found without importing it. Nothing is downloaded.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os
import re
from typing import Sequence

from vlm_jax.data.tokenizers import Tokenizer, read_bytes
from vlm_jax.errors import UserError

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_ENV = "VLM_JAX_CLIP_VOCAB"
NUM_MERGES = 49152 - 256 - 2
SOT, EOT = "<start_of_text>", "<end_of_text>"
END_OF_WORD = "</w>"
_PRETOKEN = SOT + "|" + EOT + r"""|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+"""
# Printable ASCII without '&' (plus tab and newline) is left unchanged by ftfy and html.unescape: skip both.
_NEEDS_FIXING = re.compile(r"[^\t\n\x20-\x7e]|&")


def byte_table() -> list[tuple[int, str]]:
  """(byte, character) pairs in vocabulary order (GPT-2's table): bytes that print as themselves ('!'…'~',
  '¡'…'¬', '®'…'ÿ') keep their character; the other 68 bytes, in byte order, take U+0100 onwards."""
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  kept = set(keep)
  moved = [b for b in range(256) if b not in kept]
  return [(b, chr(b)) for b in keep] + [(b, chr(256 + k)) for k, b in enumerate(moved)]


def find_vocab(vocab_path: str | None = None) -> str:
  """Path of the CLIP BPE vocabulary: `vocab_path`, `$VLM_JAX_CLIP_VOCAB`, or an installed open_clip / clip."""
  for given in (vocab_path, os.environ.get(VOCAB_ENV)):
    if given:
      return given
  for package in ("open_clip", "clip"):
    try:
      spec = importlib.util.find_spec(package)  # locates the package without importing it (or torch)
    except (ImportError, ValueError):
      spec = None
    for folder in (spec.submodule_search_locations or []) if spec else []:
      path = os.path.join(folder, VOCAB_FILE)
      if os.path.isfile(path):
        return path
  raise UserError(f"the clip_bpe tokenizer needs OpenAI CLIP's {VOCAB_FILE}: `pip install open-clip-torch` "
                  f"(it ships the file), or pass tokenizer.vocab_path=/path/to/{VOCAB_FILE} "
                  f"(or set ${VOCAB_ENV})")


@functools.lru_cache(maxsize=4)
def load_vocab(path: str) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
  """(symbol -> id, merge pair -> rank) from a CLIP BPE merges file (one version line, then 'a b' merges).

  A file with fewer than 48,894 merges gives a proportionally smaller vocabulary (used by the tests)."""
  try:
    text = gzip.decompress(read_bytes(path)).decode("utf-8")
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise UserError(f"cannot read the CLIP BPE vocabulary {path}: {e}") from None
  lines = text.split("\n")[1:1 + NUM_MERGES]
  merges = [tuple(line.split()) for line in lines if line.strip()]
  if not merges or any(len(m) != 2 for m in merges):
    raise UserError(f"{path} is not a CLIP BPE merges file (expected lines 'a b' after a version line)")
  chars = [c for _, c in byte_table()]
  symbols = chars + [c + END_OF_WORD for c in chars] + ["".join(m) for m in merges] + [SOT, EOT]
  return {s: i for i, s in enumerate(symbols)}, {m: r for r, m in enumerate(merges)}


def clean(text: str, fix_text) -> str:
  """CLIP's text cleaning: ftfy, HTML unescape twice, whitespace collapsed, lower case."""
  if _NEEDS_FIXING.search(text):
    text = html.unescape(html.unescape(fix_text(text)))
  return " ".join(text.split()).lower()


class ClipBpeTokenizer(Tokenizer):
  """CLIP's lower-cased byte-level BPE (see the module docstring); `vocab_path` locates the merges file."""

  def __init__(self, vocab_path: str | None = None, context_length: int = 77, cache_size: int = 1 << 18):
    try:
      import ftfy  # noqa: PLC0415  (optional: only this tokenizer needs them)
      import regex  # noqa: PLC0415
    except ImportError as e:
      raise UserError(f"the clip_bpe tokenizer needs the packages ftfy and regex ({e}): "
                      "pip install ftfy regex") from None
    self.vocab_path = find_vocab(vocab_path)
    self._encoder, self._ranks = load_vocab(self.vocab_path)
    self._decoder = {i: s for s, i in self._encoder.items()}
    self.sot_id, self.eot_id = self._encoder[SOT], self._encoder[EOT]
    super().__init__(context_length, vocab_size=len(self._encoder))
    self._fix_text = ftfy.fix_text
    self._pattern = regex.compile(_PRETOKEN, regex.IGNORECASE)
    self._byte_symbol = dict(byte_table())
    self._byte_of = {c: b for b, c in self._byte_symbol.items()}
    self._cache_size = cache_size
    self._word_ids = functools.lru_cache(maxsize=cache_size)(self._word_ids_uncached)

  def __getstate__(self):  # picklable for data-loader workers: rebuild from the path
    return {"vocab_path": self.vocab_path, "context_length": self.context_length, "cache_size": self._cache_size}

  def __setstate__(self, state):
    self.__init__(**state)

  def merge(self, symbols: list[str]) -> list[str]:
    """BPE (Sennrich et al., 2016): repeatedly merge every occurrence, left to right, of the adjacent pair of
    lowest merge rank until no adjacent pair is a merge."""
    ranks = self._ranks
    while len(symbols) > 1:
      best, best_rank = None, len(ranks)
      for pair in zip(symbols, symbols[1:]):
        rank = ranks.get(pair, best_rank)
        if rank < best_rank:
          best, best_rank = pair, rank
      if best is None:
        break
      first, second = best
      out, i, n = [], 0, len(symbols)
      while i < n:
        if i + 1 < n and symbols[i] == first and symbols[i + 1] == second:
          out.append(first + second)
          i += 2
        else:
          out.append(symbols[i])
          i += 1
      symbols = out
    return symbols

  def _word_ids_uncached(self, word: str) -> tuple[int, ...]:
    if word in (SOT, EOT):
      return (self._encoder[word],)
    symbols = [self._byte_symbol[b] for b in word.encode("utf-8")]
    symbols[-1] += END_OF_WORD
    return tuple(self._encoder[s] for s in self.merge(symbols))

  def clean(self, text: str) -> str:
    return clean(text, self._fix_text)

  def encode(self, text: str) -> list[int]:
    ids = []
    for word in self._pattern.findall(self.clean(text)):
      ids.extend(self._word_ids(word))
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    """Text of a row: the ids after SOT up to the first EOT (0 before EOT is '!'); words joined by spaces."""
    symbols = []
    for i in ids:
      i = int(i)
      if i == self.eot_id:
        break
      if i != self.sot_id:
        symbols.append(self._decoder[i])
    words = "".join(symbols).split(END_OF_WORD)
    data = b" ".join(bytes(self._byte_of[c] for c in w) for w in words)
    return data.decode("utf-8", errors="replace").strip()
