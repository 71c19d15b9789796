"""Pairs and triplets for contrastive training, on the same prepared shards as everything else.

A pair source (JSONL/CSV/TSV, a tfds dataset's text features) is prepared once per role column: one
corpus each for anchor, positive and any negatives, in `<dir>/<role>/`, so that record i of every
role is row i of the source. `PairBatches` reads whole rows: Grain's global index shuffle (a new
permutation each epoch), global batches of keys, each process reading only its rows, every role
padded to the smallest length bucket that holds the global batch's longest text (so every process
pads the same). `MixedPairBatches` draws each global batch from one of several sources, picked by
weight with a seeded generator (the 2021 all-MiniLM recipe: in-batch negatives of one kind).

Batch: <role>_input_ids / _attention_mask / _token_type_ids (B, T) (negatives (B, K, T)),
<role>_text_id (B,) int32 (crc32 of the token ids: equal texts, equal ids), labels (B,) float32
(the anchor corpus's labels, e.g. STS scores), weights (B,), index (B,) row key.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import grain
import numpy as np

from minilm_jax.data import prepare as prepare_lib
from minilm_jax.data import shards
from minilm_jax.data.files import _check_columns, _jsonl_records
from minilm_jax.data.pipeline import _Batches, _bucket_of, _check_hosts, _padded_rows
from minilm_jax.data.sources import Source


def roles_of(num_negatives: int) -> list[str]:
  return ["anchor", "positive"] + [f"negative_{k}" for k in range(1, num_negatives + 1)]


def prepare_pairs(source: Source, columns: dict[str, str], out_dir: str | Path, *,
                  tokenizer_path, max_length: int, beam_args=None, resume: bool = False,
                  label_column: str | None = None) -> dict[str, shards.Prepared]:
  """Prepares each role's column of `source` into `out_dir/<role>`; `columns` maps anchor,
  positive[, negative_1, ...] to column names. `label_column` (a float, e.g. an STS score) goes
  with the anchors. Every row must have every column (an empty text is an error naming file
  and line, never a dropped row, which would misalign the roles)."""
  want = roles_of(len(columns) - 2)
  if sorted(columns) != sorted(want):
    raise ValueError(f"pair columns {sorted(columns)}; expected roles {want}")
  out = {}
  for role in want:
    column = {"text_key": columns[role], "windows": False} if source.kind == "tfds" else \
        {"text_column": columns[role]}
    role_source = dataclasses.replace(
        source, **column, pair_column=None, drop_empty=False,
        label_column=label_column if role == "anchor" else None,
        regression=label_column is not None and role == "anchor", label_names=None)
    out[role] = prepare_lib.prepare_once(role_source, Path(out_dir) / role,
                                         tokenizer_path=tokenizer_path, max_length=max_length,
                                         beam_args=beam_args, resume=resume)
  counts = {role: p.num_examples for role, p in out.items()}
  if len(set(counts.values())) != 1:
    raise shards.PreparedError(f"{out_dir}: roles prepared with different row counts {counts}")
  return out


def _text_ids(records) -> np.ndarray:
  return np.asarray([zlib.crc32(r[shards.HEADER_BYTES:]) & 0x7FFFFFFF for r in records],
                    np.int32)


class PairBatches(_Batches):
  """Global batches of rows of a prepared pair source (see the module docstring)."""

  def __init__(self, corpora: dict[str, shards.Prepared], *, batch_size: int, seed: int = 0,
               shuffle: bool = True, buckets: Sequence[int] = (32, 64, 128),
               process_index: int = 0, process_count: int = 1, pad_id: int = 0):
    self.local_batch_size = _check_hosts(batch_size, process_index, process_count)
    if batch_size < 2:
      raise ValueError(f"in-batch negatives need a global batch of at least 2, got {batch_size}")
    # One role alone (the queries or the documents of a RetrievalCorpus), or whole rows.
    self.roles = list(corpora) if len(corpora) == 1 else roles_of(len(corpora) - 2)
    if sorted(corpora) != sorted(self.roles) or (
        len(corpora) == 1 and self.roles[0] not in ("anchor", "positive")):
      raise ValueError(f"pair corpora {sorted(corpora)}; expected roles {self.roles}")
    self.corpora = {r: corpora[r] for r in self.roles}
    self.n = self.corpora[self.roles[0]].num_examples
    self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
    self.buckets, self.process_index, self.pad_id = tuple(buckets), process_index, pad_id
    self._bucket = {r: _bucket_of(p.lengths(), self.buckets, p.path)
                    for r, p in self.corpora.items()}
    self._sources = {r: p.source() for r, p in self.corpora.items()}
    self.batches_per_epoch = -(-self.n // batch_size)
    self._it = None

  def spec(self) -> dict:
    return {"kind": "pairs", "batch_size": self.batch_size, "seed": self.seed,
            "shuffle": self.shuffle, "buckets": list(self.buckets),
            "roles": {r: p.spec() for r, p in self.corpora.items()}}

  def _dataset(self, repeat: bool = True) -> grain.IterDataset:
    keys = grain.MapDataset.range(self.n)
    keys = keys.shuffle(seed=self.seed) if self.shuffle else keys
    keys = keys.repeat() if repeat else keys
    return keys.batch(self.batch_size).map(self._read).to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))

  def _read(self, keys: np.ndarray) -> dict[str, np.ndarray]:
    rows = np.full(self.batch_size, -1, np.int64)
    rows[:len(keys)] = keys
    lo = self.process_index * self.local_batch_size
    mine = rows[lo:lo + self.local_batch_size]
    real = mine >= 0
    batch = {"weights": real.astype(np.float32), "index": mine.astype(np.int32)}
    # Each role padded to the bucket of the global batch's longest text (the same on every
    # host); the negatives to their longest, stacked (B, K, T).
    width = {r: self.buckets[int(self._bucket[r][keys].max())] for r in self.roles}
    negatives = [r for r in self.roles if r.startswith("negative_")]
    if negatives:
      width.update(dict.fromkeys(negatives, max(width[r] for r in negatives)))
    parts = {}
    for role in self.roles:
      records = self._sources[role].__getitems__(mine[real]) if real.any() else []
      parts[role] = _padded_rows(records, mine, width[role], self.pad_id)
      text_id = np.full(len(mine), -1, np.int32)  # padding rows: no text
      text_id[real] = _text_ids(records)
      parts[role]["text_id"] = text_id
      labels = parts[role].pop("labels")
      if role == "anchor" or len(self.roles) == 1:
        batch["labels"] = labels  # the anchors' (e.g. STS scores)
    for role in ("anchor", "positive"):
      if role in parts:
        batch.update({f"{role}_{k}": v for k, v in parts[role].items()})
    if negatives:
      batch.update({f"negative_{k}": np.stack([parts[r][k] for r in negatives], 1)
                    for k in parts[negatives[0]]})
    return batch

  def iter_epoch(self, epoch: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """One pass in row order (evaluation)."""
    del epoch
    yield from iter(self._dataset(repeat=False))


class MixedPairBatches(_Batches):
  """Each global batch from one of `parts`, chosen by `weights` with a generator seeded by
  (seed, step): every process picks the same part. State: the step and each part's state."""

  def __init__(self, parts: Sequence[PairBatches], weights: Sequence[float], *, seed: int = 0):
    if len(parts) != len(weights) or not parts:
      raise ValueError(f"{len(parts)} pair sources for {len(weights)} weights")
    w = np.asarray(weights, np.float64)
    if (w < 0).any() or w.sum() <= 0:
      raise ValueError(f"source weights {list(weights)} must be >= 0 with a positive sum")
    sizes = {p.batch_size for p in parts}
    if len(sizes) != 1:
      raise ValueError(f"pair sources with different batch sizes {sorted(sizes)}")
    self.parts, self.p, self.seed = list(parts), w / w.sum(), seed
    self.batch_size = parts[0].batch_size
    self.local_batch_size = parts[0].local_batch_size
    self.batches_per_epoch = sum(p.batches_per_epoch for p in parts)
    self._step = 0

  def spec(self) -> dict:
    return {"kind": "mixed_pairs", "seed": self.seed, "weights": self.p.tolist(),
            "parts": [p.spec() for p in self.parts]}

  def _pick(self, step: int) -> int:
    return int(np.random.default_rng([self.seed, step]).choice(len(self.parts), p=self.p))

  def __iter__(self):
    iters = [p._iterator() for p in self.parts]
    while True:
      part = self._pick(self._step)
      self._step += 1
      yield next(iters[part])

  def state(self) -> dict:
    return {"step": self._step, "parts": [p.state() for p in self.parts]}

  def restore(self, state: dict) -> None:
    if len(state.get("parts", ())) != len(self.parts):
      raise ValueError(f"data state for {len(state.get('parts', ()))} pair sources, this run "
                       f"mixes {len(self.parts)}")
    self._step = int(state["step"])
    for p, s in zip(self.parts, state["parts"], strict=True):
      p.restore(s)

  def close(self) -> None:
    for p in self.parts:
      p.close()


