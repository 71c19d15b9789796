"""The BERT encoder in Flax NNX: embeddings, post-LN Transformer layers, optional pooler.

`Encoder(...)(input_ids, ...)` returns `(hidden, out)`: the last hidden states and a dict of named
intermediates (per-layer hidden states, q/k/v per head, attention logits, pooled output).
Distillation reads the intermediates; under `jax.jit` whatever the caller ignores is dead code
that XLA removes, so asking for nothing costs nothing.

Axis letters used in einsums and shape comments:
  B batch, T query positions, S key positions, D hidden (embed), N heads, H head dim,
  F feed-forward (mlp), V vocabulary.
Parameters carry `logical_axes` metadata and hidden states pass `sharding.constrain` with
activation names; only `sharding.py` maps those names to a mesh.

Hooks for callers that drive the layers themselves (UniLM seq2seq, cached decoding): an
attention `core(q, k, v, rng) -> (context, extra)` replaces scaled dot-product attention inside
`Layer`/`Attention`; `Encoder.layer_stack` runs the layers over given embeddings, and `depth`
stops the stack early (a frozen teacher only runs the layers an objective reads).
"""

from __future__ import annotations

import functools
import math

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from minilm_jax import attention, packing, sharding
from minilm_jax.config import ModelConfig
from minilm_jax.ops import dropout, matmul

Array = jax.Array
HIDDEN_AXES = ("act_batch", "act_length", "act_embed")


def _param(rngs: nnx.Rngs, cfg: ModelConfig, shape, axes, init: str = "normal") -> nnx.Param:
  if init == "normal":
    value = cfg.initializer_range * jax.random.normal(rngs.params(), shape, cfg.weight_dtype)
  elif init == "ones":
    value = jnp.ones(shape, cfg.weight_dtype)
  else:
    value = jnp.zeros(shape, cfg.weight_dtype)
  return nnx.Param(value, logical_axes=axes)


