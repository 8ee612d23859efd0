"""The tar-shard pipeline: patterns, reading, robustness with exact skip counts, exact resume, streams, workers."""

from __future__ import annotations

import collections
import os

import numpy as np
import pytest

from tests import shard_fixtures as fx
from vlm_jax.data import pipeline, shard_stream, shards
from vlm_jax.data.tokenizers import get_tokenizer
from vlm_jax.errors import UserError

TOK = get_tokenizer("bytes", context_length=12)
S = 16


def _data(spec, **kw):
  return {"shards": spec, "image_size": S, "shuffle_buffer": 0, "cycle_length": 1,
          "augment": {"crop_scale": (0.5, 1.0), "flip": True}, **kw}


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert set(x) == set(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


# ---- patterns and the reader ----------------------------------------------------------------------------------

def test_expand_patterns_braces_globs_lists_weights(tmp_path):
  d = str(tmp_path)
  paths = fx.write_clean(d, 3, 2, prefix="a") + fx.write_clean(d, 2, 2, prefix="b")
  got = shards.expand_shards(f"{d}/a-{{00000..00002}}.tar:3,{d}/b-*.tar")
  assert got == [(paths[:3], 3.0), (paths[3:], 1.0)]
  assert shards.expand_shards([f"{d}/a-00001.tar", f"file://{d}/b-00000.tar:0.5"]) == [
      ([paths[1]], 1.0), ([f"file://{d}/b-00000.tar"], 0.5)]
  with pytest.raises(UserError, match="no shard matches"):
    shards.expand_shards(f"{d}/c-{{00000..00009}}.tar")
  with pytest.raises(UserError, match="no shard matches"):
    shards.expand_shards(f"{d}/nothing-*.tar")
  with pytest.raises(UserError, match="weight"):
    shards.expand_shards(f"{d}/a-00000.tar:-1")


def test_writer_reader_round_trip_and_resume_offsets(tmp_path):
  paths = fx.write_clean(str(tmp_path), 2, 5)
  items = list(shards.read_shard(paths[1]))
  assert [it.caption for it, _ in items] == [f"sample {i}" for i in range(5, 10)]
  assert [it.label for it, _ in items] == list(range(5, 10)) and items[-1][1] == -1
  for k in range(4):  # restarting at any sample boundary continues exactly
    rest = list(shards.read_shard(paths[1], items[k][1]))
    assert [it.key for it, _ in rest] == [it.key for it, _ in items[k + 1:]]


def test_reader_reports_each_defect_exactly(tmp_path):
  n_good = fx.write_dirty(str(tmp_path / "dirty.tar"))
  items = [it for it, _ in shards.read_shard(str(tmp_path / "dirty.tar"))]
  skips = collections.Counter(it.reason for it in items if isinstance(it, shards.Skip))
  assert skips == fx.DIRTY_READER_SKIPS
  samples = [it for it in items if isinstance(it, shards.Sample)]
  assert len(samples) == n_good + sum(fx.DIRTY_DECODE_SKIPS.values())
  assert "../../escape" in {s.key for s in samples}  # read as a key, never as a path
  assert not os.path.exists(tmp_path.parent / "escape.png")
  fx.write_truncated(str(tmp_path / "trunc.tar"), n_good=3)
  items = [it for it, _ in shards.read_shard(str(tmp_path / "trunc.tar"))]
  assert [type(it).__name__ for it in items] == ["Sample"] * 3 + ["Skip"]
  assert items[-1].reason == "truncated_shard"
  items = [it for it, _ in shards.read_shard(str(tmp_path / "missing.tar"))]
  assert len(items) == 1 and items[0].reason == "unreadable_shard"


# ---- the pipeline ---------------------------------------------------------------------------------------------

def test_pipeline_skips_and_counts_every_defect_exactly(tmp_path):
  """One epoch over clean, dirty, truncated and missing shards: every valid sample once, every defect counted."""
  d = str(tmp_path)
  clean = fx.write_clean(d, 1, 4)
  n_dirty = fx.write_dirty(f"{d}/dirty.tar")
  fx.write_truncated(f"{d}/trunc.tar", n_good=3)
  spec = f"{d}/{{clean-00000.tar,dirty.tar,trunc.tar,missing.tar}}"  # one source of four shards
  [(paths, _)] = shards.expand_shards(spec)
  data = _data(spec)
  n_good = 4 + n_dirty + 3
  it = pipeline.make_train_iterator(data, global_batch_size=1, seed=3, tokenizer=TOK)
  captions = [TOK.decode(next(it)["text"][0]) for _ in range(n_good)]
  assert sorted(captions) == sorted([f"sample {i}" for i in range(4)] + [f"good {i}" for i in range(n_dirty)]
                                    + [f"trunc {i}" for i in range(3)])
  # Expected counts by hand: every defect of the shards read before the epoch's last valid sample.
  order = [shard_stream._ShardSamplesIterator(shard_stream.ShardSamples(paths, seed=3 * 1_000_003))._shard(i)
           for i in range(4)]
  per_shard = {f"{d}/dirty.tar": {**fx.DIRTY_READER_SKIPS, **fx.DIRTY_DECODE_SKIPS},
               f"{d}/trunc.tar": {"truncated_shard": 1}, f"{d}/missing.tar": {"unreadable_shard": 1},
               clean[0]: {}}
  expected = collections.Counter()
  for p in order:
    expected.update(per_shard[p])
  # A defect after the epoch's last valid sample is counted with the next valid sample (next epoch): a
  # missing shard at the end of the order, and then the truncation at the end of trunc.tar if it is last.
  while order[-1] == f"{d}/missing.tar":
    expected["unreadable_shard"] -= 1
    order.pop()
  if order[-1] == f"{d}/trunc.tar":
    expected["truncated_shard"] -= 1
  got = {k.split("/")[-1]: v for k, v in it.stats().items() if v}
  assert got == {k: v for k, v in expected.items() if v}, (order, got)
  assert set(shards.SKIP_REASONS) - set(got) <= {"truncated_shard", "unreadable_shard", "unreadable_file",
                                                 "special_member", "decompression_bomb"}  # see tests/faults/


def test_pipeline_batches_resume_exactly_mid_shard(tmp_path):
  spec = f"{tmp_path}/clean-{{00000..00005}}.tar"
  fx.write_clean(str(tmp_path), 6, 7)
  data = _data(spec, shuffle_buffer=10, cycle_length=3)
  it = pipeline.make_train_iterator(data, global_batch_size=4, seed=5, tokenizer=TOK, views=True)
  first = _take(it, 3)
  b = first[0]
  assert b["image"].shape == (4, S, S, 3) and b["image"].dtype == np.float32
  assert b["text"].shape == (4, 12) and b["text"].dtype == np.int32 and b["label"].dtype == np.int32
  assert b["image_view1"].shape == b["image"].shape and not np.array_equal(b["image_view1"], b["image_view2"])
  state = it.get_state()  # 12 samples in: mid-shard (7 per shard) and mid-window
  more = _take(it, 12)    # crosses shard ends and an epoch boundary (42 samples)
  it2 = pipeline.make_train_iterator(data, global_batch_size=4, seed=5, tokenizer=TOK, views=True)
  it2.set_state(state)
  _assert_batches_equal(more, _take(it2, 12))
  _assert_batches_equal(first + more, _take(pipeline.make_train_iterator(
      data, global_batch_size=4, seed=5, tokenizer=TOK, views=True), 15))
  labels = np.concatenate([x["label"] for x in first + more])
  # the first 4 windows (40 samples) come from the first epoch (42 samples): no sample twice
  assert len(set(labels[:40].tolist())) == 40 and labels[:40].max() < 42
  other = next(pipeline.make_train_iterator(data, global_batch_size=4, seed=6, tokenizer=TOK, views=True))
  assert not np.array_equal(other["label"], b["label"])


def test_streams_make_process_count_irrelevant(tmp_path):
  fx.write_clean(str(tmp_path), 4, 5)
  data = _data(f"{tmp_path}/clean-*.tar", streams=2, shuffle_buffer=8, cycle_length=2)
  whole = _take(pipeline.make_train_iterator(data, global_batch_size=6, seed=2, tokenizer=TOK), 4)
  parts = [_take(pipeline.make_train_iterator(data, global_batch_size=6, seed=2, tokenizer=TOK,
                                              process_index=p, process_count=2), 4) for p in range(2)]
  for step in range(4):
    for k in whole[step]:
      np.testing.assert_array_equal(np.concatenate([parts[0][step][k], parts[1][step][k]]), whole[step][k])
  # each process reads a disjoint half of the shards (shards 0, 2 vs 1, 3 → labels 0–4, 10–14 vs 5–9, 15–19)
  seen = [{int(x) % 10 // 5 for b in part for x in b["label"]} for part in parts]
  assert seen == [{0}, {1}]
  with pytest.raises(UserError, match="multiple"):
    pipeline.make_train_iterator(data, global_batch_size=6, seed=2, tokenizer=TOK, process_index=0,
                                 process_count=4)


def test_worker_processes_resume_exactly(tmp_path):
  fx.write_clean(str(tmp_path), 4, 6)
  data = _data(f"{tmp_path}/clean-*.tar", workers=2, shuffle_buffer=5, cycle_length=2)
  it = pipeline.make_train_iterator(data, global_batch_size=4, seed=1, tokenizer=TOK)
  _take(it, 3)
  state = it.get_state()
  more = _take(it, 5)
  it2 = pipeline.make_train_iterator(data, global_batch_size=4, seed=1, tokenizer=TOK)
  it2.set_state(state)
  _assert_batches_equal(more, _take(it2, 5))


def _labelled_shards(out_dir: str, prefix: str, n_shards: int, per_shard: int, first_label: int) -> str:
  """`n_shards` shards of `per_shard` samples labelled first_label, first_label + 1, …; returns a brace pattern."""
  w = shards.ShardWriter(out_dir, shard_size=per_shard, prefix=prefix)
  for i in range(n_shards * per_shard):
    w.write(f"{prefix}{i:06d}", fx.image_bytes(first_label + i), "png", f"{prefix} {i}", label=first_label + i)
  w.close(stats_file=False)
  return f"{out_dir}/{prefix}-{{00000..{n_shards - 1:05d}}}.tar"


@pytest.mark.parametrize("w_a,w_b", [(3, 1), (0.5, 2.0)])
def test_weighted_mixture_follows_weights(tmp_path, w_a, w_b):
  """`data.shards='A:w_a,B:w_b'` through `make_train_iterator`: the share of source A among the samples of the
  batches is w_a / (w_a + w_b), and resuming from a saved state continues the mixture exactly.

  Tolerance: if each sample came from A independently with probability p, the observed share of N samples has
  standard deviation sqrt(p(1 − p)/N) (≤ 0.015 here at N = 800); 4 of those make a false alarm ~6e-5 likely and
  still reject ignored (0.5) or swapped weights. (grain's mix is in fact a deterministic interleave, so the error
  is even smaller.)"""
  d = str(tmp_path)
  a = _labelled_shards(d, "a", 4, 10, 0)
  b = _labelled_shards(d, "b", 4, 10, 1000)
  data = _data(f"{a}:{w_a},{b}:{w_b}", shuffle_buffer=20, cycle_length=2)
  it = pipeline.make_train_iterator(data, global_batch_size=10, seed=0, tokenizer=TOK)
  labels = np.concatenate([next(it)["label"] for _ in range(80)])
  assert set(labels.tolist()) == set(range(40)) | set(range(1000, 1040))  # every sample of both sources
  n, p = len(labels), w_a / (w_a + w_b)
  observed, tol = float(np.mean(labels < 1000)), 4 * np.sqrt(p * (1 - p) / len(labels))
  print(f"weights {w_a}:{w_b}: share of source A expected {p:.4f}, observed {observed:.4f} over {n} samples "
        f"(tolerance {tol:.4f})")
  assert abs(observed - p) < tol
  state = it.get_state()
  more = _take(it, 6)
  it2 = pipeline.make_train_iterator(data, global_batch_size=10, seed=0, tokenizer=TOK)
  it2.set_state(state)
  _assert_batches_equal(more, _take(it2, 6))


def _shard_draws(data: dict, n_draws: int, per_shard: int) -> list[int]:
  """The shard of each draw of a one-shard-at-a-time stream (cycle_length 1, no shuffle): batches of `per_shard`
  rows are exactly one draw each, because every shard holds `per_shard` samples (label // per_shard = shard)."""
  it = pipeline.make_train_iterator(data, global_batch_size=per_shard, seed=4, tokenizer=TOK)
  draws = []
  for _ in range(n_draws):
    labels = next(it)["label"]
    assert labels.tolist() == list(range(labels[0], labels[0] + per_shard)) and labels[0] % per_shard == 0
    draws.append(int(labels[0]) // per_shard)
  return draws


def test_resample_draws_shards_with_replacement_and_resumes_exactly(tmp_path):
  """`data.resample=True` draws each shard uniformly with replacement (a shard can repeat before every shard was
  read), unlike the default epochs (each a permutation of the shards); its stream resumes exactly mid-shard."""
  n_shards, per_shard, n_draws = 10, 3, 400
  spec = _labelled_shards(str(tmp_path), "r", n_shards, per_shard, 0)
  epochs = _shard_draws(_data(spec), 3 * n_shards, per_shard)
  for e in range(3):
    assert sorted(epochs[e * n_shards:(e + 1) * n_shards]) == list(range(n_shards))
  draws = _shard_draws(_data(spec, resample=True), n_draws, per_shard)
  first = draws[:n_shards]
  assert len(set(first)) < n_shards, first  # a repeat among the first 10 draws (P = 1 − 10!/10^10 ≈ 0.9996)
  assert sum(sorted(draws[i:i + n_shards]) != list(range(n_shards)) for i in range(0, n_draws, n_shards)) > 30
  counts = np.bincount(draws, minlength=n_shards)
  expected = n_draws / n_shards
  chi2 = float(((counts - expected) ** 2 / expected).sum())
  # uniform draws: chi-square with 9 degrees of freedom; 27.88 is its 0.999 quantile
  print(f"resampled shard counts over {n_draws} draws: {counts.tolist()} (expected {expected:.0f} each), "
        f"chi2 = {chi2:.2f} < 27.88")
  assert chi2 < 27.88
  data = _data(spec, resample=True, cycle_length=2, shuffle_buffer=4)
  it = pipeline.make_train_iterator(data, global_batch_size=2, seed=7, tokenizer=TOK)
  first = _take(it, 7)  # 14 samples: mid-shard
  state = it.get_state()
  more = _take(it, 20)
  it2 = pipeline.make_train_iterator(data, global_batch_size=2, seed=7, tokenizer=TOK)
  it2.set_state(state)
  _assert_batches_equal(more, _take(it2, 20))
  _assert_batches_equal(first + more, _take(pipeline.make_train_iterator(data, global_batch_size=2, seed=7,
                                                                         tokenizer=TOK), 27))


def test_pipeline_user_errors(tmp_path):
  with pytest.raises(UserError, match="no shard matches"):
    pipeline.make_train_iterator(_data(f"{tmp_path}/none-*.tar"), global_batch_size=2, seed=0, tokenizer=TOK)
  fx.write_clean(str(tmp_path), 1, 3)
  with pytest.raises(UserError, match="cannot feed 2 data streams"):
    pipeline.make_train_iterator(_data(f"{tmp_path}/clean-*.tar", streams=2), global_batch_size=2, seed=0,
                                 tokenizer=TOK)
  with pytest.raises(UserError, match="unknown data option"):
    pipeline.make_train_iterator(_data(f"{tmp_path}/clean-*.tar", shufle=3), global_batch_size=2, seed=0,
                                 tokenizer=TOK)
  with open(tmp_path / "junk.tar", "wb") as f:
    f.write(b"\0" * 100)
  it = pipeline.make_train_iterator(_data(f"{tmp_path}/junk.tar"), global_batch_size=2, seed=0, tokenizer=TOK)
  with pytest.raises(UserError, match="no readable sample"):
    next(it)


def test_remote_paths_stream_through_fsspec(tmp_path):
  """Shards behind an fsspec URL (here the in-memory filesystem) are globbed and streamed without local files."""
  import fsspec
  local = fx.write_clean(str(tmp_path), 2, 3)
  fs = fsspec.filesystem("memory")
  for p in local:
    fs.pipe(f"/bucket/{os.path.basename(p)}", open(p, "rb").read())
  [(paths, _)] = shards.expand_shards("memory://bucket/clean-*.tar")
  assert [p.replace(":///", "://") for p in paths] == ["memory://bucket/clean-00000.tar",
                                                      "memory://bucket/clean-00001.tar"]
  it = pipeline.make_train_iterator(_data("memory://bucket/clean-{00000..00001}.tar"), global_batch_size=6,
                                    seed=0, tokenizer=TOK)
  assert sorted(next(it)["label"].tolist()) == list(range(6))
  with pytest.raises(UserError, match="no shard matches"):
    shards.expand_shards("memory://bucket/other-{0..3}.tar")


def test_image_folder_source_trains_like_shards(tmp_path):
  """root/class_name/*.jpg streams with per-epoch shuffles, exact resume and skip counting."""
  root = tmp_path / "pets"
  for c, name in enumerate(["golden_retriever", "tabby_cat"]):
    (root / name / "sub").mkdir(parents=True)
    for i in range(5):
      (root / name / "sub" / f"{i}.jpg").write_bytes(fx.image_bytes(10 * c + i, "JPEG"))
  (root / "tabby_cat" / "broken.png").write_bytes(b"garbage")
  (root / "tabby_cat" / "notes.txt").write_text("not an image")
  data = {"image_folder": str(root), "image_size": S, "caption_template": "a {}"}
  it = pipeline.make_train_iterator(data, global_batch_size=11, seed=0, tokenizer=TOK)
  b = next(it)
  assert sorted(b["label"].tolist()) == [0] * 5 + [1] * 5 + [int(b["label"][-1])]  # one epoch + 1
  assert {TOK.decode(t) for t in b["text"]} == {"a golden r", "a tabby ca"}  # SOT + 10 bytes + EOT
  state = it.get_state()
  more = _take(it, 3)
  it2 = pipeline.make_train_iterator(data, global_batch_size=11, seed=0, tokenizer=TOK)
  it2.set_state(state)
  _assert_batches_equal(more, _take(it2, 3))
  assert it.stats()["data/skipped/corrupt_image"] == it2.stats()["data/skipped/corrupt_image"] >= 1
  with pytest.raises(UserError, match="cannot read image folder"):
    pipeline.make_train_iterator({"image_folder": str(tmp_path / "nope"), "image_size": S}, global_batch_size=2,
                                 seed=0, tokenizer=TOK)
