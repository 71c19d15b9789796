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
def _run_dir(cfg, given: bool):
  """`cfg` with its run directory: the given one (exports on), else a temporary one that is
  deleted afterwards."""
  if given:
    yield dataclasses.replace(cfg, export_hf=True)
    return
  with tempfile.TemporaryDirectory(prefix="minilm_") as tmp:
    yield dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, output_dir=tmp))


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
  if res.interrupted:
    where = (f"; checkpoint in {cfg.loop.output_dir}/checkpoints: fit(..., output_dir="
             f"{cfg.loop.output_dir!r}, resume=True) continues" if given else "")
    log.warning("fit interrupted after step %d; the model holds that step's weights%s",
                summary["steps"], where)
  m.history = History(list(res.history), list(res.evals), res.best, res.interrupted,
                      cfg.loop.output_dir if given else None)
  return m.history


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
  with _run_dir(cfg, "output_dir" in config) as cfg:
    summary, student = recipe.run_job(cfg, teacher=teacher, sources=sources)
  student.history = History(list(summary["history"]), list(summary["evals"]), summary["best"],
                            summary["interrupted"],
                            cfg.loop.output_dir if "output_dir" in config else None)
  return student


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
