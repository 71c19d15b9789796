"""BERT's masked-LM objective: the no-distillation baseline of `train.distill`
(`objective.kind=mlm`), which spends the same steps on the same text as the distilled students
with no teacher. Works on packed rows (`packing.py`) as on padded ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from minilm_jax import losses, packing
from minilm_jax.trainer import Objective


def mask_tokens(rng: jax.Array, ids: jax.Array, real: jax.Array, *, mask_id: int,
                vocab_size: int, special_ids: Sequence[int], mask_prob: float = 0.15,
                num_predictions: int | None = None):
  """BERT's masking: round(mask_prob x n) of each row's n maskable tokens (real, not special;
  at least one) are chosen uniformly; 80% of them become [MASK], 10% a random token, 10% stay.

  Static shapes: at most `num_predictions` per row (default ceil(mask_prob x T)).
  -> (corrupted ids (B, T), positions (B, K), original ids (B, K), weights (B, K) 1/0)."""
  b, t = ids.shape
  k = num_predictions or max(1, int(np.ceil(mask_prob * t)))
  maskable = real.astype(bool)
  for i in special_ids:
    maskable &= ids != i
  r_pick, r_how, r_tok = jax.random.split(rng, 3)
  # Random priorities: the top-k maskable positions of a row are a uniform random subset.
  score = jnp.where(maskable, jax.random.uniform(r_pick, (b, t)), -1.0)
  _, pos = jax.lax.top_k(score, k)
  n = jnp.clip(jnp.round(mask_prob * maskable.sum(-1)), 1, k)
  weights = ((jnp.arange(k)[None] < n[:, None]) &
             jnp.take_along_axis(maskable, pos, axis=1)).astype(jnp.float32)
  labels = jnp.take_along_axis(ids, pos, axis=1)
  u = jax.random.uniform(r_how, (b, k))
  rand = jax.random.randint(r_tok, (b, k), 0, vocab_size, ids.dtype)
  new = jnp.where(u < 0.8, mask_id, jnp.where(u < 0.9, rand, labels)).astype(ids.dtype)
  rows = jnp.arange(b)[:, None]
  corrupted = ids.at[rows, pos].set(jnp.where(weights > 0, new, labels))
  return corrupted, pos, labels, weights


def objective(*, mask_id: int, vocab_size: int, special_ids: Sequence[int],
              mask_prob: float = 0.15, eval_seed: int = 0) -> Objective:
  """Masked-LM training of a `MaskedLM` (encoder + tied MLM head) with `mask_tokens`; logits are
  computed at the masked positions only (B, K, V), not at every position.
  Evaluation masks with a fixed key (`eval_seed`), so every eval scores the same predictions.
  Per example: the mean cross-entropy over its masked tokens; `mlm_accuracy` of those
  predictions."""

  def per_example(model, batch, mask_rng, dropout_rng):
    inputs = packing.model_inputs(batch)
    ids, pos, labels, w = mask_tokens(mask_rng, inputs["input_ids"], packing.real_tokens(batch),
                                      mask_id=mask_id, vocab_size=vocab_size,
                                      special_ids=special_ids, mask_prob=mask_prob)
    hidden, _ = model.encoder(**{**inputs, "input_ids": ids}, dropout_rng=dropout_rng)
    picked = jnp.take_along_axis(hidden, pos[..., None], axis=1)  # (B, K, D)
    logits = model.mlm(picked, model.encoder.embed.word[...])
    count = jnp.maximum(w.sum(-1), 1.0)
    ce = losses.token_cross_entropy(logits, labels, w) / count
    hits = ((logits.argmax(-1) == labels) * w).sum(-1) / count
    return ce, hits

  def loss_fn(model, batch, rng, frozen):
    ce, hits = per_example(model, batch, jax.random.fold_in(rng, 1), rng)
    w = packing.example_weights(batch)
    return ce, {"mlm_accuracy": jnp.sum(hits * w) / jnp.maximum(jnp.sum(w), 1.0)}

  def eval_fn(model, batch, frozen):
    ce, hits = per_example(model, batch, jax.random.key(eval_seed), None)
    return {"loss": ce, "mlm_accuracy": hits}

  def metrics_fn(out):
    return {k: float(np.mean(v)) for k, v in out.items() if np.asarray(v).ndim == 1}

  return Objective(loss_fn, eval_fn, metrics_fn, best_metric="loss",
                   weights=packing.example_weights)
