"""Training objectives as pure array functions: CE, regression, span QA, logit KD, hidden MSE and
the MiniLM v1 / MiniLMv2 self-attention distillation losses, and the contrastive sentence-embedding
losses (in-batch negatives, Matryoshka).

Every function takes arrays, masks and weights and returns one value per example, shape (B,);
the caller chooses how to reduce over the batch (mean, weighted mean, sum over devices). Nothing
here imports the model: distillation reads the q/k/v intermediates the model returns.

Arithmetic runs in at least float32 whatever the input dtype (bf16 activations are upcast; float64
stays float64 so gradient checks can use it), because softmax/KL over long rows in bf16 loses the
small probabilities the KL is made of.

Axis letters: B batch, T query positions, S key positions (same sequence as T in self-attention),
N heads, H head dim, R relation heads, D hidden, C classes, V vocabulary.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from minilm_jax import packing

# Masked positions get this logit rather than -inf: exp underflows to exactly 0 in float32, yet
# (masked - max) stays finite, so fully padded rows give a uniform softmax instead of NaN.
_MASK_LOGIT = -1e9

# MiniLMv2 relation-head counts used by the public re-implementations (PP-MiniLM, minilmv2.bb):
# 48 when distilling from a base-size teacher, 64 from a large-size teacher.
RELATION_HEADS_BASE = 48
RELATION_HEADS_LARGE = 64


def _f32(x: jax.Array) -> jax.Array:
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _sum_non_batch(x: jax.Array) -> jax.Array:
  return x.reshape(x.shape[0], -1).sum(-1)


def _mean_non_batch(x: jax.Array) -> jax.Array:
  return x.reshape(x.shape[0], -1).mean(-1)


def _smoothed_ce(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
  """CE over the last axis against (1 - eps) * one_hot + eps / C, without building the one-hot."""
  lse = jax.nn.logsumexp(logits, axis=-1)
  label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  ce = lse - label_logit
  if label_smoothing:
    # Uniform part: -sum_c (1/C) log p_c = lse - mean_c logits_c.
    ce = (1.0 - label_smoothing) * ce + label_smoothing * (lse - logits.mean(-1))
  return ce


# ----------------------------------------------------------------------------------------------
# Supervised losses.


def cross_entropy(logits: jax.Array, labels: jax.Array, *,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Softmax cross-entropy. logits (B, C), integer labels (B,) -> (B,)."""
  return _smoothed_ce(_f32(logits), jnp.asarray(labels), label_smoothing)


def token_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array, *,
                        label_smoothing: float = 0.0) -> jax.Array:
  """Per-example SUM of token cross-entropies over masked-in tokens.

  logits (B, T, V), labels (B, T) int, mask (B, T) bool or float weights -> (B,).
  Labels at masked-out positions are ignored (any value, e.g. -100, is fine). The result is a sum,
  not a mean, so the caller picks the normaliser: the batch token count `mask.sum()` (MLM,
  UniLM s2s "normalised by the number of target tokens") or per example `mask.sum(-1)`.
  """
  mask = _f32(mask)
  labels = jnp.where(mask > 0, labels, 0)  # keep the gather in range at ignored positions
  ce = _smoothed_ce(_f32(logits), labels, label_smoothing)  # BT
  return (ce * mask).sum(-1)


