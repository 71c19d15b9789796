"""Features -> fixed-shape batches: length buckets give a handful of shapes (jit compiles each
once), the order is a pure function of (seed, epoch) so a checkpointed `state()` resumes the
exact sequence, and each host of a multi-host run slices the same global batch."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import numpy as np

from minilm_jax.data.features import Features

# ---------------------------------------------------------------------------------------------
# Batching.


class Batcher:
  """Fixed-shape batches over `Features`, bucketed by length, resumable, multi-host sliced.

  Epoch e's order is a pure function of (seed, e): rng = default_rng([seed, e]); a permutation
  of the examples (identity without `shuffle`); per bucket (ascending), consecutive groups of
  `batch_size` in that order; the buckets' remainders then share batches, each as long as the
  bucket of its longest row, the last one padded with dummy rows (index -1, weight 0), so an
  epoch has ceil(N / batch_size) batches as HF's has (`drop_remainder` drops the remainders
  instead); then a permutation of the batch order (none without `shuffle`). An example goes to
  the smallest bucket >= its length, so every batch has shape
  (batch_size // process_count, bucket) for a bucket in `buckets`.

  Multi-host: every process computes the same global batches and takes rows
  [p * B / P, (p + 1) * B / P) of each. Without `shuffle` (evaluation) each example appears
  exactly once per epoch across processes, which makes metrics exact.

  Iterating the Batcher yields forever and advances its position; `state()` is the position of
  the next batch ({"epoch", "batch"}, JSON-serialisable), `restore(state)` moves there, so a
  checkpoint taken after step k resumes with batch k + 1. Batches: input_ids, attention_mask,
  token_type_ids (int32, padded with pad_id / 0 / 0), labels (the features' dtype, 0 in dummy
  rows so that gathers stay in range), weights (float32, 1 real / 0 dummy), index (int32
  example index, -1 dummy).
  """

  def __init__(self, features: Features, *, batch_size: int,
               buckets: Sequence[int] = (32, 64, 128), seed: int = 0, shuffle: bool = True,
               drop_remainder: bool = False, process_index: int = 0, process_count: int = 1):
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"bad process_index {process_index} / process_count {process_count}")
    if batch_size < 1 or batch_size % process_count:
      raise ValueError(f"global batch_size {batch_size} is not a positive multiple of "
                       f"process_count {process_count}")
    buckets = tuple(int(b) for b in buckets)
    if not buckets or buckets[0] < 1 or any(a >= b for a, b in itertools.pairwise(buckets)):
      raise ValueError(f"buckets must be positive and strictly increasing, got {buckets}")
    if seed < 0:
      raise ValueError(f"seed must be non-negative, got {seed}")
    if len(features) == 0:
      raise ValueError("no examples to batch")
    lengths = features.lengths
    if lengths.max() > buckets[-1]:
      raise ValueError(f"an example has {lengths.max()} tokens but the largest bucket is "
                       f"{buckets[-1]}; encode with max_length <= {buckets[-1]}")
    self.features = features
    self.batch_size = batch_size
    self.local_batch_size = batch_size // process_count
    self.buckets = buckets
    self.seed = seed
    self.shuffle = shuffle
    self.drop_remainder = drop_remainder
    self.process_index = process_index
    self.process_count = process_count
    self._bucket = np.searchsorted(np.asarray(buckets), lengths, side="left")
    counts = np.bincount(self._bucket, minlength=len(buckets))
    self._counts = counts
    full = int((counts // batch_size).sum())
    self.batches_per_epoch = full if drop_remainder else -(-len(features) // batch_size)
    self._epoch, self._batch = 0, 0
    self._plan_epoch, self._plan = None, None

  @property
  def shapes(self) -> list[tuple[int, int]]:
    """The batch shapes this Batcher can produce (one jit compilation each): every bucket that
    holds a full batch, or any example when remainders are kept."""
    least = self.batch_size if self.drop_remainder else 1
    return [(self.local_batch_size, b) for b, n in zip(self.buckets, self._counts, strict=True)
            if n >= least]

  def epoch_batches(self, epoch: int) -> list[np.ndarray]:
    """Global batches of an epoch as int32 example-index arrays of length batch_size (-1 dummy)."""
    n, size = len(self.features), self.batch_size
    rng = np.random.default_rng([self.seed, epoch])
    order = rng.permutation(n) if self.shuffle else np.arange(n)
    batches, rest = [], []
    for b in range(len(self.buckets)):
      members = order[self._bucket[order] == b]
      full = len(members) - len(members) % size
      batches += [members[s:s + size].astype(np.int32) for s in range(0, full, size)]
      rest.append(members[full:])
    if not self.drop_remainder:
      rest = np.concatenate(rest)
      for start in range(0, len(rest), size):
        chunk = rest[start:start + size]
        batches.append(np.concatenate([chunk, np.full(size - len(chunk), -1)]).astype(np.int32))
    if self.shuffle:
      batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches

  def get_batch(self, epoch: int, index: int) -> dict[str, np.ndarray]:
    """Batch `index` of `epoch`, this process's rows."""
    if self._plan_epoch != epoch:
      self._plan_epoch, self._plan = epoch, self.epoch_batches(epoch)
    rows = self._plan[index]
    length = self._length(rows)
    lo = self.process_index * self.local_batch_size
    rows = rows[lo:lo + self.local_batch_size]
    f = self.features
    b = len(rows)
    input_ids = np.full((b, length), f.pad_id, np.int32)
    attention_mask = np.zeros((b, length), np.int32)
    token_type_ids = np.zeros((b, length), np.int32)
    real = rows >= 0
    for r in np.flatnonzero(real):
      s, e = f.offsets[rows[r]], f.offsets[rows[r] + 1]
      input_ids[r, :e - s] = f.tokens[s:e]
      token_type_ids[r, :e - s] = f.token_types[s:e]
      attention_mask[r, :e - s] = 1
    labels = np.zeros(b, f.labels.dtype)
    labels[real] = f.labels[rows[real]]
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "token_type_ids": token_type_ids, "labels": labels,
            "weights": real.astype(np.float32), "index": rows.astype(np.int32)}

  def _length(self, rows: np.ndarray) -> int:
    """A batch's length: the bucket of its longest real row (dummies only pad the end)."""
    return self.buckets[int(self._bucket[rows[rows >= 0]].max())]

  def iter_epoch(self, epoch: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """The batches of one epoch (evaluation: Batcher(..., shuffle=False).iter_epoch())."""
    for i in range(self.batches_per_epoch):
      yield self.get_batch(epoch, i)

  def iterate(self, start: dict[str, int] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Batches forever from position `start` (default the beginning); leaves `state()` alone."""
    epoch, index = self._check_state(start or {"epoch": 0, "batch": 0})
    while True:
      yield self.get_batch(epoch, index)
      index += 1
      if index == self.batches_per_epoch:
        epoch, index = epoch + 1, 0

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    if self.batches_per_epoch == 0:
      raise ValueError("no batches: every bucket has fewer than batch_size examples and "
                       "drop_remainder is set")
    while True:
      batch = self.get_batch(self._epoch, self._batch)
      # Advance before yielding: state() taken after consuming this batch names the next one.
      self._batch += 1
      if self._batch == self.batches_per_epoch:
        self._epoch, self._batch = self._epoch + 1, 0
      yield batch

  def state(self) -> dict[str, int]:
    return {"epoch": self._epoch, "batch": self._batch}

  def restore(self, state: dict[str, int]) -> None:
    self._epoch, self._batch = self._check_state(state)

  def _check_state(self, state) -> tuple[int, int]:
    if set(state) != {"epoch", "batch"}:
      raise ValueError(f"a Batcher state has keys epoch and batch, got {sorted(state)}")
    epoch, index = int(state["epoch"]), int(state["batch"])
    if epoch < 0 or not 0 <= index < max(self.batches_per_epoch, 1):
      raise ValueError(f"state {state} is outside epochs of {self.batches_per_epoch} batches")
    return epoch, index

  def padding_fraction(self, epoch: int = 0) -> float:
    """Fraction of the token slots in an epoch's global batches that hold padding (dummy rows
    included): the compute that bucketing does not recover."""
    lengths = self.features.lengths
    slots = real = 0
    for rows in self.epoch_batches(epoch):
      slots += self.batch_size * self._length(rows)
      real += int(lengths[rows[rows >= 0]].sum())
    return 1.0 - real / slots if slots else 0.0


class ArrayBatcher:
  """The Batcher interface over pre-padded fixed-shape arrays (e.g. SQuAD windows, which
  `squad.prepare_*_features` already pad to max_seq_length): same seeded order, resumable
  state, dummy rows of weight 0 and per-process slices; one shape, so no buckets."""

  def __init__(self, arrays: dict[str, np.ndarray], *, batch_size: int, seed: int = 0,
               shuffle: bool = True, drop_remainder: bool = False, process_index: int = 0,
               process_count: int = 1):
    n = {len(v) for v in arrays.values()}
    if len(n) != 1:
      raise ValueError(f"arrays have different lengths: { {k: len(v) for k, v in arrays.items()} }")
    self.arrays = {k: np.asarray(v) for k, v in arrays.items() if k != "offsets"}
    (self.n,) = n
    if batch_size < 1 or batch_size % process_count:
      raise ValueError(f"global batch_size {batch_size} is not a positive multiple of "
                       f"process_count {process_count}")
    self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
    self.drop_remainder = drop_remainder
    self.local_batch_size = batch_size // process_count
    self.process_index = process_index
    self.batches_per_epoch = (self.n // batch_size if drop_remainder
                              else -(-self.n // batch_size))
    self._epoch, self._batch = 0, 0

  def epoch_batches(self, epoch: int) -> list[np.ndarray]:
    rng = np.random.default_rng([self.seed, epoch])
    order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
    out = []
    for i in range(self.batches_per_epoch):
      rows = order[i * self.batch_size:(i + 1) * self.batch_size]
      out.append(np.concatenate([rows, np.full(self.batch_size - len(rows), -1)]).astype(np.int32))
    return out

  def get_batch(self, epoch: int, index: int) -> dict[str, np.ndarray]:
    rows = self.epoch_batches(epoch)[index]
    lo = self.process_index * self.local_batch_size
    rows = rows[lo:lo + self.local_batch_size]
    real = rows >= 0
    safe = np.where(real, rows, 0)
    batch = {k: np.where(real.reshape((-1,) + (1,) * (v.ndim - 1)), v[safe], 0).astype(v.dtype)
             for k, v in self.arrays.items()}
    batch["weights"] = real.astype(np.float32)
    batch["index"] = rows.astype(np.int32)
    return batch

  def iter_epoch(self, epoch: int = 0) -> Iterator[dict[str, np.ndarray]]:
    for i in range(self.batches_per_epoch):
      yield self.get_batch(epoch, i)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    while True:
      batch = self.get_batch(self._epoch, self._batch)
      self._batch += 1
      if self._batch == self.batches_per_epoch:
        self._epoch, self._batch = self._epoch + 1, 0
      yield batch

  def state(self) -> dict[str, int]:
    return {"epoch": self._epoch, "batch": self._batch}

  def restore(self, state: dict[str, int]) -> None:
    self._epoch, self._batch = int(state["epoch"]), int(state["batch"])
