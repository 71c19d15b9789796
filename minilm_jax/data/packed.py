"""Packed rows for distillation: `PackedBatches`, a Grain pipeline (see pipeline.py) whose
packing is planned from the lengths files, so records are read only once a batch is decided."""

from __future__ import annotations

import math
import struct

import grain
import grain.experimental as gx
import numpy as np

from minilm_jax.data import shards
from minilm_jax.data.pipeline import _Batches, _check_hosts

_HEAD = struct.Struct("<ii")  # a record's token count and first type-1 token (shards.py)


class _KeyLengths:
  """Record key -> token count from the shards' memory-mapped lengths files (2 bytes an
  example; only the pages of the keys looked up are ever read)."""

  def __init__(self, prepared: shards.Prepared):
    entries = prepared.manifest["shards"]
    self.parts = [np.load(prepared.path / e["lengths"], mmap_mode="r") for e in entries]
    self.ends = np.cumsum([e["examples"] for e in entries])

  def __call__(self, keys: np.ndarray) -> np.ndarray:
    shard = np.searchsorted(self.ends, keys, side="right")
    lo = np.concatenate([[0], self.ends])[shard]
    out = np.empty(len(keys), np.int64)
    for i in np.unique(shard):
      sel = shard == i
      out[sel] = self.parts[i][keys[sel] - lo[sel]]
    return out


class _PackIterator(grain.DatasetIterator):
  """One data shard's packed rows, planned from the lengths alone: keys in Grain's shuffled
  order (`grain.experimental.index_shuffle`, a new permutation each epoch), each into the
  first of `num_bins` open rows it fits; when it fits none, the fullest row is closed. A batch
  is `rows` closed rows; only then are its records read (`shards.Records`, by key).
  State: (epoch, keys placed, the keys in each open and closed-but-unsent row): exact."""

  def __init__(self, p: PackedBatches, s: int):
    super().__init__()
    self.p, self.s = p, s
    self.n = p.stop - p.start
    self.size = len(range(s, self.n, p.num_shards))  # this shard's keys an epoch
    self._epoch, self._pos, self._open, self._closed = 0, 0, [], []
    self._ahead = (0, 0, np.zeros(0, np.int64), np.zeros(0, np.int64))

  def keys(self, epoch: int, lo: int, hi: int) -> np.ndarray:
    """Keys at this shard's positions [lo, hi) of `epoch`."""
    seed = (self.p.seed + epoch) % 2**32
    return np.fromiter((gx.index_shuffle(j * self.p.num_shards + self.s, max_index=self.n - 1,
                                         seed=seed, rounds=4) for j in range(lo, hi)),
                       np.int64, hi - lo) + self.p.start

  def _next_key(self) -> tuple[int, int]:
    epoch, lo, keys, lengths = self._ahead
    if epoch != self._epoch or not lo <= self._pos < lo + len(keys):
      hi = min(self._pos + 4096, self.size)
      keys = self.keys(self._epoch, self._pos, hi)
      self._ahead = (self._epoch, self._pos, keys, self.p._lengths(keys))
      epoch, lo, keys, lengths = self._ahead
    i = self._pos - lo
    self._pos += 1
    if self._pos == self.size:
      self._epoch, self._pos = self._epoch + 1, 0
    return int(keys[i]), int(lengths[i])

  def __next__(self):
    p = self.p
    while len(self._closed) < p.rows_per_shard:
      key, n = self._next_key()
      for row in self._open:
        if row[0] + n <= p.seq_len:
          row[0] += n
          row.append(key)
          break
      else:
        if len(self._open) == p.num_bins:
          fullest = max(range(len(self._open)), key=lambda r: self._open[r][0])
          self._closed.append(self._open.pop(fullest)[1:])
        self._open.append([n, key])
    rows, self._closed = self._closed[:p.rows_per_shard], self._closed[p.rows_per_shard:]
    return p._read_rows(rows)

  def get_state(self):
    return {"epoch": self._epoch, "placed": self._pos, "open": [list(r) for r in self._open],
            "closed": [list(r) for r in self._closed]}

  def set_state(self, state):
    if not 0 <= int(state["placed"]) < max(self.size, 1):
      raise ValueError("another corpus or shard layout")
    self._epoch, self._pos = int(state["epoch"]), int(state["placed"])
    self._open = [list(map(int, r)) for r in state["open"]]
    self._closed = [list(map(int, r)) for r in state["closed"]]


class _PackShard(grain.IterDataset):
  def __init__(self, p: PackedBatches, s: int):
    super().__init__()
    self.p, self.s = p, s

  def __iter__(self):
    return _PackIterator(self.p, self.s)


