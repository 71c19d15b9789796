"""Extractive question answering data (SQuAD v1.1 / v2.0, MLQA): examples, features, answers.

This module owns the way from SQuAD-format data to fixed-shape feature arrays for the span head,
and back from start/end logits to answer strings:

  read_squad_json / from_tfds     files or tfds records -> flat example dicts
  from_records                    plain dicts (a notebook's) -> the same
  prepare_train_features          examples -> windows with start/end token labels
  prepare_eval_features           examples -> windows with character offsets of context tokens
  best_spans / postprocess        logits of all windows -> best span / answer string per example
  references                      examples -> gold answers in the form metrics.squad_metrics takes

An example is {"id", "title", "context", "question", "answers": {"text": [...],
"answer_start": [...]}, "is_impossible"}; answer_start counts characters of `context`.

The conventions are those of transformers' examples/pytorch/question-answering (run_qa.py and
utils_qa.py): question first, context second; a context longer than the window is cut into
windows that overlap by `doc_stride` tokens (the tokenizers library's `stride`, not the step of
Google's run_squad.py); a window that does not hold the whole answer is labelled with the [CLS]
index 0; the null score is start[0] + end[0]. The deviations (question truncation to
max_query_length, the answer-ends-the-window case, "" instead of "empty") are stated where they
happen. Never imports torch, transformers or tensorflow.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# --------------------------------------------------------------------------------- examples


class _AnswerCheck:
  """Collects answers whose text is not found at answer_start (or raises at the first).

  run_qa labels tokens from answer_start and len(text) only, so a mismatched answer trains on
  whatever text sits there; by default such answers are kept, as run_qa keeps them, and counted.
  """

  def __init__(self, source: str, strict: bool):
    self.source, self.strict = source, strict
    self.total, self.bad = 0, []

  def __call__(self, context: str, text: str, start: int, where: str):
    self.total += 1
    if context[start:start + len(text)] == text:
      return
    msg = (f"answer {text!r} at {where} does not match the context at answer_start={start} "
           f"(context there: {context[start:start + len(text)]!r})")
    if self.strict:
      raise ValueError(f"{self.source}: {msg}")
    self.bad.append(msg)

  def report(self):
    if self.bad:
      warnings.warn(f"{self.source}: {len(self.bad)} of {self.total} answers do not match the "
                    f"context at answer_start; kept as they are. First: {self.bad[0]}",
                    stacklevel=3)


def _example(check: _AnswerCheck, where: str, *, id: str, title: str, context: str,
             question: str, texts: list[str], starts: list[int], is_impossible: bool) -> dict:
  if len(texts) != len(starts):
    raise ValueError(f"{check.source}: {where} has {len(texts)} answer texts but "
                     f"{len(starts)} answer_start values")
  if is_impossible and texts:
    raise ValueError(f"{check.source}: {where} is marked is_impossible but has answers")
  for k, (text, start) in enumerate(zip(texts, starts, strict=True)):
    if not 0 <= start <= len(context):
      raise ValueError(f"{check.source}: {where}.answers[{k}] answer_start={start} is outside "
                       f"the context ({len(context)} characters)")
    check(context, text, start, f"{where}.answers[{k}]")
  return {"id": id, "title": title, "context": context, "question": question,
          "answers": {"text": texts, "answer_start": starts}, "is_impossible": bool(is_impossible)}


def _get(obj: Any, key: str, kind: type, source: str, where: str, default: Any = ...) -> Any:
  if not isinstance(obj, dict):
    raise ValueError(f"{source}: {where} is a {type(obj).__name__}, expected an object")
  if key not in obj:
    if default is not ...:
      return default
    raise ValueError(f"{source}: {where} has no {key!r} key")
  value = obj[key]
  # bool is an int to isinstance; an answer_start of `true` is still malformed.
  if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
    raise ValueError(f"{source}: {where}.{key} is a {type(value).__name__}, expected "
                     f"{kind.__name__}")
  return value


def read_squad_json(path: str | Path, *, strict: bool = False) -> list[dict]:
  """Flat examples from a SQuAD-format file (data -> paragraphs -> qas): SQuAD v1.1, v2.0, MLQA.

  Malformed files raise ValueError naming the file and the place (data[a].paragraphs[p].qas[q]):
  missing keys, wrong types, duplicate ids, answer_start outside the context, answers on an
  is_impossible question. An answer whose text is not at answer_start is kept with a warning
  that counts them, or raises with `strict=True`. Titles are optional (default "").
  """
  path = Path(path)
  try:
    raw = json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
    raise ValueError(f"{path}: expected a JSON object with a 'data' list (SQuAD format)")
  source, check = str(path), _AnswerCheck(str(path), strict)
  examples, seen = [], set()
  for a, article in enumerate(raw["data"]):
    where_a = f"data[{a}]"
    title = _get(article, "title", str, source, where_a, default="")
    for p, para in enumerate(_get(article, "paragraphs", list, source, where_a)):
      where_p = f"{where_a}.paragraphs[{p}]"
      context = _get(para, "context", str, source, where_p)
      for q, qa in enumerate(_get(para, "qas", list, source, where_p)):
        where = f"{where_p}.qas[{q}]"
        qid = _get(qa, "id", str, source, where)
        if qid in seen:
          raise ValueError(f"{source}: {where} repeats the id {qid!r}")
        seen.add(qid)
        texts, starts = [], []
        for k, ans in enumerate(_get(qa, "answers", list, source, where)):
          texts.append(_get(ans, "text", str, source, f"{where}.answers[{k}]"))
          starts.append(_get(ans, "answer_start", int, source, f"{where}.answers[{k}]"))
        examples.append(_example(
            check, where, id=qid, title=title, context=context,
            question=_get(qa, "question", str, source, where), texts=texts, starts=starts,
            is_impossible=_get(qa, "is_impossible", bool, source, where, default=False)))
  check.report()
  return examples


def _str(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def from_tfds(records: Iterable[Mapping[str, Any]], *, strict: bool = False) -> list[dict]:
  """Examples from tfds `squad`, `squad/v2.0` or `mlqa` records as `tfds.as_numpy` yields them.

  Strings arrive as bytes (decoded as UTF-8), answers as {"text": bytes array, "answer_start":
  int array}; is_impossible is absent outside squad/v2.0 (False). plausible_answers of
  unanswerable v2.0 questions are dropped, as run_qa never trains on them. Same checks as
  read_squad_json, except that repeated ids are allowed (tfds may shard or repeat).
  """
  check, examples = _AnswerCheck("tfds records", strict), []
  for i, rec in enumerate(records):
    where = f"record {i}"
    for key in ("id", "context", "question"):
      if key not in rec:
        raise ValueError(f"tfds records: {where} has no {key!r} field")
    answers = rec.get("answers") or {}
    texts = [_str(t) for t in np.asarray(answers.get("text", []), dtype=object).reshape(-1)]
    starts = [int(s) for s in np.asarray(answers.get("answer_start", [])).reshape(-1)]
    examples.append(_example(
        check, where, id=_str(rec["id"]), title=_str(rec.get("title", b"")),
        context=_str(rec["context"]), question=_str(rec["question"]), texts=texts,
        starts=starts, is_impossible=bool(rec.get("is_impossible", False))))
  check.report()
  return examples


def from_records(records: Iterable[Mapping[str, Any]], *, source: str = "records",
                 strict: bool = False) -> list[dict]:
  """Examples from plain dicts, as a notebook holds them: "question", "context", and the answer
  as HF datasets' squad layout ("answers": {"text": [...], "answer_start": [...]}) or as a bare
  "answer" string (located at its first occurrence in the context; an error if absent). "id"
  (default: the record's index) and "title" are optional; no answer at all is an unanswerable
  (SQuAD 2.0) question. Same checks as read_squad_json, errors naming `source` and the record."""
  check, examples, seen = _AnswerCheck(source, strict), [], set()
  for i, rec in enumerate(records):
    where = f"record {i}"
    if not isinstance(rec, Mapping):
      raise ValueError(f"{source}: {where} is a {type(rec).__name__}, expected a dict")
    for key in ("context", "question"):
      if not isinstance(rec.get(key), str) or not rec[key].strip():
        raise ValueError(f"{source}: {where} has no {key!r} text")
    context, qid = rec["context"], str(rec.get("id", i))
    if qid in seen:
      raise ValueError(f"{source}: {where} repeats the id {qid!r}")
    seen.add(qid)
    if "answer" in rec:
      text = rec["answer"]
      start = context.find(text) if isinstance(text, str) and text else -1
      if start < 0:
        raise ValueError(f"{source}: {where}: the answer {text!r} is not in the context")
      texts, starts = [text], [start]
    else:
      answers = rec.get("answers") or {}
      texts, starts = list(answers.get("text", [])), [int(a) for a in
                                                      answers.get("answer_start", [])]
    examples.append(_example(check, where, id=qid, title=str(rec.get("title", "")),
                             context=context, question=rec["question"], texts=texts,
                             starts=starts, is_impossible=not texts))
  if not examples:
    raise ValueError(f"{source}: no examples")
  check.report()
  return examples


def references(examples: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
  """id -> gold answer texts ([] for unanswerable), the form metrics.squad_metrics takes."""
  return {ex["id"]: [] if ex.get("is_impossible", False) else list(ex["answers"]["text"])
          for ex in examples}


# --------------------------------------------------------------------------------- features


def _windows(examples, tok, max_seq_length: int, doc_stride: int, max_query_length: int):
  """Yields one (example index, input ids, token types, context position, context offsets) per
  window; `context position` is where the window's first context token sits in the input ids."""
  if doc_stride < 0 or max_query_length < 0:
    raise ValueError(f"doc_stride ({doc_stride}) and max_query_length ({max_query_length}) must "
                     "be >= 0")
  n_special = tok.num_special_tokens(True)
  # Where the second segment starts after an empty first one: found by placing a marker id,
  # because the pair template ([CLS] A [SEP] B [SEP], <s> A </s></s> B </s>) is the tokenizer's.
  lead = tok.build_inputs([], [-1])[0].index(-1)
  # run_qa strips leading whitespace from questions: some SQuAD questions start with lots of it.
  questions = [tok.encode(ex["question"].lstrip())[:max_query_length] for ex in examples]
  ctx = tok([ex["context"] for ex in examples], padding="do_not_pad", return_offsets=True)
  for i, q_ids in enumerate(questions):
    keep = [k for k, s in enumerate(ctx["sequence_ids"][i]) if s == 0]
    c_ids = [ctx["input_ids"][i][k] for k in keep]
    c_offs = np.array([ctx["offsets"][i][k] for k in keep], np.int32).reshape(-1, 2)
    width = max_seq_length - len(q_ids) - n_special
    if width <= 0:
      raise ValueError(f"example {i} ({examples[i]['id']!r}): a question of {len(q_ids)} tokens "
                       f"leaves no room for context in max_seq_length={max_seq_length}")
    if len(c_ids) > width and doc_stride >= width:
      # The tokenizers library refuses this too: windows would never advance.
      raise ValueError(f"example {i} ({examples[i]['id']!r}): doc_stride={doc_stride} must be "
                       f"smaller than the {width} context tokens a window holds")
    # The tokenizers library's overflow rule: windows of `width` tokens starting every
    # width - stride tokens, until one reaches the end of the context.
    start = 0
    while True:
      stop = min(start + width, len(c_ids))
      ids, types = tok.build_inputs(q_ids, c_ids[start:stop])
      yield i, ids, types, lead + len(q_ids), c_offs[start:stop]
      if stop == len(c_ids):
        break
      start += width - doc_stride


def _pack(rows: list[list[int]], length: int, fill: int) -> np.ndarray:
  out = np.full((len(rows), length), fill, np.int32)
  for r, row in enumerate(rows):
    out[r, :len(row)] = row
  return out


def _features(examples, tok, max_seq_length, doc_stride, max_query_length, pad_to, label):
  """The arrays both feature functions share; `label(example, context pos, offsets)` adds the
  per-window fields (start/end positions, or offsets)."""
  length = max_seq_length if pad_to is None else pad_to
  ids, types, index, extra = [], [], [], []
  for i, row_ids, row_types, pos, offs in _windows(examples, tok, max_seq_length, doc_stride,
                                                   max_query_length):
    if len(row_ids) > length:
      raise ValueError(f"a window of example {i} has {len(row_ids)} tokens, more than "
                       f"pad_to={pad_to}")
    ids.append(row_ids)
    types.append(row_types)
    index.append(i)
    extra.append(label(examples[i], pos, offs))
  out = {
      "input_ids": _pack(ids, length, tok.pad_id),
      "attention_mask": _pack([[1] * len(r) for r in ids], length, 0),
      "token_type_ids": _pack(types, length, 0),
      "example_index": np.array(index, np.int32),
  }
  return out, extra


def prepare_train_features(examples: Sequence[Mapping[str, Any]], tok, *,
                           max_seq_length: int = 384, doc_stride: int = 128,
                           max_query_length: int = 64, pad_to: int | None = None
                           ) -> dict[str, np.ndarray]:
  """Training windows: int32 input_ids, attention_mask, token_type_ids (F, L), start_positions,
  end_positions, example_index (F,).

  Each example gives one window per `doc_stride`-overlapping slice of its context; the question
  (left-stripped, cut to `max_query_length` tokens) is repeated in each. The positions are the
  tokens holding the first and last character of answers[0]; 0 ([CLS]) for unanswerable
  questions and for windows that do not hold the whole answer. L is max_seq_length, or `pad_to`
  (e.g. a multiple of 128 for TPU tiles, or less for short data; it must fit every window).

  Deviations from run_qa: run_qa does not truncate questions (Google's run_squad.py did;
  max_query_length=64 keeps long questions from eating the context), and when the answer starts
  at the last context token of a window run_qa's scan runs past the window into [SEP]/padding,
  giving start > end; here the scan stays inside the window.
  """
  def label(ex, pos, offs):
    if ex.get("is_impossible", False) or not ex["answers"]["answer_start"] or not len(offs):
      return 0, 0
    start_char = ex["answers"]["answer_start"][0]
    end_char = start_char + len(ex["answers"]["text"][0])
    if not (offs[0, 0] <= start_char and offs[-1, 1] >= end_char):
      return 0, 0
    # Offsets grow along the context, so run_qa's two scans are binary searches: the last token
    # starting at or before start_char, the first token ending at or after end_char.
    first = np.searchsorted(offs[:, 0], start_char, side="right") - 1
    last = np.searchsorted(offs[:, 1], end_char, side="left")
    return pos + int(first), pos + int(last)

  out, spans = _features(examples, tok, max_seq_length, doc_stride, max_query_length, pad_to,
                         label)
  spans = np.array(spans, np.int32).reshape(-1, 2)
  out["start_positions"], out["end_positions"] = spans[:, 0], spans[:, 1]
  return out


def prepare_eval_features(examples: Sequence[Mapping[str, Any]], tok, *,
                          max_seq_length: int = 384, doc_stride: int = 128,
                          max_query_length: int = 64, pad_to: int | None = None
                          ) -> dict[str, np.ndarray]:
  """Evaluation windows (the same as prepare_train_features'): int32 input_ids, attention_mask,
  token_type_ids (F, L), example_index (F,) and offsets (F, L, 2): the character span in the
  context of each context token, (-1, -1) for question, special and pad tokens (run_qa's None),
  so postprocess never proposes them.
  """
  def label(ex, pos, offs):
    return pos, offs

  out, spans = _features(examples, tok, max_seq_length, doc_stride, max_query_length, pad_to,
                         label)
  offsets = np.full(out["input_ids"].shape + (2,), -1, np.int32)
  for f, (pos, offs) in enumerate(spans):
    offsets[f, pos:pos + len(offs)] = offs
  out["offsets"] = offsets
  return out


# ---------------------------------------------------------------------------- predictions


def best_spans(examples: Sequence[Mapping[str, Any]], features: Mapping[str, np.ndarray],
               start_logits, end_logits, *, n_best: int = 20, max_answer_length: int = 30
               ) -> list[tuple[tuple[int, int] | None, float, float]]:
  """Per example, (the best span's character (start, end) in its context or None, its score
  start + end logit, the null score): utils_qa's search, which `postprocess` turns into answers.

  Per window, the n_best highest start and n_best highest end logits are paired; pairs with a
  token outside the context, end < start, or more than max_answer_length tokens are dropped;
  a span scores start + end logit, and the best over all windows wins. The null score is the
  smallest start[0] + end[0] over the windows."""
  offsets, owner = np.asarray(features["offsets"]), np.asarray(features["example_index"])
  # float64 so that start + end is exact for float32 or bfloat16 logits.
  start_logits = np.asarray(start_logits, np.float64)
  end_logits = np.asarray(end_logits, np.float64)
  if start_logits.shape != offsets.shape[:2] or end_logits.shape != offsets.shape[:2]:
    raise ValueError(f"logits of shapes {start_logits.shape} and {end_logits.shape} do not match "
                     f"the features' {offsets.shape[:2]}")
  if n_best < 1 or max_answer_length < 1:
    raise ValueError(f"n_best ({n_best}) and max_answer_length ({max_answer_length}) must be >= 1")
  if len(owner) and not 0 <= owner.min() <= owner.max() < len(examples):
    raise ValueError("features['example_index'] points outside `examples`")
  by_example = [[] for _ in examples]
  for f, i in enumerate(owner):
    by_example[i].append(f)

  out = []
  for i, ex in enumerate(examples):
    if not by_example[i]:
      raise ValueError(f"example {i} ({ex['id']!r}) has no features: were the features built "
                       "from these examples?")
    null, best, best_span = np.inf, -np.inf, None
    for f in by_example[i]:
      s, e, valid = start_logits[f], end_logits[f], offsets[f, :, 0] >= 0
      null = min(null, s[0] + e[0])
      # utils_qa's exact expression, so equal logits are visited in the same order.
      starts = np.argsort(s)[-1:-n_best - 1:-1][:, None]
      ends = np.argsort(e)[-1:-n_best - 1:-1][None, :]
      ok = valid[starts] & valid[ends] & (ends >= starts) & (ends - starts < max_answer_length)
      if not ok.any():
        continue
      scores = np.where(ok, s[starts] + e[ends], -np.inf)
      # argmax takes the first maximum in start-major order, as utils_qa's stable sort does;
      # a later window must be strictly better to win.
      a, b = np.unravel_index(np.argmax(scores), scores.shape)
      if scores[a, b] > best:
        best = scores[a, b]
        best_span = (int(offsets[f, starts[a, 0], 0]), int(offsets[f, ends[0, b], 1]))
    out.append((best_span, float(best), float(null)))
  return out


def postprocess(examples: Sequence[Mapping[str, Any]], features: Mapping[str, np.ndarray],
                start_logits, end_logits, *, n_best: int = 20, max_answer_length: int = 30,
                version_2: bool = False, null_threshold: float = 0.0
                ) -> tuple[dict[str, str], dict[str, float]]:
  """One answer per example from the logits (F, T) of its windows (utils_qa's
  postprocess_qa_predictions), the spans of `best_spans`. Returns (predictions id -> text,
  null_scores id -> null score - best span score, run_qa's null_odds). With `version_2` the
  answer is "" when that difference exceeds `null_threshold`.

  Deviation: with no valid span at all run_qa answers the placeholder "empty" (and for v2
  compares the null score against 0); here the answer is "" and the difference is +inf.
  """
  spans = best_spans(examples, features, start_logits, end_logits, n_best=n_best,
                     max_answer_length=max_answer_length)
  predictions, null_scores = {}, {}
  for ex, (span, best, null) in zip(examples, spans, strict=True):
    if ex["id"] in predictions:
      raise ValueError(f"example id {ex['id']!r} appears twice")
    text = "" if span is None else ex["context"][span[0]:span[1]]
    null_scores[ex["id"]] = null - best
    predictions[ex["id"]] = "" if version_2 and null - best > null_threshold else text
  return predictions, null_scores
