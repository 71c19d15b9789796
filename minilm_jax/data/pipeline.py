"""Reading: Grain pipelines over a prepared corpus, each yielding fixed-shape numpy batches.

  PackedBatches    (packed.py) distillation and other unlabeled corpora. Per data shard: keys in
                   Grain's global index shuffle (a new permutation each epoch, O(1) memory),
                   this shard's slice of them, first-fit packing planned from the lengths files
                   alone, then its records read by key (`shards.Records`). A process reads
                   only its own shards; every row is (local batch, seq_len).
  BucketedBatches  fine-tuning and evaluation. Every process walks the same shuffled key order
                   and the lengths file (2 bytes an example, memory-mapped) to form the same
                   global batches by length bucket, then reads only its own rows of each.
  ArrayBatches     features already padded in memory (SQuAD windows, seq2seq layouts): the same
                   Grain shuffle, batching, per-process rows and state, without shards.

All three: `batch_size` (global), `batches_per_epoch`, iteration that advances `state()`,
`restore(state)`, `iter_epoch()` for evaluation, and `spec()`, what a saved state means. The
state is Grain's iterator state (JSON), saved in the orbax checkpoint beside the train state,
so a resumed run reads exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import atexit
from collections.abc import Iterator, Sequence

import grain
import grain.experimental as gx
import numpy as np

from minilm_jax.data import shards


def _check_hosts(batch_size: int, process_index: int, process_count: int) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"bad process_index {process_index} / process_count {process_count}")
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(f"global batch_size {batch_size} is not a positive multiple of "
                     f"process_count {process_count}")
  return batch_size // process_count


class _Batches:
  """What the trainer reads: a resumable Grain iterator plus an epoch's worth of metadata."""

  batch_size: int
  batches_per_epoch: int

  def _dataset(self) -> grain.IterDataset:
    raise NotImplementedError

  def _iterator(self):
    if getattr(self, "_it", None) is None:
      self._it = iter(self._dataset())
      # Prefetch threads stopped before the interpreter tears down their modules.
      atexit.register(self.close)
    return self._it

  def close(self) -> None:
    it, self._it = getattr(self, "_it", None), None
    if it is not None and hasattr(it, "close"):
      it.close()

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    it = self._iterator()
    while True:
      yield next(it)

  def state(self) -> dict:
    return self._iterator().get_state()

  def restore(self, state: dict) -> None:
    try:
      self._iterator().set_state(state)
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"data state {str(state)[:200]} does not fit this pipeline ({e})"
                       ) from None


# ---------------------------------------------------------------------------------------------
# Length buckets.

def _bucket_of(lengths: np.ndarray, buckets: Sequence[int], where) -> np.ndarray:
  if len(lengths) and int(lengths.max()) > buckets[-1]:
    raise ValueError(f"{where}: examples of up to {int(lengths.max())} tokens, but the largest "
                     f"bucket is {buckets[-1]}")
  return np.searchsorted(np.asarray(buckets), lengths, side="left").astype(np.int8)


def _padded_rows(records: Sequence[bytes], rows: np.ndarray, length: int, pad_id: int,
                 label_dtype=np.float32) -> dict[str, np.ndarray]:
  """input_ids / attention_mask / token_type_ids (len(rows), length) and labels (NaN -> 0) of
  `records`, one for each real row (rows >= 0) in order; dummy rows stay padding."""
  b = len(rows)
  out = {"input_ids": np.full((b, length), pad_id, np.int32),
         "attention_mask": np.zeros((b, length), np.int32),
         "token_type_ids": np.zeros((b, length), np.int32), "labels": np.zeros(b, label_dtype)}
  for r, rec in zip(np.flatnonzero(rows >= 0), records, strict=True):
    ids, types, label = shards.decode_record(rec)
    out["input_ids"][r, :len(ids)] = ids
    out["token_type_ids"][r, :len(ids)] = types
    out["attention_mask"][r, :len(ids)] = 1
    out["labels"][r] = 0 if np.isnan(label) else label
  return out


