"""`python -m train.embed` end to end on a tiny random model: pairs prepared on the fly,
retrieval evaluation before and after, the sentence-transformers export; and its config errors."""

import json

import numpy as np
import pytest
from conftest import random_hf_model, save_hf
from test_pairs import write_jsonl
from test_pipeline import IN_PROCESS, lines

from minilm_jax import pretrained
from minilm_jax.config import TINY
from train import cli, embed


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("embed")
  model = save_hf(random_hf_model(TINY, seed=5), root / "model", vocab=True)
  texts = [t.replace("jovial", "cat") for t in lines(40, seed=2, max_words=8)]
  train = write_jsonl(root / "train.jsonl", [{"q": texts[i], "a": texts[i + 20]}
                                             for i in range(16)])
  dev = write_jsonl(root / "dev.jsonl", [{"query": texts[i], "document": texts[i + 20]}
                                         for i in range(16, 20)] * 2)
  write_jsonl(root / "q.jsonl", [{"id": f"q{i}", "text": texts[i]} for i in range(4)])
  write_jsonl(root / "d.jsonl", [{"id": f"d{i}", "text": texts[20 + i]} for i in range(8)])
  write_jsonl(root / "qrels.jsonl", [{"query_id": f"q{i}", "doc_id": f"d{i}"} for i in range(4)])
  return model, train, dev


def config(files, out, **over):
  model, train, dev = files
  flat = {"model.path": str(model), "data.source": "jsonl", "data.train_paths": str(train),
          "data.columns": "q,a", "data.retrieval_path": str(dev), "data.max_length": 16,
          "data.buckets": "16", "data.beam_args": ",".join(IN_PROCESS),
          "optim.learning_rate": 1e-3, "loop.output_dir": str(out), "loop.batch_size": 8,
          "loop.eval_batch_size": 8, "loop.max_steps": 2, "loop.eval_every": 2,
          "loop.progress": False, **over}
  cfg, _ = cli.load(embed.EmbedConfig, None, [f"--{k}={v}" for k, v in flat.items()],
                    default="embed_manpages")
  return cfg


def test_embed_trains_evaluates_and_exports(files, tmp_path):
  from sentence_transformers import SentenceTransformer
  root = files[1].parent
  corpus = {"data.corpus_queries": root / "q.jsonl", "data.corpus_documents": root / "d.jsonl",
            "data.corpus_qrels": root / "qrels.jsonl"}
  summary = embed.run(config(files, tmp_path / "run", **corpus))
  metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
  assert summary["steps"] == 2
  for when in ("start", "final"):
    assert set(metrics[when]) >= {"retrieval/mrr@10", "retrieval/ndcg@10", "retrieval/recall@1",
                                  "corpus/mrr@10", "corpus/recall@10"}
  assert metrics["start"] != metrics["final"]  # the model moved
  final = pretrained.from_pretrained(tmp_path / "run" / "final")
  st = SentenceTransformer(str(tmp_path / "run" / "sentence-transformers"), device="cpu")
  texts = ["the cat sat on the mat", "hello world", "a dog"]
  assert np.abs(final.encode(texts) - st.encode(texts, convert_to_numpy=True)).max() < 1e-5


@pytest.mark.parametrize("over, message", [
    ({"objective.matryoshka_dims": "64,16"}, r"matryoshka_dims \[64, 16\] must lie in 1..32"),
    ({"loop.batch_size": 1}, "at least 2"),
    ({"data.columns": "q,missing"}, r"train.jsonl, line 1: missing column\(s\) \['missing'\]"),
])
def test_embed_config_errors(files, tmp_path, over, message):
  with pytest.raises(ValueError, match=message):
    embed.run(config(files, tmp_path / "run", **over))


def test_shipped_embed_configs_parse():
  paths = sorted((cli.CONFIG_DIR).glob("embed_*.yaml"))
  assert [p.stem for p in paths] == ["embed_all_minilm", "embed_manpages"]
  for path in paths:
    cfg, _ = cli.load(embed.EmbedConfig, str(path), [], default="embed_manpages")
    assert cfg.objective.scale == 20.0
