"""Preparation: a source -> tokenised ArrayRecord shards + manifest, as an Apache Beam pipeline.

The driver cuts the source into splits (byte ranges of large line files, cut at line or blank-line
boundaries; tfds index ranges; chunks of in-memory examples) and Beam runs one `_WriteShard` per
split: read, tokenise with the model's own tokenizer, write `shard-i-of-n` under a temporary
name, rename. No example crosses workers, so the local runner's processes scale on one machine
and Dataflow/Flink/Spark runners (`beam_args`) scale past it. When every shard is written the
driver writes the manifest, last and atomically; a failed split writes `prepare.failed.json`
instead, so a crashed or failed preparation never looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from minilm_jax.data import shards, sources
from minilm_jax.data.sources import Source

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Tokenising and writing one shard.

def _windows(tok, text: str, max_length: int) -> Iterator[tuple[list[int], list[int]]]:
  """A document's tokens cut into consecutive windows of max_length (specials included)."""
  ids = tok.encode(text)
  room = max_length - tok.num_special_tokens(False)
  for s in range(0, max(len(ids), 1), room):
    yield tok.build_inputs(ids[s:s + room])


def write_shard(tok, examples, path: Path, max_length: int, chunk: int = 1024) -> dict:
  """Tokenises `examples` into the ArrayRecord file `path` (via a temporary name) and its
  lengths file; returns the shard's entry for the manifest."""
  from array_record.python.array_record_module import ArrayRecordWriter
  tmp = path.with_name(f".{path.name}.tmp")
  writer = ArrayRecordWriter(str(tmp), "group_size:1")  # random access
  lengths, tokens, truncated, labeled = [], 0, 0, False

  def put(ids, types, label):
    nonlocal tokens
    writer.write(shards.encode_record(ids, types, label))
    lengths.append(len(ids))
    tokens += len(ids)

  buf: list[dict] = []

  def flush():
    nonlocal truncated, labeled
    plain = [ex for ex in buf if not ex.get("document")]
    for ex in buf:
      if ex.get("document"):
        for ids, types in _windows(tok, ex["text"], max_length):
          put(ids, types, np.nan)
    if plain:
      pairs = [ex["pair"] for ex in plain] if "pair" in plain[0] else None
      enc = tok([ex["text"] for ex in plain], pairs, max_length=max_length,
                truncation="longest_first", padding="do_not_pad", return_truncated=True)
      truncated += int(enc["truncated"].sum())
      for ex, ids, types in zip(plain, enc["input_ids"], enc["token_type_ids"], strict=True):
        labeled = labeled or "label" in ex
        put(ids, types, ex.get("label", np.nan))
    buf.clear()

  try:
    for ex in examples:
      buf.append(ex)
      if len(buf) == chunk:
        flush()
    flush()
  finally:
    writer.close()
  lengths_path = path.with_name(path.name.replace(".array_record", ".lengths.npy"))
  np.save(lengths_path, np.asarray(lengths, np.uint16))
  os.replace(tmp, path)
  return {"file": path.name, "lengths": lengths_path.name, "examples": len(lengths),
          "tokens": tokens, "truncated": truncated, "labeled": labeled,
          "bytes": path.stat().st_size}


class _WriteShard:
  """Beam DoFn body: (index, split) -> the shard's stats file (an error is a stats file too:
  the driver reports it with its file and line, whatever the runner did with exceptions)."""

  def __init__(self, out_dir: str, num_shards: int, tokenizer_path: str, max_length: int,
               source: Source, label_names):
    self.out_dir, self.num_shards = Path(out_dir), num_shards
    self.tokenizer_path, self.max_length = tokenizer_path, max_length
    self.source, self.label_names = source, label_names
    self.tok = None

  def __call__(self, item):
    if self.tok is None:
      from minilm_jax import tokenizer
      self.tok = tokenizer.load(self.tokenizer_path)
    index, split = item
    path = self.out_dir / shards.shard_name(index, self.num_shards)
    try:
      stats = write_shard(self.tok, sources.read_split(self.source, split, self.label_names), path,
                          self.max_length)
    except (ValueError, OSError) as e:
      stats = {"error": str(e)}
    shards.write_json_atomic(self.out_dir / f".stats-{index:05d}.json", stats)
    yield index


def default_beam_args(num_workers: int | None = None) -> list[str]:
  """Beam's local runner in multi-process mode, one worker per core (in-process for one).

  That is the FnApiRunner, named directly: the DirectRunner (Beam >= 2.6x) first tries the
  Prism runner, which downloads its binary from GitHub at run time (and waits on a machine
  without internet) before falling back to the FnApiRunner with these same options."""
  n = num_workers or os.cpu_count() or 1
  mode = "multi_processing" if n > 1 else "in_memory"
  return ["--runner=FnApiRunner", f"--direct_running_mode={mode}", f"--direct_num_workers={n}"]


