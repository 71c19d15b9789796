"""Pair and triplet batches over prepared shards (data/pairs.py): aligned roles, per-process
rows, exact resume, source mixing, and the errors a bad pair file gives."""

import json

import numpy as np
import pytest
from test_pipeline import IN_PROCESS, lines

from minilm_jax import contrastive, data, pooling, pretrained, tokenizer
from minilm_jax.data import pairs


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


@pytest.fixture(scope="module")
def triplets(tmp_path_factory, gt_model_dir):
  root = tmp_path_factory.mktemp("pairs")
  texts = lines(66, seed=4, max_words=12)
  rows = [{"q": texts[i], "d": texts[i + 22], "n": texts[i + 44], "score": i / 4}
          for i in range(22)]
  src = data.Source("jsonl", paths=(str(write_jsonl(root / "t.jsonl", rows)),))
  corpora = pairs.prepare_pairs(src, {"anchor": "q", "positive": "d", "negative_1": "n"},
                                root / "prep", tokenizer_path=gt_model_dir, max_length=32,
                                beam_args=IN_PROCESS, label_column="score")
  return rows, corpora


def test_roles_are_aligned_rows(triplets, gt_model_dir):
  rows, corpora = triplets
  tok = tokenizer.load(gt_model_dir)
  b = pairs.PairBatches(corpora, batch_size=8, shuffle=False)
  seen = []
  for batch in b.iter_epoch():
    for r in np.flatnonzero(batch["weights"]):
      i = int(batch["index"][r])
      seen.append(i)
      for role, col, arr in (("anchor", "q", batch["anchor_input_ids"]),
                             ("positive", "d", batch["positive_input_ids"]),
                             ("negative", "n", batch["negative_input_ids"][:, 0])):
        want = tok([rows[i][col]], max_length=32, padding="do_not_pad")["input_ids"][0]
        assert arr[r, :len(want)].tolist() == want and not arr[r, len(want):].any(), role
      assert batch["labels"][r] == pytest.approx(rows[i]["score"])
  assert seen == list(range(22))
  assert batch["negative_input_ids"].ndim == 3 and batch["weights"].sum() == 22 - 16


def test_processes_read_disjoint_rows_of_the_same_global_batches(triplets):
  _, corpora = triplets
  one = pairs.PairBatches(corpora, batch_size=8, seed=3)
  hosts = [pairs.PairBatches(corpora, batch_size=8, seed=3, process_index=i, process_count=2)
           for i in range(2)]
  for g, h0, h1, _ in zip(iter(one), iter(hosts[0]), iter(hosts[1]), range(6)):
    for k in g:
      np.testing.assert_array_equal(np.concatenate([h0[k], h1[k]]), g[k], err_msg=k)
  epoch = [int(i) for b, _ in zip(iter(pairs.PairBatches(corpora, batch_size=11, seed=5)),
                                   range(2)) for i in b["index"]]
  assert sorted(epoch) == list(range(22))  # a shuffled epoch holds every row once


def test_resume_and_mixing_are_exact(triplets):
  _, corpora = triplets
  make = lambda: pairs.MixedPairBatches(
      [pairs.PairBatches(corpora, batch_size=4, seed=1),
       pairs.PairBatches({r: corpora[r] for r in ("anchor", "positive")}, batch_size=4,
                         seed=2)], [3, 1], seed=9)
  run = make()
  it = iter(run)
  ref = [next(it) for _ in range(12)]
  assert {"negative_input_ids" in b for b in ref} == {True, False}  # both sources drawn
  again = make()
  it = iter(again)
  for _ in range(5):
    next(it)
  state = again.state()
  resumed = make()
  resumed.restore(json.loads(json.dumps(state)))
  it = iter(resumed)
  for want in ref[5:]:
    got = next(it)
    assert sorted(got) == sorted(want)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_a_batch_trains_through_the_contrastive_objective(triplets, gt_model_dir):
  _, corpora = triplets
  model = pretrained.from_pretrained(gt_model_dir)
  batch = next(iter(pairs.PairBatches(corpora, batch_size=8, seed=0)))
  per, aux = contrastive.objective(pooling.Pooling()).loss_fn(model.model, batch, None)
  assert per.shape == (8,) and np.isfinite(per).all() and 0 <= float(aux["accuracy"]) <= 1


