"""Text generation metrics on host strings: corpus BLEU-4 (sacrebleu), ROUGE-L F1 (rouge-score)
and METEOR (nltk) when WordNet data is installed.

All scores are percentages (0-100), one reference per hypothesis. These are the standard
re-implementations, not the Du et al. (2017) / coco-caption scripts the question generation papers
report with (Python 2 + a Java METEOR 1.5 jar); the numbers are close but not identical.

METEOR needs WordNet for synonym matching. No well-kept PyPI package ships NLTK's WordNet data
(`nltk.download` fetches it from a hub, which is not reachable here), so METEOR is computed only
when nltk finds a `corpora/wordnet` under its data path (NLTK_DATA); otherwise it is left out of
the results and `meteor_unavailable_reason()` says why. Debian's `wordnet-base` is not a drop-in:
nltk's reader also wants `lexnames` and `index.sense`, and refuses paths outside its data path.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence


def _check(hyps: Sequence[str], refs: Sequence[str]):
  if len(hyps) != len(refs):
    raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")


def bleu4(hyps: Sequence[str], refs: Sequence[str]) -> float:
  """Corpus BLEU-4 with sacrebleu's defaults (13a tokenization, exponential smoothing off)."""
  import sacrebleu
  _check(hyps, refs)
  if not hyps:
    return 0.0
  return float(sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score)


def rouge_l(hyps: Sequence[str], refs: Sequence[str]) -> float:
  """Mean sentence-level ROUGE-L F1 (rouge-score, Porter stemming off as in coco-caption)."""
  from rouge_score import rouge_scorer
  _check(hyps, refs)
  if not hyps:
    return 0.0
  scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
  return 100.0 * sum(scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)) / len(hyps)


@functools.lru_cache(maxsize=1)
def _wordnet():
  """-> (nltk's wordnet reader or None, why not)."""
  try:
    from nltk.corpus import wordnet
  except ImportError:
    return None, "nltk is not installed"
  try:
    wordnet.ensure_loaded()
  except (LookupError, OSError, ValueError):
    return None, ("nltk has no WordNet data (corpora/wordnet under NLTK_DATA) and no well-kept "
                  "PyPI package ships it")
  return wordnet, ""


def meteor_unavailable_reason() -> str:
  return _wordnet()[1]


def meteor(hyps: Sequence[str], refs: Sequence[str]) -> float | None:
  """Mean nltk METEOR (alpha 0.9, beta 3, gamma 0.5), or None without WordNet data."""
  wn, _ = _wordnet()
  if wn is None:
    return None
  from nltk.translate.meteor_score import single_meteor_score
  _check(hyps, refs)
  if not hyps:
    return 0.0
  total = sum(single_meteor_score(r.split(), h.split(), wordnet=wn) for h, r in zip(hyps, refs))
  return 100.0 * total / len(hyps)


def score(hyps: Sequence[str], refs: Sequence[str], *, lowercase: bool = True) -> dict[str, float]:
  """{"bleu4", "rouge_l", "meteor" (when available)} for uncased models compare lowercased text."""
  if lowercase:
    hyps, refs = [h.lower() for h in hyps], [r.lower() for r in refs]
  out = {"bleu4": bleu4(hyps, refs), "rouge_l": rouge_l(hyps, refs)}
  m = meteor(hyps, refs)
  if m is not None:
    out["meteor"] = m
  return out
