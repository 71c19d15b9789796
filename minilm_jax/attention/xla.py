"""Attention compiled by XLA itself: masks as additive biases, the dense core, and the blocked
core that serves inference and dropout-free training on CPU.

Operands are (B,T,N,H) queries and (B,S,N,H) keys and values (axis letters: `model.py`); the
cores work heads-major. `xla_attention` returns the context and the float32 logits (which XLA
drops when nobody reads them; distillation does).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from minilm_jax.config import ModelConfig
from minilm_jax.ops import dropout, matmul

Array = jax.Array


def mask_value(dtype) -> float:
  """The additive bias of a masked key: finite in `dtype` with room to spare, so that logits +
  bias never overflow to -inf (finfo.min does, in bfloat16 and float16) and a row whose keys are
  all masked (a padded dummy row) softmaxes to uniform weights instead of NaN."""
  return -0.5 * float(jnp.finfo(dtype).max)


def attention_bias(mask: Array, dtype=jnp.float32) -> Array:
  """(B,S) key mask or (B,T,S) full mask -> additive bias broadcastable to (B,N,T,S)."""
  mask = mask.astype(bool)
  if mask.ndim == 2:
    mask = mask[:, None, None, :]
  elif mask.ndim == 3:
    mask = mask[:, None, :, :]
  else:
    raise ValueError(f"attention_mask must be (B,S) or (B,T,S), got shape {mask.shape}")
  return jnp.where(mask, 0.0, mask_value(dtype)).astype(dtype)


def cast_bias(bias: Array, dtype) -> Array:
  """A bias in another dtype, masked entries clipped to that dtype's `mask_value` (a float32
  mask value would round to -inf in float16)."""
  return jnp.maximum(bias, mask_value(dtype)).astype(dtype)


def xla_attention(q: Array, k: Array, v: Array, bias: Array, cfg: ModelConfig, dropout_rng
                  ) -> tuple[Array, Array]:
  """Scaled dot-product attention on (B,T,N,H) q and (B,S,N,H) k, v with an additive bias
  broadcastable to (B,N,T,S) -> (context (B,T,N,H) in the compute dtype, float32 logits).

  Training with attention dropout runs the dense core, and so does every forward off CPU unless
  `cfg.attention_query_block` says otherwise (`query_block`): the blocks are a CPU trick.
  Otherwise the context comes from `_blocked_attention`, which loops over blocks of about that
  many queries and differentiates as the dense core. The logits come from their own matmul,
  which XLA drops when the caller ignores them. The cores work on heads-major (B,N,T,H)
  operands: XLA:CPU runs the batched matmuls without relayouts around them."""
  dtype = cfg.compute_dtype
  q, k, v = _bnth(q), _bnth(k), _bnth(v)
  logits = _logits(q, k, bias, dtype)
  block = query_block(cfg)
  if (dropout_rng is not None and cfg.attention_dropout > 0) or not block:
    ctx = _weigh(logits, v, dtype, cfg.attention_dropout, dropout_rng)
  else:
    ctx = _blocked_attention(q, k, v, bias, dtype, block)
  return _bnth(ctx.astype(dtype)), logits


def query_block(cfg: ModelConfig) -> int:
  """The query block size `attend` uses: the config's, or by default 128 on CPU and 0 (the dense
  core) on other backends."""
  if cfg.attention_query_block is not None:
    return cfg.attention_query_block
  return 128 if platform() == "cpu" else 0


def platform() -> str:
  """The backend the computation being traced will run on ("cpu", "gpu" or "tpu"): what the
  CPU-only tricks and `attention_impl="auto"` decide by."""
  return jax.default_backend()


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
