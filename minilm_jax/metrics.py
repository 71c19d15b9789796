"""Evaluation metrics on host arrays: classification/correlation metrics with the GLUE task
conventions, and the official SQuAD v1.1/v2.0 and MLQA answer-matching rules.

Everything here is plain numpy and Python (no scipy or scikit-learn at runtime); the tests check
each metric against scikit-learn and scipy. Inputs are whatever leaves the device at eval time:
predicted labels, regression scores, or answer strings.
"""

from __future__ import annotations

import collections
import functools
import re
import string
import sys
import unicodedata
from collections.abc import Callable, Mapping, Sequence

import numpy as np

# ----------------------------------------------------------------------------------------------
# Classification and correlation.


def _flat(x) -> np.ndarray:
  return np.asarray(x).reshape(-1)


def accuracy(preds, labels) -> float:
  preds, labels = _flat(preds), _flat(labels)
  return float(np.mean(preds == labels)) if labels.size else 0.0


def _f1_for(preds: np.ndarray, labels: np.ndarray, positive) -> float:
  tp = np.sum((preds == positive) & (labels == positive))
  fp = np.sum((preds == positive) & (labels != positive))
  fn = np.sum((preds != positive) & (labels == positive))
  denom = 2 * tp + fp + fn
  # sklearn's zero_division default: no positives predicted nor present -> 0.0.
  return float(2 * tp / denom) if denom else 0.0


def f1(preds, labels) -> float:
  """Binary F1 with positive class 1 (MRPC, QQP)."""
  return _f1_for(_flat(preds), _flat(labels), 1)


def macro_f1(preds, labels) -> float:
  """Unweighted mean of per-class F1 over the classes present in preds or labels (sklearn's)."""
  preds, labels = _flat(preds), _flat(labels)
  classes = np.union1d(preds, labels)
  return float(np.mean([_f1_for(preds, labels, c) for c in classes])) if classes.size else 0.0


def matthews_corrcoef(preds, labels) -> float:
  """Multi-class Matthews correlation (Gorodkin's R_K, as sklearn); 0.0 when undefined, e.g.
  when every prediction (or every label) is the same class."""
  preds, labels = _flat(preds), _flat(labels)
  classes, inv = np.unique(np.concatenate([labels, preds]), return_inverse=True)
  y, p = inv[:labels.size], inv[labels.size:]
  k = classes.size
  conf = np.bincount(y * k + p, minlength=k * k).reshape(k, k).astype(np.float64)
  t_sum, p_sum = conf.sum(1), conf.sum(0)
  correct, n = np.trace(conf), conf.sum()
  cov_yp = correct * n - t_sum @ p_sum
  cov_pp = n * n - p_sum @ p_sum
  cov_yy = n * n - t_sum @ t_sum
  if cov_pp * cov_yy == 0:
    return 0.0
  return float(cov_yp / np.sqrt(cov_yy * cov_pp))


