"""Sources: what can be prepared, cut into splits (the units of Beam work), and read split by split.

A split is a small picklable description: a byte range of a large line file, cut at a line (or
blank-line) boundary with the number of its first line, so errors still name file and line; a
tfds index range; a chunk of in-memory examples; or a whole quoted CSV file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

from minilm_jax.data.files import (
  ENCODING_HINT,
  _check_columns,
  _jsonl_records,
  _to_examples,
  infer_label_names,
  label_key,
  read_table,
  sort_label_names,
)

KINDS = ("text", "documents", "csv", "tsv", "jsonl", "tfds", "examples")


@dataclasses.dataclass(frozen=True)
class Source:
  """What to prepare. kind:
    text       one example per non-empty line            (paths)
    documents  documents separated by blank lines; each is cut into max_length windows
    csv / tsv  a header row; columns text[, pair][, label]     (paths)
    jsonl      one JSON object per line, same columns         (paths)
    tfds       a prepared tfds dataset (never downloaded): `text_key` documents, cut into
               windows like `documents` (wikipedia, c4); with `windows` false one example a
               row (truncated, as a line; a pair column or an STS score: `label_column`)
    examples   `examples`, in memory (packaged corpora, GLUE read through tfds)
  """

  kind: str
  paths: tuple[str, ...] = ()
  text_column: str = "text"
  pair_column: str | None = None
  label_column: str | None = None
  label_names: tuple[str, ...] | None = None
  regression: bool = False
  encoding: str = "utf-8"
  drop_empty: bool = False
  tfds_name: str = ""
  split: str = "train"
  data_dir: str | None = None
  text_key: str = "text"
  windows: bool = True
  examples: tuple = ()

  def describe(self) -> str:
    if self.kind == "tfds":
      return f"tfds {self.tfds_name} [{self.split}]" + (
          "" if self.windows else f" feature {self.text_key!r} a row")
    if self.kind == "examples":
      digest = hashlib.sha256(json.dumps(list(self.examples), sort_keys=True, default=str)
                              .encode()).hexdigest()[:12]
      return f"{len(self.examples)} in-memory examples #{digest}"
    cols = [c for c in (self.text_column, self.pair_column, self.label_column) if c]
    return f"{self.kind} {', '.join(self.paths)}" + (
        f" columns {cols}" if self.kind in ("csv", "tsv", "jsonl") else "")


# ---------------------------------------------------------------------------------------------
# Splits: the units of work, small picklable descriptions.

def _line_splits(path: Path, split_bytes: int, blank: bool, skip_header: bool) -> list[dict]:
  """Byte ranges of ~split_bytes, each starting on a line (a blank line with `blank`), and the
  1-based number of its first line; one cheap pass over the file."""
  size = path.stat().st_size
  starts, lines = [0], [1]
  with open(path, "rb") as f:
    if skip_header:
      f.readline()
      starts[0], lines[0] = f.tell(), 2
    pos, line = starts[0], lines[0]
    while pos + split_bytes < size:
      f.seek(pos)
      block = f.read(split_bytes)
      target = pos + len(block)
      f.seek(target)
      tail = f.readline()  # finish the current line
      while blank and tail.strip():  # documents: finish the current paragraph
        more = f.readline()
        if not more:
          break
        tail += more
        if not more.strip():
          break
      nxt = target + len(tail)
      if nxt >= size:
        break
      line += block.count(b"\n") + tail.count(b"\n")
      starts.append(nxt)
      lines.append(line)
      pos = nxt
  ends = starts[1:] + [size]
  return [{"path": str(path), "start": s, "end": e, "line": ln}
          for s, e, ln in zip(starts, ends, lines, strict=True)]


def make_splits(source: Source, *, split_bytes: int = 64 << 20, examples_per_split: int = 20000
                ) -> list[dict]:
  """The work units of `source`, in order: shard i holds split i's examples."""
  if source.kind not in KINDS:
    raise ValueError(f"unknown source kind {source.kind!r}; one of {KINDS}")
  if source.kind == "examples":
    ex = list(source.examples)
    n = max(1, math.ceil(len(ex) / examples_per_split))
    step = math.ceil(len(ex) / n) if ex else 0
    return [{"examples": ex[i * step:(i + 1) * step]} for i in range(n)]
  if source.kind == "tfds":
    import tensorflow_datasets as tfds
    builder = tfds.builder(source.tfds_name, data_dir=source.data_dir)
    try:
      total = builder.info.splits[source.split].num_examples
    except KeyError:  # no split metadata (mock data, a split expression): one unit of work
      return [{"tfds": (None, None)}]
    n = max(1, math.ceil(total / examples_per_split))
    step = math.ceil(total / n) if total else 0
    return [{"tfds": (i * step, min(total, (i + 1) * step))} for i in range(n)]
  if not source.paths:
    raise ValueError(f"a {source.kind} source needs paths")
  out = []
  for p in source.paths:
    path = Path(p)
    if not path.is_file():
      raise FileNotFoundError(f"{path}: no such source file")
    if source.kind == "csv":
      out.append({"path": str(path), "whole": True})
    else:
      out += _line_splits(path, split_bytes, blank=source.kind == "documents",
                          skip_header=source.kind == "tsv")
  return out