def test_bad_pair_input(tmp_path, gt_model_dir):
  path = write_jsonl(tmp_path / "p.jsonl", [{"q": "a b", "d": "c"}, {"q": "x"}])
  src = data.Source("jsonl", paths=(str(path),))
  with pytest.raises(ValueError, match=r"p.jsonl, line 2: missing column\(s\) \['d'\]"):
    pairs.prepare_pairs(src, {"anchor": "q", "positive": "d"}, tmp_path / "o",
                        tokenizer_path=gt_model_dir, max_length=16, beam_args=IN_PROCESS)
  write_jsonl(path, [{"q": "a b", "d": "c", "s": "high"}])
  with pytest.raises(ValueError, match="p.jsonl, line 1: regression label 'high' is not a "
                                       "number"):
    pairs.prepare_pairs(src, {"anchor": "q", "positive": "d"}, tmp_path / "o2",
                        tokenizer_path=gt_model_dir, max_length=16, beam_args=IN_PROCESS,
                        label_column="s")
  with pytest.raises(ValueError, match="expected roles"):
    pairs.prepare_pairs(src, {"anchor": "q"}, tmp_path / "o3", tokenizer_path=gt_model_dir,
                        max_length=16)
  write_jsonl(path, [{"q": "a b", "d": "c"}, {"q": "x y", "d": "z"}])
  corpora = pairs.prepare_pairs(src, {"anchor": "q", "positive": "d"}, tmp_path / "o4",
                                tokenizer_path=gt_model_dir, max_length=16, beam_args=IN_PROCESS)
  with pytest.raises(ValueError, match="at least 2"):
    pairs.PairBatches(corpora, batch_size=1)


def test_in_loop_metrics_equal_sentence_transformers_evaluators(tmp_path, gt_model_dir):
  """STS spearman and retrieval MRR/nDCG/recall from the objective's eval over EvalSets equal
  sentence-transformers' EmbeddingSimilarityEvaluator and InformationRetrievalEvaluator."""
  import jax
  from sentence_transformers import SentenceTransformer
  from sentence_transformers.sentence_transformer import evaluation

  from minilm_jax import sharding, trainer
  texts = lines(48, seed=8, max_words=10)
  sts = [{"a": texts[i], "b": texts[i + 1], "s": float((i * 7) % 5)} for i in range(0, 24, 2)]
  # Queries 0-11 -> documents; queries 12-15 repeat documents 0-3 (shared documents).
  ret = [{"q": texts[24 + i], "d": texts[36 + i % 12]} for i in range(16)]
  kw = dict(tokenizer_path=gt_model_dir, max_length=32, beam_args=IN_PROCESS)
  s = pairs.prepare_pairs(data.Source("jsonl", paths=(str(write_jsonl(tmp_path / "s.jsonl",
                          sts)),)), {"anchor": "a", "positive": "b"}, tmp_path / "s",
                          label_column="s", **kw)
  r = pairs.prepare_pairs(data.Source("jsonl", paths=(str(write_jsonl(tmp_path / "r.jsonl",
                          ret)),)), {"anchor": "q", "positive": "d"}, tmp_path / "r", **kw)
  # A corpus with ids: 6 queries, 10 documents (4 distractors), 2 queries with 2 relevant ones.
  c_queries = {f"q{i}": texts[i] for i in range(6)}
  c_docs = {f"d{i}": texts[10 + i] for i in range(10)}
  c_qrels = {f"q{i}": {f"d{i}"} | ({f"d{i + 6}"} if i < 2 else set()) for i in range(6)}
  corpus = pairs.RetrievalCorpus.prepare(
      write_jsonl(tmp_path / "cq.jsonl", [{"id": k, "text": v} for k, v in c_queries.items()]),
      write_jsonl(tmp_path / "cd.jsonl", [{"id": k, "text": v} for k, v in c_docs.items()]),
      write_jsonl(tmp_path / "qrels.jsonl", [{"query_id": q, "doc_id": d}
                                             for q, ds in c_qrels.items() for d in sorted(ds)]),
      tmp_path / "c", batch_size=4, **kw)
  sets = pairs.EvalSets({"sts": ("sts", pairs.PairBatches(s, batch_size=4, shuffle=False)),
                         "ir": ("retrieval", pairs.PairBatches(r, batch_size=6,
                                                               shuffle=False)),
                         "corpus": ("corpus", corpus)})
  model = pretrained.from_pretrained(gt_model_dir)
  obj = contrastive.objective(model.pooling, eval_sets=sets)
  import flax.nnx as nnx
  graphdef, params = nnx.split(model.model)
  mesh = sharding.make_mesh(1, 1)
  got = trainer.run_eval(jax.jit(trainer.make_eval_step(graphdef, obj)), params, sets, obj, mesh)
  st = SentenceTransformer(str(gt_model_dir), device="cpu")
  want_sts = evaluation.EmbeddingSimilarityEvaluator(
      [x["a"] for x in sts], [x["b"] for x in sts], [x["s"] for x in sts])(st)
  docs = {f"d{i}": texts[36 + i] for i in range(12)}
  want_ir = evaluation.InformationRetrievalEvaluator(
      {f"q{i}": x["q"] for i, x in enumerate(ret)}, docs,
      {f"q{i}": {f"d{i % 12}"} for i in range(16)}, mrr_at_k=[10], ndcg_at_k=[10],
      accuracy_at_k=[1], precision_recall_at_k=[1, 10], map_at_k=[10])(st)
  sts_key = next(k for k in want_sts if k.endswith("spearman_cosine"))
  assert abs(got["sts/spearman"] - want_sts[sts_key]) < 1e-6
  for ours, theirs in (("mrr@10", "cosine_mrr@10"), ("ndcg@10", "cosine_ndcg@10"),
                       ("recall@1", "cosine_recall@1"), ("recall@10", "cosine_recall@10")):
    key = next(k for k in want_ir if k.endswith(theirs))
    assert abs(got[f"ir/{ours}"] - want_ir[key]) < 1e-6, (ours, got, want_ir)
  assert 0 < got["ir/mrr@10"] < 1 and obj.best_metric == "sts/spearman"
  want_corpus = evaluation.InformationRetrievalEvaluator(
      c_queries, c_docs, c_qrels, mrr_at_k=[10], ndcg_at_k=[10], accuracy_at_k=[1],
      precision_recall_at_k=[1, 10], map_at_k=[10])(st)
  for ours, theirs in (("mrr@10", "cosine_mrr@10"), ("ndcg@10", "cosine_ndcg@10"),
                       ("recall@1", "cosine_recall@1"), ("recall@10", "cosine_recall@10")):
    key = next(k for k in want_corpus if k.endswith(theirs))
    assert abs(got[f"corpus/{ours}"] - want_corpus[key]) < 1e-6, (ours, got, want_corpus)
  assert got["corpus/recall@1"] < 1  # two queries have two relevant documents
  bad = write_jsonl(tmp_path / "bad_qrels.jsonl", [{"query_id": "q0", "doc_id": "d99"}])
  with pytest.raises(ValueError, match="bad_qrels.jsonl, line 1: unknown document id 'd99'"):
    pairs.RetrievalCorpus.prepare(tmp_path / "cq.jsonl", tmp_path / "cd.jsonl", bad,
                                  tmp_path / "c", batch_size=4, **kw)