class EvalSets:
  """Evaluation sets read as one: `{name: (kind, what)}`:
    "sts"        a PairBatches of (sentence, sentence) rows, anchor labels the gold scores;
    "retrieval"  a PairBatches of (query, relevant document) rows: each query ranks the set's
                 distinct documents (by text id);
    "corpus"     a `RetrievalCorpus`: queries and documents with ids and qrels, as
                 sentence-transformers' InformationRetrievalEvaluator takes them.
  Each batch carries `eval_set` (the set's position) and `eval_part` (0 queries or pairs, 1
  corpus documents), for `contrastive.objective`'s metrics."""

  KINDS = ("sts", "retrieval", "corpus")

  def __init__(self, sets: dict[str, tuple[str, object]]):
    for name, (kind, _) in sets.items():
      if kind not in self.KINDS:
        raise ValueError(f"eval set {name!r}: kind {kind!r}, one of {self.KINDS}")
    self.sets = dict(sets)

  @property
  def kinds(self) -> list[tuple[str, str]]:
    return [(name, kind) for name, (kind, _) in self.sets.items()]

  def relevant(self, i: int) -> list[list[int]] | None:
    kind, what = list(self.sets.values())[i]
    return what.relevant if kind == "corpus" else None

  def iter_epoch(self, epoch: int = 0) -> Iterator[dict[str, np.ndarray]]:
    for i, (kind, what) in enumerate(self.sets.values()):
      parts = (what.queries, what.documents) if kind == "corpus" else (what,)
      for part, batches in enumerate(parts):
        for batch in batches.iter_epoch(epoch):
          n = len(batch["weights"])
          yield {**batch, "eval_set": np.full(n, i, np.int32),
                 "eval_part": np.full(n, part, np.int32)}


