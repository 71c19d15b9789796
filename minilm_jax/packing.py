"""Packed rows: several examples in one row, told apart by segment ids (MaxText's and T5's layout).

`segment_ids` (B, T) int: 1, 2, ... for the examples of a row in order, 0 for padding. The
encoder turns them into a block-diagonal attention mask and per-segment positions; the
distillation losses into per-segment relations. Pure array functions: the model, the losses and
the data pipeline share them, and none of them imports another.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def segment_mask(segment_ids: Array) -> Array:
  """(B, T) -> (B, T, T) bool: query t may attend to key s iff both are in the same segment
  (padding sees nothing and is seen by nobody)."""
  seg = jnp.asarray(segment_ids)
  return (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)


def segment_positions(segment_ids: Array) -> Array:
  """(B, T) -> (B, T) int32: each token's index within its own segment (0 at a segment's first
  token), so that a packed example gets the position ids it has alone."""
  seg = jnp.asarray(segment_ids)
  idx = jnp.broadcast_to(jnp.arange(seg.shape[1], dtype=jnp.int32), seg.shape)
  return idx - jax.lax.cummax(jnp.where(_starts(seg), idx, 0), axis=1)


def _starts(seg: Array) -> Array:
  """(B, T) bool: the token opens a run of equal segment ids (padding runs included)."""
  return jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)


def segment_lengths(segment_ids: Array) -> Array:
  """(B, T) -> (B, T) float32: the length of each token's segment (0 at padding)."""
  seg = jnp.asarray(segment_ids)
  return (segment_mask(seg).sum(-1) * (seg > 0)).astype(jnp.float32)


def num_segments(segment_ids: Array) -> Array:
  """(B, T) -> (B,) float32: how many examples each row holds."""
  seg = jnp.asarray(segment_ids)
  return ((seg > 0) & _starts(seg)).sum(-1).astype(jnp.float32)


# --- batches: packed rows or padded ones ------------------------------------------------------

def model_inputs(batch: dict) -> dict:
  """The model's keyword inputs: packed rows (`segment_ids`) instead of an attention mask."""
  keys = ("input_ids", "token_type_ids", "segment_ids" if "segment_ids" in batch
          else "attention_mask")
  return {k: batch[k] for k in keys}


def real_tokens(batch: dict) -> Array:
  """(B, T) mask of real tokens, for packed rows too."""
  return batch["segment_ids"] > 0 if "segment_ids" in batch else batch["attention_mask"]


def example_weights(batch: dict) -> Array:
  """Loss weights: a packed row counts as many examples as it holds, so that the loop's weighted
  mean is the mean over examples, as for unpacked rows."""
  if "segment_ids" in batch:
    return batch["weights"] * num_segments(batch["segment_ids"])
  return batch["weights"]
