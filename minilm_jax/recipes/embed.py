"""The contrastive sentence-embedding job: in-batch negatives over the global batch (every device
and host), hard negatives, Matryoshka, GradCache; STS and retrieval evaluation in the loop; a
sentence-transformers export.

`EmbedConfig` is what `python -m train.embed` parses and what the notebook API's
`Pretrained.fit(anchors, positives)` on an encoder fills in; `run_job` prepares the pair shards
-> `trainer.train` -> exports. The notebook API hands it a loaded encoder and rows in memory
(`data.source="examples"`), written as JSONL into the run directory and prepared like a file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Literal

import flax.nnx as nnx
import jax

from minilm_jax import configs, contrastive, data, pretrained, sharding, trainer
from minilm_jax.data import manpages
from minilm_jax.optim import OptimConfig
from minilm_jax.pooling import Pooling
from minilm_jax.recipes.finetune import ModelSpec, resolve_model_path

log = logging.getLogger("embed")

EXAMPLE_SETS = ("train", "sts", "retrieval")


@dataclasses.dataclass(frozen=True)
class EmbedData:
  # manpages: (summary, description) pairs of the installed manual pages (data/manpages.py),
  #   `held_out` of the pages kept for retrieval evaluation; jsonl | csv | tsv: pair files;
  #   examples: rows given in memory (the notebook API), written as JSONL into the run directory
  source: Literal["manpages", "jsonl", "csv", "tsv", "examples"] = "manpages"
  train_paths: tuple[str, ...] = ()   # several: each global batch from one, picked by weights
  weights: tuple[float, ...] = ()     # default: equal
  columns: tuple[str, ...] = ("anchor", "positive")  # anchor, positive[, negative, ...]
  sts_path: str = ""                  # STS eval file (same format): sentence, sentence, score
  sts_columns: tuple[str, ...] = ("sentence1", "sentence2", "score")
  retrieval_path: str = ""            # retrieval eval file: (query, relevant document) rows
  retrieval_columns: tuple[str, ...] = ("query", "document")
  # retrieval over a corpus with ids (InformationRetrievalEvaluator's layout): JSONL queries and
  # documents ({"id", "text"}) and qrels ({"query_id", "doc_id"[, "score"]})
  corpus_queries: str = ""
  corpus_documents: str = ""
  corpus_qrels: str = ""
  held_out: float = 0.1
  max_length: int = 128
  buckets: tuple[int, ...] = (32, 64, 128)
  beam_args: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class EmbedObjective:
  pooling: Literal["checkpoint", "mean", "cls", "max"] = "checkpoint"
  normalize: bool = True
  scale: float = 20.0
  symmetric: bool = False
  matryoshka_dims: tuple[int, ...] = ()
  matryoshka_weights: tuple[float, ...] = ()
  mask_duplicates: bool = True
  grad_cache_chunk: int = 0           # > 0: GradCache, chunks of this many texts a role


@dataclasses.dataclass(frozen=True)
class EmbedConfig:
  model: ModelSpec = ModelSpec()
  data: EmbedData = EmbedData()
  objective: EmbedObjective = EmbedObjective()
  optim: OptimConfig = OptimConfig()
  loop: trainer.LoopConfig = trainer.LoopConfig(output_dir="runs/embed")
  # <output_dir>/sentence-transformers/ (the notebook API turns it on with an output_dir)
  export_sentence_transformers: bool = True


def _write_jsonl(path: Path, rows) -> Path:
  """Atomically (every process may write the same file)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
  os.replace(tmp, path)
  return path


