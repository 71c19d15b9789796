"""The notebook API: train and use a loaded model in a few lines.

  clf = minilm_jax.from_pretrained(path, "classification", num_labels=3)
  history = clf.fit(texts, labels, eval=(eval_texts, eval_labels), epochs=1, batch_size=32)
  clf.predict(texts)            # Predictions(labels, probabilities)
  clf.evaluate(texts, labels)   # {"accuracy": ..., "macro_f1": ..., "loss": ...}
  history.plot()                # the curves, inline
  student = minilm_jax.distill(teacher, texts, layers=3, objective="minilm_v2", steps=500)

`fit` is not a second loop: it fills in `recipes.finetune.FinetuneConfig` from its keywords and
runs `recipes.finetune.run_job`, the job `python -m train.finetune` runs, on the texts it is
given (prepared into shards in the run directory, streamed through the same Grain pipeline);
`distill` does the same with `recipes.distill` (`python -m train.distill`).
Keywords are a few short names (`SHORTHANDS`) or any config key written `section__key`
(`optim__weight_decay=0.0`, `loop__eval_every=50`); unknown or mistyped ones are errors, as on
the command line. Ctrl-C (a notebook's interrupt) stops after the step in flight: the model in
memory has the weights of that step, and with an `output_dir` a checkpoint is left that
`fit(..., output_dir=same, resume=True)` continues from. A second `fit` continues training
from the current weights (a fresh optimizer and schedule, as in Keras and sentence-transformers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

log = logging.getLogger(__name__)

# fit(...) keyword -> config key
SHORTHANDS = {
    "epochs": "loop.num_epochs", "max_steps": "loop.max_steps", "batch_size": "loop.batch_size",
    "learning_rate": "optim.learning_rate", "weight_decay": "optim.weight_decay",
    "warmup_ratio": "optim.warmup_ratio", "seed": "loop.seed", "max_length": "data.max_length",
    "buckets": "data.buckets", "eval_every": "loop.eval_every", "output_dir": "loop.output_dir",
    "resume": "loop.resume", "overwrite": "loop.overwrite", "progress": "loop.progress",
    "dtype": "model.dtype",
}


@dataclasses.dataclass
class History:
  """What one `fit` did: `steps` (a record per logged step: loss, accuracy, seq/s, ...),
  `evals` (a record per evaluation), `best`, and whether Ctrl-C cut it short."""
  steps: list[dict]
  evals: list[dict]
  best: dict | None = None
  interrupted: bool = False
  output_dir: str | None = None
  start: dict | None = None  # the metrics before training (sentence-embedding fits)

  def plot(self):
    """A matplotlib Figure of the loss and eval curves (shown inline in a notebook)."""
    from minilm_jax.metric_log import curves_figure
    return curves_figure(self.steps, self.evals)

  def __repr__(self) -> str:
    last = self.evals[-1] if self.evals else (self.steps[-1] if self.steps else {})
    shown = {k: round(v, 4) for k, v in last.items() if isinstance(v, float)}
    return (f"History({len(self.steps)} logged steps, {len(self.evals)} evals, last {shown}"
            + (", interrupted" if self.interrupted else "") + ")")


class Predictions(NamedTuple):
  labels: list              # label names (classification) or scores (regression)
  probabilities: np.ndarray | None  # (N, num_labels) softmax; None for regression


def _texts(texts, what: str) -> list[str]:
  if isinstance(texts, str):
    texts = [texts]
  texts = list(texts)
  if not texts:
    raise ValueError(f"{what}: no texts (an empty list)")
  for i, t in enumerate(texts):
    if not isinstance(t, str):
      raise TypeError(f"{what}: text {i} is a {type(t).__name__}, not a str: {t!r:.60}")
    if not t.strip():
      raise ValueError(f"{what}: text {i} is empty")
  return texts


def _pairs(pairs, n: int, what: str) -> list[str] | None:
  if pairs is None:
    return None
  pairs = _texts(pairs, what + " pairs")
  if len(pairs) != n:
    raise ValueError(f"{what}: {n} texts but {len(pairs)} pairs")
  return pairs


def _check_classifier(m, what: str) -> bool:
  """-> whether `m` is a regression head (one output)."""
  if m.task != "classification":
    raise ValueError(
        f"{what} needs a classification or regression model; this one is a {m.task!r} model. "
        f"Load one with minilm_jax.from_pretrained(path, 'classification', num_labels=...) "
        f"(num_labels=1 for regression)")
  return m.num_labels == 1


def _label_names_for(m, labels: Sequence) -> list[str]:
  """The classes of `m`: its own names, else those of `labels` (ints 0..n-1 or strings, sorted
  as a CSV's labels are: numerically where they are numbers)."""
  if m.label_names:
    return list(m.label_names)
  from minilm_jax.data.files import label_key, sort_label_names
  if all(isinstance(y, (int, np.integer)) and not isinstance(y, bool) for y in labels):
    return [str(i) for i in range(m.num_labels)]
  names = sort_label_names({label_key(y, f"label {i}") for i, y in enumerate(labels)})
  if len(names) > m.num_labels:
    raise ValueError(f"{len(names)} distinct labels {names[:10]} but the model has "
                     f"num_labels={m.num_labels}")
  return names


def _label_ids(labels: Sequence, names: list[str], regression: bool, what: str) -> list:
  if regression:
    out = []
    for i, y in enumerate(labels):
      try:
        out.append(float(y))
      except (TypeError, ValueError):
        raise ValueError(f"{what}: label {i} ({y!r}) is not a number (a regression model)"
                         ) from None
    return out
  index = {n: i for i, n in enumerate(names)}
  out = []
  for i, y in enumerate(labels):
    key = str(y).strip() if y is not None else ""
    if key not in index:
      raise ValueError(f"{what}: label {i} ({y!r}) is not one of the model's labels {names}")
    out.append(index[key])
  return out


def _examples(texts, labels, pairs, names, regression, what):
  texts = _texts(texts, what)
  if labels is None or isinstance(labels, str):
    raise TypeError(f"{what}: labels must be a sequence, one per text")
  labels = list(labels)
  if len(labels) != len(texts):
    raise ValueError(f"{what}: {len(texts)} texts but {len(labels)} labels")
  pairs = _pairs(pairs, len(texts), what)
  ids = _label_ids(labels, names, regression, what)
  out = []
  for i, (t, y) in enumerate(zip(texts, ids)):
    ex = {"text": t, "label": y}
    if pairs is not None:
      ex["pair"] = pairs[i]
    out.append(ex)
  return out


def config_for(m, overrides: dict[str, Any]):
  """The FinetuneConfig a `fit(**overrides)` of `m` runs (keyword errors raise here)."""
  from minilm_jax.recipes import finetune as recipe
  regression = m.num_labels == 1
  cfg = recipe.FinetuneConfig(
      model=recipe.ModelSpec(path=str(m.source), dtype=m.config.dtype),
      data=recipe.DataSpec(source="examples"),
      task=recipe.TaskSpec(kind="regression" if regression else "classification"),
      export_hf=False)
  return _config(cfg, SHORTHANDS, overrides, "fit")


@contextlib.contextmanager
def _run_dir(cfg, given: bool, export: str = "export_hf"):
  """`cfg` with its run directory: the given one (the `export` flag on), else a temporary one
  that is deleted afterwards."""
  if given:
    yield dataclasses.replace(cfg, **{export: True})
    return
  with tempfile.TemporaryDirectory(prefix="minilm_") as tmp:
    yield dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, output_dir=tmp))


