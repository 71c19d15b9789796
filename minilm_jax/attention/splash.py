"""TPU attention: Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`),
the block-sparse flash kernel MaxText trains with, over segment ids.

A BERT mask is a segment mask: a key-padding mask is segment 1 for real tokens and 0 for
padding, packed rows carry their segment ids (0 = padding). Splash takes them as
`SegmentIds(q, kv)` (a query sees the keys of its own segment) under a static full mask, so one
compiled kernel serves every batch. Padding positions form a segment of their own and attend to
each other: their outputs differ from the dense core's (which spreads them over all keys) and
are, as there, never read. Sequences are padded to the kernel's block size with segment 0.

The kernel is vmapped over the batch, and under a training mesh (`sharding.activation_sharding`)
runs per device through `shard_map` on the batch axes: a Pallas call has no partitioning rule,
so GSPMD would otherwise gather the whole batch on every device. `interpret=True` runs the same
kernel with Pallas' interpreter on any backend (the CPU tests).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from minilm_jax import sharding

Array = jax.Array
BLOCK = 128  # the kernel's query and key block: a TPU vreg's lane width


@functools.lru_cache(maxsize=32)
def _kernel(heads: int, length: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  b = BLOCK
  sizes = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                        block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  mask = sm.MultiHeadMask([sm.FullMask((length, length))] * heads)
  # Built once per shape, usually while a step is traced: its block tables are constants,
  # not values of that trace (which the cache would leak into the next one).
  with jax.ensure_compile_time_eval():
    kernel = sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)
  return kernel, sk.SegmentIds


def splash_attention(q: Array, k: Array, v: Array, segments: Array, dtype, *,
                     interpret: bool = False) -> Array:
  """(B,T,N,H) q, k, v and (B,T) int segment ids (0 = padding) -> (B,T,N,H) context in `dtype`.
  Self-attention only (T == S): segment ids name queries and keys alike."""
  b, t, n, h = q.shape
  if k.shape[1] != t:
    raise ValueError(f"splash attention is self-attention over segment ids: {t} queries but "
                     f"{k.shape[1]} keys")
  length = -(-t // BLOCK) * BLOCK  # the kernel's key blocks fill whole 128-lane vregs
  pad = length - t
  kernel, segment_ids = _kernel(n, length, interpret)

  def heads_major(a, scale=1.0):  # (B,T,N,H) -> (B,N,L,H) in the compute dtype
    a = (a.astype(jnp.float32) * scale).astype(dtype) if scale != 1.0 else a.astype(dtype)
    return jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

  seg = jnp.pad(segments.astype(jnp.int32), ((0, 0), (0, pad)))
  one = lambda q, k, v, s: kernel(q, k, v, segment_ids=segment_ids(s, s))  # noqa: E731
  run = sharding.per_batch_shard(jax.vmap(one))
  ctx = run(heads_major(q, 1.0 / math.sqrt(h)), heads_major(k), heads_major(v), seg)
  return ctx.transpose(0, 2, 1, 3)[:, :t].astype(dtype)
