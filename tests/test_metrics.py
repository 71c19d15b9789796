"""Tests for minilm_jax.metrics: against scikit-learn/scipy, and hand-made SQuAD/MLQA cases."""

import math
import warnings

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics as skm

from minilm_jax import metrics

# ------------------------------------------------------------------------- classification


def _label_cases():
  rng = np.random.default_rng(0)
  for k in (2, 3, 5):
    yield rng.integers(0, k, 50), rng.integers(0, k, 50)
  y = rng.integers(0, 2, 30)
  yield np.zeros(30, int), y  # all predictions one class
  yield y, np.ones(30, int)  # all labels one class
  yield np.ones(10, int), np.ones(10, int)  # both constant
  yield np.zeros(10, int), np.zeros(10, int)  # no positive class at all
  yield y, y  # perfect
  yield 1 - y, y  # perfectly wrong


@pytest.mark.parametrize("preds,labels", list(_label_cases()))
def test_classification_metrics_match_sklearn(preds, labels):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # sklearn warns on the degenerate cases
    assert metrics.accuracy(preds, labels) == pytest.approx(skm.accuracy_score(labels, preds))
    assert metrics.matthews_corrcoef(preds, labels) == pytest.approx(
        skm.matthews_corrcoef(labels, preds), abs=1e-12)
    assert metrics.macro_f1(preds, labels) == pytest.approx(
        skm.f1_score(labels, preds, average="macro", zero_division=0.0))
    if max(preds.max(), labels.max()) <= 1:
      assert metrics.f1(preds, labels) == pytest.approx(
          skm.f1_score(labels, preds, zero_division=0.0))


def test_mcc_degenerate_is_zero():
  assert metrics.matthews_corrcoef([1, 1, 1], [0, 1, 0]) == 0.0
  assert metrics.matthews_corrcoef([0, 1, 0], [1, 1, 1]) == 0.0


# ------------------------------------------------------------------------- correlation


def _corr_cases():
  rng = np.random.default_rng(1)
  x = rng.standard_normal(40)
  yield x, 0.5 * x + rng.standard_normal(40)
  yield np.round(rng.uniform(0, 5, 60)), np.round(rng.uniform(0, 5, 60))  # many ties
  yield rng.integers(0, 3, 25).astype(float), rng.standard_normal(25)
  yield x, -x  # perfect negative
  yield np.arange(5.0), np.array([1.0, 1.0, 1.0, 2.0, 2.0])


@pytest.mark.parametrize("x,y", list(_corr_cases()))
def test_correlations_match_scipy(x, y):
  assert metrics.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0], abs=1e-12)
  assert metrics.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y)[0], abs=1e-12)


