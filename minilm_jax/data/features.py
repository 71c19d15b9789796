"""Examples -> `Features`: token ids with special tokens, truncated longest-first, stored flat."""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Sequence

import numpy as np

from minilm_jax.data.files import Example

log = logging.getLogger(__name__)


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
