"""Tests for minilm_jax.losses against plain numpy references (loops, per-example cropping)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from conftest import assert_parity

from minilm_jax import losses

# Heavy padding: one example of length 1, one of 3, one full.
T = 6
LENGTHS = (1, 3, T)


def _mask(lengths=LENGTHS, t=T):
  return (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)


def _rand(rng, *shape, scale=1.0):
  return (scale * rng.standard_normal(shape)).astype(np.float32)


# ------------------------------------------------------------------------- numpy references


def _np_log_softmax(x):
  return x - scipy.special.logsumexp(x, axis=-1, keepdims=True)


def _np_kl_rows(t_logits, s_logits):
  """Sum over rows of KL(softmax(t) || softmax(s)); rows (T, S)."""
  lt, ls = _np_log_softmax(t_logits), _np_log_softmax(s_logits)
  return float((np.exp(lt) * (lt - ls)).sum())


def _np_split(x, r):
  """x (L, N, H) -> list of R arrays (L, d_r): concatenate heads then re-split, like minilmv2.bb."""
  flat = x.reshape(x.shape[0], -1)
  d_r = flat.shape[1] // r
  return [flat[:, i * d_r:(i + 1) * d_r] for i in range(r)]


def _np_relation_kl(t_x, s_x, lengths, r=None):
  out = []
  for b, n in enumerate(lengths):
    tx, sx = t_x[b, :n].astype(np.float64), s_x[b, :n].astype(np.float64)  # crop to true length
    if r is None:
      t_heads = [tx[:, h] for h in range(tx.shape[1])]
      s_heads = [sx[:, h] for h in range(sx.shape[1])]
    else:
      t_heads, s_heads = _np_split(tx, r), _np_split(sx, r)
    total = 0.0
    for th, sh in zip(t_heads, s_heads, strict=True):
      total += _np_kl_rows(th @ th.T / np.sqrt(th.shape[1]), sh @ sh.T / np.sqrt(sh.shape[1]))
    out.append(total / (len(t_heads) * n))
  return np.array(out)


def _np_attention_kl(tq, tk, sq, sk, lengths):
  out = []
  for b, n in enumerate(lengths):
    total = 0.0
    for h in range(tq.shape[2]):
      a_t = tq[b, :n, h] @ tk[b, :n, h].T / np.sqrt(tq.shape[3])
      a_s = sq[b, :n, h] @ sk[b, :n, h].T / np.sqrt(sq.shape[3])
      total += _np_kl_rows(a_t.astype(np.float64), a_s.astype(np.float64))
    out.append(total / (tq.shape[2] * n))
  return np.array(out)


def _qkv(rng, n, h, b=3, t=T):
  return [_rand(rng, b, t, n, h) for _ in range(3)]


# ------------------------------------------------------------------------- supervised


def test_cross_entropy_matches_numpy():
  rng = np.random.default_rng(0)
  logits, labels = _rand(rng, 5, 4, scale=3), rng.integers(0, 4, 5)
  ref = -_np_log_softmax(logits.astype(np.float64))[np.arange(5), labels]
  np.testing.assert_allclose(losses.cross_entropy(logits, labels), ref, rtol=1e-5)
  eps = 0.1
  target = (1 - eps) * np.eye(4)[labels] + eps / 4
  ref_s = -(target * _np_log_softmax(logits.astype(np.float64))).sum(-1)
  np.testing.assert_allclose(losses.cross_entropy(logits, labels, label_smoothing=eps), ref_s,
                             rtol=1e-5)


def test_cross_entropy_bf16_computes_in_f32():
  logits = jnp.asarray([[0.0, 30.0]], jnp.bfloat16)
  out = losses.cross_entropy(logits, jnp.asarray([0]))
  assert out.dtype == jnp.float32 and np.isfinite(out).all()


def test_token_cross_entropy_sums_masked_tokens():
  rng = np.random.default_rng(1)
  mask = _mask()
  logits = _rand(rng, 3, T, 7, scale=2)
  labels = np.where(mask > 0, rng.integers(0, 7, (3, T)), -100)  # ignored positions out of range
  out = losses.token_cross_entropy(logits, labels, mask)
  ref = [sum(-_np_log_softmax(logits[b, t].astype(np.float64))[labels[b, t]] for t in range(n))
         for b, n in enumerate(LENGTHS)]
  np.testing.assert_allclose(out, ref, rtol=1e-5)


def test_mse_and_logit_mse():
  rng = np.random.default_rng(2)
  p, t = _rand(rng, 4, 3, 2), _rand(rng, 4, 3, 2)
  ref = ((p - t) ** 2).reshape(4, -1).mean(-1)
  np.testing.assert_allclose(losses.mse(p, t), ref, rtol=1e-6)
  np.testing.assert_allclose(losses.logit_mse(p, t), ref, rtol=1e-6)
  np.testing.assert_allclose(losses.mse(p[:, 0, 0], t[:, 0, 0]), (p - t)[:, 0, 0] ** 2, rtol=1e-6)


def test_span_qa_loss_masks_padding():
  rng = np.random.default_rng(3)
  mask = _mask()
  s_log, e_log = _rand(rng, 3, T, scale=2), _rand(rng, 3, T, scale=2)
  start, end = np.array([0, 1, 4]), np.array([0, 2, 5])
  out = losses.span_qa_loss(s_log, e_log, start, end, mask)
  ref = []
  for b, n in enumerate(LENGTHS):
    ce_s = -_np_log_softmax(s_log[b, :n].astype(np.float64))[start[b]]
    ce_e = -_np_log_softmax(e_log[b, :n].astype(np.float64))[end[b]]
    ref.append((ce_s + ce_e) / 2)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  assert abs(float(out[0])) < 1e-6  # a single real token: the softmax is certain


def test_soft_logit_kd():
  rng = np.random.default_rng(4)
  s, t = _rand(rng, 4, 5, scale=2), _rand(rng, 4, 5, scale=2)
  for temp in (1.0, 2.5):
    ref = [temp**2 * _np_kl_rows(t[b:b + 1].astype(np.float64) / temp,
                                 s[b:b + 1].astype(np.float64) / temp) for b in range(4)]
    np.testing.assert_allclose(losses.soft_logit_kd(s, t, temperature=temp), ref, rtol=1e-5)
  np.testing.assert_allclose(losses.soft_logit_kd(t, t, temperature=2.0), 0.0, atol=1e-6)


def test_hidden_mse_over_real_tokens():
  rng = np.random.default_rng(5)
  mask = _mask()
  s, t = _rand(rng, 3, T, 4), _rand(rng, 3, T, 4)
  ref = [((s[b, :n] - t[b, :n]) ** 2).mean() for b, n in enumerate(LENGTHS)]
  np.testing.assert_allclose(losses.hidden_mse(s, t, mask), ref, rtol=1e-5)
  assert float(losses.hidden_mse(s, t, np.zeros((3, T)))[0]) == 0.0


# ------------------------------------------------------------------------- attention distillation


@pytest.mark.parametrize("r", [None, 2, 4])
def test_relation_kl_matches_numpy(r):
  rng = np.random.default_rng(6)
  # Different head counts and widths are only allowed with relation heads.
  t_x = _rand(rng, 3, T, 2, 4)
  s_x = _rand(rng, 3, T, 2, 3) if r is None else _rand(rng, 3, T, 4, 3)
  out = losses.relation_kl(t_x, s_x, _mask(), num_relation_heads=r)
  np.testing.assert_allclose(out, _np_relation_kl(t_x, s_x, LENGTHS, r), rtol=1e-4, atol=1e-6)


def test_relation_kl_errors():
  rng = np.random.default_rng(7)
  t_x, s_x = _rand(rng, 3, T, 2, 4), _rand(rng, 3, T, 3, 4)
  with pytest.raises(ValueError, match="num_relation_heads"):
    losses.relation_kl(t_x, s_x, _mask(), num_relation_heads=None)
  with pytest.raises(ValueError, match="not divisible"):
    losses.relation_kl(t_x, s_x, _mask(), num_relation_heads=5)


def test_minilm_v1_matches_numpy():
  rng = np.random.default_rng(8)
  tq, tk, tv = _qkv(rng, 2, 4)
  sq, sk, sv = _qkv(rng, 2, 3)  # same heads, smaller head dim (hidden sizes differ)
  out = losses.minilm_v1_loss(tq, tk, tv, sq, sk, sv, _mask())
  ref = _np_attention_kl(tq, tk, sq, sk, LENGTHS) + _np_relation_kl(tv, sv, LENGTHS)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-6)
  att_logits = lambda q, k: jnp.einsum("BTNH,BSNH->BNTS", q, k) / np.sqrt(q.shape[-1])  # noqa: E731
  np.testing.assert_allclose(
      losses.attention_kl(att_logits(tq, tk), att_logits(sq, sk), _mask()),
      _np_attention_kl(tq, tk, sq, sk, LENGTHS), rtol=1e-4, atol=1e-6)


def test_minilm_v1_rejects_different_head_counts():
  rng = np.random.default_rng(9)
  t, s = _qkv(rng, 2, 4), _qkv(rng, 4, 2)
  with pytest.raises(ValueError, match="MiniLMv2"):
    losses.minilm_v1_loss(*t, *s, _mask())


def test_minilm_v2_with_head_count_is_per_head_formula():
  rng = np.random.default_rng(10)
  t, s = _qkv(rng, 2, 4), _qkv(rng, 2, 3)
  out = losses.minilm_v2_loss(*t, *s, _mask(), num_relation_heads=2)
  ref = sum(_np_relation_kl(tx, sx, LENGTHS) for tx, sx in zip(t, s, strict=True))
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-6)


def test_minilm_v2_different_heads_and_sizes():
  rng = np.random.default_rng(11)
  t, s = _qkv(rng, 4, 6), _qkv(rng, 3, 4)  # teacher 24 wide, student 12 wide
  out = losses.minilm_v2_loss(*t, *s, _mask(), num_relation_heads=6)
  ref = sum(_np_relation_kl(tx, sx, LENGTHS, 6) for tx, sx in zip(t, s, strict=True))
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-6)
  assert out.shape == (3,) and (np.asarray(out)[1:] > 0).all()  # length 1 -> 0


def test_zero_when_student_equals_teacher_positive_otherwise():
  rng = np.random.default_rng(12)
  mask = _mask()
  q, k, v = _qkv(rng, 2, 4, t=T)
  q2, k2, v2 = _qkv(rng, 2, 4, t=T)
  for fn in (lambda *a: losses.minilm_v1_loss(*a, mask),
             lambda *a: losses.minilm_v2_loss(*a, mask, num_relation_heads=4)):
    np.testing.assert_allclose(fn(q, k, v, q, k, v), 0.0, atol=1e-6)
    out = np.asarray(fn(q, k, v, q2, k2, v2))
    # A length-1 example has one key: every distribution is certain, so its KL is 0.
    assert out[0] == pytest.approx(0.0, abs=1e-6) and (out[1:] > 0).all()


def test_heavy_padding_stays_finite():
  rng = np.random.default_rng(13)
  t_len = 16
  mask = _mask((0, 1, 2), t_len)  # includes an all-padding row
  t = [_rand(rng, 3, t_len, 2, 4, scale=30) for _ in range(3)]
  s = [_rand(rng, 3, t_len, 2, 4, scale=30) for _ in range(3)]
  for out in (losses.minilm_v1_loss(*t, *s, mask),
              losses.minilm_v2_loss(*t, *s, mask, num_relation_heads=4),
              losses.span_qa_loss(t[0][..., 0, 0], s[0][..., 0, 0], np.zeros(3, int),
                                  np.zeros(3, int), mask),
              losses.hidden_mse(t[0][..., 0, :], s[0][..., 0, :], mask)):
    assert np.isfinite(out).all()
  assert float(losses.minilm_v2_loss(*t, *s, mask, num_relation_heads=4)[0]) == 0.0
  g = jax.grad(lambda x: losses.minilm_v2_loss(*t[:2], x, *s, mask, num_relation_heads=4).sum())(
      t[2])
  assert np.isfinite(g).all()


def test_bf16_inputs_give_f32_loss():
  rng = np.random.default_rng(14)
  t, s = _qkv(rng, 2, 4), _qkv(rng, 2, 4)
  out = losses.minilm_v2_loss(*[jnp.asarray(x, jnp.bfloat16) for x in t + s], _mask(),
                              num_relation_heads=2)
  assert out.dtype == jnp.float32


# ------------------------------------------------------------------------- gradients


def _check_grad(fn, x, rng, eps=1e-5, directions=3):
  """Directional derivatives of sum(fn(x)) against central finite differences, in float64."""
  x = jnp.asarray(x, jnp.float64)
  f = lambda y: jnp.sum(fn(y))  # noqa: E731
  # jit + vmap over all perturbed points: two compilations instead of hundreds of eager ops.
  g = jax.jit(jax.grad(f))(x)
  assert g.dtype == jnp.float64
  d = jnp.asarray(rng.standard_normal((directions, *x.shape)))
  vals = jax.jit(jax.vmap(f))(jnp.concatenate([x + eps * d, x - eps * d]))
  fd = (vals[:directions] - vals[directions:]) / (2 * eps)
  analytic = jnp.einsum("...,k...->k", g, d)
  np.testing.assert_allclose(np.asarray(analytic), np.asarray(fd), rtol=1e-6, atol=1e-9)


def test_gradients_match_finite_differences():
  rng = np.random.default_rng(15)
  t_len, lengths = 4, (1, 2, 4)
  with jax.enable_x64(True):
    mask = jnp.asarray(_mask(lengths, t_len))
    f64 = lambda *s: jnp.asarray(rng.standard_normal(s))  # noqa: E731
    tq, tk, tv = f64(3, t_len, 2, 4), f64(3, t_len, 2, 4), f64(3, t_len, 2, 4)
    sk, sv = f64(3, t_len, 2, 2), f64(3, t_len, 2, 2)
    s2k, s2v = f64(3, t_len, 4, 2), f64(3, t_len, 4, 2)
    logits, labels = f64(3, 5), jnp.asarray([0, 3, 4])
    tok_labels = jnp.asarray(rng.integers(0, 5, (3, t_len)))
    cases = [
        (lambda x: losses.cross_entropy(x, labels, label_smoothing=0.1), logits),
        (lambda x: losses.token_cross_entropy(x, tok_labels, mask), f64(3, t_len, 5)),
        (lambda x: losses.mse(x, logits), f64(3, 5)),
        (lambda x: losses.span_qa_loss(x, x[:, ::-1], jnp.zeros(3, int), jnp.asarray([0, 1, 2]),
                                       mask), f64(3, t_len)),
        (lambda x: losses.soft_logit_kd(x, logits, temperature=2.0), f64(3, 5)),
        (lambda x: losses.hidden_mse(x, tq[:, :, 0], mask), f64(3, t_len, 4)),
        (lambda x: losses.minilm_v1_loss(tq, tk, tv, x, sk, sv, mask), f64(3, t_len, 2, 2)),
        (lambda x: losses.minilm_v2_loss(tq, tk, tv, x, s2k, s2v, mask, num_relation_heads=2),
         f64(3, t_len, 4, 2)),
    ]
    for fn, x in cases:
      _check_grad(fn, x, rng)


# ------------------------------------------------------------------------- packed rows


def _pack(arrays, lengths, width):
  """Per-example arrays (B, T, ...) with real prefixes `lengths` -> one packed row (1, width, ...)
  and its segment ids."""
  row = np.concatenate([arrays[i, :n] for i, n in enumerate(lengths)])
  pad = np.zeros((width - len(row),) + row.shape[1:], row.dtype)
  seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)]
                       + [np.zeros(width - sum(lengths), int)])
  return np.concatenate([row, pad])[None], seg[None].astype(np.int32)


@pytest.mark.parametrize("kind", ["relation", "relation_heads", "attention", "hidden"])
def test_packed_losses_equal_the_unpacked_mean(kind):
  """Three examples packed into one row (with padding after them) give, per row, the mean of
  their unpacked losses; with the row weighted by its segment count the loop's mean is theirs."""
  from minilm_jax import packing
  rng = np.random.default_rng(5)
  lengths, t, width = (5, 2, 6), 6, 16
  mask = _mask(lengths, t)
  tx, sx = _rand(rng, 3, t, 4, 8), _rand(rng, 3, t, 2, 8)
  if kind == "attention":
    sx = _rand(rng, 3, t, 4, 8)
  fns = {
      "relation": lambda a, b, m, **kw: losses.relation_kl(a, b, m, num_relation_heads=None,
                                                           **kw),
      "relation_heads": lambda a, b, m, **kw: losses.relation_kl(a, b, m, num_relation_heads=4,
                                                                 **kw),
      "attention": lambda a, b, m, **kw: losses.attention_kl(
          jnp.einsum("BTNH,BSNH->BNTS", a, a), jnp.einsum("BTNH,BSNH->BNTS", b, b), m, **kw),
      "hidden": lambda a, b, m, **kw: losses.hidden_mse(a.reshape(*a.shape[:2], -1),
                                                        b.reshape(*b.shape[:2], -1), m, **kw),
  }
  if kind in ("relation", "hidden"):
    sx = _rand(rng, 3, t, 4, 8)
  fn = fns[kind]
  unpacked = np.asarray(fn(tx, sx, mask))
  ptx, seg = _pack(tx, lengths, width)
  psx, _ = _pack(sx, lengths, width)
  packed = np.asarray(fn(ptx, psx, seg > 0, segment_ids=seg))
  np.testing.assert_allclose(packed[0], unpacked.mean(), rtol=1e-5)
  assert float(packing.num_segments(seg)[0]) == 3


