"""Numerics the layers share: the mixed-precision matmul (bfloat16 operands, float32
accumulation, forward and backward) and counter-hash dropout.

Axis letters in einsum strings: see `model.py`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

Array = jax.Array


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
