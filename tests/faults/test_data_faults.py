"""Fault 4 (quick part): damaged data at 5 % of every defect kind gives exact skip counts per reason and every
valid sample once per epoch; a source that vanishes mid-run stops with one `UserError`, never a hang.

The shard set (`hostile_data.write_defect_set`): 10 files — 8 tars of 40 sample slots, each holding 2 samples of
each of the 9 per-sample defect kinds (5 % of the 320 slots each) and 22 valid ones; two of them cut short after
their slots (`truncated_shard`), and two files that are no tar (`unreadable_shard`). The slow part — grain worker
processes and a real pre-training run — is in test_data_faults_slow.py.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal

import numpy as np
import pytest

from tests import shard_fixtures as fx
from tests.faults import hostile_data as hd
from vlm_jax.data import pipeline, shard_stream, shards
from vlm_jax.data.tokenizers import get_tokenizer
from vlm_jax.errors import UserError

TOK = get_tokenizer("bytes", context_length=8)
SEED = 3


def data_config(pattern: str, **kw) -> dict:
  """One shard at a time, no shuffle window: an epoch is the shards in their order, so its end is exact."""
  return {"shards": pattern, "image_size": 16, "shuffle_buffer": 0, "cycle_length": 1, **kw}


def worker_orders(paths: list[str], seed: int, workers: int, epoch: int) -> list[list[str]]:
  """Each worker's shard order in `epoch` (grain gives worker w the slice w::workers; one worker without)."""
  out = []
  for w in range(max(workers, 1)):
    ds = shard_stream.ShardSamples(paths, seed=seed * 1_000_003, cycle_length=1)
    if workers:
      ds.set_slice(slice(w, None, workers))
    it = shard_stream._ShardSamplesIterator(ds)  # noqa: SLF001 (the order is what the test predicts)
    n = len(ds.paths)
    out.append([it._shard(epoch * n + i) for i in range(n)])  # noqa: SLF001
  return out


def expected_counts(s: dict, workers: int, epochs: int) -> collections.Counter:
  """Skip counts after exactly `epochs` epochs of valid samples. A skip is counted with the next valid sample, so
  what follows a worker's last valid sample of the last epoch (shards without any, a truncated tail) is not in
  yet: it is counted with the first sample of the next epoch."""
  total = collections.Counter()
  for e in range(epochs):
    for order in worker_orders(s["paths"], SEED, workers, e):
      for p in order:
        total.update(s["per_shard"][p])
  for order in worker_orders(s["paths"], SEED, workers, epochs - 1):
    for p in reversed(order):
      counts = s["per_shard"][p]
      if "unreadable_shard" in counts:  # no valid sample: all of it trails
        total.subtract(counts)
        continue
      total["truncated_shard"] -= counts.get("truncated_shard", 0)  # the cut is after its last valid sample
      break
  return +total