def _history(m, summary: dict, cfg, given: bool) -> History:
  """`m.history` from a job's summary; a warning when Ctrl-C cut the run short."""
  out = cfg.loop.output_dir if given else None
  if summary["interrupted"]:
    where = (f"; checkpoint in {out}/checkpoints: the same call with output_dir={out!r}, "
             f"resume=True continues" if given else "")
    log.warning("training interrupted after step %d; the model holds that step's weights%s",
                summary["steps"], where)
  m.history = History(list(summary["history"]), list(summary["evals"]), summary["best"],
                      summary["interrupted"], out, summary.get("start"))
  return m.history


def fit(m, texts, labels, *, pairs=None, eval=None, **config) -> History:
  """Fine-tunes classifier or regressor `m` in place; see the module doc. `eval`: (texts,
  labels) or (texts, pairs, labels), evaluated every `eval_every` steps (default: per epoch)."""
  from minilm_jax.data import Source
  from minilm_jax.recipes import finetune as recipe
  regression = _check_classifier(m, "fit")
  cfg = config_for(m, config)  # keyword errors first
  names = None if regression else _label_names_for(m, list(labels) if labels is not None else [])
  train = _examples(texts, labels, pairs, names, regression, "fit")
  evals = {}
  if eval is not None:
    if not isinstance(eval, (tuple, list)) or len(eval) not in (2, 3):
      raise TypeError("fit: eval must be (texts, labels) or (texts, pairs, labels)")
    ev_texts, ev_pairs, ev_labels = (eval[0], None, eval[1]) if len(eval) == 2 else eval
    evals["eval"] = _examples(ev_texts, ev_labels, ev_pairs, names, regression, "fit eval")
  src = lambda ex: Source("examples", examples=tuple(ex), regression=regression,
                          pair_column="pair" if pairs is not None else None,
                          label_names=tuple(names) if names else None)
  sources = (src(train), {k: src(v) for k, v in evals.items()}, names)
  given = "output_dir" in config
  with _run_dir(cfg, given) as cfg:
    summary, res = recipe.run_job(cfg, model=m, sources=sources)
  m.model, m.label_names = res.model, names
  return _history(m, _loop_summary(summary, res), cfg, given)