# --- relation KLs in chunks of heads ----------------------------------------------------------

def test_chunked_relation_kl_equals_unchunked_in_value_and_gradient():
  """A chunk of heads at a time (scan + remat) is the same loss with the same gradients, for
  padded and packed rows, relations and q/k attention alike; qk_attention_kl equals
  attention_kl on the logits."""
  rng = np.random.default_rng(0)
  b, t = 3, 10
  tx, sx = (jnp.asarray(rng.normal(size=(b, t, n, 8)), jnp.float32) for n in (4, 2))
  mask = jnp.asarray((np.arange(t)[None] < np.array([[10], [7], [4]])).astype(np.int32))
  seg = jnp.asarray(np.array([[1] * 4 + [2] * 6, [1] * 7 + [0] * 3, [1] * 2 + [2] * 2 + [0] * 6]))
  for segment_ids in (None, seg):
    def rel(tx, sx, chunk, segment_ids=segment_ids):
      return losses.relation_kl(tx, sx, mask, num_relation_heads=8, segment_ids=segment_ids,
                                chunk=chunk).sum()
    want = jax.value_and_grad(rel, (0, 1))(tx, sx, 8)
    for chunk in (1, 2, 4):
      got = jax.value_and_grad(rel, (0, 1))(tx, sx, chunk)
      for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert_parity(g, w, 1e-6, what=f"relation chunk {chunk}")
  q, k = tx, tx[:, ::-1]
  sq, sk = (jnp.asarray(rng.normal(size=(b, t, 4, 4)), jnp.float32) for _ in range(2))
  logits = lambda q, k: jnp.einsum("BTNH,BSNH->BNTS", q, k) / np.sqrt(q.shape[-1])  # noqa: E731
  want = losses.attention_kl(logits(q, k), logits(sq, sk), mask, segment_ids=seg)
  for chunk in (1, 4):
    got = losses.qk_attention_kl(q, k, sq, sk, mask, segment_ids=seg, chunk=chunk)
    assert_parity(got, want, 1e-6, what=f"qk attention chunk {chunk}")
  with pytest.raises(ValueError, match="3 heads does not divide the 8 relation heads"):
    losses.relation_kl(tx, sx, mask, num_relation_heads=8, chunk=3)


