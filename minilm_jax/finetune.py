"""Fine-tuning objectives: sequence classification, regression, span QA and UniLM seq2seq as
`trainer.Objective`s.

Each loss is per-example (the loop weights and averages); each eval function returns per-example
outputs that the host turns into task metrics (GLUE conventions, SQuAD EM/F1 after
post-processing, BLEU/ROUGE/METEOR of decoded text).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from minilm_jax import losses, metrics
from minilm_jax import seq2seq as s2s
from minilm_jax.decoding import DecodeConfig, decode_batch
from minilm_jax.trainer import Objective


def _inputs(batch):
  return batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]


def classification(num_labels: int, task: str | None = None,
                   label_smoothing: float = 0.0) -> Objective:
  """Single-sentence or pair classification; `task` picks GLUE metrics (default: accuracy+F1)."""

  def loss_fn(model, batch, rng, frozen=None):
    logits, _ = model(*_inputs(batch), dropout_rng=rng)
    per_ex = losses.cross_entropy(logits, batch["labels"], label_smoothing=label_smoothing)
    acc = jnp.sum((logits.argmax(-1) == batch["labels"]) * batch["weights"]) / jnp.maximum(
        batch["weights"].sum(), 1.0)
    return per_ex, {"accuracy": acc}

  def eval_fn(model, batch, frozen=None):
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

  def loss_fn(model, batch, rng, frozen=None):
    pred, _ = model(*_inputs(batch), dropout_rng=rng)
    return losses.mse(pred[:, 0], batch["labels"].astype(jnp.float32)), {}

  def eval_fn(model, batch, frozen=None):
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

  def loss_fn(model, batch, rng, frozen=None):
    (start, end), _ = model(*_inputs(batch), dropout_rng=rng)
    return losses.span_qa_loss(start, end, batch["start_positions"], batch["end_positions"],
                               batch["attention_mask"]), {}

  def eval_fn(model, batch, frozen=None):
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


def seq2seq(tok, cfg: s2s.Seq2SeqConfig, decode: DecodeConfig, *,
            references: Sequence[str] | None = None, lowercase: bool = True,
            on_predictions: Callable[[np.ndarray, list[str]], None] | None = None) -> Objective:
  """UniLM seq2seq (`seq2seq.py`). Batches: `seq2seq.encode_pairs` arrays.

  The loss is s2s-ft's: summed token CE over the number of target tokens in the whole batch.
  Each example contributes its mean over its own tokens, weighted by its token count
  (`Objective.weights`), so the normalisation stays global when `microbatches` slices the batch.
  Eval decodes with `decode` inside the jitted eval step and scores the text against
  `references` (indexed by the batcher's "index"): BLEU-4, ROUGE-L, METEOR where available, plus
  the teacher-forced token loss ("loss", no label smoothing). `on_predictions(index, texts)`
  receives every eval's generated texts (e.g. to write them out).
  """
  sp = s2s.Specials.from_tokenizer(tok, decode.ngram_ignore_words)

  def weights(batch):
    return batch["weights"] * batch["num_target"]

  def loss_fn(model, batch, rng, frozen=None):
    ce, pred, valid = s2s.pseudo_mask_loss(model, batch, rng, cfg, sp)
    tokens = valid.sum(-1)
    correct = ((pred == batch["target_ids"]) & valid).sum() * 1.0
    acc = correct / jnp.maximum(jnp.sum(weights(batch)), 1.0)  # a mean under `weights`
    return ce / jnp.maximum(tokens, 1), {"token_accuracy": acc}

  def eval_fn(model, batch, frozen=None):
    ce, _, valid = s2s.pseudo_mask_loss(model, batch, None, cfg, sp, label_smoothing=0.0)
    ids, _ = decode_batch(model, batch["source_ids"], batch["num_source"], decode, sp)
    return {"generated": ids, "nll_sum": ce, "num_tokens": valid.sum(-1)}

  def metrics_fn(out):
    from minilm_jax import generation_metrics
    res = {"loss": float(out["nll_sum"].sum() / max(out["num_tokens"].sum(), 1))}
    hyps = s2s.decode_texts(tok, out["generated"], sp.sep)
    if references is not None:
      refs = [references[i] for i in out["_index"]]
      res.update(generation_metrics.score(hyps, refs, lowercase=lowercase))
    if on_predictions is not None:
      on_predictions(out["_index"], hyps)
    return res

  return Objective(loss_fn, eval_fn, metrics_fn, weights=weights,
                   best_metric="bleu4" if references is not None else None)