def _ids(path: Path, column: str) -> list[str]:
  out = []
  for line, rec in _jsonl_records(path, "utf-8"):
    _check_columns(path, line, rec, [column])
    out.append(str(rec[column]))
  return out


@dataclasses.dataclass
class RetrievalCorpus:
  """Queries and documents (JSONL rows with an id and a text column, each prepared as its own
  corpus) and qrels (JSONL rows: query id, document id[, score > 0 = relevant]); `relevant[q]`
  lists the document record indices relevant to query record q."""
  queries: PairBatches
  documents: PairBatches
  relevant: list[list[int]]

  @classmethod
  def prepare(cls, queries: str | Path, documents: str | Path, qrels: str | Path,
              out_dir: str | Path, *, batch_size: int, id_column: str = "id",
              text_column: str = "text", tokenizer_path, max_length: int, beam_args=None,
              resume: bool = False, **batch_kw) -> RetrievalCorpus:
    parts = {}
    for role, path in (("anchor", queries), ("positive", documents)):
      source = Source("jsonl", paths=(str(path),), text_column=text_column)
      corpus = prepare_lib.prepare_once(source, Path(out_dir) / role,
                                        tokenizer_path=tokenizer_path, max_length=max_length,
                                        beam_args=beam_args, resume=resume)
      parts[role] = (PairBatches({role: corpus}, batch_size=batch_size, shuffle=False,
                                 **batch_kw), _ids(Path(path), id_column))
    q_index = {q: i for i, q in enumerate(parts["anchor"][1])}
    d_index = {d: i for i, d in enumerate(parts["positive"][1])}
    relevant: list[list[int]] = [[] for _ in q_index]
    for line, rec in _jsonl_records(Path(qrels), "utf-8"):
      _check_columns(qrels, line, rec, ["query_id", "doc_id"])
      q, d = str(rec["query_id"]), str(rec["doc_id"])
      for what, key, index in (("query", q, q_index), ("document", d, d_index)):
        if key not in index:
          raise ValueError(f"{qrels}, line {line}: unknown {what} id {key!r}")
      if float(rec.get("score", 1)) > 0:
        relevant[q_index[q]].append(d_index[d])
    keep = [i for i, r in enumerate(relevant) if r]
    if len(keep) != len(relevant):  # as InformationRetrievalEvaluator: queries with a qrel
      raise ValueError(f"{qrels}: {len(relevant) - len(keep)} of {len(relevant)} queries in "
                       f"{queries} have no relevant document")
    return cls(parts["anchor"][0], parts["positive"][0], relevant)