# ---------------------------------------------------------------------------------------------
# Reading one split -> examples ({"text", "pair"?, "label"?}).

def _split_lines(source: Source, split: dict) -> Iterator[tuple[int, str]]:
  with open(split["path"], "rb") as f:
    f.seek(split["start"])
    raw = f.read(split["end"] - split["start"])
  try:
    text = raw.decode(source.encoding)
  except UnicodeDecodeError as e:
    line = split["line"] + raw[:e.start].count(b"\n")
    raise ValueError(f"{split['path']}, line {line}: not {source.encoding} text ({e.reason}); "
                     f"{ENCODING_HINT}") from None
  for i, line in enumerate(text.split("\n")):
    yield split["line"] + i, line


def read_split(source: Source, split: dict, label_names) -> Iterator[dict]:
  kind = source.kind
  if kind == "examples":
    yield from split["examples"]
  elif kind == "tfds":
    yield from _read_tfds(source, *split["tfds"])
  elif kind == "csv":
    yield from read_table(split["path"], text_column=source.text_column,
                          pair_column=source.pair_column, label_column=source.label_column,
                          encoding=source.encoding, label_names=label_names,
                          regression=source.regression, drop_empty=source.drop_empty)
  elif kind == "text":
    for _, line in _split_lines(source, split):
      if line.strip():
        yield {"text": line.strip()}
  elif kind == "documents":
    doc: list[str] = []
    for _, line in [*_split_lines(source, split), (0, "")]:
      if line.strip():
        doc.append(line.strip())
      elif doc:
        yield {"text": " ".join(doc), "document": True}
        doc = []
  else:  # jsonl, tsv: per line, through the file readers' column and label checks
    path = Path(split["path"])
    if kind == "tsv":
      with open(path, encoding=source.encoding) as f:
        header = f.readline().rstrip("\n").split("\t")
      _check_columns(path, None, header, [source.text_column, source.pair_column,
                                          source.label_column])
    records = []
    for line_no, line in _split_lines(source, split):
      if not line.strip():
        continue
      if kind == "tsv":
        row = line.rstrip("\r").split("\t")
        if len(row) != len(header):
          raise ValueError(f"{path}, line {line_no}: expected {len(header)} fields, got "
                           f"{len(row)}")
        records.append((line_no, dict(zip(header, row, strict=True))))
      else:
        try:
          rec = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}, line {line_no}: malformed JSON ({e.msg})") from None
        if not isinstance(rec, dict):
          raise ValueError(f"{path}, line {line_no}: expected a JSON object")
        records.append((line_no, rec))
    yield from _to_examples(path, records, source.text_column, source.pair_column,
                            source.label_column, None, label_names, source.regression,
                            source.drop_empty)


def _read_tfds(source: Source, start: int, end: int) -> Iterator[dict]:
  import tensorflow as tf
  import tensorflow_datasets as tfds
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    pass
  split = source.split if start is None else f"{source.split}[{start}:{end}]"
  ds = tfds.load(source.tfds_name, split=split,
                 data_dir=source.data_dir, download=False, shuffle_files=False)
  for i, row in enumerate(tfds.as_numpy(ds), start or 0):
    for key in (source.text_key, source.label_column):
      if key is not None and key not in row:
        raise ValueError(f"tfds {source.tfds_name} [{source.split}] example {i}: no feature "
                         f"{key!r}; features: {sorted(row)}")
    text = row[source.text_key]
    text = text.decode() if isinstance(text, bytes) else str(text)
    if source.windows:
      if text.strip():
        yield {"text": " ".join(text.split()), "document": True}
      continue
    if not text.strip():  # one example a row: a dropped row would misalign paired columns
      raise ValueError(f"tfds {source.tfds_name} [{source.split}] example {i}: empty "
                       f"{source.text_key!r}")
    ex = {"text": " ".join(text.split())}
    if source.label_column is not None:
      ex["label"] = float(row[source.label_column])
    yield ex


def label_names(source: Source) -> tuple[str, ...] | None:
  """The class names labels map to: given, else read off the (labeled, local) source."""
  if source.regression or (source.label_column is None and source.kind != "examples"):
    return None
  if source.label_names:
    return tuple(source.label_names)
  if source.kind == "examples":
    return None
  if source.kind in ("csv", "tsv"):
    names = set()
    for p in source.paths:
      names |= set(infer_label_names(p, label_column=source.label_column,
                                     encoding=source.encoding))
  else:
    names = set()
    for p in source.paths:
      for line, rec in _jsonl_records(Path(p), source.encoding):
        _check_columns(p, line, rec, [source.label_column])
        names.add(label_key(rec[source.label_column], f"{p}, line {line}"))
  return tuple(sort_label_names(names))
