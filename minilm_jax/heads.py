"""Task models: the encoder plus one head each (classification/regression, span QA, masked LM).

Each model returns `(output, out)` where `out` is the encoder's intermediates dict, so
distillation and fine-tuning read the same structure. Heads follow the HF layouts they convert
from: BERT classifies the pooled [CLS] through one dense layer, RoBERTa through dense-tanh-dense on
the <s> state; the MLM decoder is tied to the word embeddings.
"""

from __future__ import annotations

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from minilm_jax.config import ModelConfig
from minilm_jax.model import Dense, Encoder, LayerNorm, activation
from minilm_jax.ops import dropout, matmul

Array = jax.Array


def _split(rng, n):
  return jax.random.split(rng, n) if rng is not None else (None,) * n


class SequenceClassifier(nnx.Module):
  """BertForSequenceClassification / RobertaForSequenceClassification. num_labels=1: regression."""

  def __init__(self, cfg: ModelConfig, num_labels: int, *, rngs: nnx.Rngs):
    # BERT classifies the pooled output; RobertaForSequenceClassification has no pooler (its
    # classifier reads <s>), so building one would add weights HF does not load.
    cfg = cfg.replace(use_pooler=cfg.model_type == "bert")
    self.cfg, self.num_labels = cfg, num_labels
    self.encoder = Encoder(cfg, rngs=rngs)
    d = cfg.hidden_size
    if cfg.model_type == "roberta":
      self.classifier = RobertaClassifier(cfg, num_labels, rngs=rngs)
    else:
      self.classifier = Dense(cfg, "BD,DC->BC", (d, num_labels), ("embed", None), (num_labels,),
                              (None,), rngs=rngs)

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, dropout_rng=None):
    r = _split(dropout_rng, 2)
    hidden, out = self.encoder(input_ids, attention_mask, token_type_ids, dropout_rng=r[0])
    if self.cfg.model_type == "roberta":
      logits = self.classifier(hidden[:, 0], r[1])
    else:
      logits = self.classifier(dropout(out["pooled"], self.cfg.hidden_dropout, r[1]))
    return logits.astype(jnp.float32), out


class RobertaClassifier(nnx.Module):
  def __init__(self, cfg: ModelConfig, num_labels: int, *, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.rate = cfg.hidden_dropout
    self.dense = Dense(cfg, "BD,DE->BE", (d, d), ("embed", None), (d,), (None,), rngs=rngs)
    self.out_proj = Dense(cfg, "BD,DC->BC", (d, num_labels), ("embed", None), (num_labels,),
                          (None,), rngs=rngs)

  def __call__(self, x, rng):
    r = _split(rng, 2)
    x = jnp.tanh(self.dense(dropout(x, self.rate, r[0])))
    return self.out_proj(dropout(x, self.rate, r[1]))


class SpanQA(nnx.Module):
  """BertForQuestionAnswering: per-token start and end logits."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg.replace(use_pooler=False)
    self.encoder = Encoder(self.cfg, rngs=rngs)
    d = cfg.hidden_size
    self.qa = Dense(cfg, "BTD,DC->BTC", (d, 2), ("embed", None), (2,), (None,), rngs=rngs)

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, dropout_rng=None):
    hidden, out = self.encoder(input_ids, attention_mask, token_type_ids, dropout_rng=dropout_rng)
    logits = self.qa(hidden).astype(jnp.float32)
    return (logits[..., 0], logits[..., 1]), out


class MaskedLM(nnx.Module):
  """BertForMaskedLM head: dense-act-LN transform, decoder tied to the word embeddings."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg.replace(use_pooler=False)
    self.encoder = Encoder(self.cfg, rngs=rngs)
    self.mlm = MLMHead(self.cfg, rngs=rngs)

  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *,
               dropout_rng=None):
    hidden, out = self.encoder(input_ids, attention_mask, token_type_ids, position_ids,
                               dropout_rng=dropout_rng)
    return self.mlm(hidden, self.encoder.embed.word[...]), out


class MLMHead(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.dtype = cfg.compute_dtype
    self.act = activation(cfg.hidden_act)
    self.transform = Dense(cfg, "BTD,DE->BTE", (d, d), ("embed", None), (d,), (None,), rngs=rngs)
    self.ln = LayerNorm(cfg, rngs=rngs)
    self.bias = nnx.Param(jnp.zeros((cfg.vocab_size,), cfg.weight_dtype), logical_axes=("vocab",))

  def __call__(self, hidden: Array, word_embeddings: Array) -> Array:
    x = self.ln(self.act(self.transform(hidden)))
    logits = matmul("BTD,VD->BTV", x, word_embeddings, self.dtype)
    return logits + self.bias[...].astype(jnp.float32)
