"""A prepared corpus on disk: ArrayRecord shards of token ids, a lengths file per shard and a
manifest written last.

  <dir>/manifest.json                    what the shards hold (written last, atomically)
  <dir>/shard-00000-of-00004.array_record  one record per example (`encode_record`)
  <dir>/shard-00000-of-00004.lengths.npy   uint16 token counts, record order (buckets, packing)
  <dir>/prepare.failed.json              instead of a manifest, when preparation failed

`open_prepared` is the only way in: it checks the manifest, the tokenizer fingerprint and every
shard's size before a single record is read, so a corpus from another tokenizer, a truncated
shard or a half-written preparation fails at start-up with the file named.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import threading
from pathlib import Path

import numpy as np

FORMAT = "minilm_jax.prepared/1"
_COUNT = struct.Struct("<i")
MANIFEST = "manifest.json"
FAILED = "prepare.failed.json"
HEADER_BYTES = 16  # int32 length, int32 first type-1 token, float64 label


def encode_record(input_ids, token_type_ids, label: float) -> bytes:
  """One example: (n, type split, label, ids). Token types are 0 up to `split`, then 1, which
  is what every tokenizer template here produces (BERT pairs: [CLS] A [SEP] | B [SEP])."""
  ids = np.asarray(input_ids, np.int32)
  types = np.asarray(token_type_ids, np.int32)
  ones = np.flatnonzero(types)
  split = int(ones[0]) if len(ones) else len(ids)
  if len(ones) and (len(ones) != len(ids) - split or np.any(types[split:] != 1)):
    raise ValueError(f"token types {types.tolist()} are not 0...0 1...1")
  head = np.array([len(ids), split], np.int32).tobytes() + np.float64(label).tobytes()
  return head + ids.tobytes()


def decode_record(record: bytes) -> tuple[np.ndarray, np.ndarray, float]:
  """(input_ids, token_type_ids, label) of `encode_record`'s bytes."""
  n, split = np.frombuffer(record, np.int32, 2)
  if len(record) != HEADER_BYTES + 4 * int(n):
    raise ValueError(f"record of {len(record)} bytes, its header says {HEADER_BYTES + 4 * int(n)}")
  ids = np.frombuffer(record, np.int32, int(n), HEADER_BYTES)
  types = (np.arange(n, dtype=np.int32) >= split).astype(np.int32)
  return ids, types, float(np.frombuffer(record, np.float64, 1, 8)[0])


def fingerprint(tok, max_length: int) -> dict:
  """What the token ids depend on: the tokenizer kind and its whole serialised pipeline
  (vocabulary, normaliser, pre-tokeniser), hashed, and the truncation length."""
  backend = tok.backend.to_str().encode()
  return {"kind": tok.kind, "vocab_size": int(tok.vocab_size),
          "vocab_sha256": hashlib.sha256(backend).hexdigest()[:16], "max_length": int(max_length)}


def _describe(fp: dict) -> str:
  return (f"{fp.get('kind')} tokenizer, vocab {fp.get('vocab_size')} "
          f"#{fp.get('vocab_sha256')}, max_length {fp.get('max_length')}")


def shard_name(i: int, n: int) -> str:
  return f"shard-{i:05d}-of-{n:05d}.array_record"


def write_json_atomic(path: Path, obj: dict) -> None:
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  tmp.write_text(json.dumps(obj, indent=1))
  os.replace(tmp, path)


class PreparedError(ValueError):
  """A prepared corpus that cannot be read as it is; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Prepared:
  """An opened, checked corpus: record i of the concatenated shards is example i."""

  path: Path
  manifest: dict

  @property
  def shards(self) -> list[Path]:
    return [self.path / s["file"] for s in self.manifest["shards"]]

  @property
  def label_names(self) -> list[str] | None:
    return self.manifest.get("label_names")

  @property
  def num_examples(self) -> int:
    return int(self.manifest["examples"])

  def lengths(self, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Token counts of records [start, stop) (default all), from the memory-mapped lengths
    files (2 bytes an example) of only the shards that hold them."""
    stop = self.num_examples if stop is None else stop
    parts, lo = [], 0
    for s in self.manifest["shards"]:
      hi = lo + s["examples"]
      if hi > start and lo < stop:
        part = np.load(self.path / s["lengths"], mmap_mode="r")
        parts.append(part[max(start - lo, 0):min(stop, hi) - lo])
      lo = hi
    return np.concatenate(parts) if parts else np.zeros(0, np.uint16)

  def source(self) -> Records:
    """The shards as one random-access source of raw records."""
    return Records(self)

  def spec(self) -> dict:
    """What the checkpointed data position depends on: which records, in which order."""
    return {"corpus": self.manifest["fingerprint"], "examples": self.num_examples,
            "corpus_id": self.manifest["id"]}


