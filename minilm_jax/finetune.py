"""Fine-tuning objectives: sequence classification, regression and span QA as `trainer.Objective`s.

Each loss is per-example (the loop weights and averages); each eval function returns per-example
outputs that the host turns into task metrics (GLUE conventions, SQuAD EM/F1 after
post-processing).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from minilm_jax import losses, metrics
from minilm_jax.trainer import Objective


def _inputs(batch):
  return batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]


def classification(num_labels: int, task: str | None = None,
                   label_smoothing: float = 0.0) -> Objective:
  """Single-sentence or pair classification; `task` picks GLUE metrics (default: accuracy+F1)."""

  def loss_fn(model, batch, rng):
    logits, _ = model(*_inputs(batch), dropout_rng=rng)
    per_ex = losses.cross_entropy(logits, batch["labels"], label_smoothing=label_smoothing)
    acc = jnp.sum((logits.argmax(-1) == batch["labels"]) * batch["weights"]) / jnp.maximum(
        batch["weights"].sum(), 1.0)
    return per_ex, {"accuracy": acc}

  def eval_fn(model, batch):
    logits, _ = model(*_inputs(batch))
    return {"logits": logits, "loss": losses.cross_entropy(logits, batch["labels"])}

  def metrics_fn(out):
    preds, labels = out["logits"].argmax(-1), out["_labels"]
    if task:
      res = metrics.glue_metrics(task, preds, labels)
    else:
      res = {"accuracy": metrics.accuracy(preds, labels),
             "macro_f1": metrics.macro_f1(preds, labels)}
    res["loss"] = float(out["loss"].mean())
    return res

  best = {"cola": "mcc", "mrpc": "f1", "qqp": "f1"}.get((task or "").lower(), "accuracy")
  return Objective(loss_fn, eval_fn, metrics_fn, best_metric=best)


def regression() -> Objective:
  """STS-B style: one output, MSE loss, Pearson/Spearman."""

  def loss_fn(model, batch, rng):
    pred, _ = model(*_inputs(batch), dropout_rng=rng)
    return losses.mse(pred[:, 0], batch["labels"].astype(jnp.float32)), {}

  def eval_fn(model, batch):
    pred, _ = model(*_inputs(batch))
    return {"pred": pred[:, 0], "loss": losses.mse(pred[:, 0], batch["labels"])}

  def metrics_fn(out):
    return {"pearson": metrics.pearson(out["pred"], out["_labels"]),
            "spearman": metrics.spearman(out["pred"], out["_labels"]),
            "loss": float(out["loss"].mean())}

  return Objective(loss_fn, eval_fn, metrics_fn, best_metric="pearson")


def span_qa(postprocess: Callable[[np.ndarray, np.ndarray, np.ndarray], dict] | None = None
            ) -> Objective:
  """Extractive QA. `postprocess(feature_index, start_logits, end_logits) -> metrics` turns an
  epoch of eval features into EM/F1 (see `squad.py`); without it only the loss is reported."""

  def loss_fn(model, batch, rng):
    (start, end), _ = model(*_inputs(batch), dropout_rng=rng)
    return losses.span_qa_loss(start, end, batch["start_positions"], batch["end_positions"],
                               batch["attention_mask"]), {}

  def eval_fn(model, batch):
    (start, end), _ = model(*_inputs(batch))
    return {"start_logits": start, "end_logits": end}

  def metrics_fn(out):
    if postprocess is None:
      return {}
    return postprocess(out["_index"], out["start_logits"], out["end_logits"])

  return Objective(loss_fn, eval_fn, metrics_fn, best_metric="f1")


def per_group(objective: Objective, group_of_example: np.ndarray, groups: list[str]
              ) -> Objective:
  """Cross-lingual evaluation: metrics per group (language) plus their mean ("avg_*"), which is
  what the MiniLM XNLI/MLQA recipe selects checkpoints on (the joint dev set of all languages)."""
  inner = objective.metrics_fn

  def metrics_fn(out):
    group = group_of_example[out["_index"]]
    res, keys = {}, []
    for g in groups:
      sel = group == g
      for k, v in inner({k: v[sel] for k, v in out.items()}).items():
        res[f"{g}/{k}"] = v
        keys += [k] if k not in keys else []
    for k in keys:
      res[f"avg_{k}"] = float(np.mean([res[f"{g}/{k}"] for g in groups if f"{g}/{k}" in res]))
    return res

  best = f"avg_{objective.best_metric}" if objective.best_metric else None
  return dataclasses.replace(objective, metrics_fn=metrics_fn, best_metric=best)
