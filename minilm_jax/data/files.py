"""Local files -> `Example`s: CSV/TSV/JSONL with configurable columns, one text per line.

Bad user data fails loudly: every error names the file and the line.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

Example = dict  # {"text": str, "pair"?: str, "label"?: int | float, "id"?: int}


# ---------------------------------------------------------------------------------------------
# Local files.


def read_table(path: str | Path, *, text_column: str, pair_column: str | None = None,
               label_column: str | None = None, id_column: str | None = None,
               delimiter: str | None = None, quoted: bool | None = None,
               encoding: str = "utf-8", label_names: Sequence[str] | None = None,
               regression: bool = False, drop_empty: bool = False) -> list[Example]:
  """Examples from a CSV/TSV file with a header row.

  delimiter=None infers "," from .csv and tab from .tsv/.tab. quoted=None means CSV quoting for
  "," files and none for tab files (GLUE/XNLI TSVs contain stray quote characters).
  Labels: with `regression`, floats; otherwise the label cell is looked up in `label_names`
  (index = class id). label_names=None takes `infer_label_names` of this file; pass the train
  file's names when reading its dev/test files, or a class missing there shifts the ids.
  "id" is `id_column`'s value, else the 0-based record index in the file.
  Empty text raises, unless `drop_empty` (then such rows are dropped and counted in the log).
  """
  path = Path(path)
  header, records = _table_records(path, delimiter, quoted, encoding)
  _check_columns(path, None, header, [text_column, pair_column, label_column, id_column])
  return _to_examples(path, records, text_column, pair_column, label_column, id_column,
                      label_names, regression, drop_empty)


def read_jsonl(path: str | Path, *, text_column: str, pair_column: str | None = None,
               label_column: str | None = None, id_column: str | None = None,
               encoding: str = "utf-8", label_names: Sequence[str] | None = None,
               regression: bool = False, drop_empty: bool = False) -> list[Example]:
  """Examples from a JSON-lines file (one object per line; blank lines skipped).

  Column and label arguments mean what they mean in `read_table`; a non-string label (JSON
  1) is looked up as its str() ("1").
  """
  path = Path(path)
  records = _jsonl_records(path, encoding)
  return _to_examples(path, records, text_column, pair_column, label_column, id_column,
                      label_names, regression, drop_empty)


def infer_label_names(path: str | Path, *, label_column: str, delimiter: str | None = None,
                      quoted: bool | None = None, encoding: str = "utf-8") -> list[str]:
  """The sorted set of labels in a .jsonl or CSV/TSV file: numerically when all are integers."""
  path = Path(path)
  if path.suffix in (".jsonl", ".json"):
    records = _jsonl_records(path, encoding)
  else:
    header, records = _table_records(path, delimiter, quoted, encoding)
    _check_columns(path, None, header, [label_column])
  keys = set()
  for line, rec in records:
    _check_columns(path, line, rec, [label_column])
    keys.add(label_key(rec[label_column], f"{path}, line {line}"))
  return sort_label_names(keys)


def read_text_lines(path: str | Path, *, encoding: str = "utf-8") -> Iterator[str]:
  """The non-empty lines of a text file, stripped, lazily (distillation corpora can be large)."""
  with open(path, encoding=encoding) as f:
    for line in f:
      line = line.strip()
      if line:
        yield line


def _table_records(path: Path, delimiter, quoted, encoding):
  if delimiter is None:
    delimiter = {".csv": ",", ".tsv": "\t", ".tab": "\t"}.get(path.suffix.lower())
    if delimiter is None:
      raise ValueError(f"{path}: cannot infer the delimiter from the suffix {path.suffix!r}; "
                       "pass delimiter=")
  if quoted is None:
    quoted = delimiter != "\t"
  with open(path, encoding=_without_bom(encoding), newline="") as f:
    # strict: a stray quote would otherwise swallow the rest of the file into one field.
    reader = csv.reader(f, delimiter=delimiter, strict=True,
                        quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE)
    records = []
    # line_num is the physical line a record ends on; a quoted field can span lines, so the
    # record starts one line after the previous record ended.
    start = 1
    try:
      header = next(reader, None)
      if header is None:
        raise ValueError(f"{path}: empty file, expected a header row")
      start = reader.line_num + 1
      for row in reader:
        if row:
          if len(row) != len(header):
            raise ValueError(f"{path}, line {start}: expected {len(header)} fields "
                             f"({', '.join(header)}), got {len(row)}")
          records.append((start, dict(zip(header, row, strict=True))))
        start = reader.line_num + 1
    except csv.Error as e:
      raise ValueError(f"{path}, line {start}: {e}") from None
    except UnicodeDecodeError:
      raise _decode_error(path, encoding) from None
  return header, records


ENCODING_HINT = ("set the file's encoding: data.encoding= (train.finetune) or corpus.encoding= "
                 "(train.distill) on the command line, encoding= in Python; e.g. latin-1")


def _without_bom(encoding: str) -> str:
  # utf-8-sig reads plain UTF-8 too and drops a byte-order mark, which would otherwise glue
  # itself to the first column name (or break the first JSON line).
  return "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding


def _decode_error(path: Path, encoding: str) -> ValueError:
  # Text files decode in buffered chunks, so the reader's position says little; decoding the
  # whole file once gives the exact byte offset (only on this error path).
  raw = path.read_bytes()
  try:
    raw.decode(encoding)
  except UnicodeDecodeError as e:
    line = raw[:e.start].count(b"\n") + 1
    return ValueError(f"{path}, line {line}: not {encoding} text ({e.reason}); {ENCODING_HINT}")
  return ValueError(f"{path}: not {encoding} text; {ENCODING_HINT}")


def _jsonl_records(path: Path, encoding):
  try:
    with open(path, encoding=_without_bom(encoding)) as f:
      lines = list(f)
  except UnicodeDecodeError:
    raise _decode_error(path, encoding) from None
  records = []
  for line_no, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}, line {line_no}: malformed JSON ({e.msg} at column {e.colno})"
                       ) from None
    if not isinstance(rec, dict):
      raise ValueError(f"{path}, line {line_no}: expected a JSON object, got "
                       f"{type(rec).__name__}")
    records.append((line_no, rec))
  return records


def _check_columns(path, line, available, wanted):
  missing = [c for c in wanted if c is not None and c not in available]
  if missing:
    where = f"{path}, line 1 (header)" if line is None else f"{path}, line {line}"
    raise ValueError(f"{where}: missing column(s) {missing}; available: {sorted(available)}")


def label_key(value, where) -> str:
  if value is None or (isinstance(value, str) and not value.strip()):
    raise ValueError(f"{where}: empty label")
  return value.strip() if isinstance(value, str) else str(value)


def sort_label_names(keys) -> list[str]:
  try:
    return sorted(keys, key=int)
  except ValueError:
    return sorted(keys)


def _to_examples(path, records, text_column, pair_column, label_column, id_column, label_names,
                 regression, drop_empty) -> list[Example]:
  wanted = [text_column, pair_column, label_column, id_column]
  for line, rec in records:
    _check_columns(path, line, rec, wanted)
  if label_column is not None and not regression:
    if label_names is None:
      label_names = sort_label_names({label_key(rec[label_column], f"{path}, line {line}")
                                    for line, rec in records})
    label_index = {str(name): i for i, name in enumerate(label_names)}

  examples, dropped = [], 0
  for index, (line, rec) in enumerate(records):
    where = f"{path}, line {line}"
    ex = {}
    for key, column in (("text", text_column), ("pair", pair_column)):
      if column is None:
        continue
      value = rec[column]
      if not isinstance(value, str):
        raise ValueError(f"{where}: column {column!r} is not a string: {value!r}")
      ex[key] = value
    empty = [column for column in (text_column, pair_column)
             if column is not None and not rec[column].strip()]
    if empty:
      if drop_empty:
        dropped += 1
        continue
      raise ValueError(f"{where}: empty text in column {empty[0]!r} (pass drop_empty=True to "
                       "skip such rows)")
    if label_column is not None:
      raw = rec[label_column]
      if regression:
        try:
          value = float(raw)
        except (TypeError, ValueError):
          raise ValueError(f"{where}: regression label {raw!r} is not a number") from None
        if not math.isfinite(value):
          raise ValueError(f"{where}: regression label {raw!r} is not finite")
        ex["label"] = value
      else:
        key = label_key(raw, where)
        if key not in label_index:
          raise ValueError(f"{where}: unknown label {key!r}; label_names are {list(label_index)}")
        ex["label"] = label_index[key]
    ex["id"] = rec[id_column] if id_column is not None else index
    examples.append(ex)
  if dropped:
    log.warning("%s: dropped %d of %d rows with empty text", path, dropped, len(records))
  return examples
