"""Model configuration: one frozen dataclass, named presets for the MiniLM family, HF config I/O.

A `ModelConfig` describes the encoder's shape and numerics only. Task heads, optimisers and data
have their own configs next to the code that uses them (`heads.py`, `finetune.py`, ...).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, Literal

import jax.numpy as jnp

PositionStyle = Literal["absolute", "roberta"]
TokenizerKind = Literal["wordpiece", "xlmr", "bpe"]
ModelType = Literal["bert", "roberta"]
# The attention kernels (minilm_jax/attention).
AttentionImpl = Literal["auto", "xla", "splash", "cudnn"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a BERT-architecture encoder (post-LN, learned absolute positions)."""

  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: Literal["gelu", "gelu_new", "relu"] = "gelu"
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  initializer_range: float = 0.02
  pad_token_id: int = 0
  # "roberta": position ids = cumsum(non-pad) * non-pad + pad_token_id, so real tokens start at
  # pad_token_id + 1 and the usable length is max_position_embeddings - pad_token_id - 1.
  position_style: PositionStyle = "absolute"
  model_type: ModelType = "bert"
  tokenizer: TokenizerKind = "wordpiece"
  do_lower_case: bool = True
  use_pooler: bool = True
  # Numerics: params are stored in param_dtype, matmuls run in dtype; LayerNorm and softmax
  # statistics are always float32.
  dtype: str = "float32"
  param_dtype: str = "float32"
  # The attention kernel (minilm_jax/attention): "auto" picks per backend (splash on TPU, cuDNN
  # on GPU where they apply, XLA otherwise); "xla" (einsums, with the attention logits among the
  # intermediates), "splash" (Pallas, TPU) and "cudnn" (GPU) force one.
  attention_impl: AttentionImpl = "auto"
  # Run Pallas kernels (splash) in Pallas' interpreter: any backend, slowly; for tests.
  pallas_interpret: bool = False
  # "xla" attention without dropout loops over blocks of this many queries (attention.attend);
  # 0 computes all queries at once. None: 128 on CPU, where blocks halve the bf16 attention time,
  # 0 on GPU/TPU, whose compilers fuse the dense core (a CPU trick never runs there by default).
  attention_query_block: int | None = None
  # A forward without dropout (inference, evaluation, a frozen teacher) runs the batch through
  # the whole encoder in chunks of about this many tokens (model.Encoder); 0 runs it at once.
  # None: 2048 on CPU, where each chunk's activations then stay in cache, 0 elsewhere.
  inference_chunk_tokens: int | None = None
  remat: bool = False

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in ("float32", "bfloat16", "float16"):
        raise ValueError(
            f"{name} must be float32, bfloat16 or float16, got {getattr(self, name)!r}")
    if self.attention_impl not in typing.get_args(AttentionImpl):
      raise ValueError(f"attention_impl must be one of auto, xla, splash, cudnn; got "
                       f"{self.attention_impl!r}")
    if self.attention_query_block is not None and self.attention_query_block < 0:
      raise ValueError(
          f"attention_query_block must be >= 0 or None, got {self.attention_query_block}")
    if self.inference_chunk_tokens is not None and self.inference_chunk_tokens < 0:
      raise ValueError(
          f"inference_chunk_tokens must be >= 0 or None, got {self.inference_chunk_tokens}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)

  @property
  def max_length(self) -> int:
    """Longest input (special tokens included) the position table supports."""
    if self.position_style == "roberta":
      return self.max_position_embeddings - self.pad_token_id - 1
    return self.max_position_embeddings

  def replace(self, **kw) -> ModelConfig:
    return dataclasses.replace(self, **kw)

  # --- Hugging Face config.json ------------------------------------------------------------

  @classmethod
  def from_hf(cls, hf: dict[str, Any] | str | Path, **overrides) -> ModelConfig:
    """Builds a config from an HF `config.json` (path or dict) of a BERT or RoBERTa model."""
    if not isinstance(hf, dict):
      path = Path(hf)
      if path.is_dir():
        path = path / "config.json"
      if not path.exists():
        raise FileNotFoundError(f"no HF config at {path}")
      hf = json.loads(path.read_text())
    model_type = hf.get("model_type", "bert")
    if model_type in ("xlm-roberta",):
      model_type = "roberta"
    if model_type not in ("bert", "roberta"):
      raise ValueError(
          f"unsupported model_type {model_type!r}: minilm_jax loads BERT-architecture encoders "
          "(model_type 'bert' or 'roberta')")
    if hf.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError(
          f"position_embedding_type {hf['position_embedding_type']!r} is not supported "
          "(absolute only)")
    act = hf.get("hidden_act", "gelu")
    if act not in ("gelu", "gelu_new", "relu"):
      raise ValueError(f"unsupported hidden_act {act!r}")
    vocab_size = hf["vocab_size"]
    kw = dict(
        vocab_size=vocab_size,
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf["max_position_embeddings"],
        type_vocab_size=hf.get("type_vocab_size", 2),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        hidden_act=act,
        hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        initializer_range=hf.get("initializer_range", 0.02),
        pad_token_id=hf.get("pad_token_id", 1 if model_type == "roberta" else 0),
        position_style="roberta" if model_type == "roberta" else "absolute",
        model_type=model_type,
        tokenizer=hf.get("minilm_jax_tokenizer") or _guess_tokenizer(model_type, vocab_size),
        do_lower_case=hf.get("minilm_jax_do_lower_case", True),
    )
    kw.update(overrides)
    return cls(**kw)

  def to_hf(self) -> dict[str, Any]:
    """The HF `config.json` dict that transformers' AutoModel builds this encoder from."""
    arch = "RobertaModel" if self.model_type == "roberta" else "BertModel"
    return {
        "architectures": [arch],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "intermediate_size": self.intermediate_size,
        "max_position_embeddings": self.max_position_embeddings,
        "type_vocab_size": self.type_vocab_size,
        "layer_norm_eps": self.layer_norm_eps,
        "hidden_act": self.hidden_act,
        "hidden_dropout_prob": self.hidden_dropout,
        "attention_probs_dropout_prob": self.attention_dropout,
        "initializer_range": self.initializer_range,
        "pad_token_id": self.pad_token_id,
        "position_embedding_type": "absolute",
        "add_pooling_layer": self.use_pooler,
        # Ours, ignored by transformers: keep the tokenizer choice explicit across round trips.
        "minilm_jax_tokenizer": self.tokenizer,
        "minilm_jax_do_lower_case": self.do_lower_case,
    }


def _guess_tokenizer(model_type: str, vocab_size: int) -> TokenizerKind:
  # Only a fallback for configs without tokenizer files; `tokenizer.load` decides from the
  # checkpoint's own files and checks them against the config.
  if model_type == "roberta":
    return "bpe"
  if vocab_size >= 250000:
    return "xlmr"
  return "wordpiece"


_BERT_BASE = dict(hidden_size=768, num_heads=12, intermediate_size=3072)
_BERT_LARGE = dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096)
_ROBERTA = dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                layer_norm_eps=1e-5, pad_token_id=1, position_style="roberta",
                model_type="roberta", tokenizer="bpe", do_lower_case=False)