def _loop_summary(summary: dict, res) -> dict:
  return {**summary, "history": res.history, "evals": res.evals, "interrupted": res.interrupted}


DISTILL_SHORTHANDS = {
    "steps": "loop.max_steps", "epochs": "loop.num_epochs", "batch_size": "loop.batch_size",
    "learning_rate": "optim.learning_rate", "seed": "loop.seed", "objective": "objective.kind",
    "relation_heads": "objective.num_relation_heads", "init": "student.init",
    "hidden_size": "student.hidden_size", "num_heads": "student.num_heads",
    "max_length": "corpus.max_length", "held_out": "corpus.held_out",
    "packing": "corpus.packing", "seq_len": "corpus.seq_len", "eval_every": "loop.eval_every",
    "output_dir": "loop.output_dir", "resume": "loop.resume", "overwrite": "loop.overwrite",
    "progress": "loop.progress", "dtype": "student.dtype",
}


def _config(cfg, shorthands: dict, overrides: dict, what: str):
  """`cfg` with keyword `overrides`: a shorthand or section__key each, type-checked."""
  from minilm_jax import configs
  flat = {}
  for key, value in overrides.items():
    if key in shorthands:
      flat[shorthands[key]] = value
    elif "__" in key:
      flat[key.replace("__", ".")] = value
    else:
      raise TypeError(f"{what}() got an unknown keyword {key!r}; use one of {sorted(shorthands)}"
                      f" or a config key as section__key (sections: "
                      f"{[f.name for f in dataclasses.fields(cfg)]}, e.g. optim__weight_decay)")
  try:
    return configs.merge(cfg, flat)
  except KeyError as e:
    raise TypeError(f"{what}(): {e.args[0]}") from None