class Dense(nnx.Module):
  """kernel + bias applied with an explicit einsum, so heads stay a separate axis."""

  def __init__(self, cfg: ModelConfig, eqn: str, kernel_shape, kernel_axes, bias_shape,
               bias_axes, *, rngs: nnx.Rngs):
    self.eqn = eqn
    self.dtype = cfg.compute_dtype
    self.kernel = _param(rngs, cfg, kernel_shape, kernel_axes)
    self.bias = _param(rngs, cfg, bias_shape, bias_axes, init="zeros")

  def __call__(self, x: Array) -> Array:
    y = matmul(self.eqn, x, self.kernel[...], self.dtype)
    return (y + self.bias[...].astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm whose statistics are float32 whatever the compute dtype."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.eps = cfg.layer_norm_eps
    self.dtype = cfg.compute_dtype
    self.scale = _param(rngs, cfg, (cfg.hidden_size,), ("embed",), init="ones")
    self.bias = _param(rngs, cfg, (cfg.hidden_size,), ("embed",), init="zeros")

  def __call__(self, x: Array) -> Array:
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


def activation(name: str):
  return {
      # HF "gelu" is the exact form, written as torch writes it: erf is a short polynomial on
      # XLA:CPU, where jax.nn.gelu's erfc computes two branches (L12 inference 1.02-1.04x).
      "gelu": lambda x: x * 0.5 * (1.0 + jax.lax.erf(x * (1 / math.sqrt(2)))),
      "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
      "relu": jax.nn.relu,
  }[name]


class Embeddings(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.hidden_size
    self.word = _param(rngs, cfg, (cfg.vocab_size, d), ("vocab", "embed"))
    self.position = _param(rngs, cfg, (cfg.max_position_embeddings, d), (None, "embed"))
    self.token_type = _param(rngs, cfg, (cfg.type_vocab_size, d), (None, "embed"))
    self.ln = LayerNorm(cfg, rngs=rngs)

  def __call__(self, input_ids, token_type_ids, position_ids, dropout_rng) -> Array:
    # Gathers stay in param dtype and are summed in float32, as PyTorch does for fp32 weights.
    x = (jnp.take(self.word[...], input_ids, axis=0).astype(jnp.float32)
         + jnp.take(self.position[...], position_ids, axis=0).astype(jnp.float32)
         + jnp.take(self.token_type[...], token_type_ids, axis=0).astype(jnp.float32))
    return dropout(self.ln(x), self.cfg.hidden_dropout, dropout_rng)


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, n, h = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    qkv = dict(eqn="BTD,DNH->BTNH", kernel_shape=(d, n, h), kernel_axes=("embed", "heads", "kv"),
               bias_shape=(n, h), bias_axes=("heads", "kv"), rngs=rngs)
    self.q = Dense(cfg, **qkv)
    self.k = Dense(cfg, **qkv)
    self.v = Dense(cfg, **qkv)
    self.o = Dense(cfg, "BTNH,NHD->BTD", (n, h, d), ("heads", "kv", "embed"), (d,), ("embed",),
                   rngs=rngs)

  def __call__(self, x: Array, mask, dropout_rng, core=None) -> tuple[Array, dict]:
    """Attention over `mask` (an `attention.Mask`, a bare additive bias, or None), by the
    config's kernel (`attention.attend`). `core(q, k, v, rng) -> (context (B,T,N,H), extra
    dict)` replaces it (and ignores `mask`); its extras join the intermediates."""
    q, k, v = self.q(x), self.k(x), self.v(x)  # (B,T,N,H) each
    if core is None:
      ctx, extra = attention.attend(q, k, v, mask, self.cfg, dropout_rng)
    else:
      ctx, extra = core(q, k, v, dropout_rng)
    return self.o(ctx), {"q": q, "k": k, "v": v, **extra}


class MLP(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.act = activation(cfg.hidden_act)
    self.wi = Dense(cfg, "BTD,DF->BTF", (d, f), ("embed", "mlp"), (f,), ("mlp",), rngs=rngs)
    self.wo = Dense(cfg, "BTF,FD->BTD", (f, d), ("mlp", "embed"), (d,), ("embed",), rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return self.wo(self.act(self.wi(x)))


class Layer(nnx.Module):
  """Post-LN Transformer layer: x = LN(x + Attn(x)); x = LN(x + MLP(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.attn = Attention(cfg, rngs=rngs)
    self.attn_ln = LayerNorm(cfg, rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)
    self.mlp_ln = LayerNorm(cfg, rngs=rngs)

  def __call__(self, x: Array, mask, dropout_rng, core=None) -> tuple[Array, dict]:
    r = jax.random.split(dropout_rng, 3) if dropout_rng is not None else (None,) * 3
    a, inter = self.attn(x, mask, r[0], core)
    x = self.attn_ln(x + dropout(a, self.cfg.hidden_dropout, r[1]))
    x = self.mlp_ln(x + dropout(self.mlp(x), self.cfg.hidden_dropout, r[2]))
    return x, inter


class Encoder(nnx.Module):
  """BertModel / RobertaModel: the converted checkpoints load into this, key for key."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = Embeddings(cfg, rngs=rngs)
    self.layers = nnx.List([Layer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    if cfg.use_pooler:
      d = cfg.hidden_size
      self.pooler = Dense(cfg, "BD,DE->BE", (d, d), ("embed", None), (d,), (None,), rngs=rngs)

  def position_ids(self, input_ids: Array, within: Array | None = None) -> Array:
    """Position ids of a batch; `within` (B,T): each token's index inside its packed segment."""
    cfg = self.cfg
    if cfg.position_style == "roberta":
      # RobertaModel counts real tokens from padding_idx + 1 and gives pads padding_idx.
      real = (input_ids != cfg.pad_token_id).astype(jnp.int32)
      count = jnp.cumsum(real, axis=1) if within is None else within + 1
      return count * real + cfg.pad_token_id
    if within is not None:
      return within.astype(jnp.int32)
    return jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)

  def __call__(self, input_ids: Array, attention_mask: Array | None = None,
               token_type_ids: Array | None = None, position_ids: Array | None = None, *,
               segment_ids: Array | None = None, dropout_rng: Array | None = None,
               depth: int | None = None) -> tuple[Array, dict]:
    """-> (hidden (B,T,D), intermediates). `depth` runs only the first `depth` layers (the
    hidden states and intermediates then stop there, and there is no pooled output).

    Packed rows pass `segment_ids` instead of `attention_mask` (`packing.py`): attention is
    block-diagonal per segment and positions restart at every segment, so each packed example
    gets the hidden states it has alone. With explicit `position_ids` the length may exceed the
    position table (UniLM's pseudo tokens reuse the target's positions): only the ids index it."""
    cfg = self.cfg
    if segment_ids is not None:
      if attention_mask is not None:
        raise ValueError("pass attention_mask or segment_ids (packed rows), not both")
      if position_ids is None:
        position_ids = self.position_ids(input_ids, packing.segment_positions(segment_ids))
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be (batch, seq), got shape {input_ids.shape}")
    seq_len = input_ids.shape[1]
    if position_ids is None and seq_len > cfg.max_length:
      raise ValueError(
          f"sequence length {seq_len} exceeds the model's position table: at most "
          f"{cfg.max_length} tokens (max_position_embeddings={cfg.max_position_embeddings})")
    if depth is not None and not 0 <= depth <= cfg.num_layers:
      raise ValueError(f"depth {depth} is outside 0..{cfg.num_layers} layers")
    if attention_mask is None and segment_ids is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if position_ids is None:
      position_ids = self.position_ids(input_ids)
    masks = {"attention_mask": attention_mask} if segment_ids is None else {
        "segment_ids": segment_ids}
    inputs = (input_ids, masks, token_type_ids, position_ids)
    chunks = 1 if dropout_rng is not None else inference_chunks(cfg, *input_ids.shape)
    if chunks == 1:
      return self._forward(*inputs, dropout_rng, depth)
    return _over_batch_chunks(lambda xs: self._forward(*xs, None, depth), inputs, chunks)

  def _forward(self, input_ids, masks, token_type_ids, position_ids, dropout_rng, depth):
    keys = self.dropout_keys(dropout_rng)
    x = self.embed(input_ids, token_type_ids, position_ids, keys[0])
    x, out = self.layer_stack(x, attention.Mask.of(**masks), keys[1:], depth=depth)
    if self.cfg.use_pooler and depth in (None, self.cfg.num_layers):
      out["pooled"] = jnp.tanh(self.pooler(x[:, 0]))
    return x, out

  def dropout_keys(self, dropout_rng) -> list:
    """One key for the embeddings and one per layer (all None without dropout)."""
    n = self.cfg.num_layers + 1
    return list(jax.random.split(dropout_rng, n)) if dropout_rng is not None else [None] * n

  def layer_stack(self, x: Array, mask, keys, *, core=None,
                  depth: int | None = None) -> tuple[Array, dict]:
    """The Transformer layers over embeddings `x` -> (hidden, intermediates with the embeddings
    as hidden_states[0]). `mask`: an `attention.Mask`, a bare additive bias or None. `keys`: one
    dropout key (or None) per layer. `core(i, q, k, v, rng) -> (context, extra)` replaces layer
    i's attention over `mask`."""
    cfg = self.cfg
    x = sharding.constrain(x, HIDDEN_AXES)
    out = {"hidden_states": [x], "q": [], "k": [], "v": [], "attention_logits": []}

    def run(layer, x, mask, rng, layer_core):
      return layer(x, mask, rng, layer_core)
    if cfg.remat:
      run = nnx.remat(run, static_argnums=(4,))
    for i, (layer, key) in enumerate(zip(self.layers[:depth], keys)):
      x, inter = run(layer, x, mask, key, None if core is None else functools.partial(core, i))
      x = sharding.constrain(x, HIDDEN_AXES)
      out["hidden_states"].append(x)
      for name, value in inter.items():
        out.setdefault(name, []).append(value)
    if not out["attention_logits"]:
      del out["attention_logits"]
    return x, out


def encoder_of(model: nnx.Module) -> Encoder:
  """The Encoder inside a task model or a wrapper (anything with `.encoder`), or the model."""
  while not isinstance(model, Encoder):
    model = model.encoder
  return model


def inference_chunks(cfg: ModelConfig, batch: int, seq: int) -> int:
  """How many chunks a forward without dropout splits a (batch, seq) batch into.

  On CPU a batch of B32 S128 is twice the tokens that keep a layer's activations in cache: an
  (B*T, 1536) float32 feed-forward activation is 25 MB there, and the bf16 matmul that writes
  it runs at half the speed of the same matmul on 2048 rows. Chunks of ~2048 tokens make L12
  inference 1.3x faster at S128 and 1.2x at S512 in bf16, 1.1x in float32 (bench/README.md)."""
  tokens = cfg.inference_chunk_tokens
  if tokens is None:
    tokens = 2048 if attention.platform() == "cpu" else 0
  if not tokens:
    return 1
  return max(1, min(batch, -(-batch * seq // tokens)))


def split_batch(a: Array, n: int) -> Array:
  """(n * size, ...) -> (n, size, ...), slice c holding rows c, c + n, c + 2n, ...: a batch
  sharded over devices in contiguous blocks of rows stays sharded the same way in every slice
  (when size divides by the device count)."""
  return a.reshape(a.shape[0] // n, n, *a.shape[1:]).swapaxes(0, 1)


def merge_batch(a: Array) -> Array:
  """The inverse of `split_batch`: (n, size, ...) -> (n * size, ...)."""
  return a.swapaxes(0, 1).reshape(a.shape[0] * a.shape[1], *a.shape[2:])


def _over_batch_chunks(fn, inputs, chunks: int):
  """`fn(inputs)` as `lax.map` over `chunks` slices (`split_batch`) of the batch axis of every
  input and output leaf; the batch is padded by repeating its last row to a multiple of the
  chunk size."""
  batch = jax.tree.leaves(inputs)[0].shape[0]
  size = -(-batch // chunks)
  chunks = -(-batch // size)  # fewest chunks of that size: padding < one row per chunk
  pad = size * chunks - batch

  def split(a):
    return split_batch(jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), mode="edge"), chunks)

  out = jax.lax.map(fn, jax.tree.map(split, inputs))
  return jax.tree.map(lambda a: merge_batch(a)[:batch], out)


def count_params(module: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