def prepare_corpus(source: Source, out_dir: str | Path, *, tokenizer_path: str | Path,
                   max_length: int, beam_args: Sequence[str] | None = None,
                   overwrite: bool = False, split_bytes: int = 64 << 20,
                   examples_per_split: int = 20000) -> shards.Prepared:
  """Prepares `source` into `out_dir` and returns it opened. Raises ValueError (file and line
  named) on bad input, leaving `prepare.failed.json` and no manifest."""
  import apache_beam as beam
  from apache_beam.options.pipeline_options import PipelineOptions

  from minilm_jax import tokenizer as tokenizer_lib
  out = Path(out_dir)
  if (out / shards.MANIFEST).exists() and not overwrite:
    raise FileExistsError(f"{out / shards.MANIFEST}: {out} is already prepared; pass "
                          "overwrite to prepare it again")
  out.mkdir(parents=True, exist_ok=True)
  for f in [out / shards.MANIFEST, out / shards.FAILED, *out.glob("shard-*"),
            *out.glob(".stats-*"), *out.glob(".shard-*")]:
    f.unlink(missing_ok=True)
  t0 = time.perf_counter()
  tok = tokenizer_lib.load(tokenizer_path)
  fp = shards.fingerprint(tok, max_length)

  def fail(msg):
    shards.write_json_atomic(out / shards.FAILED, {"error": msg, "source": source.describe()})
    raise shards.PreparedError(msg)

  labels = sources.label_names(source)
  splits = sources.make_splits(source, split_bytes=split_bytes,
                               examples_per_split=examples_per_split)
  fn = _WriteShard(str(out), len(splits), str(tokenizer_path), max_length, source, labels)
  if beam_args is None:  # one split has nothing to spread: skip the worker processes' start-up
    beam_args = default_beam_args(1 if len(splits) == 1 else None)
  options = PipelineOptions(list(beam_args))
  try:
    with beam.Pipeline(options=options) as p:
      _ = (p | "splits" >> beam.Create(list(enumerate(splits)))
           | "spread" >> beam.Reshuffle()
           | "tokenise+write" >> beam.FlatMap(fn))
  except ModuleNotFoundError as e:  # Beam's IPython integration (a notebook) imports pandas
    if e.name != "pandas":
      raise
    raise ModuleNotFoundError(
        f"preparing {source.describe()} into {out}: Apache Beam inside IPython/Jupyter needs "
        "pandas; pip install 'minilm_jax[notebook]' (or pandas)", name="pandas") from e
  entries = []
  for i in range(len(splits)):
    stats_file = out / f".stats-{i:05d}.json"
    if not stats_file.is_file():
      fail(f"{out}: split {i} of {source.describe()} wrote no shard (the runner lost it)")
    stats = json.loads(stats_file.read_text())
    if "error" in stats:
      fail(stats["error"])
    entries.append(stats)
  total = sum(s["examples"] for s in entries)
  if total == 0:
    fail(f"{source.describe()}: empty source, no examples to prepare")
  hist = np.zeros(max_length + 1, np.int64)
  for s in entries:
    hist += np.bincount(np.load(out / s["lengths"]), minlength=max_length + 1)[:max_length + 1]
  manifest = {
      "format": shards.FORMAT, "status": "complete", "fingerprint": fp,
      "source": source.describe(), "examples": total,
      "tokens": sum(s["tokens"] for s in entries),
      "truncated": sum(s["truncated"] for s in entries),
      "pairs": source.pair_column is not None,
      "labels": ("regression" if source.regression else
                 "class" if any(s["labeled"] for s in entries) else None),
      "label_names": list(labels) if labels is not None else None,
      "length_histogram": hist.tolist(), "shards": entries,
      "seconds": round(time.perf_counter() - t0, 2)}
  manifest["id"] = hashlib.sha256(json.dumps(
      [fp, [(s["examples"], s["tokens"], s["bytes"]) for s in entries]]).encode()).hexdigest()[:16]
  for f in out.glob(".stats-*"):
    f.unlink(missing_ok=True)
  shards.write_json_atomic(out / shards.MANIFEST, manifest)
  log.info("prepared %s: %d examples, %d tokens in %d shards (%.1fs)", out, total,
           manifest["tokens"], len(entries), manifest["seconds"])
  if manifest["truncated"]:
    log.info("%d of %d examples (%.1f%%) were truncated to max_length %d", manifest["truncated"],
             total, 100 * manifest["truncated"] / total, max_length)
  return shards.open_prepared(out)


def prepare_once(source: Source, out_dir: str | Path, *, tokenizer_path: str | Path,
                 max_length: int, beam_args: Sequence[str] | None = None,
                 resume: bool = False) -> shards.Prepared:
  """`out_dir` prepared from `source`, reusing an earlier, complete preparation of the same
  source with the same tokenizer (a resumed run must read the same records). A resumed run
  whose corpus there came from another source fails instead of replacing it. With several
  processes, process 0 prepares and the others wait at a barrier, then open the result."""
  import jax

  from minilm_jax import tokenizer as tokenizer_lib
  out = Path(out_dir)
  if jax.process_index() == 0:
    reuse = False
    if (out / shards.MANIFEST).is_file():
      tok = tokenizer_lib.load(tokenizer_path)
      existing = shards.open_prepared(out, tokenizer=tok, max_length=max_length)
      reuse = existing.manifest["source"] == source.describe()
      if resume and not reuse:
        raise shards.PreparedError(
            f"{out / shards.MANIFEST}: the run being resumed was prepared from "
            f"{existing.manifest['source']}, this run reads {source.describe()}; resume with "
            "the corpus it was started with, or use a new loop.output_dir")
    if not reuse:
      prepare_corpus(source, out, tokenizer_path=tokenizer_path, max_length=max_length,
              beam_args=beam_args, overwrite=True)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"minilm_jax_prepare:{out}")
  return shards.open_prepared(out)
