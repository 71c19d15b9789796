"""The NNX encoder and heads on the shared tiny config: intermediates, jit, dropout, limits.

Numerical parity with transformers is checked in test_convert.py (random models of every preset)
and test_pretrained.py (the real checkpoint); this file checks the model's own contracts.
"""

from __future__ import annotations

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import count_loops, random_batch, tiny_roberta

from minilm_jax.attention import attention_bias, cast_bias, mask_value
from minilm_jax.attention import xla_attention as attend
from minilm_jax.heads import MaskedLM, SequenceClassifier, SpanQA
from minilm_jax.model import Encoder, inference_chunks
from minilm_jax.ops import matmul


@pytest.fixture(scope="module")
def encoder():
  from minilm_jax.config import TINY
  return Encoder(TINY, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def batch():
  from minilm_jax.config import TINY
  return {k: jnp.asarray(v) for k, v in random_batch(TINY, batch=3, length=10).items()}


def test_intermediates(encoder, batch, tiny_cfg):
  b, t = batch["input_ids"].shape
  n, h, d, layers = tiny_cfg.num_heads, tiny_cfg.head_dim, tiny_cfg.hidden_size, tiny_cfg.num_layers
  hidden, out = encoder(**batch)
  assert hidden.shape == (b, t, d)
  assert len(out["hidden_states"]) == layers + 1  # embeddings, then one per layer
  np.testing.assert_array_equal(out["hidden_states"][-1], hidden)
  for name in ("q", "k", "v"):
    assert len(out[name]) == layers
    assert all(x.shape == (b, t, n, h) for x in out[name]), name
  assert len(out["attention_logits"]) == layers
  assert all(x.shape == (b, n, t, t) for x in out["attention_logits"])
  assert out["pooled"].shape == (b, d)
  # q/k/v are the projections of the layer's input, logits their scaled dot products.
  x0 = out["hidden_states"][0]
  attn = encoder.layers[0].attn
  np.testing.assert_allclose(out["q"][0], attn.q(x0), atol=1e-6)
  logits = jnp.einsum("BTNH,BSNH->BNTS", out["q"][0], out["k"][0]) / np.sqrt(h)
  mask = np.asarray(batch["attention_mask"], bool)[:, None, None, :]
  np.testing.assert_allclose(np.where(mask, out["attention_logits"][0], 0),
                             np.where(mask, logits, 0), atol=1e-5)
  # Padded keys get no probability mass.
  probs = jax.nn.softmax(out["attention_logits"][-1], axis=-1)
  assert float(jnp.max(jnp.where(mask, 0.0, probs))) == 0.0


def test_jit_hidden_only(encoder, batch):
  """The split/jit/merge pattern the training loops use, asking for the last hidden state only."""
  graphdef, state = nnx.split(encoder)

  @jax.jit
  def last_hidden(state, ids, mask, types):
    return nnx.merge(graphdef, state)(ids, mask, types)[0]

  eager, _ = encoder(**batch)
  jitted = last_hidden(state, batch["input_ids"], batch["attention_mask"],
                       batch["token_type_ids"])
  np.testing.assert_allclose(jitted, eager, atol=1e-5)
  # Unused intermediates are dead code: the compiled program returns one array.
  lowered = last_hidden.lower(state, batch["input_ids"], batch["attention_mask"],
                              batch["token_type_ids"])
  assert len(jax.tree.leaves(lowered.out_info)) == 1


def test_dropout(encoder, batch):
  base, _ = encoder(**batch)
  again, _ = encoder(**batch, dropout_rng=None)
  np.testing.assert_array_equal(base, again)
  key = jax.random.key(1)
  a, _ = encoder(**batch, dropout_rng=key)
  b, _ = encoder(**batch, dropout_rng=key)
  c, _ = encoder(**batch, dropout_rng=jax.random.key(2))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, base, atol=1e-3)
  assert not np.allclose(a, c, atol=1e-3)


def test_remat_matches(encoder, batch, tiny_cfg):
  remat = Encoder(tiny_cfg.replace(remat=True), rngs=nnx.Rngs(0))
  nnx.update(remat, nnx.state(encoder))
  np.testing.assert_allclose(remat(**batch)[0], encoder(**batch)[0], atol=1e-6)


def test_too_long_input(encoder, tiny_cfg):
  limit = tiny_cfg.max_position_embeddings
  encoder(jnp.ones((1, limit), jnp.int32))
  with pytest.raises(ValueError, match=f"at most {limit} tokens"):
    encoder(jnp.ones((1, limit + 1), jnp.int32))


