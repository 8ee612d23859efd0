"""A grain `IterDataset` of raw samples streamed from tar shards, interleaved, with an exact resume state.

    shard order:  epoch e visits every shard once in the order permutation(seed, e)    (default), or
                  draw i picks shard uniform(seed, i), with replacement                 (resample=True)
    interleave:   `cycle_length` shards are open at once; elements are taken round-robin from them; a shard
                  that ends is replaced by the next one in the order
    state:        {'next': next draw in the order, 'turn': next slot, 'slots': [[draw, byte offset] | None],
                   'shards': fingerprint of this stream's shard list}

A shard that cannot be opened (deleted, unreadable, not a tar) yields one `unreadable_shard` skip and the next
shard is opened; after 2 × (shards) + `cycle_length` opens in a row without a single valid sample — every shard
of this stream gone or bad — `__next__` raises a `UserError` instead of looping forever.

The state is a few integers, so a checkpoint holds it exactly and `set_state` reopens each open shard by
seeking to its byte offset (`shards.read_shard`): a resumed stream continues mid-epoch and mid-shard with
exactly the elements an uninterrupted one would have produced. Draws are positions in the shard list, so a
state is refused (`UserError`) when the list it was saved with differs from the one the patterns match now
(shards deleted, added or renamed between runs): it would resume a different stream, silently. grain's worker
processes (`mp_prefetch`) and the
per-process split each take a slice of the shard list (`set_slice`).

Elements are dicts: a sample {'image': bytes, 'ext', 'caption', 'label', 'meta' (the {key}.json member or None),
'skip': '', 'src': shard path} or a skip marker
{'skip': reason, …} that the decode stage counts (see `shards.SKIP_REASONS`).
"""

from __future__ import annotations

import functools
import hashlib
from typing import Sequence

import grain
import numpy as np

from vlm_jax.data import shards
from vlm_jax.errors import UserError


def _element(item, src: str) -> dict:
  if isinstance(item, shards.Skip):
    return {"image": b"", "ext": "", "caption": "", "label": -1, "meta": None, "skip": item.reason, "src": src}
  return {"image": item.image, "ext": item.image_ext, "caption": item.caption, "label": int(item.label),
          "meta": item.meta, "skip": "", "src": src}


class ShardSamples(grain.IterDataset):
  """Raw samples of `paths` (see the module docstring); infinite."""

  def __init__(self, paths: Sequence[str], *, seed: int, cycle_length: int = 4, resample: bool = False,
               caption_field: str | None = None):
    super().__init__()
    if not paths:
      raise UserError("no shards to read (fewer shards than processes × data streams × workers?)")
    self.paths = list(paths)
    self.seed, self.cycle_length, self.resample = int(seed), int(cycle_length), bool(resample)
    self.caption_field = caption_field
    self.salt = 0

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    """Keeps this worker's shards (grain calls this once per worker process)."""
    n = len(self.paths)
    if sequential_slice:
      start, _, step = sl.indices(n)
      k = step  # sl = slice(worker, None, workers)
      bounds = np.linspace(0, n, k + 1).astype(int)
      self.paths = self.paths[bounds[start]:bounds[start + 1]]
    else:
      self.paths = self.paths[sl]
    if not self.paths:
      raise UserError(f"a data worker got no shard: {n} shard(s) split over more workers; lower data.workers")
    self.salt = 1 + (sl.start or 0)

  def __iter__(self):
    return _ShardSamplesIterator(self)

  def __str__(self) -> str:
    return f"ShardSamples({len(self.paths)} shards, cycle={self.cycle_length}, resample={self.resample})"


class _ShardSamplesIterator(grain.DatasetIterator):

  def __init__(self, ds: ShardSamples):
    super().__init__()
    self._ds = ds
    self._k = max(1, min(ds.cycle_length, len(ds.paths)))
    self._next, self._turn = 0, 0
    self._slots: list[list[int] | None] = [None] * self._k
    self._readers: list = [None] * self._k
    self._empty_opens = 0

  @functools.lru_cache(maxsize=2)
  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng((self._ds.seed, self._ds.salt, epoch)).permutation(len(self._ds.paths))

  def _shard(self, draw: int) -> str:
    n = len(self._ds.paths)
    if self._ds.resample:
      return self._ds.paths[int(np.random.default_rng((self._ds.seed, self._ds.salt, 1 << 40, draw)).integers(n))]
    epoch, i = divmod(draw, n)
    return self._ds.paths[int(self._permutation(epoch)[i])]

  def _reader(self, slot: int):
    if self._readers[slot] is None:
      draw, offset = self._slots[slot]
      self._readers[slot] = shards.read_shard(self._shard(draw), offset, caption_field=self._ds.caption_field)
    return self._readers[slot]

  def __next__(self) -> dict:
    while True:
      slot = self._turn
      if self._slots[slot] is None:
        if self._empty_opens > 2 * len(self._ds.paths) + self._k:
          raise UserError(f"no readable sample in any of {len(self._ds.paths)} shard(s), e.g. "
                          f"{self._ds.paths[0]}: missing, unreadable or only bad samples (deleted mid-run?)")
        self._slots[slot], self._readers[slot] = [self._next, 0], None
        self._next += 1
        self._empty_opens += 1
      src = self._shard(self._slots[slot][0])
      try:
        item, next_offset = next(self._reader(slot))
      except StopIteration:
        self._slots[slot], self._readers[slot] = None, None
        continue
      if isinstance(item, shards.Sample):
        self._empty_opens = 0
      if next_offset < 0:
        self._slots[slot], self._readers[slot] = None, None
      else:
        self._slots[slot][1] = next_offset
      self._turn = (slot + 1) % self._k
      return _element(item, src)

  def _fingerprint(self) -> str:
    return f"{len(self._ds.paths)}:" + hashlib.sha256("\n".join(self._ds.paths).encode()).hexdigest()[:16]

  def get_state(self) -> dict:
    return {"next": self._next, "turn": self._turn, "slots": [list(s) if s else None for s in self._slots],
            "shards": self._fingerprint()}

  def set_state(self, state: dict) -> None:
    saved = state.get("shards")  # absent in states saved before the check existed
    if saved is not None and saved != self._fingerprint():
      then, now = saved.split(":")[0], len(self._ds.paths)
      raise UserError(f"the shards changed since the checkpoint ({then} then, {now} now in this stream, e.g. "
                      f"{self._ds.paths[0]}): its data position would point into other shards. Restore the "
                      "shards, or start a new --workdir with --config.init.checkpoint=THIS_RUN to keep the weights")
    self._next, self._turn = int(state["next"]), int(state["turn"])
    slots = state["slots"]
    if len(slots) != self._k:
      raise UserError(f"data state has {len(slots)} open shards, this pipeline {self._k}: the data config "
                      "(shards, cycle_length, workers) changed since the checkpoint")
    self._slots = [list(map(int, s)) if s else None for s in slots]
    self._readers = [None] * self._k
    self._empty_opens = 0