def test_head_chunk_bounds_the_relation_logits_memory():
  """Chunks by memory: every head at once at notebook sizes, one head per chunk at the base
  recipe's 256 x 512 per device; XLA's own buffer accounting shows the drop."""
  assert losses.head_chunk(32, 48, 128) == 48
  assert losses.head_chunk(256, 48, 512) == 1
  assert losses.head_chunk(8, 48, 512) == 24  # 8 x 512 x 512 x 4 B = 8 MiB a head, 256 MiB
  b, t, r = 4, 256, 16
  x = jax.ShapeDtypeStruct((b, t, r, 8), jnp.float32)
  mask = jax.ShapeDtypeStruct((b, t), jnp.int32)

  def temp_bytes(chunk):
    f = jax.grad(lambda tx, sx, m: losses.relation_kl(tx, sx, m, num_relation_heads=None,
                                                       chunk=chunk).sum(), (0, 1))
    return jax.jit(f).lower(x, x, mask).compile().memory_analysis().temp_size_in_bytes

  whole, chunked = temp_bytes(r), temp_bytes(1)
  one_head = b * t * t * 4
  # measured: 118.0 MB at once (7 tensors of all 16 heads), 8.8 MB a head at a time
  assert whole >= 4 * r * one_head and whole > 8 * chunked, (whole, chunked, one_head)