def test_roberta_positions_and_limit(tiny_cfg):
  """RoBERTa counts real tokens from padding_idx + 1; two table rows are never used by them."""
  cfg = tiny_roberta(tiny_cfg)
  enc = Encoder(cfg, rngs=nnx.Rngs(0))
  ids = jnp.asarray([[0, 7, 8, 2, 1, 1], [0, 9, 2, 1, 1, 1]], jnp.int32)
  np.testing.assert_array_equal(enc.position_ids(ids), [[2, 3, 4, 5, 1, 1], [2, 3, 4, 1, 1, 1]])
  assert cfg.max_length == cfg.max_position_embeddings - 2
  enc(jnp.full((1, cfg.max_length), 5, jnp.int32))  # the last position id is the last row
  with pytest.raises(ValueError, match=f"at most {cfg.max_length} tokens"):
    enc(jnp.full((1, cfg.max_length + 1), 5, jnp.int32))


def test_bfloat16_compute(tiny_cfg, batch):
  enc = Encoder(tiny_cfg.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
  hidden, out = enc(**batch)
  assert hidden.dtype == jnp.bfloat16 and out["q"][0].dtype == jnp.bfloat16
  assert out["attention_logits"][0].dtype == jnp.float32  # softmax statistics stay float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(enc, nnx.Param)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mask", ["keys", "per_query", "causal_2d"])
def test_blocked_attention_matches_dense(tiny_cfg, dtype, mask):
  """Query blocks (T=11 in 3 blocks of 4, one padded row; a (B,S) key mask, or a (B,T,S) mask or
  a bare (T,S) bias whose rows travel with their block) give the dense core's context, logits
  and gradients."""
  blocked = tiny_cfg.replace(dtype=dtype, attention_query_block=4)
  dense = blocked.replace(attention_query_block=0)
  b, t, n, h = 2, 11, tiny_cfg.num_heads, tiny_cfg.head_dim
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, h)), dtype) for _ in range(3))
  keep = rng.random((b, t, t) if mask == "per_query" else (b, t)) < 0.7
  keep[..., 0] = True  # every query sees a key
  bias = attention_bias(jnp.asarray(keep))
  if mask == "causal_2d":
    bias = jnp.where(jnp.tril(jnp.ones((t, t), bool)), 0.0, jnp.finfo(jnp.float32).min)
  w = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)

  def run(cfg):
    ctx, logits = attend(q, k, v, bias, cfg, None)
    grads = jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v, bias, cfg, None)[0] * w),
                     (0, 1, 2))(q, k, v)
    return ctx, logits, grads

  jaxpr = lambda cfg: str(jax.make_jaxpr(lambda q: attend(q, k, v, bias, cfg, None)[0])(q))  # noqa: E731
  assert "scan" in jaxpr(blocked) and "scan" not in jaxpr(dense)  # the loop really runs
  tol = 1e-5 if dtype == "float32" else 2e-2
  for got, want in zip(jax.tree.leaves(run(blocked)), jax.tree.leaves(run(dense))):
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=tol, atol=tol)


def test_inference_chunks(tiny_cfg):
  """Chunks of about `inference_chunk_tokens` tokens; None means 2048 on CPU, none elsewhere."""
  auto = tiny_cfg.replace(inference_chunk_tokens=None)
  want = [2, 8, 1, 2, 1, 2] if jax.default_backend() == "cpu" else [1] * 6
  assert [inference_chunks(auto, b, t) for b, t in [(32, 128), (32, 512), (16, 128), (5, 512),
                                                     (1, 512), (31, 128)]] == want
  assert inference_chunks(tiny_cfg.replace(inference_chunk_tokens=0), 32, 512) == 1
  assert inference_chunks(tiny_cfg.replace(inference_chunk_tokens=1), 3, 7) == 3  # <= batch
  with pytest.raises(ValueError, match="inference_chunk_tokens must be >= 0"):
    tiny_cfg.replace(inference_chunk_tokens=-1)


