"""KV-cache generation (vlm_jax.decoding) for CoCa and CapPa: cached step logits equal a full forward on the
prefix, cached greedy equals greedy by full recomputation, beam search equals exhaustive search when the beam
holds every prefix."""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import decoding
from vlm_jax.models import build_model

VOCAB, LENGTH, SOT, EOT = 7, 6, 2, 6  # ids: pad 0, unk 1, sot 2, words 3..5, eot 6 (the words-tokenizer layout)


def _model(framework: str, vocab: int = VOCAB, length: int = LENGTH):
  cfg = {"framework": framework, "image": {"kind": "vit", "variant": "mu/4", "image_size": 8, "pool_type": "gap"},
         "text": {"variant": "tiny", "width": 16, "depth": 2, "num_heads": 2, "mlp_dim": 32, "vocab_size": vocab,
                  "max_len": length}}
  if framework == "coca":
    cfg.update(embed_dim=8, n_queries=3)
  model = build_model(cfg)
  images = np.random.default_rng(0).normal(size=(3, 8, 8, 3)).astype(np.float32)
  text = np.zeros((3, length), np.int32)
  variables = model.init({"params": jax.random.key(0)}, {"image": images, "text": text})
  # the vocabulary head starts at zero (all logits tie): give it random weights so decoding has choices
  params = jax.tree.map(lambda x: x, nn.unbox(variables["params"]))
  head = params["decoder"]["head"]
  head["kernel"] = jax.random.normal(jax.random.key(1), head["kernel"].shape) * 2.0
  return model, {"params": params}, images


@pytest.fixture(scope="module", params=["coca", "cappa"])
def setup(request):
  return _model(request.param)


def test_cached_logits_equal_full_forward(setup):
  model, variables, images = setup
  memory = model.apply(variables, images, method="decode_memory")
  ids = np.random.default_rng(1).integers(3, VOCAB, size=(3, LENGTH - 1)).astype(np.int32)
  ids[:, 0] = SOT
  full = model.apply(variables, ids, memory, method="decode_logits")
  cache = decoding.init_cache(model, variables, memory, 3, LENGTH - 1)
  # a 2-token prefill, then one token per step
  steps = [(0, 2)] + [(t, t + 1) for t in range(2, LENGTH - 1)]
  for start, stop in steps:
    logits, mutated = model.apply({**variables, "cache": cache}, ids[:, start:stop], memory, decode=True,
                                  method="decode_logits", mutable=["cache"])
    cache = mutated["cache"]
    np.testing.assert_allclose(logits, full[:, start:stop], rtol=1e-5, atol=1e-5)


def _naive_greedy(model, variables, images):
  memory = model.apply(variables, images, method="decode_memory")
  ids = np.zeros((len(images), LENGTH), np.int32)
  ids[:, 0] = SOT
  done = np.zeros(len(images), bool)
  for t in range(LENGTH - 1):
    logits = np.array(model.apply(variables, ids[:, :t + 1], memory, method="decode_logits")[:, t])
    logits[:, [0, SOT]] = -np.inf
    nxt = np.where(done, 0, logits.argmax(-1))
    ids[:, t + 1] = nxt
    done |= nxt == EOT
  return ids


def test_greedy_equals_full_recomputation(setup):
  model, variables, images = setup
  gen = decoding.make_generator(model, max_len=LENGTH, sot_id=SOT, eot_id=EOT)
  got = np.asarray(gen(variables, images))
  np.testing.assert_array_equal(got, _naive_greedy(model, variables, images))
  assert (got[:, 0] == SOT).all()


def _candidate_scores(model, variables, memory, candidates, alpha):
  """Length-normalised log p of each candidate continuation of SOT, by one full forward over all of them."""
  n = max(len(c) for c in candidates)
  inputs = np.zeros((len(candidates), n), np.int32)
  inputs[:, 0] = SOT
  for row, c in enumerate(candidates):
    inputs[row, 1:len(c)] = c[:-1]
  mem = jnp.repeat(memory, len(candidates), axis=0)
  logits = np.array(model.apply(variables, inputs, mem, method="decode_logits"), np.float64)
  logits[..., [0, SOT]] = -np.inf
  m = logits.max(-1, keepdims=True)
  logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
  return [sum(logp[row, t, tok] for t, tok in enumerate(c)) / len(c) ** alpha for row, c in enumerate(candidates)]


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_beam_search_equals_exhaustive_search(alpha):
  model, variables, images = _model("cappa", vocab=5, length=4)  # words 3; eot 4; 3 generated tokens
  eot, words = 4, [1, 3]
  ids, scores = jax.jit(lambda v, x: decoding.beam_search(model, v, x, max_len=4, sot_id=SOT, eot_id=eot,
                                                          beam_size=8, alpha=alpha))(variables, images)
  memory = model.apply(variables, images, method="decode_memory")
  candidates = [[*body, eot] for n in (1, 2, 3) for body in itertools.product(words, repeat=n - 1)]
  candidates += [list(body) for body in itertools.product(words, repeat=3)]  # truncated: no EOT
  for row in range(len(images)):
    scores_row = _candidate_scores(model, variables, memory[row:row + 1], candidates, alpha)
    best = int(np.argmax(scores_row))
    expect = np.zeros(4, np.int32)
    expect[:len(candidates[best]) + 1] = [SOT, *candidates[best]]
    np.testing.assert_array_equal(np.asarray(ids[row]), expect)
    np.testing.assert_allclose(float(scores[row]), scores_row[best], rtol=1e-4)