# Every published MiniLM (and the teachers we distil from). Keys are lower-case HF repo names.
PRESETS: dict[str, ModelConfig] = {
    # MiniLM v1 (arXiv 2002.10957), 33M params.
    "minilm-l12-h384-uncased": ModelConfig(),
    # BERT weights, XLM-R sentencepiece tokenizer: 250037 embedding rows for 250002 token ids.
    "multilingual-minilm-l12-h384": ModelConfig(
        vocab_size=250037, tokenizer="xlmr", do_lower_case=False),
    # MiniLMv2 (arXiv 2012.15828), nreimers/MiniLMv2-*.
    "minilmv2-l6-h768-distilled-from-bert-base": ModelConfig(num_layers=6, **_BERT_BASE),
    "minilmv2-l6-h768-distilled-from-bert-large": ModelConfig(num_layers=6, **_BERT_BASE),
    "minilmv2-l12-h384-distilled-from-bert-large": ModelConfig(),
    "minilmv2-l6-h384-distilled-from-bert-large": ModelConfig(num_layers=6),
    "minilmv2-l6-h384-distilled-from-bert-base": ModelConfig(num_layers=6),
    "minilmv2-l6-h384-distilled-from-roberta-large": ModelConfig(num_layers=6, **_ROBERTA),
    "minilmv2-l6-h768-distilled-from-roberta-large": ModelConfig(
        num_layers=6, **_BERT_BASE, **_ROBERTA),
    "minilmv2-l12-h384-distilled-from-roberta-large": ModelConfig(**_ROBERTA),
    # microsoft/xtremedistil-l6-h384-uncased.
    "xtremedistil-l6-h384-uncased": ModelConfig(num_layers=6),
    # sentence-transformers/all-MiniLM-L6-v2 (the packaged checkpoint).
    "all-minilm-l6-v2": ModelConfig(num_layers=6),
    # Teachers.
    "bert-base-uncased": ModelConfig(num_layers=12, **_BERT_BASE),
    "bert-large-uncased": ModelConfig(**_BERT_LARGE),
    "roberta-large": ModelConfig(**_BERT_LARGE, **_ROBERTA),
}


def get_preset(name: str, **overrides) -> ModelConfig:
  key = name.lower().split("/")[-1]
  if key not in PRESETS:
    raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
  return PRESETS[key].replace(**overrides) if overrides else PRESETS[key]


# The one tiny config tests share.
TINY = ModelConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4,
                   intermediate_size=64, max_position_embeddings=64)