def test_pairs_from_tfds(tmp_path, gt_model_dir):
  """glue/stsb through tfds (mock data, nothing downloads): sentence1 / sentence2 a row each,
  the float label with the anchors, aligned by row."""
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=6):
    src = data.Source("tfds", tfds_name="glue/stsb", split="train")
    corpora = pairs.prepare_pairs(src, {"anchor": "sentence1", "positive": "sentence2"},
                                  tmp_path / "p", tokenizer_path=gt_model_dir, max_length=16,
                                  beam_args=IN_PROCESS, label_column="label")
    rows = list(tfds.as_numpy(tfds.load("glue/stsb", split="train")))
  tok = tokenizer.load(gt_model_dir)
  batch = next(pairs.PairBatches(corpora, batch_size=6, shuffle=False).iter_epoch())
  for r, row in enumerate(rows):
    for role, key in (("anchor", "sentence1"), ("positive", "sentence2")):
      text = " ".join(row[key].decode().split())
      want = tok([text], max_length=16, padding="do_not_pad")["input_ids"][0]
      assert batch[f"{role}_input_ids"][r, :len(want)].tolist() == want
    assert batch["labels"][r] == pytest.approx(float(row["label"]))
  with tfds.testing.mock_data(num_examples=2):
    with pytest.raises(ValueError, match=r"glue/stsb \[train\] example 0: no feature 'nope'"):
      pairs.prepare_pairs(src, {"anchor": "nope", "positive": "sentence2"}, tmp_path / "q",
                          tokenizer_path=gt_model_dir, max_length=16, beam_args=IN_PROCESS)


def test_pairs_from_csv_with_configurable_columns(tmp_path, gt_model_dir):
  import csv
  rows = [{"question": f"q {w}", "answer": f"a {w}", "wrong": f"n {w}"}
          for w in ("cat", "dog", "mat", "world")]
  with open(tmp_path / "t.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["question", "answer", "wrong"])
    w.writeheader()
    w.writerows(rows)
  corpora = pairs.prepare_pairs(data.Source("csv", paths=(str(tmp_path / "t.csv"),)),
                                {"anchor": "question", "positive": "answer",
                                 "negative_1": "wrong"}, tmp_path / "p",
                                tokenizer_path=gt_model_dir, max_length=16, beam_args=IN_PROCESS)
  tok = tokenizer.load(gt_model_dir)
  batch = next(pairs.PairBatches(corpora, batch_size=4, shuffle=False).iter_epoch())
  for r, row in enumerate(rows):
    want = tok([row["wrong"]], max_length=16, padding="do_not_pad")["input_ids"][0]
    assert batch["negative_input_ids"][r, 0, :len(want)].tolist() == want
  assert len(set(batch["anchor_text_id"].tolist())) == 4
