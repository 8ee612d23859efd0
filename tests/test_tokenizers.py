"""Tokenizers: exact ids on hand-checked cases, EOT kept by truncation, round trips, SentencePiece training, and
(interop) id-for-id parity of 'clip_bpe' with open_clip's tokenizer."""

from __future__ import annotations

import gzip
import html
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest

from vlm_jax.data import clip_bpe, train_tokenizer
from vlm_jax.data.synthetic import SyntheticShapes
from vlm_jax.data.tokenizers import get_tokenizer
from vlm_jax.errors import UserError

# A tiny CLIP-format merges file. Byte characters have ids ord(c) - 33 for '!'…'~' ('a' 64, 'c' 66, 'e' 68,
# 'h' 71, 'l' 75, 'o' 78, 's' 82, 't' 83, "'" 6, ',' 11, '!' 0), +256 with '</w>'; merges take 512…517, then
# <start_of_text> 518 and <end_of_text> 519.
TINY_MERGES = ["l l", "h e", "he ll", "hell o</w>", "c a", "ca t</w>"]


@pytest.fixture(scope="module")
def tiny_vocab(tmp_path_factory):
  path = tmp_path_factory.mktemp("vocab") / "tiny_bpe.txt.gz"
  path.write_bytes(gzip.compress(("#version: test\n" + "\n".join(TINY_MERGES) + "\n").encode()))
  return str(path)


def _one_line_user_error(fn, fragment: str):
  with pytest.raises(UserError) as e:
    fn()
  assert "\n" not in str(e.value) and fragment in str(e.value), str(e.value)


# ---- factory ---------------------------------------------------------------------------------------------------

def test_factory_options_and_errors():
  tok = get_tokenizer("bytes", max_len=12)  # the old option name
  assert tok.context_length == tok.max_len == 12 and tok("x").shape == (1, 12)
  assert get_tokenizer("words", context_length=8).max_len == 8
  assert get_tokenizer("words", max_len=8, context_length=8).context_length == 8
  _one_line_user_error(lambda: get_tokenizer("nope"), "unknown tokenizer")
  _one_line_user_error(lambda: get_tokenizer("bytes", vocab_path="x"), "vocab_path")
  _one_line_user_error(lambda: get_tokenizer("words", max_len=8, context_length=9), "disagree")
  _one_line_user_error(lambda: get_tokenizer("bytes", context_length=1), ">= 2")
  _one_line_user_error(lambda: get_tokenizer("sentencepiece"), "model_path")
  _one_line_user_error(lambda: get_tokenizer("sentencepiece", model_path="/no/such.model"), "/no/such.model")


@pytest.mark.parametrize("name", ["words", "bytes"])
def test_common_layout(name):
  tok = get_tokenizer(name, context_length=6)
  ids = tok(["a red circle", "a very long caption about a big blue square in the top left", ""])
  assert ids.dtype == np.int32 and ids.shape == (3, 6)
  assert tok.pad_id == 0 and tok.eot_id == tok.vocab_size - 1 and tok.sot_id < tok.eot_id
  assert np.all(ids[:, 0] == tok.sot_id) and ids.max() <= tok.eot_id
  np.testing.assert_array_equal(ids.argmax(1), [ids[0].tolist().index(tok.eot_id), 5, 1])
  assert tok("a red circle").shape == (1, 6)  # one string -> one row


# ---- bytes -----------------------------------------------------------------------------------------------------

def test_bytes_ids_truncation_and_round_trip():
  tok = get_tokenizer("bytes")
  assert (tok.vocab_size, tok.sot_id, tok.eot_id, tok.context_length) == (259, 257, 258, 128)
  np.testing.assert_array_equal(tok("hé!", context_length=7)[0], [257, 105, 196, 170, 34, 258, 0])  # é = C3 A9
  np.testing.assert_array_equal(tok("hé!", context_length=4)[0], [257, 105, 196, 258])  # EOT kept
  assert tok.decode(tok("hé!", context_length=4)[0]) == "h\ufffd"  # a cut character decodes to U+FFFD
  for text in ["a red circle", "naïve café", "日本語のテキスト", "emoji 🐱👍🏽 🇫🇷", "tabs\tand\nnewlines", ""]:
    assert tok.decode(tok(text)[0]) == text