class Records:
  """The shards as one random-access source of raw records (Grain's RandomAccessDataSource
  protocol: `len`, `[key]`, `__getitems__`), read through array_record's reader, one per
  shard and thread, by seek + read: ~4.5 us a record whatever the shard's size.

  Not `grain.sources.ArrayRecordDataSource`: its batched read allocates a slot for every chunk
  of the file on each call (with group_size 1, a chunk a record), 2.3 ms a call on a
  1.2M-record shard however few keys it asks for, which bounded a packed batch of short
  records to 0.5 M tokens/s. A record that cannot be read or decoded names its shard (riegeli
  checks each chunk's hash, so flipped bytes fail here instead of training on them)."""

  _OPTIONS = "readahead_buffer_size:0,max_parallelism:0"  # random access, no thread pool

  def __init__(self, prepared: Prepared):
    self._prepared = prepared
    counts = [s["examples"] for s in prepared.manifest["shards"]]
    self._ends = np.cumsum(counts)
    self._starts = self._ends - counts
    self._local = threading.local()

  def __len__(self) -> int:
    return self._prepared.num_examples

  def __getstate__(self):  # readers stay in the process (and thread) that opened them
    return {k: v for k, v in self.__dict__.items() if k != "_local"}

  def __setstate__(self, state):
    self.__dict__.update(state, _local=threading.local())

  def _reader(self, shard: int):
    readers = self._local.__dict__.setdefault("readers", {})
    if shard not in readers:
      from array_record.python.array_record_module import ArrayRecordReader
      readers[shard] = ArrayRecordReader(str(self._prepared.shards[shard]), self._OPTIONS,
                                         file_reader_buffer_size=4096)
    return readers[shard]

  def __getitem__(self, key) -> bytes:
    return self.__getitems__([key])[0]

  def __getitems__(self, keys) -> list[bytes]:
    keys = np.asarray(keys, np.int64)
    if len(keys) and (keys.min() < 0 or keys.max() >= len(self)):
      raise IndexError(f"{self._prepared.path}: keys outside its {len(self)} records")
    shard = np.searchsorted(self._ends, keys, side="right")
    out = []
    for key, s, pos in zip(keys.tolist(), shard.tolist(), (keys - self._starts[shard]).tolist()):
      try:
        reader = self._reader(s)
        reader.seek(pos)
        record = reader.read()
      except Exception as e:  # noqa: BLE001 - riegeli raises plain RuntimeError/ValueError
        self._local.__dict__.get("readers", {}).pop(s, None)  # a failed reader stays failed
        raise PreparedError(f"{self._prepared.shards[s]}: corrupt shard, record {key} cannot "
                            f"be read ({str(e).splitlines()[0][:200]}); prepare the corpus "
                            "again") from None
      if len(record) < HEADER_BYTES or \
          len(record) != HEADER_BYTES + 4 * _COUNT.unpack_from(record)[0]:
        raise PreparedError(f"{self._prepared.shards[s]}: corrupt record {key} "
                            f"({len(record)} bytes); prepare the corpus again")
      out.append(record)
    return out


def open_prepared(path: str | Path, *, tokenizer=None, max_length: int | None = None,
                  label_names=None) -> Prepared:
  """Opens a prepared corpus and checks it before anything is read.

  With `tokenizer` (and `max_length`), the corpus must have been prepared with the same
  tokenizer and length: a mismatch names both fingerprints. `label_names` must equal the
  prepared label set when both exist.
  """
  path = Path(path)
  manifest_path = path / MANIFEST
  if (path / FAILED).is_file() and not manifest_path.is_file():
    failed = json.loads((path / FAILED).read_text())
    raise PreparedError(f"{path / FAILED}: the preparation of {path} failed "
                        f"({failed.get('error', '?')}); fix the source and run train.prepare "
                        "again")
  if not manifest_path.is_file():
    raise PreparedError(f"{manifest_path}: no manifest, so {path} is not a completed "
                        "preparation (still running, crashed, or never prepared); run "
                        "python -m train.prepare")
  try:
    manifest = json.loads(manifest_path.read_text())
  except json.JSONDecodeError as e:
    raise PreparedError(f"{manifest_path}: not valid JSON ({e.msg}, line {e.lineno})") from None
  if manifest.get("format") != FORMAT or manifest.get("status") != "complete":
    raise PreparedError(f"{manifest_path}: format {manifest.get('format')!r}, status "
                        f"{manifest.get('status')!r}; expected {FORMAT!r}, 'complete'. Prepare "
                        "the corpus again with this version")
  for s in manifest["shards"]:
    for key in ("file", "lengths"):
      f = path / s[key]
      if not f.is_file():
        raise PreparedError(f"{f}: missing shard file listed in {manifest_path}")
    size = (path / s["file"]).stat().st_size
    if size != s["bytes"]:
      raise PreparedError(f"{path / s['file']}: truncated or rewritten shard ({size} bytes, "
                          f"the manifest says {s['bytes']}); prepare the corpus again")
  if tokenizer is not None:
    want = fingerprint(tokenizer, max_length if max_length is not None
                       else manifest["fingerprint"]["max_length"])
    have = manifest["fingerprint"]
    if have != want:
      raise PreparedError(f"{manifest_path}: prepared with {_describe(have)}, but this run "
                          f"uses {_describe(want)}; prepare the corpus with this model's "
                          "tokenizer and max_length")
  if label_names is not None and manifest.get("label_names") is not None and \
      list(label_names) != list(manifest["label_names"]):
    raise PreparedError(f"{manifest_path}: label set {manifest['label_names']}, this run "
                        f"expects {list(label_names)}")
  return Prepared(path, manifest)