@pytest.mark.parametrize("mask_rank", [2, 3])
def test_chunked_forward_matches_whole_batch(tiny_cfg, mask_rank):
  """A forward without dropout in chunks (B=5, T=6 in chunks of 2 rows: 3 chunks, one padded
  row) gives every output and every parameter gradient of the whole-batch forward; with a
  dropout key the batch runs whole."""
  chunked = Encoder(tiny_cfg.replace(inference_chunk_tokens=12), rngs=nnx.Rngs(0))
  whole = Encoder(tiny_cfg.replace(inference_chunk_tokens=0), rngs=nnx.Rngs(0))
  batch = {k: jnp.asarray(v) for k, v in random_batch(tiny_cfg, batch=5, length=6).items()}
  if mask_rank == 3:  # a per-query (B,T,S) mask, as seq2seq uses
    batch["attention_mask"] = batch["attention_mask"][:, None, :] * jnp.tril(jnp.ones((6, 6)))

  def loss(model):
    hidden, out = model(**batch)
    return jnp.sum(hidden ** 2) + jnp.sum(out["pooled"]), (hidden, out)

  grad = nnx.jit(nnx.value_and_grad(loss, has_aux=True))  # jitted: eager op-by-op took ~50 s
  (got_loss, got), got_grads = grad(chunked)
  (want_loss, want), want_grads = grad(whole)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves((got_loss, got, got_grads)),
                  jax.tree.leaves((want_loss, want, want_grads))):
    assert g.shape == w.shape
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)  # sums over rows reassociate

  graphdef, state = nnx.split(chunked)
  jaxpr = lambda **kw: str(jax.make_jaxpr(  # noqa: E731
      lambda s: nnx.merge(graphdef, s)(**batch, **kw)[0])(state))
  assert "length=3" in jaxpr()  # the chunk loop really runs
  assert "length=3" not in jaxpr(dropout_rng=jax.random.key(0))


def test_matmul_accumulates_in_float32():
  # 3000 ones: a bfloat16 accumulator (8 significant bits) cannot hold 3000, float32 can.
  x = jnp.ones((2, 3000), jnp.float32)
  y = jnp.ones((3000, 3), jnp.float32)
  out = matmul("TK,KN->TN", x, y, jnp.bfloat16)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out), 3000.0)


@pytest.mark.parametrize("eqn", ["BTD,DNH->BTNH", "BTNH,NHD->BTD", "BD,DE->BE",
                                 "BNTH,BNSH->BNTS", "BNTS,BNSH->BNTH", "BTD,VD->BTV"])
def test_matmul_gradients(eqn):
  """The bfloat16 backward pass (cotangent cast to bf16, float32 accumulation) gives the
  float32 gradients to bf16 precision, in the operands' own dtypes; float32 is plain einsum."""
  sizes = dict(B=2, T=5, S=6, D=8, N=2, H=4, E=3, V=7)
  lhs, rest = eqn.split(",")
  rhs, out = rest.split("->")
  rng = np.random.default_rng(0)
  x, y = (jnp.asarray(rng.normal(size=[sizes[c] for c in spec]), jnp.float32)
          for spec in (lhs, rhs))
  w = jnp.asarray(rng.normal(size=[sizes[c] for c in out]), jnp.float32)
  loss = lambda dtype: lambda x, y: jnp.sum(matmul(eqn, x, y, dtype) * w)  # noqa: E731
  want = jax.grad(lambda x, y: jnp.sum(jnp.einsum(eqn, x, y) * w), (0, 1))(x, y)
  exact = jax.grad(loss(jnp.float32), (0, 1))(x, y)
  mixed = jax.grad(loss(jnp.bfloat16), (0, 1))(x, y)
  for e, m, ref in zip(exact, mixed, want):
    np.testing.assert_allclose(e, ref, rtol=1e-5, atol=1e-5)
    assert m.dtype == jnp.float32
    scale = float(jnp.abs(ref).max())
    np.testing.assert_allclose(m, ref, atol=0.05 * scale)
    assert float(jnp.abs(m - ref).max()) > 0  # the bf16 path really ran in bf16


def test_matmul_rejects_an_index_private_to_one_operand():
  with pytest.raises(ValueError, match="summed within one operand"):
    matmul("BTD,DF->BF", jnp.ones((2, 3, 4)), jnp.ones((4, 5)), jnp.bfloat16)


@pytest.mark.parametrize("roberta", [False, True], ids=["bert", "roberta"])
def test_heads(tiny_cfg, roberta):
  cfg = tiny_roberta(tiny_cfg) if roberta else tiny_cfg
  b = {k: jnp.asarray(v) for k, v in random_batch(cfg, batch=2, length=7).items()}
  rngs = nnx.Rngs(0)
  logits, out = SequenceClassifier(cfg, 3, rngs=rngs)(**b)
  assert logits.shape == (2, 3) and logits.dtype == jnp.float32
  # RobertaForSequenceClassification has no pooler; BERT's classifier reads the pooled output.
  assert ("pooled" in out) != roberta
  (start, end), _ = SpanQA(cfg, rngs=rngs)(**b)
  assert start.shape == end.shape == (2, 7)
  mlm = MaskedLM(cfg, rngs=rngs)
  logits, _ = mlm(**b)
  assert logits.shape == (2, 7, cfg.vocab_size)
  # The decoder is the word embedding: the head owns transform, LayerNorm and output bias only.
  d = cfg.hidden_size
  head = sum(x.size for x in jax.tree.leaves(nnx.state(mlm.mlm, nnx.Param)))
  assert head == d * d + d + 2 * d + cfg.vocab_size