# ---- clip_bpe on a tiny merges file (no open_clip needed) -------------------------------------------------------

def test_clip_bpe_tiny_vocab_exact_ids(tiny_vocab):
  pytest.importorskip("ftfy")
  pytest.importorskip("regex")
  tok = get_tokenizer("clip_bpe", vocab_path=tiny_vocab, context_length=14)
  assert (tok.vocab_size, tok.sot_id, tok.eot_id) == (520, 518, 519)
  row = tok("Hello,  HELL!!\n cat's")[0]
  # hello -> hello</w>; ',' -> ,</w>; hell -> he l l</w> (no 'l l</w>' merge); '!!' -> ! !</w>;
  # cat -> ca t</w> -> cat</w>; 's -> ' s</w>
  np.testing.assert_array_equal(row, [518, 515, 267, 513, 75, 331, 0, 256, 517, 6, 338, 519, 0, 0])
  assert tok.decode(row) == "hello , hell !! cat 's"
  # bytes outside printable latin-1 move to U+0100…: 🐱 = F0 9F 90 B1 -> 172, 253, 238, 109 + 256
  np.testing.assert_array_equal(tok("é🐱")[0, :7], [518, 127, 358, 172, 253, 238, 365])
  assert tok.decode(tok("é 🐱")[0]) == "é 🐱"
  np.testing.assert_array_equal(tok("hello cat hello", context_length=3)[0], [518, 515, 519])  # EOT kept
  np.testing.assert_array_equal(tok("")[0, :3], [518, 519, 0])
  np.testing.assert_array_equal(tok("x <end_of_text>")[0, :4], [518, 87 + 256, 519, 519])  # as in CLIP
  again = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(again("hello cat"), tok("hello cat"))


def test_clip_bpe_vocab_lookup(tiny_vocab, monkeypatch):
  pytest.importorskip("ftfy")
  pytest.importorskip("regex")
  monkeypatch.setenv(clip_bpe.VOCAB_ENV, tiny_vocab)
  assert get_tokenizer("clip").vocab_size == 520
  monkeypatch.delenv(clip_bpe.VOCAB_ENV)
  monkeypatch.setattr(clip_bpe.importlib.util, "find_spec", lambda name: None)
  _one_line_user_error(lambda: get_tokenizer("clip_bpe"), "pip install open-clip-torch")
  _one_line_user_error(lambda: get_tokenizer("clip_bpe", vocab_path="/no/vocab.gz"), "/no/vocab.gz")


def test_clip_cleaning_fast_path_matches_ftfy():
  """Plain printable ASCII skips ftfy and html.unescape; everything else must go through them."""
  ftfy = pytest.importorskip("ftfy")
  rng = random.Random(0)
  pool = [chr(i) for i in range(128)] + ["&amp;", "&lt;", "&#39;", "é", "Ã©", "\u00a0", "\u2028"]
  texts = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 30))) for _ in range(2000)]
  for t in texts:
    expected = " ".join(html.unescape(html.unescape(ftfy.fix_text(t))).strip().split()).lower()
    assert clip_bpe.clean(t, ftfy.fix_text) == expected, repr(t)


def test_clip_bpe_real_vocab_ids():
  pytest.importorskip("ftfy")
  pytest.importorskip("regex")
  try:
    tok = get_tokenizer("clip_bpe")
  except UserError:
    pytest.skip("no CLIP BPE vocabulary installed (open-clip-torch)")
  assert (tok.vocab_size, tok.sot_id, tok.eot_id, tok.context_length) == (49408, 49406, 49407, 77)
  ids = tok(["a photo of a cat.", "A   PHOTO of a dog"], context_length=8)
  np.testing.assert_array_equal(ids, [[49406, 320, 1125, 539, 320, 2368, 269, 49407],
                                      [49406, 320, 1125, 539, 320, 1929, 49407, 0]])
  np.testing.assert_array_equal(tok("a photo of a cat", context_length=4)[0], [49406, 320, 1125, 49407])
  assert tok.decode(ids[0]) == "a photo of a cat ."