def distill(teacher, texts, *, layers: int | Sequence[int] = 3, eval_texts=None, **config):
  """A student distilled from `teacher` (a loaded model or a path) on `texts` -> a Pretrained
  encoder, its `history` set. `layers`: the student's depth (its layers start from the
  teacher's, evenly spaced) or the teacher layers to copy; `init="random"` and `hidden_size`
  build other students. Held out for the distillation loss: `eval_texts`, else the first
  `held_out` texts (default a tenth, at most 1000). The job is `python -m train.distill`'s;
  keywords: `DISTILL_SHORTHANDS` or section__key, checked as for `fit`."""
  from minilm_jax.data import Source
  from minilm_jax.pretrained import Pretrained, from_pretrained
  from minilm_jax.recipes import distill as recipe
  if not isinstance(teacher, Pretrained):
    teacher = from_pretrained(teacher)
  texts = _texts(texts, "distill")
  cfg = recipe.DistillConfig(
      teacher=recipe.TeacherSpec(path=str(teacher.source)),
      corpus=recipe.CorpusSpec(source="examples",
                               held_out=0 if eval_texts is not None else
                               min(1000, len(texts) // 10)),
      export_hf=False)
  cfg = _config(cfg, DISTILL_SHORTHANDS, config, "distill")  # keyword errors first
  n = teacher.config.num_layers
  if isinstance(layers, int):
    if not 1 <= layers <= n:
      raise ValueError(f"distill: layers={layers}, the teacher has {n}")
    # evenly spaced, the last one the teacher's last (same output space): 6 -> 3 is 1, 3, 5
    layers = tuple(n - 1 - round((layers - 1 - i) * n / layers) for i in range(layers))
  cfg = dataclasses.replace(cfg, student=dataclasses.replace(
      cfg.student, layers=tuple(layers), num_layers=len(layers)))
  src = lambda ts: Source("examples", examples=tuple({"text": t} for t in ts))
  sources = (src(texts), src(_texts(eval_texts, "distill eval")) if eval_texts is not None
             else None)
  given = "output_dir" in config
  with _run_dir(cfg, given) as cfg:
    summary, student = recipe.run_job(cfg, teacher=teacher, sources=sources)
  _history(student, summary, cfg, given)
  return student


# --- sentence embeddings: contrastive pairs (recipes/embed.py, `python -m train.embed`) --------

EMBED_SHORTHANDS = {
    **{k: v for k, v in SHORTHANDS.items() if k != "buckets"}, "buckets": "data.buckets",
    "scale": "objective.scale", "symmetric": "objective.symmetric",
    "matryoshka_dims": "objective.matryoshka_dims", "grad_cache_chunk":
    "objective.grad_cache_chunk", "pooling": "objective.pooling",
    "mask_duplicates": "objective.mask_duplicates",
}


def _negatives(negatives, n: int) -> list[list[str]]:
  """Hard negatives: one text per anchor, or K texts per anchor (the same K for all)."""
  negatives = list(negatives)
  if len(negatives) != n:
    raise ValueError(f"fit: {n} anchors but {len(negatives)} negatives")
  rows = [[x] if isinstance(x, str) else list(x) for x in negatives]
  ks = {len(r) for r in rows}
  if len(ks) != 1 or 0 in ks:
    raise ValueError(f"fit: every anchor needs the same number (>= 1) of negatives, got {ks}")
  for i, r in enumerate(rows):
    _texts(r, f"fit negatives of anchor {i}")
  return rows


def fit_pairs(m, anchors, positives, *, negatives=None, eval_retrieval=None, eval_sts=None,
              **config) -> History:
  """Trains encoder `m` contrastively in place: each anchor against its positive and every
  other text of the global batch (MultipleNegativesRankingLoss, scale 20 on cosine; equal
  texts are masked, not negatives). `negatives`: hard negatives, one or K per anchor.
  Evaluated before training and every `eval_every` steps: `eval_retrieval=(queries, documents)`
  (MRR@10, nDCG@10, Recall@1/10, the i-th document relevant to the i-th query) and
  `eval_sts=(sentences1, sentences2, scores)` (Spearman of cosine). The job is
  `python -m train.embed`'s; keywords: `EMBED_SHORTHANDS` or section__key."""
  from minilm_jax.recipes import embed as recipe
  from minilm_jax.recipes.finetune import ModelSpec
  if m.task != "encoder":
    raise ValueError(f"fit(anchors, positives) trains an encoder; this one is a {m.task!r} "
                     f"model (load it with minilm_jax.from_pretrained(path))")
  anchors = _texts(anchors, "fit anchors")
  if positives is None:
    raise TypeError("fit(anchors, positives): an encoder trains on pairs; positives missing")
  positives = list(positives)
  distinct = len({p if isinstance(p, str) else repr(p) for p in positives})
  if not all(isinstance(p, str) for p in positives) or (len(positives) >= 4
                                                         and distinct <= len(positives) // 2):
    raise ValueError(
        f"fit on an encoder trains on (anchor, positive) text pairs; these positives look like "
        f"class labels ({distinct} distinct values over {len(positives)} rows), and with "
        f"in-batch negatives a repeated positive is no negative. To classify, load "
        f"minilm_jax.from_pretrained(path, 'classification', num_labels=N)")
  positives = _pairs(positives, len(anchors), "fit")
  columns = ["anchor", "positive"]
  rows = [{"anchor": a, "positive": p} for a, p in zip(anchors, positives)]
  if negatives is not None:
    neg = _negatives(negatives, len(anchors))
    columns += [f"negative_{k + 1}" for k in range(len(neg[0]))]
    rows = [{**r, **{c: t for c, t in zip(columns[2:], ns)}} for r, ns in zip(rows, neg)]
  examples = {"train": rows}
  if eval_retrieval is not None:
    if not isinstance(eval_retrieval, (tuple, list)) or len(eval_retrieval) != 2:
      raise TypeError("fit: eval_retrieval must be (queries, documents)")
    q = _texts(eval_retrieval[0], "fit eval_retrieval queries")
    d = _pairs(eval_retrieval[1], len(q), "fit eval_retrieval")
    examples["retrieval"] = [{"query": a, "document": b} for a, b in zip(q, d)]
  if eval_sts is not None:
    if not isinstance(eval_sts, (tuple, list)) or len(eval_sts) != 3:
      raise TypeError("fit: eval_sts must be (sentences1, sentences2, scores)")
    s1 = _texts(eval_sts[0], "fit eval_sts")
    s2 = _pairs(eval_sts[1], len(s1), "fit eval_sts")
    scores = list(eval_sts[2])
    for i, y in enumerate(scores):
      if isinstance(y, bool) or not isinstance(y, (int, float, np.integer, np.floating)):
        raise ValueError(f"fit eval_sts: score {i} ({y!r}) is not a number")
    if len(scores) != len(s1):
      raise ValueError(f"fit eval_sts: {len(s1)} sentence pairs but {len(scores)} scores")
    examples["sts"] = [{"sentence1": a, "sentence2": b, "score": float(y)}
                       for a, b, y in zip(s1, s2, scores)]
  cfg = recipe.EmbedConfig(
      model=ModelSpec(path=str(m.source), dtype=m.config.dtype),
      data=recipe.EmbedData(source="examples", columns=tuple(columns)),
      export_sentence_transformers=False)
  cfg = _config(cfg, EMBED_SHORTHANDS, config, "fit")
  given = "output_dir" in config
  with _run_dir(cfg, given, "export_sentence_transformers") as cfg:
    summary, trained = recipe.run_job(cfg, model=m, examples=examples)
  m.model, m.pooling = trained.model, trained.pooling
  return _history(m, summary, cfg, given)


# --- extractive QA (recipes/finetune.py's run_qa) ------------------------------------------------

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
  import flax.nnx as nnx
  import jax
  import jax.numpy as jnp

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
  graphdef, state = nnx.split(m.model)
  fn = m._forwards.get(("qa", graphdef))
  if fn is None:
    def forward(state, ids, mask, types):
      (start, end), _ = nnx.merge(graphdef, state)(ids, mask, types)
      return start.astype(jnp.float32), end.astype(jnp.float32)
    fn = m._forwards[("qa", graphdef)] = jax.jit(forward)
  n = len(feats["input_ids"])
  start, end = (np.zeros(feats["input_ids"].shape, np.float32) for _ in range(2))
  for s in range(0, n, batch_size):
    sl = slice(s, s + batch_size)
    start[sl], end[sl] = (np.asarray(x) for x in fn(
        state, feats["input_ids"][sl], feats["attention_mask"][sl], feats["token_type_ids"][sl]))
  out = []
  for ex, (span, score, _) in zip(examples, squad.best_spans(
      examples, feats, start, end, max_answer_length=max_answer_length), strict=True):
    a, b = span if span is not None else (0, 0)
    out.append({"answer": ex["context"][a:b], "start": a, "end": b,
                "score": score if span is not None else None})
  return out[0] if single else out


def _logits(m, texts, pairs, batch_size: int, max_length: int | None) -> np.ndarray:
  """(N, num_labels) float32 outputs of the head, batched longest-first like `encode`."""
  import flax.nnx as nnx
  import jax
  import jax.numpy as jnp
  max_length = min(max_length or m.max_seq_length, m.config.max_length)
  enc = m.tokenizer(texts, pairs, max_length=max_length, padding="do_not_pad")
  order = np.argsort(-np.asarray([len(ids) for ids in enc["input_ids"]]), kind="stable")
  graphdef, state = nnx.split(m.model)
  fn = m._forwards.get(("head", graphdef))
  if fn is None:
    def forward(state, ids, mask, types):
      out, _ = nnx.merge(graphdef, state)(ids, mask, types)
      return out.astype(jnp.float32)
    fn = m._forwards[("head", graphdef)] = jax.jit(forward)
  out = np.zeros((len(texts), m.num_labels), np.float32)
  for s in range(0, len(texts), batch_size):
    idx = order[s:s + batch_size]
    batch = m.tokenizer([texts[i] for i in idx], None if pairs is None else
                        [pairs[i] for i in idx], max_length=max_length, pad_to_multiple_of=16)
    out[idx] = np.asarray(fn(state, batch["input_ids"], batch["attention_mask"],
                             batch["token_type_ids"]))
  return out


def predict(m, texts, pairs=None, *, batch_size: int = 128,
            max_length: int | None = None) -> Predictions:
  """Label names and softmax probabilities (classification), or scores (regression)."""
  regression = _check_classifier(m, "predict")
  texts = _texts(texts, "predict")
  logits = _logits(m, texts, _pairs(pairs, len(texts), "predict"), batch_size, max_length)
  if regression:
    return Predictions(logits[:, 0].tolist(), None)
  z = np.exp(logits - logits.max(-1, keepdims=True))
  probs = z / z.sum(-1, keepdims=True)
  names = m.label_names or [str(i) for i in range(m.num_labels)]
  return Predictions([names[i] for i in probs.argmax(-1)], probs)


def evaluate(m, texts, labels, pairs=None, *, batch_size: int = 128,
             max_length: int | None = None) -> dict:
  """The metrics the training loop reports: accuracy, macro-F1 and loss (classification);
  Pearson, Spearman and loss (regression)."""
  from minilm_jax import finetune
  regression = _check_classifier(m, "evaluate")
  names = None if regression else _label_names_for(m, list(labels) if labels is not None else [])
  ex = _examples(texts, labels, pairs, names, regression, "evaluate")
  y = np.asarray([e["label"] for e in ex])
  logits = _logits(m, [e["text"] for e in ex], None if pairs is None else [e["pair"] for e in ex],
                   batch_size, max_length)
  if regression:
    pred = logits[:, 0]
    return finetune.regression().metrics_fn(
        {"pred": pred, "_labels": y.astype(np.float32), "loss": (pred - y) ** 2})
  shifted = logits - logits.max(-1, keepdims=True)
  nll = np.log(np.exp(shifted).sum(-1)) - shifted[np.arange(len(y)), y]
  return finetune.classification(m.num_labels).metrics_fn(
      {"logits": logits, "_labels": y, "loss": nll})
