"""Span QA: `fit(squad_json_or_records)` over `recipes/finetune.py`'s qa task, and `answer`."""

from __future__ import annotations

import numpy as np

from minilm_jax.api.common import (
  SHORTHANDS,
  History,
  _config,
  _history,
  _loop_summary,
  _pairs,
  _run_dir,
  _texts,
)

QA_SHORTHANDS = {**SHORTHANDS, "doc_stride": "data.doc_stride",
                 "max_answer_length": "data.max_answer_length", "version_2": "data.version_2"}


def _qa_examples(examples, what: str) -> list[dict]:
  """A SQuAD-format JSON file or records (see `squad.from_records`)."""
  import os

  from minilm_jax import squad
  if isinstance(examples, (str, os.PathLike)):
    return squad.read_squad_json(examples)
  if isinstance(examples, dict):
    raise TypeError(f"{what}: a list of records or a SQuAD JSON path, not one dict")
  return squad.from_records(list(examples), source=what)


def fit_qa(m, examples, *, eval=None, **config) -> History:
  """Fine-tunes span-QA model `m` in place on SQuAD-format `examples`: a JSON file's path or
  records ({"question", "context", "answers": {"text", "answer_start"}} or {"question",
  "context", "answer"}); `eval` the same, scored by exact match and F1. The job is `python -m
  train.finetune --task.kind=qa`'s; keywords: `QA_SHORTHANDS` or section__key."""
  from minilm_jax.recipes import finetune as recipe
  if m.task != "qa":
    raise ValueError(f"fit(examples) on SQuAD-format data needs a 'qa' model; this one is a "
                     f"{m.task!r} model (minilm_jax.from_pretrained(path, 'qa'))")
  cfg = recipe.FinetuneConfig(
      model=recipe.ModelSpec(path=str(m.source), dtype=m.config.dtype),
      data=recipe.DataSpec(source="examples"), task=recipe.TaskSpec(kind="qa"), export_hf=False)
  cfg = _config(cfg, QA_SHORTHANDS, config, "fit")
  train = _qa_examples(examples, "fit")
  ev = _qa_examples(eval, "fit eval") if eval is not None else []
  given = "output_dir" in config
  with _run_dir(cfg, given) as cfg:
    summary, res = recipe.run_job(cfg, model=m, qa_examples=(train, ev))
  m.model = res.model
  return _history(m, _loop_summary(summary, res), cfg, given)


def answer(m, question, context, *, batch_size: int = 32, max_length: int = 384,
           doc_stride: int = 128, max_query_length: int = 64, max_answer_length: int = 30):
  """The answer span of `context` to `question` -> {"answer", "start", "end", "score"}
  (character offsets into the context; score = start + end logit); lists of questions and
  contexts give a list. Long contexts are read in overlapping windows, as in training."""
  from minilm_jax import squad
  if m.task != "qa":
    raise ValueError(f"answer needs a 'qa' model; this one is a {m.task!r} model")
  single = isinstance(question, str)
  questions = _texts(question, "answer questions")
  contexts = _pairs([context] if isinstance(context, str) else context, len(questions),
                    "answer (questions vs contexts)")
  examples = [{"id": str(i), "title": "", "question": q, "context": c,
               "answers": {"text": [], "answer_start": []}, "is_impossible": False}
              for i, (q, c) in enumerate(zip(questions, contexts))]
  feats = squad.prepare_eval_features(examples, m.tokenizer,
                                      max_seq_length=min(max_length, m.config.max_length),
                                      doc_stride=doc_stride, max_query_length=max_query_length)
  n = len(feats["input_ids"])
  start, end = (np.zeros(feats["input_ids"].shape, np.float32) for _ in range(2))
  for s in range(0, n, batch_size):
    sl = slice(s, s + batch_size)
    start[sl], end[sl] = (np.asarray(x) for x in m._head(
        feats["input_ids"][sl], feats["attention_mask"][sl], feats["token_type_ids"][sl]))
  out = []
  for ex, (span, score, _) in zip(examples, squad.best_spans(
      examples, feats, start, end, max_answer_length=max_answer_length), strict=True):
    a, b = span if span is not None else (0, 0)
    out.append({"answer": ex["context"][a:b], "start": a, "end": b,
                "score": score if span is not None else None})
  return out[0] if single else out
