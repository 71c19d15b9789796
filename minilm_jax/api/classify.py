"""Classification and regression: `fit(texts, labels)`, `predict`, `evaluate` over
`recipes/finetune.py` (the job of `python -m train.finetune`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from minilm_jax.api.common import (
  SHORTHANDS,
  History,
  Predictions,
  _config,
  _history,
  _loop_summary,
  _pairs,
  _run_dir,
  _texts,
)


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


def _logits(m, texts, pairs, batch_size: int, max_length: int | None) -> np.ndarray:
  """(N, num_labels) float32 outputs of the head, batched longest-first like `encode`."""
  max_length = min(max_length or m.max_seq_length, m.config.max_length)
  enc = m.tokenizer(texts, pairs, max_length=max_length, padding="do_not_pad")
  order = np.argsort(-np.asarray([len(ids) for ids in enc["input_ids"]]), kind="stable")
  out = np.zeros((len(texts), m.num_labels), np.float32)
  for s in range(0, len(texts), batch_size):
    idx = order[s:s + batch_size]
    batch = m.tokenizer([texts[i] for i in idx], None if pairs is None else
                        [pairs[i] for i in idx], max_length=max_length, pad_to_multiple_of=16)
    out[idx] = np.asarray(m._head(batch["input_ids"], batch["attention_mask"],
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