def mse(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Squared error averaged over all non-batch axes (regression, e.g. STS-B). (B, ...) -> (B,)."""
  diff = _f32(pred) - _f32(target)
  return _mean_non_batch(jnp.square(diff))


def span_qa_loss(start_logits: jax.Array, end_logits: jax.Array, start: jax.Array,
                 end: jax.Array, mask: jax.Array) -> jax.Array:
  """Extractive QA: (CE(start) + CE(end)) / 2, padded positions excluded from the softmax.

  start/end logits (B, T), gold positions (B,) int, mask (B, T) -> (B,). Gold positions must be
  real (masked-in) tokens; SQuAD 2.0 no-answer examples point both at [CLS] (position 0).
  """
  valid = jnp.asarray(mask) > 0

  def one(logits, pos):
    logits = jnp.where(valid, _f32(logits), _MASK_LOGIT)
    return _smoothed_ce(logits, jnp.asarray(pos), 0.0)

  return 0.5 * (one(start_logits, start) + one(end_logits, end))


# ----------------------------------------------------------------------------------------------
# Logit and hidden-state distillation (Hinton KD; XtremeDistil stages 1 and 2).


def soft_logit_kd(student_logits: jax.Array, teacher_logits: jax.Array, *,
                  temperature: float = 1.0) -> jax.Array:
  """Hinton KD: T^2 * KL(softmax(teacher / T) || softmax(student / T)) over the last axis.

  (B, C) -> (B,); extra middle axes (B, ..., C) are summed. The T^2 factor keeps gradient
  magnitudes comparable across temperatures. Note the argument order: student first.
  """
  log_ps = jax.nn.log_softmax(_f32(student_logits) / temperature, axis=-1)
  log_pt = jax.nn.log_softmax(_f32(teacher_logits) / temperature, axis=-1)
  kl = (jnp.exp(log_pt) * (log_pt - log_ps)).sum(-1)
  return temperature**2 * _sum_non_batch(kl)


def logit_mse(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """MSE between logits, averaged over non-batch axes (XtremeDistil stage 2). -> (B,)."""
  return mse(student_logits, teacher_logits)


def hidden_mse(student_h: jax.Array, teacher_h: jax.Array, mask: jax.Array, *,
               segment_ids: jax.Array | None = None) -> jax.Array:
  """MSE over real tokens and features. student_h (B, T, D) already projected to the teacher's
  width by the caller, teacher_h (B, T, D), mask (B, T) -> (B,). All-padding rows give 0.

  Packed rows (`segment_ids`, see `packing.py`): the mean over each segment's masked tokens,
  then over the row's segments: a segment's value is the unpacked example's."""
  mask = _f32(mask)
  sq = jnp.square(_f32(student_h) - _f32(teacher_h)).mean(-1)  # BT
  seg = _segments(mask, segment_ids)
  per_segment = (packing.segment_mask(seg) * mask[:, None, :]).sum(-1)  # masked tokens, BT
  w = mask / jnp.maximum(per_segment, 1.0)
  return (sq * w).sum(-1) / jnp.maximum(packing.num_segments(seg), 1.0)


def _segments(mask: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
  """The rows' segment ids: given for packed rows, else one segment of the real tokens."""
  if segment_ids is not None:
    return jnp.asarray(segment_ids)
  return (jnp.asarray(mask) > 0).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# Self-attention distillation: MiniLM v1 (attention + value relation) and MiniLMv2 (Q/K/V
# relations over relation heads). All are KL(teacher || student) per query row, averaged over
# (heads x real query positions) per example.


# A (B, heads, T, S) float32 logits tensor per side is the loss's memory: at length 512 that is
# 1 MiB per example and head, 16 GB for one relation of 64 heads at 256 examples per device.
# `_pairwise_kl` computes the KL a chunk of heads at a time once a chunk would pass this size.
RELATION_CHUNK_BYTES = 1 << 28


def _row_kl_sum(t_logits: jax.Array, s_logits: jax.Array, key_ok: jax.Array) -> jax.Array:
  """Sum over heads of KL(teacher || student) of row softmaxes: (B, N, T, S) -> (B, T)."""
  t_logits = jnp.where(key_ok, _f32(t_logits), _MASK_LOGIT)
  s_logits = jnp.where(key_ok, _f32(s_logits), _MASK_LOGIT)
  log_pt = jax.nn.log_softmax(t_logits, axis=-1)
  log_ps = jax.nn.log_softmax(s_logits, axis=-1)
  # where() instead of relying on 0 * (big - big): keeps values and gradients exactly 0 there.
  return jnp.where(key_ok, jnp.exp(log_pt) * (log_pt - log_ps), 0.0).sum((1, -1))


def _per_example(kl: jax.Array, seg: jax.Array, num_heads: int) -> jax.Array:
  """(B, T) row KLs summed over heads -> (B,): each segment's rows averaged over heads and its
  real query positions, then the mean over the row's segments."""
  length = packing.segment_lengths(seg)  # 0 at padded queries
  kl = jnp.where(length > 0, kl / jnp.maximum(length, 1.0), 0.0).sum(-1)  # B
  return kl / (num_heads * jnp.maximum(packing.num_segments(seg), 1.0))


def _row_kl(t_logits: jax.Array, s_logits: jax.Array, mask: jax.Array,
            segment_ids: jax.Array | None = None) -> jax.Array:
  """KL(teacher || student) of row softmaxes. logits (B, N, T, S), mask (B, T=S) -> (B,).

  Padded keys get no probability mass; padded query rows contribute 0; the sum over heads and real
  query positions is divided by N * (number of real positions). Packed rows (`segment_ids`): a
  query sees only its own segment's keys, each segment is normalised by its own length, and the
  row's value is the mean over its segments, each one the unpacked example's loss.
  """
  seg = _segments(mask, segment_ids)
  kl = _row_kl_sum(t_logits, s_logits, packing.segment_mask(seg)[:, None])
  return _per_example(kl, seg, t_logits.shape[1])


def head_chunk(batch: int, heads: int, length: int, budget: float | None = None) -> int:
  """Heads per chunk of `_pairwise_kl`: the largest divisor of `heads` whose (batch, chunk,
  length, length) float32 logits fit `budget` bytes (default `RELATION_CHUNK_BYTES`; at least
  1)."""
  budget = RELATION_CHUNK_BYTES if budget is None else budget
  per_head = batch * length * length * 4
  fits = [c for c in range(1, heads + 1) if heads % c == 0 and c * per_head <= budget]
  return max(fits, default=1)


def _pairwise_kl(t: tuple[jax.Array, jax.Array], s: tuple[jax.Array, jax.Array],
                 mask: jax.Array, segment_ids: jax.Array | None, chunk: int | None
                 ) -> jax.Array:
  """KL of softmax(a b^T / sqrt(d)) rows, teacher vs student, over R heads: t = (a, b) with a,
  b (B, T, R, d_t), s likewise with its own d_s -> (B,) as `_row_kl`.

  `chunk` heads at a time (default `head_chunk`): a `lax.scan` over head chunks whose body is
  rematerialised, so forward and backward hold one chunk's (B, chunk, T, S) logits, never all R
  heads'. The gradient is the unchunked loss's (the same sum, in chunk order)."""
  (ta, tb), (sa, sb) = (tuple(_f32(x) for x in pair) for pair in (t, s))
  b, length, r, _ = ta.shape
  seg = _segments(mask, segment_ids)
  key_ok = packing.segment_mask(seg)[:, None]  # B1TS

  def kl_of(xs):  # a chunk of heads -> (B, T)
    ta, tb, sa, sb = xs
    logits = lambda a, b: jnp.einsum("BTRH,BSRH->BRTS", a, b) / math.sqrt(a.shape[-1])  # noqa: E731
    return _row_kl_sum(logits(ta, tb), logits(sa, sb), key_ok)

  chunk = chunk or head_chunk(b, r, length)
  if r % chunk:
    raise ValueError(f"a chunk of {chunk} heads does not divide the {r} relation heads")
  if chunk == r:
    kl = kl_of((ta, tb, sa, sb))
  else:
    n = r // chunk
    split = lambda x: jnp.moveaxis(x.reshape(*x.shape[:2], n, chunk, x.shape[-1]), 2, 0)  # noqa: E731
    step = jax.checkpoint(lambda acc, xs: (acc + kl_of(xs), None))
    kl, _ = jax.lax.scan(step, jnp.zeros((b, length), ta.dtype),
                         tuple(split(x) for x in (ta, tb, sa, sb)))
  return _per_example(kl, seg, r)


def attention_kl(t_logits: jax.Array, s_logits: jax.Array, mask: jax.Array, *,
                 segment_ids: jax.Array | None = None) -> jax.Array:
  """KL between attention distributions given pre-softmax attention logits (B, N, T, S).

  Use when the model already returns its attention scores (QK^T / sqrt(d_k)); any mask bias in
  them is harmless, since padded keys are masked again here. mask (B, T) -> (B,). From q/k,
  `qk_attention_kl` computes the same without ever holding every head's logits.
  """
  if t_logits.shape[1] != s_logits.shape[1]:
    raise ValueError(f"attention_kl needs equal head counts, got teacher {t_logits.shape[1]} and "
                     f"student {s_logits.shape[1]}; use minilm_v2_loss with relation heads.")
  return _row_kl(t_logits, s_logits, mask, segment_ids)


def qk_attention_kl(t_q: jax.Array, t_k: jax.Array, s_q: jax.Array, s_k: jax.Array,
                    mask: jax.Array, *, segment_ids: jax.Array | None = None,
                    chunk: int | None = None) -> jax.Array:
  """`attention_kl` of softmax(q k^T / sqrt(d_k)) per head, from (B, T, N, H) q and k of each
  side, in chunks of heads (`_pairwise_kl`). mask (B, T) -> (B,)."""
  if t_q.shape[2] != s_q.shape[2]:
    raise ValueError(f"attention_kl needs equal head counts, got teacher {t_q.shape[2]} and "
                     f"student {s_q.shape[2]}; use minilm_v2_loss with relation heads.")
  return _pairwise_kl((t_q, t_k), (s_q, s_k), mask, segment_ids, chunk)


def _relation_heads(x: jax.Array, num_relation_heads: int | None, who: str) -> jax.Array:
  """(B, T, N, H) -> (B, T, R, width / R): heads concatenated and re-split into R relation heads
  (a reshape: heads are contiguous along the last axes), or as they are for None."""
  if num_relation_heads is None:
    return x
  b, t, n, h = x.shape
  width = n * h
  if width % num_relation_heads:
    raise ValueError(f"{who} width {width} (= {n} heads x {h}) is not divisible by "
                     f"num_relation_heads={num_relation_heads}")
  return x.reshape(b, t, num_relation_heads, width // num_relation_heads)


def relation_kl(t_x: jax.Array, s_x: jax.Array, mask: jax.Array, *,
                num_relation_heads: int | None, segment_ids: jax.Array | None = None,
                chunk: int | None = None) -> jax.Array:
  """Self-relation KL: KL(softmax(X_t X_t^T / sqrt(d_t)) || softmax(X_s X_s^T / sqrt(d_s))).

  t_x (B, T, N, H) teacher, s_x (B, T, N', H') student, mask (B, T) -> (B,).
  num_relation_heads=None: the model's own heads (N must equal N'). Otherwise heads are
  concatenated (width N*H, resp. N'*H') and re-split into R relation heads, each side with its own
  d_r = width / R, so teacher and student may differ in heads and hidden size. Computed in
  chunks of `chunk` relation heads (default: by memory, `head_chunk`).
  """
  if num_relation_heads is None and t_x.shape[2] != s_x.shape[2]:
    raise ValueError(f"relation_kl without relation heads needs equal head counts, got teacher "
                     f"{t_x.shape[2]} and student {s_x.shape[2]}; pass num_relation_heads.")
  t_rel = _relation_heads(t_x, num_relation_heads, "teacher")
  s_rel = _relation_heads(s_x, num_relation_heads, "student")
  return _pairwise_kl((t_rel, t_rel), (s_rel, s_rel), mask, segment_ids, chunk)


def minilm_v1_loss(t_q: jax.Array, t_k: jax.Array, t_v: jax.Array, s_q: jax.Array,
                   s_k: jax.Array, s_v: jax.Array, mask: jax.Array) -> jax.Array:
  """MiniLM v1 (arXiv 2002.10957): attention KL + value-relation KL on the last layer, summed.

  q/k/v (B, T, N, H) per side, mask (B, T) -> (B,). Head counts must match; head dims may differ
  (each side scales by its own sqrt(d_k)).
  """
  n_t, n_s = t_q.shape[2], s_q.shape[2]
  if n_t != n_s:
    raise ValueError(
        f"MiniLM v1 needs equal head counts in teacher and student (got {n_t} and {n_s}): its "
        "attention and value relations are compared head by head. Use MiniLMv2 "
        "(minilm_v2_loss with num_relation_heads), which re-splits both into relation heads.")
  return (qk_attention_kl(t_q, t_k, s_q, s_k, mask)
          + relation_kl(t_v, s_v, mask, num_relation_heads=None))


def minilm_v2_loss(t_q: jax.Array, t_k: jax.Array, t_v: jax.Array, s_q: jax.Array,
                   s_k: jax.Array, s_v: jax.Array, mask: jax.Array, *,
                   num_relation_heads: int) -> jax.Array:
  """MiniLMv2 (arXiv 2012.15828): Q-Q + K-K + V-V relation KLs over relation heads, weights 1.

  q/k/v (B, T, N, H) teacher and (B, T, N', H') student, mask (B, T) -> (B,).
  num_relation_heads: RELATION_HEADS_BASE (48) for base-size teachers, RELATION_HEADS_LARGE (64)
  for large ones; it must divide both hidden sizes.
  """
  return sum(relation_kl(t, s, mask, num_relation_heads=num_relation_heads)
             for t, s in ((t_q, s_q), (t_k, s_k), (t_v, s_v)))


# --- contrastive sentence embeddings (sentence-transformers' losses) --------------------------

def l2_normalize(x: jax.Array) -> jax.Array:
  """x / max(||x||, 1e-12) over the last axis, in float32: torch.nn.functional.normalize."""
  x = _f32(x)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def in_batch_negatives(anchors: jax.Array, candidates: jax.Array, *, scale: float = 20.0,
                       symmetric: bool = False, valid: jax.Array | None = None,
                       same: jax.Array | None = None) -> jax.Array:
  """MultipleNegativesRankingLoss: anchor i's cross-entropy over scale * cos(a_i, c_j) against
  its positive c_i, every other candidate a negative. anchors (B, D), candidates (K*B, D): the B
  positives, then any hard negatives (rows B.. of each further block). -> (B,).

  Under jit over a batch sharded across devices and hosts the similarity matrix is global (XLA
  gathers the candidates), so every anchor sees the whole global batch as negatives.

  symmetric: also each positive's cross-entropy over the anchors (sentence-transformers'
    directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"): the two
    log-partitions are averaged.
  valid (B,): False for padding rows, whose anchors, positives and negatives are no candidates.
  same (B, K*B): True where candidate j is the same text as anchor i's positive (a false
    negative); those logits are masked, the positive itself never.
  """
  b = anchors.shape[0]
  if b < 2:
    raise ValueError(f"in-batch negatives need a batch of at least 2, got {b}")
  a, c = l2_normalize(anchors), l2_normalize(candidates)
  scores = scale * (a @ c.T)                                           # (B, K*B)
  eye = jnp.eye(b, scores.shape[1], dtype=bool)
  drop = jnp.zeros_like(eye)
  if valid is not None:
    drop |= ~jnp.tile(valid, scores.shape[1] // b)[None, :]
  if same is not None:
    drop |= same & ~eye
  scores = jnp.where(drop & ~eye, _MASK_LOGIT, scores)
  positive = jnp.diagonal(scores[:, :b])
  log_z = jax.nn.logsumexp(scores, axis=1)
  if symmetric:
    back = scores[:, :b].T                                             # positive i vs anchors
    drop_back = jnp.zeros((b, b), bool)
    if valid is not None:
      drop_back |= ~valid[None, :]
    if same is not None:
      drop_back |= same[:, :b].T
    back = jnp.where(drop_back & ~eye[:, :b], _MASK_LOGIT, back)
    log_z = (log_z + jax.nn.logsumexp(back, axis=1)) / 2
  return log_z - positive


def matryoshka(loss_fn, anchors: jax.Array, candidates: jax.Array, dims, weights=None,
               **kwargs) -> jax.Array:
  """MatryoshkaLoss: sum_d w_d * loss_fn(anchors[:, :d], candidates[:, :d]) over the truncated
  prefixes `dims` (e.g. 384/256/128/64; weights default 1). -> (B,)."""
  width = anchors.shape[-1]
  if any(d > width or d < 1 for d in dims):
    raise ValueError(f"matryoshka dims {list(dims)} must lie in 1..{width}, the embedding size")
  weights = [1.0] * len(dims) if weights is None else list(weights)
  if len(weights) != len(dims):
    raise ValueError(f"{len(weights)} matryoshka weights for {len(dims)} dims")
  return sum(w * loss_fn(anchors[:, :d], candidates[:, :d], **kwargs)
             for d, w in zip(dims, weights, strict=True))