class _PlanIterator(grain.DatasetIterator):
  """Global batches of keys, by bucket, as the keys come in shuffled order; the remainders of
  the buckets share the last batches of an epoch (shortest first), padded with -1.
  State: (epoch, keys consumed, the keys waiting in each bucket): restored exactly."""

  def __init__(self, plan: _BucketPlan):
    super().__init__()
    self.p = plan
    self._epoch, self._pos, self._wait = 0, 0, [[] for _ in plan.buckets]
    self._tail: list[list[int]] = []

  def __next__(self):
    p = self.p
    while True:
      if self._tail:
        return self._emit(self._tail.pop(0))
      if self._pos == p.n:
        self._end_epoch()
        continue
      key = int(p.keys[self._epoch * p.n + self._pos])
      self._pos += 1
      w = self._wait[int(p.bucket[key - p.start])]
      w.append(key)
      if len(w) == p.batch_size:
        rows = list(w)
        w.clear()
        return self._emit(rows)

  def _emit(self, rows):
    rows = np.asarray(rows + [-1] * (self.p.batch_size - len(rows)), np.int64)
    return {"rows": rows, "epoch": self._epoch}

  def _end_epoch(self):
    rest = [k for w in self._wait for k in w]
    self._wait = [[] for _ in self.p.buckets]
    if not self.p.drop_remainder:
      b = self.p.batch_size
      self._tail = [rest[i:i + b] for i in range(0, len(rest), b)]
    self._epoch, self._pos = self._epoch + 1, 0

  def get_state(self):
    return {"epoch": self._epoch, "consumed": self._pos,
            "waiting": [list(w) for w in self._wait], "tail": [list(t) for t in self._tail]}

  def set_state(self, state):
    self._epoch, self._pos = int(state["epoch"]), int(state["consumed"])
    if len(state["waiting"]) != len(self.p.buckets) or not 0 <= self._pos <= self.p.n:
      raise ValueError("another bucket layout or corpus")
    self._wait = [list(map(int, w)) for w in state["waiting"]]
    self._tail = [list(map(int, t)) for t in state["tail"]]


class _BucketPlan(grain.IterDataset):
  def __init__(self, n, start, bucket, keys, buckets, batch_size, drop_remainder):
    super().__init__()
    self.n, self.start, self.bucket, self.keys, self.buckets = n, start, bucket, keys, buckets
    self.batch_size, self.drop_remainder = batch_size, drop_remainder

  def __iter__(self):
    return _PlanIterator(self)


