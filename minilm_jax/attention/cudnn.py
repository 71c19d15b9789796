"""GPU attention: cuDNN's fused flash attention through `jax.nn.dot_product_attention`.

cuDNN takes the mask as an additive bias (key padding, packed segments and (B,T,S) seq2seq
masks alike), computes in float16 or bfloat16 only, and `jax.nn.dot_product_attention` gives it
no attention dropout: `attention.choose` sends the other cases to XLA. `IMPLEMENTATION = "xla"`
runs the same call through XLA's reference path (the CPU tests).
"""

from __future__ import annotations

import jax

from minilm_jax.attention.xla import cast_bias

Array = jax.Array
DTYPES = ("bfloat16", "float16")
MAX_HEAD_DIM = 128  # cuDNN's flash kernels: head dims up to 128, multiples of 8
# What `cudnn_attention` asks jax.nn.dot_product_attention for; the CPU tests set "xla" to run
# this module's call (bias, casts, shapes) through XLA's reference path.
IMPLEMENTATION = "cudnn"


def supports(dtype: str, head_dim: int) -> str | None:
  """Why cuDNN cannot serve this config, or None if it can."""
  if dtype not in DTYPES:
    return f"cuDNN attention computes in {' or '.join(DTYPES)}, not {dtype}"
  if head_dim % 8 or head_dim > MAX_HEAD_DIM:
    return f"cuDNN attention needs a head dim that is a multiple of 8 up to {MAX_HEAD_DIM}, " \
           f"not {head_dim}"
  return None


def cudnn_attention(q: Array, k: Array, v: Array, bias: Array) -> Array:
  """(B,T,N,H) q and (B,S,N,H) k, v in the compute dtype, a float32 bias broadcastable to
  (B,N,T,S) -> (B,T,N,H) context. The bias is cast to the compute dtype with masked entries
  clipped to its `mask_value` (finite: a fully padded row stays NaN-free) and broadcast to
  full (T, S), the shape cuDNN's bias input takes."""
  b, t, _, _ = q.shape
  s = k.shape[1]
  bias = cast_bias(bias, q.dtype)
  bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
  bias = jax.numpy.broadcast_to(bias, (bias.shape[0], bias.shape[1], t, s))
  return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=IMPLEMENTATION)
