"""Token layout from the tokenizer (issue 12): for every tokenizer, EOT pooling reads the EOT position, word masks
exclude SOT/EOT/padding, and MLM random replacements are never a special id; the old convention (no ids) is kept."""

from __future__ import annotations

import gzip
import io
import random

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.data import train_tokenizer
from vlm_jax.data.synthetic import SyntheticShapes
from vlm_jax.data.tokenizers import get_tokenizer, token_layout
from vlm_jax.errors import UserError
from vlm_jax.models import build_encoder, tokens
from vlm_jax.models.masking import bert_mask, random_tokens
from vlm_jax.models.two_tower import text_token_mask

TEXTS = ["a red circle!", "a big blue square in the top left and a small red circle in the bottom right",
         "", "hello cat", "!!"]
TINY_MERGES = ["l l", "h e", "he ll", "hell o</w>", "c a", "ca t</w>"]


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
  pytest.importorskip("sentencepiece")
  d = tmp_path_factory.mktemp("spm")
  ds = SyntheticShapes("train", image_size=16)
  (d / "captions.txt").write_text("\n".join(ds.scene(i).caption for i in range(300)) + "\n")
  return train_tokenizer.main(["--input", str(d / "captions.txt"), "--vocab_size", "48",
                               "--output", str(d / "spm")])["model"]


@pytest.fixture(scope="module")
def siglip_model(tmp_path_factory):
  """A small unigram model with Google's SigLIP special pieces: <pad> 0, </s> 1, <unk> 2."""
  spm = pytest.importorskip("sentencepiece")
  rng = random.Random(0)
  words = "a photo of the cat dog red blue green small big circle square star on in left right top".split()
  lines = [" ".join(rng.choices(words, k=rng.randint(2, 12))) for _ in range(400)]
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=buf, model_type="unigram", vocab_size=60, hard_vocab_limit=False,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
      num_threads=1, minloglevel=2)
  path = tmp_path_factory.mktemp("siglip") / "spiece.model"
  path.write_bytes(buf.getvalue())
  return str(path)


@pytest.fixture(scope="module")
def tiny_bpe(tmp_path_factory):
  pytest.importorskip("ftfy")
  pytest.importorskip("regex")
  path = tmp_path_factory.mktemp("bpe") / "tiny_bpe.txt.gz"
  path.write_bytes(gzip.compress(("#version: test\n" + "\n".join(TINY_MERGES) + "\n").encode()))
  return str(path)


TOKENIZERS = ["words", "bytes", "sentencepiece", "siglip", "clip_bpe"]


@pytest.fixture(params=TOKENIZERS)
def tok(request):
  name = request.param
  if name == "sentencepiece":
    return get_tokenizer(name, model_path=request.getfixturevalue("spm_model"), context_length=12)
  if name == "siglip":
    return get_tokenizer(name, model_path=request.getfixturevalue("siglip_model"), context_length=12)
  if name == "clip_bpe":
    return get_tokenizer(name, vocab_path=request.getfixturevalue("tiny_bpe"), context_length=12)
  return get_tokenizer(name, context_length=12)


def _expected(tok, rows):
  """(EOT position, word mask) of each row, by plain Python over the tokenizer's layout."""
  eot, words = [], np.zeros(rows.shape, bool)
  for r, row in enumerate(rows.tolist()):
    e = row.index(tok.eot_id)
    eot.append(e)
    start = 1 if tok.sot_id is not None else 0
    words[r, start:e] = True
  return np.asarray(eot), words


def test_every_tokenizer_exposes_its_layout(tok):
  layout = token_layout(tok)
  assert set(layout) == {"sot_id", "eot_id", "pad_id"} and layout["eot_id"] is not None
  for value in layout.values():
    assert value is None or 0 <= value < tok.vocab_size
  assert token_layout(get_tokenizer("render")) == {"sot_id": None, "eot_id": None, "pad_id": None}


