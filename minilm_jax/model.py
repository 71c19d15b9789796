"""The BERT encoder in Flax NNX: embeddings, post-LN Transformer layers, optional pooler.

`Encoder(...)(input_ids, ...)` returns `(hidden, out)`: the last hidden states and a dict of named
intermediates (per-layer hidden states, q/k/v per head, attention logits, pooled output).
Distillation reads the intermediates; under `jax.jit` whatever the caller ignores is dead code
that XLA removes, so asking for nothing costs nothing.

Axis letters used in einsums and shape comments:
  B batch, T query positions, S key positions, D hidden (embed), N heads, H head dim,
  F feed-forward (mlp), V vocabulary.
Parameters carry `logical_axes` metadata; only `sharding.py` maps those names to a mesh.
"""

from __future__ import annotations

import functools
import math

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from minilm_jax.config import ModelConfig

Array = jax.Array


def _param(rngs: nnx.Rngs, cfg: ModelConfig, shape, axes, init: str = "normal") -> nnx.Param:
  if init == "normal":
    value = cfg.initializer_range * jax.random.normal(rngs.params(), shape, cfg.weight_dtype)
  elif init == "ones":
    value = jnp.ones(shape, cfg.weight_dtype)
  else:
    value = jnp.zeros(shape, cfg.weight_dtype)
  return nnx.Param(value, logical_axes=axes)


def matmul(eqn: str, x: Array, y: Array, dtype) -> Array:
  """einsum of `x` and `y` cast to `dtype`, accumulated and returned in float32.

  Mixed precision as accelerators run it, and the fast path on CPUs: XLA:CPU hands bfloat16
  operands with a float32 result to its AMX kernels (YNNPACK), about 3-4x its float32 matmul
  here, while a bfloat16 result falls back to a generic kernel no faster than float32
  (bench/README.md). Callers add their epilogue (bias, normalisation) in float32 and cast back.
  For a low-precision `dtype` the backward pass keeps that shape: the cotangent is cast to
  `dtype` and both gradient matmuls accumulate in float32 (plain autodiff would upcast the
  operands and run them in float32)."""
  if jnp.dtype(dtype) == jnp.float32:
    return jnp.einsum(eqn, x.astype(dtype), y.astype(dtype), preferred_element_type=jnp.float32)
  lhs, rhs, out = _operands(eqn)
  if set(lhs) - set(rhs + out) or set(rhs) - set(lhs + out):
    raise ValueError(f"matmul({eqn!r}): an index summed within one operand has no mixed-precision "
                     "gradient rule; sum it first")
  return _mixed_matmul(eqn, x.astype(dtype), y.astype(dtype))


def _operands(eqn: str) -> tuple[str, str, str]:
  """"lhs,rhs->out" -> (lhs, rhs, out)."""
  lhs, rest = eqn.split(",")
  rhs, out = rest.split("->")
  return lhs, rhs, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _mixed_matmul(eqn: str, x: Array, y: Array) -> Array:
  return jnp.einsum(eqn, x, y, preferred_element_type=jnp.float32)


def _mixed_matmul_fwd(eqn, x, y):
  return _mixed_matmul(eqn, x, y), (x, y)