def read_epochs(data: dict, s: dict, epochs: int, batch: int = 8) -> tuple[list[np.ndarray], list[dict]]:
  """Labels of each epoch (one epoch = all valid samples) and the skip counts after each."""
  it = pipeline.make_train_iterator(data, global_batch_size=batch, seed=SEED, tokenizer=TOK)
  n = len(s["good"])
  assert n % batch == 0
  labels, counts = [], []
  for _ in range(epochs):
    labels.append(np.concatenate([next(it)["label"] for _ in range(n // batch)]))
    counts.append({k.split("/")[-1]: v for k, v in it.stats().items() if v})
  return labels, counts


def all_labels(s: dict) -> list[int]:
  return sorted(int(c.split()[1]) * 1000 + int(c.split()[3]) for c in s["good"])


def test_defect_set_has_every_reason_at_five_percent(tmp_path):
  """The reader finds exactly what was injected; with the decoder's two kinds, every skip reason of a shard
  pipeline occurs (only `unreadable_file`, an image-folder reason, is absent)."""
  s = hd.write_defect_set(str(tmp_path))
  seen, valid = collections.Counter(), 0
  for p in s["paths"]:
    items = [it for it, _ in shards.read_shard(p)]
    seen.update(it.reason for it in items if isinstance(it, shards.Skip))
    valid += sum(isinstance(it, shards.Sample) for it in items)
  want = collections.Counter()
  for counts in s["per_shard"].values():
    want.update(counts)
  slots = 8 * 40
  print(f"injected over {slots} sample slots: {dict(want)}; valid samples {len(s['good'])}")
  assert all(want[k] == slots // 20 for k in hd.PER_SAMPLE_DEFECTS)  # 5 % each
  decoder = {k: want[k] for k in hd.DECODER_DEFECTS}
  assert seen == want - collections.Counter(decoder)
  assert valid == len(s["good"]) + sum(decoder.values())  # the decoder's defects are samples to the reader
  assert set(want) == set(shards.SKIP_REASONS) - {"unreadable_file"}


def test_one_epoch_counts_every_defect_exactly_and_sees_every_sample_once(tmp_path):
  s = hd.write_defect_set(str(tmp_path))
  epochs, counts = read_epochs(data_config(s["pattern"]), s, epochs=2)
  for labels in epochs:  # every valid sample exactly once per epoch
    assert sorted(labels.tolist()) == all_labels(s)
  for e, got in enumerate(counts):
    print(f"skip counts after {e + 1} epoch(s) of {len(s['good'])} valid samples: {got}")
    assert got == dict(expected_counts(s, workers=0, epochs=e + 1))
  assert all(counts[1][k] == 32 for k in hd.PER_SAMPLE_DEFECTS)  # 2 epochs × 16: no per-sample defect trails


# ---- a source that vanishes mid-run -----------------------------------------------------------------------------

@contextlib.contextmanager
def deadline(seconds: int):
  """Fails the test (instead of hanging it) when the block runs longer than `seconds`."""
  def fire(*_):
    raise TimeoutError(f"still running after {seconds} s: a hang")
  old = signal.signal(signal.SIGALRM, fire)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def two_sources(d: str) -> tuple[str, list[str]]:
  """Sources A (4 shards × 5) and B (4 shards × 5, labels from 1000) mixed 1:1; returns (spec, B's paths)."""
  paths = {}
  for prefix, first in (("a", 0), ("b", 1000)):
    w = shards.ShardWriter(d, shard_size=5, prefix=prefix)
    for i in range(20):
      w.write(f"{prefix}{i:04d}", fx.image_bytes(first + i), "png", f"{prefix} {i}", label=first + i)
    w.close(stats_file=False)
    paths[prefix] = [os.path.join(d, x["shard"]) for x in w.shards]
  return f"{d}/a-*.tar:1,{d}/b-*.tar:1", paths["b"]


def test_source_vanishing_mid_run_stops_with_one_user_error(tmp_path):
  """The rule: B's shards are counted as `unreadable_shard` while its stream tries them, then a `UserError`
  (entry points: one `error:` line, exit 2) — the mixture does not go on with A alone."""
  spec, b_paths = two_sources(str(tmp_path))
  it = pipeline.make_train_iterator(data_config(spec, cycle_length=2), global_batch_size=2, seed=0, tokenizer=TOK)
  first = np.concatenate([next(it)["label"] for _ in range(4)])
  assert (first >= 1000).any() and (first < 1000).any()  # both sources feed the batches
  for p in b_paths:
    os.remove(p)
  with deadline(60), pytest.raises(UserError, match="no readable sample in any of 4 shard") as e:
    for _ in range(10_000):
      next(it)
  unreadable = it.stats()["data/skipped/unreadable_shard"]
  print(f"after deleting source B: {unreadable} unreadable_shard skips counted, then: {e.value}")
  assert unreadable > 0
  assert "\n" not in str(e.value)


def test_part_of_a_source_vanishing_is_counted_and_the_mixture_goes_on(tmp_path):
  """Two of B's four shards deleted mid-run: each failed open is an `unreadable_shard` skip, B's other shards
  keep feeding the mixture, and the run never stops."""
  spec, b_paths = two_sources(str(tmp_path))
  it = pipeline.make_train_iterator(data_config(spec, cycle_length=2), global_batch_size=2, seed=0, tokenizer=TOK)
  for _ in range(2):
    next(it)
  for p in b_paths[:2]:
    os.remove(p)
  with deadline(60):
    labels = np.concatenate([next(it)["label"] for _ in range(200)])
  b_seen = {int(x) for x in labels if x >= 1000}
  print(f"B's samples seen in 400 after deleting half its shards: {sorted(b_seen)[:5]}…, "
        f"unreadable_shard skips {it.stats()['data/skipped/unreadable_shard']}")
  assert b_seen >= set(range(1010, 1020))  # B's remaining shards (samples 10-19) go on
  assert it.stats()["data/skipped/unreadable_shard"] > 0


def test_relaunch_after_a_source_vanished_is_one_user_error(tmp_path):
  """Between runs (the shards deleted after a checkpoint, then a resumed run builds its pipeline): the pattern
  of B matches nothing any more, which is the usual one-line `UserError` before any batch is read."""
  spec, b_paths = two_sources(str(tmp_path))
  data = data_config(spec, cycle_length=2)
  it = pipeline.make_train_iterator(data, global_batch_size=2, seed=0, tokenizer=TOK)
  for _ in range(3):
    next(it)
  for p in b_paths:
    os.remove(p)
  with deadline(60), pytest.raises(UserError, match="no shard matches .*b-"):
    pipeline.make_train_iterator(data, global_batch_size=2, seed=0, tokenizer=TOK)


def test_resume_after_part_of_a_source_vanished_is_refused(tmp_path):
  """Between runs, two of B's four shards deleted: the pattern still matches, but the saved data position counts
  draws in the old shard list, so a resume would silently read other shards. It is one `UserError`; an
  unchanged shard list resumes as before."""
  spec, b_paths = two_sources(str(tmp_path))
  data = data_config(spec, cycle_length=2)
  it = pipeline.make_train_iterator(data, global_batch_size=2, seed=0, tokenizer=TOK)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = next(it)["label"]
  again = pipeline.make_train_iterator(data, global_batch_size=2, seed=0, tokenizer=TOK)
  again.set_state(state)
  np.testing.assert_array_equal(next(again)["label"], expected)
  for p in b_paths[:2]:
    os.remove(p)
  fewer = pipeline.make_train_iterator(data, global_batch_size=2, seed=0, tokenizer=TOK)
  with pytest.raises(UserError, match="shards changed since the checkpoint") as e:
    fewer.set_state(state)
  print(e.value)
  assert "\n" not in str(e.value)