def pearson(x, y) -> float:
  """Pearson correlation; NaN when either input is constant (as scipy)."""
  x, y = _flat(x).astype(np.float64), _flat(y).astype(np.float64)
  xc, yc = x - x.mean(), y - y.mean()
  denom = np.sqrt((xc @ xc) * (yc @ yc))
  if denom == 0:
    return float("nan")
  return float(np.clip((xc @ yc) / denom, -1.0, 1.0))


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks, ties sharing the mean of their ranks (scipy.stats.rankdata 'average')."""
  order = np.argsort(x, kind="mergesort")
  sorted_x = x[order]
  # Start index of each run of equal values, then each run's mean rank.
  starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
  ends = np.r_[starts[1:], x.size]
  run_rank = (starts + ends + 1) / 2.0
  ranks = np.empty(x.size, np.float64)
  ranks[order] = np.repeat(run_rank, ends - starts)
  return ranks


def spearman(x, y) -> float:
  """Spearman rank correlation with average ranks for ties; NaN for constant input (as scipy)."""
  x, y = _flat(x).astype(np.float64), _flat(y).astype(np.float64)
  return pearson(_average_ranks(x), _average_ranks(y))


def retrieval_metrics(scores, relevant: Sequence[Sequence[int]], *, ks=(1, 10)) -> dict:
  """Ranking metrics of a (queries, documents) score matrix against each query's relevant
  document indices (binary relevance), as sentence-transformers' InformationRetrievalEvaluator
  computes them: mrr@10 (1 / rank of the first relevant in the top 10), ndcg@10 (DCG of the top
  10 over the ideal DCG of min(|relevant|, 10) hits) and recall@k (share of the relevant in the
  top k) for each k in `ks`. Ties rank by document index."""
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 2 or len(relevant) != len(scores):
    raise ValueError(f"scores {scores.shape} for {len(relevant)} queries")
  depth = max(10, *ks)
  top = np.argsort(-scores, axis=1, kind="stable")[:, :depth]  # fewer documents: all of them
  discount = 1.0 / np.log2(np.arange(2, depth + 2))
  mrr, ndcg, recall = [], [], {k: [] for k in ks}
  for ranked, rel in zip(top, relevant, strict=True):
    rel = set(int(r) for r in rel)
    if not rel:
      raise ValueError("a query without relevant documents")
    hit = np.fromiter((d in rel for d in ranked), bool, len(ranked))
    first = np.flatnonzero(hit[:10])
    mrr.append(1.0 / (first[0] + 1) if len(first) else 0.0)
    dcg = (hit[:10] * discount[:len(hit[:10])]).sum()
    ndcg.append(float(dcg / discount[:min(len(rel), 10)].sum()))
    for k in ks:
      recall[k].append(hit[:k].sum() / len(rel))
  out = {"mrr@10": float(np.mean(mrr)), "ndcg@10": float(np.mean(ndcg))}
  out.update({f"recall@{k}": float(np.mean(v)) for k, v in recall.items()})
  return out


# GLUE's official metric per task (XNLI: accuracy, like MNLI). Keys are normalised task names.
_GLUE_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("mcc",),
    "sst2": ("accuracy",),
    "mnli": ("accuracy",),
    "mnlimatched": ("accuracy",),
    "mnlimismatched": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
    "xnli": ("accuracy",),
    "mrpc": ("f1", "accuracy"),
    "qqp": ("f1", "accuracy"),
    "stsb": ("pearson", "spearman"),
}
_METRIC_FNS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "mcc": matthews_corrcoef, "accuracy": accuracy, "f1": f1, "pearson": pearson,
    "spearman": spearman,
}


def glue_metrics(task: str, preds, labels) -> dict[str, float]:
  """GLUE metrics for `task` ("sst2", "SST-2", "mnli_mismatched", ...).

  preds: predicted labels, or scores with a trailing class axis (argmax is taken); for STS-B the
  regression scores, (B,) or (B, 1).
  """
  key = task.lower().replace("-", "").replace("_", "")
  if key not in _GLUE_METRICS:
    raise ValueError(f"unknown GLUE task {task!r}; known: {', '.join(_GLUE_METRICS)}")
  preds, labels = np.asarray(preds), np.asarray(labels)
  if key == "stsb":
    preds = preds.reshape(labels.shape)
  elif preds.ndim == labels.ndim + 1:
    preds = preds.argmax(-1)
  return {name: _METRIC_FNS[name](preds, labels) for name in _GLUE_METRICS[key]}


# ----------------------------------------------------------------------------------------------
# SQuAD (official evaluate-v2.0.py rules, which agree with v1.1 on answerable questions) and
# MLQA (mlqa_evaluation_v1.py: same scheme with per-language articles and segmentation).



@functools.cache
def _mlqa_punct() -> frozenset[str]:
  # MLQA strips every Unicode punctuation character, not only ASCII. Built on first use: scanning
  # all code points takes a noticeable fraction of a second.
  return frozenset(
      chr(i) for i in range(sys.maxunicode) if unicodedata.category(chr(i)).startswith("P")
  ) | frozenset(string.punctuation)

_SQUAD_PUNCT = frozenset(string.punctuation)
_MLQA_ARTICLES = {
    "en": r"\b(a|an|the)\b",
    "es": r"\b(un|una|unos|unas|el|la|los|las)\b",
    "vi": r"\b(của|là|cái|chiếc|những)\b",
    "de": r"\b(ein|eine|einen|einem|eines|einer|der|die|das|den|dem|des)\b",
    # Verbatim from the official script: the first branch can never match, so in effect every
    # "ال" is removed, also inside words. Kept so scores match published numbers.
    "ar": r"\sال^|ال",
    "hi": None,
    "zh": None,
}
_MLQA_CHAR_SEGMENTED = ("zh",)
_CJK = re.compile(r"[\u4e00-\u9fa5]")


def _mixed_segmentation(text: str) -> list[str]:
  """MLQA's zh tokenisation: each CJK character or punctuation mark is a token, the rest split on
  whitespace."""
  punct = _mlqa_punct()
  segs, buf = [], ""
  for ch in text:
    if _CJK.search(ch) or ch in punct:
      segs.extend(buf.split())
      buf = ""
      segs.append(ch)
    else:
      buf += ch
  segs.extend(buf.split())
  return segs


def normalize_answer(s: str, lang: str | None = None) -> str:
  """Lower-case, drop punctuation and articles, collapse whitespace.

  lang=None: the official SQuAD rule (ASCII punctuation, English articles). A language code
  (en, es, hi, vi, de, ar, zh): MLQA's rule for that language.
  """
  s = s.lower()
  if lang is None:
    s = "".join(ch for ch in s if ch not in _SQUAD_PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())
  if lang not in _MLQA_ARTICLES:
    raise ValueError(f"unknown MLQA language {lang!r}; known: {', '.join(_MLQA_ARTICLES)}")
  punct = _mlqa_punct()
  s = "".join(ch for ch in s if ch not in punct)
  if _MLQA_ARTICLES[lang] is not None:
    s = re.sub(_MLQA_ARTICLES[lang], " ", s)
  tokens = _mixed_segmentation(s) if lang in _MLQA_CHAR_SEGMENTED else s.split()
  return " ".join(t for t in tokens if t.strip())


def _token_f1(pred_toks: list[str], gold_toks: list[str]) -> float:
  common = collections.Counter(pred_toks) & collections.Counter(gold_toks)
  num_same = sum(common.values())
  if num_same == 0:
    return 0.0
  precision, recall = num_same / len(pred_toks), num_same / len(gold_toks)
  return 2 * precision * recall / (precision + recall)


def _squad_golds(gold_answers: Sequence[str], lang: str | None) -> list[str]:
  # SQuAD v2: golds that normalise to nothing are dropped; no gold left means "no answer", scored
  # against the empty string. MLQA's script keeps all golds (its data has no unanswerable
  # questions); we apply the same no-answer rule to it when the gold list is empty.
  if lang is None:
    gold_answers = [a for a in gold_answers if normalize_answer(a)]
  return list(gold_answers) or [""]


def exact_match(pred: str, gold_answers: Sequence[str], *, lang: str | None = None) -> float:
  """1.0 if the normalised prediction equals any normalised gold, else 0.0. An empty gold list
  (a no-answer question) matches only a prediction that normalises to ""."""
  pred_n = normalize_answer(pred, lang)
  return float(any(pred_n == normalize_answer(g, lang) for g in _squad_golds(gold_answers, lang)))


def f1_score(pred: str, gold_answers: Sequence[str], *, lang: str | None = None) -> float:
  """Token-overlap F1, max over golds. Empty gold list: 1.0 iff the prediction is empty."""
  pred_toks = normalize_answer(pred, lang).split()
  best = 0.0
  for gold in _squad_golds(gold_answers, lang):
    gold_toks = normalize_answer(gold, lang).split()
    if not gold_toks or not pred_toks:
      if lang is None or not gold_answers:
        # SQuAD v2 rule: an empty side scores 1 only when both are empty.
        best = max(best, float(gold_toks == pred_toks))
      continue  # MLQA: no common tokens -> 0
    best = max(best, _token_f1(pred_toks, gold_toks))
  return best


def _evaluate(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]],
              lang: str | None) -> dict[str, float]:
  if not references:
    raise ValueError("no references to evaluate")
  em, f1s, has_ans = {}, {}, {}
  for qid, golds in references.items():
    has_ans[qid] = bool(golds)
    if qid not in predictions:
      # Official v1.1/MLQA: an unanswered question scores 0 and still counts in the total.
      em[qid] = f1s[qid] = 0.0
      continue
    em[qid] = exact_match(predictions[qid], golds, lang=lang)
    f1s[qid] = f1_score(predictions[qid], golds, lang=lang)

  def summary(ids: list[str], prefix: str) -> dict[str, float]:
    return {f"{prefix}exact": 100.0 * sum(em[i] for i in ids) / len(ids),
            f"{prefix}f1": 100.0 * sum(f1s[i] for i in ids) / len(ids),
            f"{prefix}total": len(ids)}

  all_ids = list(references)
  out = summary(all_ids, "")
  out = {"exact_match": out["exact"], "f1": out["f1"], "total": out["total"]}
  no_ans = [i for i in all_ids if not has_ans[i]]
  if no_ans:
    answerable = [i for i in all_ids if has_ans[i]]
    if answerable:
      out.update(summary(answerable, "HasAns_"))
    out.update(summary(no_ans, "NoAns_"))
  return out


def squad_metrics(predictions: Mapping[str, str],
                  references: Mapping[str, Sequence[str]]) -> dict[str, float]:
  """Official SQuAD EM/F1 in percent over the questions in `references` (id -> gold texts; an
  empty list marks a SQuAD 2.0 no-answer question, whose correct prediction is "").

  Returns exact_match, f1, total; when there are no-answer questions also HasAns_exact/_f1/_total
  (omitted when every question is unanswerable) and NoAns_exact/_f1/_total.
  """
  return _evaluate(predictions, references, None)


def mlqa_metrics(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]],
                 lang: str) -> dict[str, float]:
  """MLQA EM/F1 in percent for answers in language `lang` (en, es, hi, vi, de, ar, zh), following
  mlqa_evaluation_v1.py. Same return keys as squad_metrics."""
  return _evaluate(predictions, references, lang)
