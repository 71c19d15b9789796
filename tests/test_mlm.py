"""minilm_jax/mlm.py: BERT's masking and the masked-LM objective (the distillation study's
no-distillation baseline; end to end in test_distill.test_run_other_objectives)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from minilm_jax import mlm, pretrained
from minilm_jax.config import TINY

CFG = TINY.replace(hidden_dropout=0.0, attention_dropout=0.0)


def test_mask_tokens_is_bert_masking():
  """round(15%) of each row's real non-special tokens, uniformly chosen; 80% [MASK], 10% random,
  10% kept; nothing else changes; padding and [CLS]/[SEP] are never picked."""
  b, t, mask_id, specials = 512, 40, 4, (2, 3, 0)
  rng = np.random.default_rng(0)
  lengths = rng.integers(3, t + 1, b)
  ids = rng.integers(10, 100, (b, t))
  ids[:, 0] = 2
  ids[np.arange(b), lengths - 1] = 3
  real = np.arange(t)[None] < lengths[:, None]
  ids[~real] = 0
  out, pos, labels, w = mlm.mask_tokens(
      jax.random.key(0), jnp.asarray(ids), jnp.asarray(real), mask_id=mask_id, vocab_size=100,
      special_ids=specials)
  out, pos, labels, w = map(np.asarray, (out, pos, labels, w))
  n = np.maximum(np.round(0.15 * (lengths - 2)), 1)
  np.testing.assert_array_equal(w.sum(1), n)
  chosen = np.zeros((b, t), bool)
  for i in range(b):
    chosen[i, pos[i][w[i] > 0]] = True
  assert chosen.sum() == n.sum()  # distinct positions
  assert not (chosen & ~real).any() and not chosen[:, 0].any()
  assert not chosen[np.arange(b), lengths - 1].any()
  np.testing.assert_array_equal(out[~chosen], ids[~chosen])
  np.testing.assert_array_equal(labels, np.take_along_axis(ids, pos, 1))
  masked, kept = (out[chosen] == mask_id).mean(), (out[chosen] == ids[chosen]).mean()
  assert abs(masked - 0.8) < 0.03 and 0.07 < kept < 0.13, (masked, kept)
  # uniform within a row: position j of a row with m maskable tokens is picked with chance n/m
  maskable = real.copy()
  maskable[:, 0] = False
  maskable[np.arange(b), lengths - 1] = False
  expected = (maskable * (n / (lengths - 2))[:, None]).sum(0)
  picked = chosen.sum(0)
  ok = expected > 50
  np.testing.assert_allclose(picked[ok], expected[ok], rtol=0.25)


def test_loss_is_the_ce_of_the_full_forward_at_the_masked_positions():
  student = pretrained.build(CFG.replace(num_layers=1), "mlm", seed=0)
  obj = mlm.objective(mask_id=4, vocab_size=CFG.vocab_size, special_ids=(2, 3, 0))
  rng = np.random.default_rng(1)
  ids = rng.integers(5, CFG.vocab_size, (4, 12))
  mask = np.ones((4, 12), np.int32)
  mask[2, 6:] = 0
  batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
           "token_type_ids": jnp.zeros((4, 12), jnp.int32), "weights": jnp.ones(4)}
  key = jax.random.key(3)
  per_ex, aux = obj.loss_fn(student, batch, key, None)
  # The same from the full MaskedLM forward on the corrupted ids.
  c, pos, labels, w = mlm.mask_tokens(
      jax.random.fold_in(key, 1), batch["input_ids"], batch["attention_mask"], mask_id=4,
      vocab_size=CFG.vocab_size, special_ids=(2, 3, 0))
  logits, _ = student(c, batch["attention_mask"], batch["token_type_ids"], dropout_rng=key)
  logp = jax.nn.log_softmax(np.asarray(logits, np.float64), -1)
  want = [-(np.asarray(logp)[i, pos[i], labels[i]] * w[i]).sum() / w[i].sum() for i in range(4)]
  np.testing.assert_allclose(per_ex, want, rtol=1e-5)
  assert per_ex.shape == (4,) and 0 <= float(aux["mlm_accuracy"]) <= 1
  ev = obj.eval_fn(student, batch, None)
  np.testing.assert_array_equal(ev["loss"], obj.eval_fn(student, batch, None)["loss"])