def pair_files(spec: EmbedData, out_dir: Path, examples: dict | None = None
               ) -> tuple[list[Path], list[str], Path | None, Path | None]:
  """-> (train files, their columns, retrieval eval file or None, STS eval file or None).
  Rows in memory (`examples`: {"train": [...], "retrieval": [...], "sts": [...]}, dicts keyed by
  the configured columns) and the man pages are written as JSONL into `<out_dir>/data/` first."""
  root = out_dir / "data"
  sts = Path(spec.sts_path) if spec.sts_path else None
  if spec.source == "examples":
    if not examples or not examples.get("train"):
      raise ValueError("data.source=examples needs rows given in memory (the notebook API)")
    unknown = set(examples) - set(EXAMPLE_SETS)
    if unknown:
      raise ValueError(f"example sets {sorted(unknown)}; expected {list(EXAMPLE_SETS)}")
    files = {k: _write_jsonl(root / f"{k}.jsonl", rows) for k, rows in examples.items() if rows}
    return [files["train"]], list(spec.columns), files.get("retrieval"), files.get("sts", sts)
  if spec.source != "manpages":
    if not spec.train_paths:
      raise ValueError(f"data.source={spec.source} needs data.train_paths")
    ret = Path(spec.retrieval_path) if spec.retrieval_path else None
    return [Path(p) for p in spec.train_paths], list(spec.columns), ret, sts
  pairs = [p for p in manpages.read_pairs() if not p["page"].startswith(manpages.GENERATED)]
  train = [p for p in pairs if not manpages.held_out(p["page"], spec.held_out)]
  held = [p for p in pairs if manpages.held_out(p["page"], spec.held_out)]
  log.info("man pages: %d pairs, %d held out for retrieval", len(pairs), len(held))
  return ([_write_jsonl(root / "manpages-train.jsonl", train)], ["summary", "description"],
          _write_jsonl(root / "manpages-held_out.jsonl", held), sts)


def make_data(cfg: EmbedConfig, out_dir: Path, model_path: Path, tok, max_len: int,
              examples: dict | None = None):
  """-> (train batches, EvalSets or None)."""
  spec, loop = cfg.data, cfg.loop
  kw = dict(tokenizer_path=model_path, max_length=max_len, beam_args=spec.beam_args or None,
            resume=loop.resume)
  hosts = dict(process_index=jax.process_index(), process_count=jax.process_count(),
               pad_id=tok.pad_id, buckets=tuple(sorted({min(b, max_len) for b in spec.buckets}
                                                       | {max_len})))
  written = spec.source in ("manpages", "examples")  # JSONL files of our own
  source = lambda path: data.Source("jsonl" if written else spec.source, paths=(str(path),))
  files, columns, retrieval, sts = pair_files(spec, out_dir, examples)
  if len(columns) < 2:
    raise ValueError(f"data.columns {list(columns)}: need anchor and positive columns")
  roles = dict(zip(data.pairs.roles_of(len(columns) - 2), columns, strict=True))
  parts = [data.PairBatches(data.prepare_pairs(source(f), roles, out_dir / "data" / f"train-{i}",
                                               **kw),
                            batch_size=loop.batch_size, seed=loop.seed + i, **hosts)
           for i, f in enumerate(files)]
  weights = spec.weights or (1.0,) * len(parts)
  train = parts[0] if len(parts) == 1 else data.MixedPairBatches(parts, weights, seed=loop.seed)
  sets = {}
  if sts is not None:
    a, b, score = spec.sts_columns
    corpora = data.prepare_pairs(source(sts), {"anchor": a, "positive": b},
                                 out_dir / "data" / "sts", label_column=score, **kw)
    sets["sts"] = ("sts", data.PairBatches(corpora, batch_size=loop.eval_batch_size,
                                           shuffle=False, **hosts))
  if retrieval is not None:
    q, d = spec.retrieval_columns if spec.source != "manpages" else columns
    corpora = data.prepare_pairs(source(retrieval), {"anchor": q, "positive": d},
                                 out_dir / "data" / "retrieval", **kw)
    sets["retrieval"] = ("retrieval", data.PairBatches(corpora, batch_size=loop.eval_batch_size,
                                                       shuffle=False, **hosts))
  if spec.corpus_queries or spec.corpus_documents or spec.corpus_qrels:
    if not (spec.corpus_queries and spec.corpus_documents and spec.corpus_qrels):
      raise ValueError("corpus retrieval needs data.corpus_queries, data.corpus_documents and "
                       "data.corpus_qrels")
    sets["corpus"] = ("corpus", data.RetrievalCorpus.prepare(
        spec.corpus_queries, spec.corpus_documents, spec.corpus_qrels, out_dir / "data" /
        "corpus", batch_size=loop.eval_batch_size, **kw, **hosts))
  return train, (data.EvalSets(sets) if sets else None)