# --- fully padded rows -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_mask_bias_is_finite_in_every_dtype(dtype):
  """finfo(float32).min became -inf in bfloat16 and float16: a row whose keys are all masked
  (a dummy eval row) then softmaxed to NaN. The bias, and logits + bias, stay finite."""
  mask = jnp.array([[1, 1, 0], [0, 0, 0]])
  bias = attention_bias(mask, jnp.dtype(dtype))
  assert bias.dtype == jnp.dtype(dtype) and bool(jnp.isfinite(bias).all())
  assert bool(jnp.isfinite(cast_bias(attention_bias(mask), jnp.dtype(dtype))).all())
  logits = jnp.full((2, 1, 1, 3), -30.0, jnp.dtype(dtype)) + bias
  assert bool(jnp.isfinite(logits).all())
  assert float(mask_value(jnp.dtype(dtype))) < -1e4


@pytest.mark.parametrize("path", ["dense", "blocked", "chunked", "fused (cudnn's bias)"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_fully_padded_row_gives_no_nan(tiny_cfg, path, dtype):
  """Row 1 is all padding, in every attention path and compute dtype: every output is finite.
  The fused path is the cudnn branch's call with implementation='xla' (no GPU here): the same
  bias cast into the compute dtype."""
  cfg = tiny_cfg.replace(dtype=dtype, attention_query_block=4 if path != "dense" else 0,
                         inference_chunk_tokens=8 if path == "chunked" else 0)
  enc = Encoder(cfg, rngs=nnx.Rngs(0))
  ids = jnp.asarray(random_batch(cfg, batch=2, length=8)["input_ids"])
  mask = jnp.array([[1] * 8, [0] * 8])
  if path.startswith("fused"):
    layer = enc.layers[0]

    def core(q, k, v, rng):
      ctx = jax.nn.dot_product_attention(q, k, v, bias=cast_bias(attention_bias(mask), q.dtype),
                                         implementation="xla")
      return ctx, {}
    x = enc.embed(ids, jnp.zeros_like(ids), enc.position_ids(ids), None)
    hidden, _ = layer(x, None, None, core)
  else:
    hidden, _ = enc(ids, mask)
  assert bool(jnp.isfinite(hidden.astype(jnp.float32)).all()), path


# --- CPU-only tricks ---------------------------------------------------------------------------

def _loops(fn, *args) -> int:
  # A fresh function per trace: make_jaxpr caches traces by function, and the backend is read
  # while tracing.
  return count_loops(jax.make_jaxpr(lambda *a: fn(*a))(*args).jaxpr)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_no_cpu_loops_on_accelerators_by_default(tiny_cfg, batch, monkeypatch, backend):
  """Query blocks and inference chunks (lax.map loops tuned for XLA:CPU) run only on CPU by
  default: traced as for a GPU/TPU, the inference forward and the train step's forward have no
  loop (on a TPU the forward runs splash: tests/test_attention.py); on CPU both loops are there,
  and an explicit attention_query_block of the xla kernel is kept anywhere."""
  cfg = tiny_cfg.replace(inference_chunk_tokens=None, attention_query_block=None)
  enc = Encoder(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(enc)
  big = {k: jnp.tile(v, (80, 4)) for k, v in batch.items()}  # 240 x 40 tokens: > 2048
  fwd = lambda s, b: nnx.merge(graphdef, s)(**b)[0]
  train = lambda s, b: nnx.merge(graphdef, s)(**b, dropout_rng=jax.random.PRNGKey(0))[0]
  assert _loops(fwd, state, big) >= 2  # CPU: chunks and query blocks
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  assert _loops(fwd, state, big) == 0
  assert _loops(train, state, big) == 0
  pinned = Encoder(cfg.replace(attention_impl="xla", attention_query_block=4), rngs=nnx.Rngs(0))
  g2, s2 = nnx.split(pinned)
  assert _loops(lambda s, b: nnx.merge(g2, s)(**b)[0], s2, big) >= 1