def test_correlation_of_constant_is_nan_like_scipy():
  assert math.isnan(metrics.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
  assert math.isnan(metrics.spearman([1.0, 2.0, 3.0], [2.0, 2.0, 2.0]))


# ------------------------------------------------------------------------- GLUE


def test_glue_metrics_per_task():
  labels = np.array([0, 1, 1, 0, 1, 1])
  preds = np.array([0, 1, 0, 0, 1, 1])
  acc = 5 / 6
  assert metrics.glue_metrics("cola", preds, labels) == {
      "mcc": pytest.approx(skm.matthews_corrcoef(labels, preds))}
  for task in ("sst2", "SST-2", "mnli", "mnli_mismatched", "qnli", "rte", "wnli", "xnli"):
    assert metrics.glue_metrics(task, preds, labels) == {"accuracy": pytest.approx(acc)}
  for task in ("mrpc", "qqp"):
    assert metrics.glue_metrics(task, preds, labels) == {
        "f1": pytest.approx(skm.f1_score(labels, preds)), "accuracy": pytest.approx(acc)}
  # Logits with a trailing class axis are argmax-ed.
  logits = np.eye(3)[[0, 2, 1, 1]] + 0.1
  assert metrics.glue_metrics("mnli", logits, [0, 2, 1, 0]) == {"accuracy": 0.75}
  # STS-B: regression scores, (B, 1) accepted.
  scores, gold = np.array([[0.1], [2.0], [3.5], [4.9]]), np.array([0.0, 2.5, 3.0, 5.0])
  out = metrics.glue_metrics("sts-b", scores, gold)
  assert out == {"pearson": pytest.approx(scipy.stats.pearsonr(scores[:, 0], gold)[0]),
                 "spearman": pytest.approx(1.0)}


def test_glue_unknown_task_lists_known():
  with pytest.raises(ValueError, match="cola.*stsb"):
    metrics.glue_metrics("squad", [0], [0])


# ------------------------------------------------------------------------- SQuAD


def test_normalize_answer_squad():
  assert metrics.normalize_answer("  The  Eiffel-Tower!! ") == "eiffeltower"
  assert metrics.normalize_answer("A cat and an apple") == "cat and apple"
  assert metrics.normalize_answer("theater") == "theater"  # articles only as whole words
  assert metrics.normalize_answer("“hi”") == "“hi”"  # SQuAD strips ASCII punctuation only


def test_exact_match_and_f1():
  assert metrics.exact_match("The Eiffel Tower!", ["eiffel tower"]) == 1.0
  assert metrics.f1_score("The Eiffel Tower!", ["eiffel tower"]) == 1.0
  # Multiple golds: max over them.
  assert metrics.exact_match("an apple", ["a pear", "the apple"]) == 1.0
  assert metrics.exact_match("in Paris, France", ["Paris", "France"]) == 0.0
  assert metrics.f1_score("in Paris, France", ["Paris", "France"]) == pytest.approx(0.5)
  assert metrics.f1_score("Paris France", ["Paris", "in Paris, France"]) == pytest.approx(0.8)
  # Repeated tokens count with multiplicity.
  assert metrics.f1_score("x y y", ["y y z"]) == pytest.approx(2 / 3)
  # No-answer questions (SQuAD 2.0): only the empty prediction is right.
  assert metrics.exact_match("", []) == 1.0 and metrics.f1_score("", []) == 1.0
  assert metrics.exact_match("the", []) == 1.0  # normalises to empty
  assert metrics.exact_match("Paris", []) == 0.0 and metrics.f1_score("Paris", []) == 0.0
  # Answerable question, empty prediction.
  assert metrics.exact_match("", ["Paris"]) == 0.0 and metrics.f1_score("", ["Paris"]) == 0.0
  # v2 drops golds that normalise to nothing.
  assert metrics.f1_score("", ["the", "cat"]) == 0.0


def test_squad_metrics():
  refs = {"q1": ["Eiffel Tower"], "q2": ["Paris", "France"], "q3": [], "q4": [], "q5": ["x"]}
  preds = {"q1": "the eiffel tower", "q2": "in Paris, France", "q3": "", "q4": "London",
           "extra": "ignored"}  # q5 unanswered: scores 0 and counts
  out = metrics.squad_metrics(preds, refs)
  assert out["exact_match"] == pytest.approx(100 * 2 / 5)
  assert out["f1"] == pytest.approx(100 * 2.5 / 5)
  assert out["total"] == 5
  assert out["HasAns_exact"] == pytest.approx(100 / 3)
  assert out["HasAns_f1"] == pytest.approx(50.0)
  assert out["NoAns_exact"] == out["NoAns_f1"] == 50.0
  assert out["HasAns_total"] == 3 and out["NoAns_total"] == 2
  # SQuAD 1.1 style: no no-answer questions, no HasAns/NoAns keys.
  v1 = metrics.squad_metrics({"q1": "Eiffel"}, {"q1": ["Eiffel Tower"]})
  assert set(v1) == {"exact_match", "f1", "total"}
  assert v1["exact_match"] == 0.0 and v1["f1"] == pytest.approx(100 * 2 / 3)


# ------------------------------------------------------------------------- MLQA


def test_mlqa_normalisation_per_language():
  n = metrics.normalize_answer
  assert n("“The” cat.", "en") == "cat"  # Unicode punctuation removed too
  assert n("La casa de los gatos", "es") == "casa de gatos"
  assert n("Der Hund und das Haus", "de") == "hund und haus"
  assert n("những con mèo", "vi") == "con mèo"
  assert n("الكتاب", "ar") == "كتاب"
  assert n("भारत  की राजधानी", "hi") == "भारत की राजधानी"
  assert n("北京大学。", "zh") == "北 京 大 学"
  assert n("2008年北京 Olympics", "zh") == "2008 年 北 京 olympics"
  with pytest.raises(ValueError, match="unknown MLQA language"):
    n("x", "fr")


def test_mlqa_metrics():
  refs = {"a": ["北京大学"], "b": ["清华"]}
  out = metrics.mlqa_metrics({"a": "北京", "b": "清华。"}, refs, "zh")
  assert out["exact_match"] == pytest.approx(50.0)
  assert out["f1"] == pytest.approx(100 * (2 / 3 + 1) / 2)
  es = metrics.mlqa_metrics({"a": "el perro"}, {"a": ["Perro"]}, "es")
  assert es["exact_match"] == 100.0 and es["f1"] == 100.0
  # Official MLQA quirk kept: both sides empty after normalisation -> EM 1 but F1 0.
  assert metrics.exact_match("", ["the"], lang="en") == 1.0
  assert metrics.f1_score("", ["the"], lang="en") == 0.0