# ---- sentencepiece ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
  pytest.importorskip("sentencepiece")
  d = tmp_path_factory.mktemp("spm")
  ds = SyntheticShapes("train", image_size=16)
  (d / "captions.txt").write_text("\n".join(ds.scene(i).caption for i in range(1000)) + "\n")
  result = train_tokenizer.main(["--input", str(d / "captions.txt"), "--vocab_size", "64",
                                 "--output", str(d / "spm")])
  assert result == {"model": str(d / "spm.model"), "pieces": 64, "captions": 1000}
  return result["model"]


def test_sentencepiece_train_then_tokenize(spm_model):
  tok = get_tokenizer("sentencepiece", model_path=spm_model, max_len=16)
  assert (tok.vocab_size, tok.sot_id, tok.eot_id, tok.context_length) == (67, 65, 66, 16)
  sp = tok.processor
  text = "a photo of a red circle"
  row = tok(text)[0]
  n = row.tolist().index(tok.eot_id)
  assert row[0] == tok.sot_id and np.all(row[n + 1:] == 0)
  np.testing.assert_array_equal(row[1:n], np.asarray(sp.encode(text)) + 1)  # piece p -> id p + 1
  pieces = [sp.id_to_piece(int(i) - 1) for i in row[1:n]]
  assert "".join(pieces) == "▁a▁photo▁of▁a▁red▁circle" and pieces[0] == "▁a"
  assert tok.decode(row) == text
  long = tok("a big blue square in the top left and a small red circle in the bottom right")[0]
  assert long[-1] == tok.eot_id and long.argmax() == 15 and 0 not in long  # truncated, EOT kept
  unknown = tok("zebra ✓")[0]
  assert 1 in unknown[1:unknown.argmax()] and unknown[1:unknown.argmax()].min() > 0  # unknown piece -> id 1
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(tok))(text)[0], row)


def test_train_tokenizer_from_shards(tmp_path):
  pytest.importorskip("sentencepiece")
  from vlm_jax.data.shards import ShardWriter  # noqa: PLC0415
  ds = SyntheticShapes("train", image_size=16)
  with ShardWriter(str(tmp_path / "shards"), shard_size=200) as w:
    for i in range(400):
      w.write(None, b"not decoded here", "png", ds.scene(i).caption)
  result = train_tokenizer.main(["--shards", str(tmp_path / "shards" / "data-{00000..00001}.tar"), "--limit",
                                 "300", "--vocab_size", "40", "--model_type", "bpe", "--output",
                                 str(tmp_path / "out" / "spm")])
  assert result["captions"] == 300 and result["pieces"] == 40
  assert (tmp_path / "out" / "spm.vocab").read_text().count("\n") == 40


