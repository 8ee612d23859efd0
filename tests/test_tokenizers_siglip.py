"""The 'siglip' tokenizer: hand-checked rows on a small SentencePiece model trained here with Google's special ids
(<pad> 0, </s> 1, <unk> 2, no BOS, as T5's c4_en), and (interop) id-for-id parity with Hugging Face's
`SiglipTokenizer` on a varied corpus at context lengths 64 and 16."""

from __future__ import annotations

import io
import pickle
import random
import string

import numpy as np
import pytest

from vlm_jax.data.synthetic import SyntheticShapes
from vlm_jax.data.tokenizers import get_tokenizer
from vlm_jax.errors import UserError

WORDS = ("a photo of the cat dog bird red blue green small large big tiny on in with car tree house man woman "
         "child running sitting picture image circle square triangle left right top bottom near far").split()
ACCENTED = ["café", "naïve", "résumé", "Über", "façade", "São", "Ελλάδα", "Москва", "straße", "İstanbul", "ﬁsh",
            "e\u0301clair", "ＦＵＬＬ", "東京", "写真", "猫", "مرحبا"]
EMOJI = ["😀", "👍🏽", "🇫🇷", "🐱", "❤️", "★"]
SPACES = [" ", "  ", "\t", "\n", "\u00a0", "\u3000", "\u2009", "\u2581", "\u200b"]
PUNCTUATION = list(string.punctuation) + ["“", "”", "—", "…", "¿", "¡", "«", "»", "。", "！", "、"]


def _phrase(rng: random.Random, n: int) -> str:
  """`n` pieces of mixed text: words in varied case, numbers, accents, emoji, punctuation, odd whitespace."""
  out = []
  for _ in range(n):
    r = rng.random()
    if r < 0.55:
      w = rng.choice(WORDS)
      out.append(rng.choice([w, w, w.upper(), w.title(), w[0] + w[1:].upper()]))
    elif r < 0.65:
      out.append(rng.choice([str(rng.randint(0, 9)), str(rng.randint(0, 10 ** 6)), f"{rng.random() * 100:.2f}",
                             f"{rng.randint(1, 999):,}"]))
    elif r < 0.75:
      out.append(rng.choice(ACCENTED))
    elif r < 0.80:
      out.append(rng.choice(EMOJI))
    elif r < 0.92:
      out.append(rng.choice(PUNCTUATION) * rng.randint(1, 2))
    else:
      out.append(rng.choice(SPACES))
  glue = [rng.choice([" ", " ", " ", "", rng.choice(SPACES)]) for _ in out]
  return "".join(g + w for g, w in zip(glue, out))


def _corpus(seed: int, n: int) -> list[str]:
  """Synthetic-dataset captions (some recased or punctuated) and mixed phrases, short to very long."""
  rng = random.Random(seed)
  ds = SyntheticShapes("train", image_size=16, seed=seed)
  out = []
  for i in range(n):
    kind = i % 4
    if kind == 0:
      c = ds.scene(i).caption
      out.append(rng.choice([c, c.capitalize() + ".", c.upper(), f'"{c}", {rng.randint(1, 99)}!']))
    elif kind == 3:
      out.append(_phrase(rng, rng.randint(60, 160)))  # longer than 64 pieces: truncation at both lengths
    else:
      out.append(_phrase(rng, rng.randint(1, 20)))
  return out


EDGE_CASES = ["", " ", "   \t\n ", "!!!", ".,;:", "\u2581", "\u2581\u2581a", "a\u2581b", "a \u2581 b", "A.B.C.",
              "e\u0301", "ＡＢＣ！", "it's a dog's life", "hello,world", "  leading and trailing  ",
              "MiXeD CaSe ÀÉÎÕÜ", "x" * 200, "a " * 100, "😀" * 30, "\u16a0 runic", "tab\tnew\nline",
              "[brackets] {braces} (parens) <angles>", "$3.50 & 100% @home #tag ~tilde `tick` ^caret|pipe"]


