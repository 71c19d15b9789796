"""Scaled dot-product attention: one entry point (`attend`) and the kernel behind it.

`ModelConfig.attention_impl` picks the kernel; "auto" (the default) picks per backend and case:

  backend  case                                               kernel
  TPU      key-padding or packed (segment ids) masks,         splash (Pallas, `splash.py`)
           no attention dropout
  GPU      float16/bfloat16, head dim <= 128, no attention    cudnn (`cudnn.py`)
           dropout; any mask (it takes a bias)
  CPU      everything                                         xla, in query blocks (`xla.py`)
  any      the rest: attention dropout in training, (B,T,S)   xla, dense
           seq2seq masks on TPU, float32 on GPU

"xla", "splash" and "cudnn" force a kernel and fail with a message naming the backend and the
alternatives where it cannot run. Neither fused kernel implements attention dropout (MaxText
and sentence-transformers' recipes train with none): training a config with
`attention_dropout > 0` runs XLA's dense core on every backend, so set it to 0 to train fused.

Only the xla kernel returns the attention logits among the intermediates; the distillation
losses compute attention from q/k, which every kernel returns.

Masks reach the kernels as a `Mask`: the additive bias every kernel can take, and, when the
mask is a segment mask (key padding, packed rows), the (B,S) segment ids splash needs. Unused
fields cost nothing under jit (XLA drops them).
"""

from __future__ import annotations

import dataclasses
import typing

import jax
import jax.numpy as jnp

from minilm_jax import packing
from minilm_jax.attention import cudnn, splash
from minilm_jax.attention.xla import (
  attention_bias,
  cast_bias,
  mask_value,
  platform,
  query_block,
  xla_attention,
)
from minilm_jax.config import AttentionImpl, ModelConfig

__all__ = ["IMPLS", "Mask", "as_mask", "attend", "attention_bias", "cast_bias", "choose",
           "mask_value", "platform", "query_block", "xla_attention"]

Array = jax.Array
IMPLS = typing.get_args(AttentionImpl)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mask:
  """Who attends to whom. `bias`: float32, broadcastable to (B,N,T,S); `segments`: (B,S) int
  segment ids (0 = padding) when the mask is a segment mask, else None."""
  bias: Array
  segments: Array | None = None

  @classmethod
  def of(cls, attention_mask: Array | None = None, segment_ids: Array | None = None) -> Mask:
    """From a (B,S) key mask, a (B,T,S) full mask, or (B,S) packed segment ids."""
    if segment_ids is not None:
      seg = jnp.asarray(segment_ids).astype(jnp.int32)
      return cls(attention_bias(packing.segment_mask(seg)), seg)
    mask = jnp.asarray(attention_mask)
    seg = mask.astype(bool).astype(jnp.int32) if mask.ndim == 2 else None
    return cls(attention_bias(mask), seg)


def as_mask(mask: Mask | Array | None) -> Mask | None:
  """A `Mask`, or a bare additive bias (callers with their own masks) wrapped in one."""
  return mask if mask is None or isinstance(mask, Mask) else Mask(mask)


def choose(cfg: ModelConfig, mask: Mask | None, dropout: bool) -> str:
  """The kernel `attend` runs: "xla", "splash" or "cudnn" (see the module docstring).
  `dropout`: attention dropout is active (training with attention_dropout > 0)."""
  impl, where = cfg.attention_impl, platform()
  segments = mask is not None and mask.segments is not None
  if impl == "auto":
    if dropout:
      return "xla"
    if where == "tpu" and segments:
      return "splash"
    if where == "gpu" and cudnn.supports(cfg.dtype, cfg.head_dim) is None:
      return "cudnn"
    return "xla"
  if impl == "xla":
    return impl
  why = None
  if dropout:
    why = (f"it has no attention dropout (attention_dropout={cfg.attention_dropout}); set "
           f"attention_dropout=0 to train with it")
  elif impl == "splash":
    if where != "tpu" and not cfg.pallas_interpret:
      why = (f"it is a TPU kernel and this backend is {where} (pallas_interpret=true runs it "
             f"in Pallas' interpreter, slowly, for tests)")
    elif not segments:
      why = "it takes key-padding or packed (segment id) masks, not a (B,T,S) mask"
  elif impl == "cudnn":
    why = ("it needs a GPU and this backend is " + where if where != "gpu"
           else cudnn.supports(cfg.dtype, cfg.head_dim))
  if why:
    raise ValueError(f"attention_impl={impl!r} cannot run here: {why}. Alternatives: "
                     f"attention_impl='auto' (picks per backend) or 'xla' (runs everywhere)")
  return impl


def attend(q: Array, k: Array, v: Array, mask: Mask | Array | None, cfg: ModelConfig,
           dropout_rng) -> tuple[Array, dict]:
  """Attention of (B,T,N,H) q over (B,S,N,H) k, v -> (context (B,T,N,H) in the compute dtype,
  extra intermediates: the float32 "attention_logits" from the xla kernel, none from fused
  ones). `mask`: a `Mask`, a bare bias, or None (attend to everything)."""
  mask = as_mask(mask)
  dtype = cfg.compute_dtype
  kernel = choose(cfg, mask, dropout_rng is not None and cfg.attention_dropout > 0)
  bias = mask.bias if mask is not None else jnp.zeros((1, 1, 1, k.shape[1]), jnp.float32)
  if kernel == "splash":
    return splash.splash_attention(q, k, v, mask.segments, dtype,
                                   interpret=cfg.pallas_interpret), {}
  if kernel == "cudnn":
    return cudnn.cudnn_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype),
                                 bias).astype(dtype), {}
  ctx, logits = xla_attention(q, k, v, bias, cfg, dropout_rng)
  return ctx, {"attention_logits": logits}