def run(cfg: EmbedConfig) -> dict:
  """The CLI's job: -> the summary (before/final/best metrics, steps), also in metrics.json."""
  return run_job(cfg)[0]


def run_job(cfg: EmbedConfig, *, model: pretrained.Pretrained | None = None,
            examples: dict | None = None) -> tuple[dict, pretrained.Pretrained]:
  """-> (summary, the trained encoder with its pooling). The notebook API passes `model`, a
  loaded encoder (`cfg.model.path` is then its directory), and `examples`, the rows of
  `data.source="examples"`."""
  out_dir = configs.start_run(cfg, cfg.loop)
  model_path = resolve_model_path(cfg.model.path)
  m = model or pretrained.from_pretrained(model_path, "encoder", seed=cfg.loop.seed,
                                          **cfg.model.overrides())
  o = cfg.objective
  pooling = m.pooling if o.pooling == "checkpoint" else Pooling(o.pooling, o.normalize)
  width = m.config.hidden_size
  if any(not 1 <= d <= width for d in o.matryoshka_dims):
    raise ValueError(f"objective.matryoshka_dims {list(o.matryoshka_dims)} must lie in "
                     f"1..{width}, the hidden size of {model_path}")
  if cfg.loop.batch_size < 2:
    raise ValueError(f"loop.batch_size {cfg.loop.batch_size}: in-batch negatives need a global "
                     "batch of at least 2")
  max_len = min(cfg.data.max_length, m.config.max_length)
  train_batches, eval_sets = make_data(cfg, out_dir, model_path, m.tokenizer, max_len,
                                      examples)
  ccfg = contrastive.ContrastiveConfig(o.scale, o.symmetric, o.matryoshka_dims,
                                       o.matryoshka_weights, o.mask_duplicates)
  objective = contrastive.objective(pooling, ccfg, grad_cache_chunk=o.grad_cache_chunk,
                                    eval_sets=eval_sets or ())
  start = None
  if eval_sets is not None and not cfg.loop.resume:  # the starting checkpoint's metrics
    mesh = sharding.make_mesh(cfg.loop.mesh_data, cfg.loop.mesh_fsdp)
    graphdef, params = nnx.split(m.model)
    start = trainer.run_eval(jax.jit(trainer.make_eval_step(graphdef, objective)), params,
                             eval_sets, objective, mesh)
    log.info("before training: %s", start)
  wrap = lambda model: pretrained.Pretrained(model, m.config, m.tokenizer, model_path,
                                             pooling=pooling)

  def on_eval(model, metrics, is_best):
    if is_best:
      wrap(model).save(out_dir / "best")

  res = trainer.train(m.model, objective, train_batches, cfg.loop, cfg.optim,
                      eval_batches=eval_sets, on_eval=on_eval)
  final = wrap(res.model)
  if not res.preempted:  # collective exports (every process), as finetune's
    final.save(out_dir / "final")
    if cfg.export_sentence_transformers:
      final.export_sentence_transformers(out_dir / "sentence-transformers")
  summary = {"final": res.evals[-1] if res.evals else None, "best": res.best,
             "steps": int(res.state["step"]), "preempted": res.preempted,
             "interrupted": res.interrupted, "history": res.history, "evals": res.evals}
  if start is not None:
    summary["start"] = start
  configs.update_metrics(out_dir, {k: v for k, v in summary.items()
                                   if k not in ("history", "evals")})
  return summary, final