def test_eot_pooling_and_word_masks_follow_the_tokenizer(tok):
  rows = tok(TEXTS)
  layout = token_layout(tok)
  eot, words = _expected(tok, rows)
  np.testing.assert_array_equal(tokens.eot_positions(rows, tok.eot_id), eot)
  mask = np.asarray(tokens.word_tokens(rows, **layout))
  np.testing.assert_array_equal(mask, words)
  special = [i for i in layout.values() if i is not None]
  if tok.sot_id is not None:
    assert not np.any(mask & np.isin(rows, [tok.sot_id, tok.eot_id]))
  assert not np.any(mask[np.arange(rows.shape[1])[None] >= eot[:, None]])  # nothing at or after EOT
  filip = np.asarray(text_token_mask(rows, **layout))
  np.testing.assert_array_equal(filip[2], np.arange(rows.shape[1]) == eot[2])  # empty text keeps its EOT only
  valid = tokens.valid_tokens(rows, eot_id=layout["eot_id"], pad_id=layout["pad_id"])
  np.testing.assert_array_equal(np.asarray(valid), np.arange(rows.shape[1])[None] <= eot[:, None])
  # the text tower pools at that position (config keys as the assembly fills them)
  enc = build_encoder({"kind": "text", "vocab_size": tok.vocab_size, "max_len": rows.shape[1], "width": 8,
                       "depth": 1, "num_heads": 2, "mlp_dim": 16, **layout})
  variables = nn.meta.unbox(enc.init(jax.random.key(0), rows))
  out = enc.apply(variables, rows)
  np.testing.assert_array_equal(out["pooled"], np.asarray(out["tokens"])[np.arange(len(rows)), eot])
  assert special  # every tokenizer here has at least EOT


def test_siglip_rows_break_the_old_argmax_convention(siglip_model):
  tok = get_tokenizer("siglip", model_path=siglip_model, context_length=12)
  rows = tok(["a photo of the cat"])
  assert int(tokens.eot_positions(rows, None)[0]) != int(tokens.eot_positions(rows, tok.eot_id)[0])
  assert rows[0].tolist().index(tok.eot_id) == int(tokens.eot_positions(rows, tok.eot_id)[0])


def test_clip_bpe_bang_is_a_word_not_padding(tiny_bpe):
  """CLIP pads with 0, which is also the id of '!': a 0 before EOT is a word."""
  tok = get_tokenizer("clip_bpe", vocab_path=tiny_bpe, context_length=8)
  row = tok(["hello!?"])  # "!?" is one pre-token: "!" then "?</w>"
  assert 0 in row[0, 1:row[0].tolist().index(tok.eot_id)]
  mask = np.asarray(tokens.word_tokens(row, **token_layout(tok)))[0]
  n = row[0].tolist().index(tok.eot_id)
  np.testing.assert_array_equal(np.flatnonzero(mask), np.arange(1, n))


def test_mlm_replacements_are_never_special(tok):
  layout = token_layout(tok)
  exclude = tokens.special_ids(tok.vocab_size, **layout) + (tok.vocab_size,)
  draws = np.asarray(random_tokens(jax.random.key(0), (10_000,), tok.vocab_size, exclude))
  assert draws.min() >= 0 and draws.max() < tok.vocab_size and not np.isin(draws, exclude).any()
  # through the whole BERT corruption, on many copies of the tokenizer's rows
  rows = np.tile(tok(TEXTS), (400, 1))
  corrupted, selected = bert_mask(jax.random.key(1), jnp.asarray(rows), mask_id=tok.vocab_size,
                                  vocab_size=tok.vocab_size, ratio=0.5, **layout)
  corrupted, selected = np.asarray(corrupted), np.asarray(selected)
  _, words = _expected(tok, rows)
  assert not np.any(selected & ~words)  # only words are selected
  replaced = corrupted[selected & (corrupted != rows) & (corrupted != tok.vocab_size)]
  assert replaced.size > 100 and not np.isin(replaced, exclude).any()


def test_random_tokens_are_uniform_over_the_allowed_ids():
  draws = np.asarray(random_tokens(jax.random.key(2), (30_000,), 7, (0, 2, 6, 9)))
  counts = np.bincount(draws, minlength=7)
  assert counts[[0, 2, 6]].sum() == 0
  np.testing.assert_allclose(counts[[1, 3, 4, 5]] / 30_000, 0.25, atol=0.015)
  with pytest.raises(UserError, match="no token id"):
    random_tokens(jax.random.key(0), (2,), 2, (0, 1))


def test_without_layout_the_old_convention_holds():
  """No ids (a converted open_clip config): EOT = argmax, pad 0, SOT at position 0 — unchanged."""
  ids = jnp.asarray([[2, 5, 6, 9, 0, 0], [2, 9, 0, 0, 0, 0]])
  np.testing.assert_array_equal(tokens.eot_positions(ids), [3, 1])
  np.testing.assert_array_equal(text_token_mask(ids), [[0, 1, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(tokens.word_tokens(ids), [[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
  assert tokens.special_ids(10) == (0, 9)
  with pytest.raises(UserError, match="outside the vocabulary"):
    enc = build_encoder({"kind": "text", "variant": "tiny", "vocab_size": 10, "max_len": 6, "eot_id": 10})
    enc.init(jax.random.key(0), ids)