@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
  """A SentencePiece unigram model with the special pieces of Google's SigLIP (T5 c4_en) vocabulary."""
  spm = pytest.importorskip("sentencepiece")
  lines = _corpus(seed=123, n=1600) + [" ".join(random.Random(i).choices(WORDS, k=12)) for i in range(800)]
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=buf, model_type="unigram", vocab_size=600, hard_vocab_limit=False,
      character_coverage=0.9995, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>",
      unk_piece="<unk>", num_threads=1, minloglevel=2)
  path = tmp_path_factory.mktemp("siglip_spm") / "spiece.model"
  path.write_bytes(buf.getvalue())
  return str(path)


def test_special_ids_and_errors(spiece):
  tok = get_tokenizer("siglip", model_path=spiece)
  sp = tok.processor
  assert [sp.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
  assert (tok.eot_id, tok.pad_id, tok.unk_id, tok.sot_id) == (1, 1, 2, None)
  assert tok.vocab_size == sp.get_piece_size() and tok.context_length == tok.max_len == 64
  for options in ({}, {"model_path": ""}):  # '' is what the open_clip SigLIP converter writes
    with pytest.raises(UserError, match="model_path"):
      get_tokenizer("siglip", **options)
  with pytest.raises(UserError, match="no_such.model"):
    get_tokenizer("siglip", model_path="/no_such.model")
  with pytest.raises(UserError, match=">= 1"):
    get_tokenizer("siglip", model_path=spiece, context_length=0)


def test_hand_checked_rows(spiece):
  tok = get_tokenizer("siglip", model_path=spiece, context_length=8)
  pid = tok.processor.piece_to_id
  for piece in ("\u2581a", "\u2581photo", "\u2581of", "\u2581cat", "\u2581"):
    assert tok.processor.id_to_piece(pid(piece)) == piece, f"{piece!r} is not a piece of the trained model"
  a, photo, of, cat, space = (pid(p) for p in ("\u2581a", "\u2581photo", "\u2581of", "\u2581cat", "\u2581"))
  # lower-cased, ASCII punctuation and extra whitespace gone, raw piece ids, </s> appended, padded with </s>
  np.testing.assert_array_equal(tok(["A Photo, of a CAT!", "  a\tphoto\u2581of...", "", "?!"]), [
      [a, photo, of, a, cat, 1, 1, 1],
      [a, photo, of, 1, 1, 1, 1, 1],
      [1] * 8,
      [1] * 8])
  # truncation keeps </s> last; a character outside the model is <unk> (2) after the dummy-prefix piece
  np.testing.assert_array_equal(tok("a photo of a cat " * 5, context_length=4), [[a, photo, of, 1]])
  np.testing.assert_array_equal(tok("a cat", context_length=1), [[1]])
  np.testing.assert_array_equal(tok("\u16a0")[0, :3], [space, 2, 1])
  # lower_case=False keeps the case (HF do_lower_case=False); literal special-token strings are plain text
  assert tok.encode("CAT") != get_tokenizer("siglip", model_path=spiece, lower_case=False).encode("CAT")
  np.testing.assert_array_equal(tok("a </s> cat <unk>"), tok("a s cat unk"))
  assert tok.decode(tok("A Photo of a CAT!")[0]) == "a photo of a cat"
  clone = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(clone(EDGE_CASES), tok(EDGE_CASES))


@pytest.mark.interop
@pytest.mark.parametrize("length", [64, 16])
def test_ids_equal_hugging_face(spiece, length):
  transformers = pytest.importorskip("transformers")
  texts = EDGE_CASES + _corpus(seed=7, n=400)
  # HF splits these literal strings out as special tokens; vlm_jax reads them as text (module docstring)
  assert not any("</s>" in t or "<unk>" in t for t in texts)
  hf = transformers.SiglipTokenizer(vocab_file=spiece)
  want = np.asarray(hf(texts, padding="max_length", truncation=True, max_length=length)["input_ids"], np.int32)
  got = get_tokenizer("siglip", model_path=spiece, context_length=length)(texts)
  assert got.shape == want.shape == (len(texts), length)
  bad = [t for t, g, w in zip(texts, got, want) if not np.array_equal(g, w)]
  assert not bad, f"{len(bad)} of {len(texts)} rows differ, e.g. {bad[:3]!r}"
  assert (got[:, -2] != 1).sum() > len(texts) // 8  # enough rows are full: truncation is exercised