class PackedBatches(_Batches):
  """Rows of `seq_len` tokens packed with several examples each (segment ids 1, 2, ...; 0 pad).

  The global batch is cut into `num_shards` data shards (default: one per process), each
  shuffled, read and packed on its own; process p owns shards p*S/P .. (p+1)*S/P - 1 and
  concatenates their rows. The batches therefore depend on (seed, batch_size, num_shards), not
  on the process count: 2 processes x 4 devices and 1 process x 8 devices with num_shards=2
  train on the same rows. Bins fill across epoch boundaries; an epoch is nominal
  (`batches_per_epoch` = the corpus's tokens over the batch's token slots).

  Batch: input_ids, token_type_ids, segment_ids, attention_mask (segment > 0), example_index
  (the record key of each token, -1 at padding), weights (1 per row), index (first key of each
  row).
  """

  def __init__(self, prepared: shards.Prepared, *, batch_size: int, seq_len: int, seed: int = 0,
               process_index: int = 0, process_count: int = 1, num_shards: int | None = None,
               num_bins: int | None = None, pad_id: int = 0,
               keys: tuple[int, int] | None = None):
    local = _check_hosts(batch_size, process_index, process_count)
    num_shards = num_shards or process_count
    if num_shards % process_count or batch_size % num_shards:
      raise ValueError(f"num_shards {num_shards} must be a multiple of process_count "
                       f"{process_count} and divide batch_size {batch_size}")
    self.start, self.stop = keys if keys is not None else (0, prepared.num_examples)
    if not 0 <= self.start < self.stop <= prepared.num_examples:
      raise ValueError(f"{prepared.path}: keys [{self.start}, {self.stop}) outside its "
                       f"{prepared.num_examples} examples")
    longest = int(np.max(np.flatnonzero(prepared.manifest["length_histogram"])))
    if longest > seq_len:
      raise ValueError(f"{prepared.path}: examples of up to {longest} tokens do not fit rows "
                       f"of seq_len {seq_len}")
    self.prepared, self.batch_size, self.local_batch_size = prepared, batch_size, local
    self.seq_len, self.seed, self.num_shards, self.pad_id = seq_len, seed, num_shards, pad_id
    self.rows_per_shard = batch_size // num_shards
    self.num_bins = num_bins or max(self.rows_per_shard, 16)
    per = num_shards // process_count
    self.own_shards = list(range(process_index * per, (process_index + 1) * per))
    self._lengths, self._source = _KeyLengths(prepared), prepared.source()
    share = (self.stop - self.start) / prepared.num_examples
    self.batches_per_epoch = max(1, math.ceil(share * prepared.manifest["tokens"]
                                              / (batch_size * seq_len)))
    self._it = None

  def spec(self) -> dict:
    return {"kind": "packed", "batch_size": self.batch_size, "seq_len": self.seq_len,
            "seed": self.seed, "num_shards": self.num_shards, "num_bins": self.num_bins,
            "keys": [self.start, self.stop], **self.prepared.spec()}

  def _shard_keys(self, s: int, epoch: int = 0) -> np.ndarray:
    """Data shard s's record keys in `epoch`: every num_shards-th of the shuffled order."""
    it = _PackIterator(self, s)
    return it.keys(epoch, 0, it.size)

  def _shard(self, s: int) -> grain.IterDataset:
    if self.stop - self.start < self.num_shards:
      raise ValueError(f"{self.prepared.path}: {self.stop - self.start} examples for "
                       f"{self.num_shards} data shards")
    return _PackShard(self, s)

  def _read_rows(self, rows: list[list[int]]) -> dict[str, np.ndarray]:
    """Packed rows of the given keys: one batched read, then slices into (rows, seq_len)."""
    b, L = len(rows), self.seq_len
    keys = [k for row in rows for k in row]
    records = iter(self._source.__getitems__(keys))
    input_ids = np.full((b, L), self.pad_id, np.int32)
    token_types = np.zeros((b, L), np.int32)
    segment_ids = np.zeros((b, L), np.int32)
    example_index = np.full((b, L), -1, np.int32)
    for r, row in enumerate(rows):  # the hot loop: no per-record numpy beyond one view
      at = 0
      for seg, key in enumerate(row, 1):
        rec = next(records)
        n, split = _HEAD.unpack_from(rec)
        end = at + n
        input_ids[r, at:end] = np.frombuffer(rec, np.int32, n, shards.HEADER_BYTES)
        token_types[r, at + split:end] = 1
        segment_ids[r, at:end] = seg
        example_index[r, at:end] = key
        at = end
    return {"input_ids": input_ids, "token_type_ids": token_types, "segment_ids": segment_ids,
            "attention_mask": (segment_ids > 0).astype(np.int32), "example_index": example_index,
            "weights": np.ones(b, np.float32), "index": example_index[:, 0].copy()}

  def _dataset(self) -> grain.IterDataset:
    parts = [self._shard(s) for s in self.own_shards]
    ds = parts[0] if len(parts) == 1 else gx.ZipIterDataset(parts).map(_concat)
    return gx.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=2)

  def iter_epoch(self, epoch: int = 0):
    raise TypeError("packed batches are for training; evaluate over BucketedBatches")


def _concat(parts):
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