def _mixed_matmul_bwd(eqn, res, g):
  # For "lhs,rhs->out" with no index private to one operand: dx = out,rhs->lhs; dy = lhs,out->rhs.
  x, y = res
  lhs, rhs, out = _operands(eqn)
  g = g.astype(x.dtype)
  dx = jnp.einsum(f"{out},{rhs}->{lhs}", g, y, preferred_element_type=jnp.float32)
  dy = jnp.einsum(f"{lhs},{out}->{rhs}", x, g, preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dy.astype(y.dtype)


_mixed_matmul.defvjp(_mixed_matmul_fwd, _mixed_matmul_bwd)


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


def _hash_bits(rng: Array, shape: tuple[int, ...]) -> Array:
  """32 well-mixed bits per element: murmur3's fmix32 of (flat index, two words from `rng`).

  Counter-based like threefry (a pure function of key and position, so the same under any
  sharding and on resume), but ~10 integer ops per element instead of threefry's ~80: XLA fuses
  it into the consumer and never materialises a mask. Not a cryptographic stream, which dropout
  does not need. One threefry call draws the two seeds.
  """
  seed = jax.random.bits(rng, (2,), jnp.uint32)
  h = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
  h = h * jnp.uint32(0x9E3779B9) + seed[0]
  h = (h ^ (h >> 16)) * jnp.uint32(0x7FEB352D)
  h = (h ^ (h >> 15) ^ seed[1]) * jnp.uint32(0x846CA68B)
  return h ^ (h >> 16)


def dropout(x: Array, rate: float, rng: Array | None) -> Array:
  """Inverted dropout driven by an explicit key; `rng=None` means deterministic.

  Masks come from `_hash_bits` (keep iff bits >= rate * 2^32): on CPU the fine-tuning step is
  1.19x faster than with `jax.random.bernoulli` (bench/README.md). Same key, same mask."""
  if rng is None or rate == 0.0:
    return x
  if math.prod(x.shape) >= 2**32:  # the flat index would wrap
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  else:
    keep = _hash_bits(rng, x.shape) >= jnp.uint32(min(int(rate * 2.0**32), 2**32 - 1))
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def activation(name: str):
  return {
      # HF "gelu" is the exact form, written as torch writes it: erf is a short polynomial on
      # XLA:CPU, where jax.nn.gelu's erfc computes two branches (L12 inference 1.02-1.04x).
      "gelu": lambda x: x * 0.5 * (1.0 + jax.lax.erf(x * (1 / math.sqrt(2)))),
      "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
      "relu": jax.nn.relu,
  }[name]


def attention_bias(mask: Array, dtype=jnp.float32) -> Array:
  """(B,S) key mask or (B,T,S) full mask -> additive bias broadcastable to (B,N,T,S)."""
  mask = mask.astype(bool)
  if mask.ndim == 2:
    mask = mask[:, None, None, :]
  elif mask.ndim == 3:
    mask = mask[:, None, :, :]
  else:
    raise ValueError(f"attention_mask must be (B,S) or (B,T,S), got shape {mask.shape}")
  return jnp.where(mask, 0.0, jnp.finfo(dtype).min).astype(dtype)


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


def attend(q: Array, k: Array, v: Array, bias: Array, cfg: ModelConfig, dropout_rng
           ) -> tuple[Array, Array]:
  """Scaled dot-product attention on (B,T,N,H) q and (B,S,N,H) k, v with an additive bias
  broadcastable to (B,N,T,S) -> (context (B,T,N,H) in the compute dtype, float32 logits).

  Training with attention dropout runs the dense core. Otherwise the context comes from
  `_blocked_attention`, which loops over blocks of about `cfg.attention_query_block` queries and
  differentiates as the dense core. The logits come from their own matmul, which XLA drops when
  the caller ignores them. The cores work on heads-major (B,N,T,H) operands: XLA:CPU runs the
  batched matmuls without relayouts around them."""
  dtype = cfg.compute_dtype
  q, k, v = _bnth(q), _bnth(k), _bnth(v)
  logits = _logits(q, k, bias, dtype)
  block = cfg.attention_query_block
  if (dropout_rng is not None and cfg.attention_dropout > 0) or not block:
    ctx = _weigh(logits, v, dtype, cfg.attention_dropout, dropout_rng)
  else:
    ctx = _blocked_attention(q, k, v, bias, dtype, block)
  return _bnth(ctx.astype(dtype)), logits


def _bnth(a: Array) -> Array:
  return a.transpose(0, 2, 1, 3)


def _logits(q: Array, k: Array, bias: Array, dtype) -> Array:
  return matmul("BNTH,BNSH->BNTS", q, k, dtype) / math.sqrt(q.shape[-1]) + bias


def _weigh(logits: Array, v: Array, dtype, rate: float = 0.0, rng: Array | None = None
           ) -> Array:
  """softmax(logits) @ v in float32, as (exp(l - m) @ v) / sum(exp(l - m)): the division
  touches (B,N,T,H) instead of (B,N,T,S). Dropout on the unnormalised weights equals dropout on
  the probabilities (a mask and a scale commute with the division)."""
  # m needs no gradient: the result does not depend on it.
  e = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
  denom = e.sum(-1, keepdims=True)  # (B,N,T,1)
  e = dropout(e.astype(dtype), rate, rng)
  return matmul("BNTS,BNSH->BNTH", e, v, dtype) / denom


def _dense_attention(q: Array, k: Array, v: Array, bias: Array, dtype) -> Array:
  return _weigh(_logits(q, k, bias, dtype), v, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blocked_attention(q: Array, k: Array, v: Array, bias: Array, dtype, block: int) -> Array:
  """`_dense_attention` on heads-major operands, a block of queries at a time (`lax.map`).

  The dense core materialises (B,N,T,S) logits, which XLA:CPU softmaxes in several passes over
  memory; blocks cut each pass to (B,N,block,S). And in the loop body the matmul operands are
  plain row-major values, which XLA:CPU keeps in bfloat16 on AMX, where the dense core's
  transposed operands get upcast to float32 matmuls. At B32 S512 the attention forward takes
  0.7x the time in float32 and 0.5x in bfloat16 (bench/README.md). Gradients come from the
  dense core, whose backward needs all the probabilities anyway."""
  b, n, t, h = q.shape
  bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)  # broadcastable to (B,N,T,S)
  nb = -(-t // block)
  tq = -(-t // nb)  # blocks of at most `block`, padded by fewer than nb rows
  pad = nb * tq - t

  def blocks(a: Array) -> Array:  # (B', N', T, X) -> (nb, B', N', tq, X)
    a = jnp.pad(a, ((0, 0), (0, 0), (0, pad), (0, 0)))
    return jnp.moveaxis(a.reshape(*a.shape[:2], nb, tq, a.shape[3]), 2, 0)

  # Blocks ride the loop in float32: XLA:CPU converts a whole stacked bfloat16 operand or
  # result on every iteration.
  xs = {"q": blocks(q.astype(jnp.float32))}
  if bias.shape[2] > 1:  # a bias row per query (seq2seq masks)
    xs["bias"] = blocks(bias)

  def one(x):
    return _dense_attention(x["q"].astype(dtype), k, v, x.get("bias", bias), dtype)

  ctx = jax.lax.map(one, xs)  # (nb, B, N, tq, H) float32
  return jnp.moveaxis(ctx, 0, 2).reshape(b, n, nb * tq, h)[:, :, :t]


def _blocked_attention_fwd(q, k, v, bias, dtype, block):
  return jax.vjp(functools.partial(_dense_attention, dtype=dtype), q, k, v, bias)


def _blocked_attention_bwd(dtype, block, dense_vjp, g):
  del dtype, block
  return dense_vjp(g)


_blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)


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

  def __call__(self, x: Array, bias: Array, dropout_rng) -> tuple[Array, dict]:
    cfg = self.cfg
    q, k, v = self.q(x), self.k(x), self.v(x)  # (B,T,N,H) each
    inter = {"q": q, "k": k, "v": v}
    if cfg.attention_impl == "cudnn":
      if dropout_rng is not None and cfg.attention_dropout > 0:
        raise ValueError("attention_impl='cudnn' has no attention dropout; set attention_dropout=0")
      ctx = jax.nn.dot_product_attention(q, k, v, bias=bias.astype(q.dtype),
                                         implementation="cudnn")
    else:
      ctx, inter["attention_logits"] = attend(q, k, v, bias, cfg, dropout_rng)
    return self.o(ctx), inter


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

  def __call__(self, x: Array, bias: Array, dropout_rng) -> tuple[Array, dict]:
    r = jax.random.split(dropout_rng, 3) if dropout_rng is not None else (None,) * 3
    a, inter = self.attn(x, bias, r[0])
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

  def position_ids(self, input_ids: Array) -> Array:
    cfg = self.cfg
    if cfg.position_style == "roberta":
      # RobertaModel counts real tokens from padding_idx + 1 and gives pads padding_idx.
      real = (input_ids != cfg.pad_token_id).astype(jnp.int32)
      return jnp.cumsum(real, axis=1) * real + cfg.pad_token_id
    return jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)

  def __call__(self, input_ids: Array, attention_mask: Array | None = None,
               token_type_ids: Array | None = None, position_ids: Array | None = None, *,
               dropout_rng: Array | None = None) -> tuple[Array, dict]:
    cfg = self.cfg
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be (batch, seq), got shape {input_ids.shape}")
    seq_len = input_ids.shape[1]
    if seq_len > cfg.max_length:
      raise ValueError(
          f"sequence length {seq_len} exceeds the model's position table: at most "
          f"{cfg.max_length} tokens (max_position_embeddings={cfg.max_position_embeddings})")
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if position_ids is None:
      position_ids = self.position_ids(input_ids)
    inputs = (input_ids, attention_mask, token_type_ids, position_ids)
    chunks = 1 if dropout_rng is not None else inference_chunks(cfg, *input_ids.shape)
    if chunks == 1:
      return self._forward(*inputs, dropout_rng)
    return _over_batch_chunks(lambda xs: self._forward(*xs, None), inputs, chunks)

  def _forward(self, input_ids, attention_mask, token_type_ids, position_ids, dropout_rng):
    cfg = self.cfg
    keys = (jax.random.split(dropout_rng, cfg.num_layers + 1) if dropout_rng is not None
            else (None,) * (cfg.num_layers + 1))

    x = self.embed(input_ids, token_type_ids, position_ids, keys[0])
    bias = attention_bias(attention_mask)
    out = {"hidden_states": [x], "q": [], "k": [], "v": [], "attention_logits": []}

    def run(layer, x, bias, rng):
      return layer(x, bias, rng)
    if cfg.remat:
      run = nnx.remat(run)
    for layer, key in zip(self.layers, keys[1:]):
      x, inter = run(layer, x, bias, key)
      out["hidden_states"].append(x)
      for name, value in inter.items():
        out[name].append(value)
    if not out["attention_logits"]:
      del out["attention_logits"]
    if cfg.use_pooler:
      out["pooled"] = jnp.tanh(self.pooler(x[:, 0]))
    return x, out


def inference_chunks(cfg: ModelConfig, batch: int, seq: int) -> int:
  """How many chunks a forward without dropout splits a (batch, seq) batch into.

  On CPU a batch of B32 S128 is twice the tokens that keep a layer's activations in cache: an
  (B*T, 1536) float32 feed-forward activation is 25 MB there, and the bf16 matmul that writes
  it runs at half the speed of the same matmul on 2048 rows. Chunks of ~2048 tokens make L12
  inference 1.3x faster at S128 and 1.2x at S512 in bf16, 1.1x in float32 (bench/README.md)."""
  tokens = cfg.inference_chunk_tokens
  if tokens is None:
    tokens = 2048 if jax.default_backend() == "cpu" else 0
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