def test_train_tokenizer_user_errors(tmp_path, capsys):
  r = subprocess.run([sys.executable, "-m", "vlm_jax.data.train_tokenizer", "--input", str(tmp_path / "no.txt"),
                      "--vocab_size", "64", "--output", str(tmp_path / "spm")],
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
  assert r.stderr.strip().splitlines() == [f"error: --input {tmp_path / 'no.txt'}: no such file"]
  (tmp_path / "few.txt").write_text("a red circle\n")
  for argv, fragment in [(["--vocab_size", "64", "--output", "x"], "--input --shards"),
                         (["--input", "x", "--vocab_size", "many", "--output", "x"], "invalid int"),
                         (["--input", str(tmp_path / "few.txt"), "--vocab_size", "5000", "--output",
                           str(tmp_path / "spm")], "Vocabulary size too high")]:
    with pytest.raises(SystemExit) as e:
      train_tokenizer.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err


# ---- parity with open_clip (interop extra) ----------------------------------------------------------------------

PARITY_TEXTS = [
    "", " ", "a photo of a cat", "A Photo Of A CAT.", "   leading and trailing   ", "multiple   spaces",
    "new\nlines\n\nand\ttabs\r\nand returns", "\u00a0no-break\u2003em space\u3000ideographic",
    "naïve café résumé Ångström Øresund façade", "Crème brûlée à la française", "Straße ß ẞ İstanbul ΣΊΣΥΦΟΣ",
    "日本語のキャプション", "中文标题：一只猫", "한국어 캡션", "Привет, мир!", "مرحبا بالعالم", "नमस्ते दुनिया",
    "emoji 🐱🐶 👍🏽 🇫🇷 👨‍👩‍👧 ❤️ ✨", "Tom &amp; Jerry", "x &lt;b&gt;bold&lt;/b&gt; y", "&amp;lt; double escaped",
    "&#39;quoted&#39; &quot;text&quot; &nbsp;&copy;", "AT&T and R&D & co", "fish &chips", "<b>html</b> <br/>",
    "<p>&amp;lt;tag&amp;gt; &amp;amp;</p>",
    "The Mona Lisa doesnâ€™t have eyebrows.", "cafÃ© au lait", "sÃ³ Ã©tÃ©", "âœ” No problems",
    "ﬁne ﬂowers", "ＬＯＵＤ　ＮＯＩＳＥＳ", "curly “quotes” and ‘single’", "em—dash – en… ellipsis",
    "1234567890", "3.14159 and 2,718 and 1e10", "²³ ½ ⅓ Ⅳ ٣ ๓", "COVID-19 in 2020/21", "$100.00 €50 £20 ¥1000",
    "it's don't they're we've I'm you'll he'd", "IT'S DON'T THEY'RE", "rock 'n' roll 'tis", "o'clock ma'am",
    "!!!???...,,,;;;", "--==>><<~~``", "a.b.c/d\\e|f_g", "#hashtag @user https://example.com/a?b=c&d=e",
    "<start_of_text>", "x <end_of_text> y", "<END_OF_TEXT>", "<start_of_text><end_of_text>",
    "control\x00\x01\x07chars\x1b[31mred\x1b[0m\x7f", "zero\u200bwidth\u200djoiner\ufeffbom", "\x85\x92\x93",
    "comb\u0301ining e\u0301", "ypogegrammeni \u0345", "tab\there", "a" * 300, "word " * 100,
    " ".join(f"token{i}" for i in range(120)), "supercalifragilisticexpialidocious " * 10,
    "🐱" * 80, "日本" * 60,
]


def _fuzz_texts(n: int, seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  pool = (list("abcXYZ019 \t\n\r\x0b\x0c\x00\x1b\x7f&;#'\"!?.,:-_<>/()") + list("éàßñÅœ日本한カ")
          + ["😀", "👍🏽", "\u200d", "\u00a0", "\u2028", "\u0345", "ﬁ", "Ｌ", "½", "Ⅳ", "٣", "Ã©", "â€™", "&amp;",
             "&lt;", "&#39;", "'s", "'T", "'re", "<end_of_text>", "\x85", "\x92", "\ufeff"])
  return ["".join(rng.choice(pool) for _ in range(rng.randint(0, 40))) for _ in range(n)]


@pytest.mark.interop
def test_clip_bpe_parity_with_open_clip():
  pytest.importorskip("torch")
  open_clip = pytest.importorskip("open_clip")
  texts = PARITY_TEXTS + _fuzz_texts(400)
  ours = get_tokenizer("clip_bpe")
  theirs = open_clip.get_tokenizer("ViT-B-32")
  assert ours.vocab_size == theirs.vocab_size and ours.eot_id == theirs.eot_token_id
  for length in (77, 16):
    expected = open_clip.tokenize(texts, context_length=length).numpy()
    np.testing.assert_array_equal(theirs(texts, context_length=length).numpy(), expected)
    got = ours(texts, context_length=length)
    mismatched = [texts[i] for i in np.nonzero((got != expected).any(1))[0]]
    assert not mismatched, (length, mismatched[:5])
  assert (expected[:, -1] == ours.eot_id).sum() >= 5  # the corpus does exercise truncation