class BucketedBatches(_Batches):
  """Fixed-shape batches by length bucket: (batch_size // process_count, bucket).

  An epoch has ceil(N / batch_size) batches (floor of each bucket's count when
  `drop_remainder`), computed from the manifest. Without `shuffle` the keys come in record
  order and each example appears exactly once per epoch across processes (exact metrics).
  Batch: input_ids, attention_mask, token_type_ids, labels, weights (1 real, 0 dummy), index
  (record key, -1 dummy).
  """

  def __init__(self, prepared: shards.Prepared, *, batch_size: int,
               buckets: Sequence[int] = (32, 64, 128), seed: int = 0, shuffle: bool = True,
               drop_remainder: bool = False, process_index: int = 0, process_count: int = 1,
               pad_id: int = 0, regression: bool | None = None,
               keys: tuple[int, int] | None = None):
    self.local_batch_size = _check_hosts(batch_size, process_index, process_count)
    buckets = tuple(int(b) for b in buckets)
    if not buckets or buckets[0] < 1 or any(a >= b for a, b in zip(buckets, buckets[1:])):
      raise ValueError(f"buckets must be positive and strictly increasing, got {buckets}")
    self.prepared, self.batch_size, self.buckets = prepared, batch_size, buckets
    self.seed, self.shuffle, self.drop_remainder = seed, shuffle, drop_remainder
    self.process_index, self.pad_id = process_index, pad_id
    if regression is None:
      regression = prepared.manifest.get("labels") == "regression"
    self.label_dtype = np.float32 if regression else np.int32
    start, stop = keys if keys is not None else (0, prepared.num_examples)
    if not 0 <= start < stop <= prepared.num_examples:
      raise ValueError(f"{prepared.path}: keys [{start}, {stop}) outside its "
                       f"{prepared.num_examples} examples")
    self.start, self.n = start, stop - start
    # Bucket of each key in [start, stop), by key - start.
    self._bucket = _bucket_of(prepared.lengths(start, stop), buckets, prepared.path)
    self._counts = np.bincount(self._bucket, minlength=len(buckets))
    full = int((self._counts // batch_size).sum())
    self.batches_per_epoch = full if drop_remainder else -(-self.n // batch_size)
    self._source = prepared.source()
    self._it = None

  @property
  def shapes(self) -> list[tuple[int, int]]:
    least = self.batch_size if self.drop_remainder else 1
    return [(self.local_batch_size, b) for b, n in zip(self.buckets, self._counts, strict=True)
            if n >= least]

  def spec(self) -> dict:
    return {"kind": "bucketed", "batch_size": self.batch_size, "buckets": list(self.buckets),
            "seed": self.seed, "shuffle": self.shuffle, "drop_remainder": self.drop_remainder,
            "keys": [self.start, self.start + self.n], **self.prepared.spec()}

  def _dataset(self) -> grain.IterDataset:
    keys = grain.MapDataset.range(self.start, self.start + self.n)
    keys = (keys.shuffle(seed=self.seed) if self.shuffle else keys).repeat()
    plan = _BucketPlan(self.n, self.start, self._bucket, keys, self.buckets, self.batch_size,
                       self.drop_remainder)
    return gx.ThreadPrefetchIterDataset(plan.map(self._read), prefetch_buffer_size=2)

  def _read(self, plan: dict) -> dict[str, np.ndarray]:
    rows = plan["rows"]
    real_all = rows >= 0
    length = self.buckets[int(self._bucket[rows[real_all] - self.start].max())]
    lo = self.process_index * self.local_batch_size
    rows = rows[lo:lo + self.local_batch_size]
    real = rows >= 0
    keys = [int(k) for k in rows[real]]
    batch = _padded_rows(self._source.__getitems__(keys) if keys else [], rows, length,
                         self.pad_id, self.label_dtype)
    return {**batch, "weights": real.astype(np.float32), "index": rows.astype(np.int32)}

  def iter_epoch(self, epoch: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """One epoch's batches (evaluation: shuffle=False)."""
    it = iter(self._dataset())
    try:
      if epoch:
        it.set_state({"epoch": epoch, "consumed": 0, "waiting": [[] for _ in self.buckets],
                      "tail": []})
      for _ in range(self.batches_per_epoch):
        yield next(it)
    finally:
      it.close()

  def padding_fraction(self) -> float:
    """Token slots of an epoch that hold padding (dummy rows included)."""
    slots = real = 0
    for batch in self.iter_epoch():
      slots += batch["input_ids"].size
      real += int(batch["attention_mask"].sum())
    return 1.0 - real / slots if slots else 0.0


# ---------------------------------------------------------------------------------------------
# In-memory fixed-shape features.

class ArrayBatches(_Batches):
  """Batches of pre-padded arrays (SQuAD windows, seq2seq layouts) through the same Grain
  shuffle/batch/per-process slicing; dummy rows (index -1, weight 0) pad the last batch."""

  def __init__(self, arrays: dict[str, np.ndarray], *, batch_size: int, seed: int = 0,
               shuffle: bool = True, drop_remainder: bool = False, process_index: int = 0,
               process_count: int = 1):
    self.local_batch_size = _check_hosts(batch_size, process_index, process_count)
    sizes = {len(v) for k, v in arrays.items() if k != "offsets"}
    if len(sizes) != 1:
      raise ValueError(f"arrays have different lengths: { {k: len(v) for k, v in arrays.items()} }")
    self.arrays = {k: np.asarray(v) for k, v in arrays.items() if k != "offsets"}
    (self.n,) = sizes
    self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
    self.drop_remainder, self.process_index = drop_remainder, process_index
    self.batches_per_epoch = self.n // batch_size if drop_remainder else -(-self.n // batch_size)
    self._it = None

  def spec(self) -> dict:
    return {"kind": "arrays", "batch_size": self.batch_size, "seed": self.seed,
            "shuffle": self.shuffle, "drop_remainder": self.drop_remainder, "examples": self.n}

  def _dataset(self, repeat: bool = True) -> grain.IterDataset:
    keys = grain.MapDataset.range(self.n)
    keys = keys.shuffle(seed=self.seed) if self.shuffle else keys
    keys = keys.batch(self.batch_size, drop_remainder=self.drop_remainder)
    keys = keys.repeat() if repeat else keys
    # Grain's default read-ahead (16 threads, 500 elements) would build 500 batches up front.
    return keys.map(self._read).to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))

  def _read(self, rows) -> dict[str, np.ndarray]:
    rows = np.concatenate([rows, np.full(self.batch_size - len(rows), -1)]).astype(np.int64)
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
    yield from iter(self._dataset(repeat=False))
