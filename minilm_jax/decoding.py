"""Decoding for UniLM seq2seq models: cached greedy and beam search in `lax.while_loop`, and the
notebook's `generate`.

Decoding mirrors the pseudo tokens of training exactly (see `seq2seq.py`): step t feeds the
previous token y_{t-1} at target position t-1 and a [MASK] at position t. The [MASK] sees the
source, y_{<t} and itself, and its MLM output gives y_t. y_{t-1}'s keys and values go to the
cache; the [MASK]'s never do. The source is encoded once and its keys/values are shared by all
beams; the target cache is (B, K, T, N, H) per layer and follows the beams. The encoder's own
layers run every step, with the cached attention as their core (`Encoder.layer_stack`). Every
shape is fixed, so one compilation serves a whole dataset.

Axis letters: B batch, K beams, S key positions (source), T target positions, N heads, H head
dim, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Sequence

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from minilm_jax.ops import matmul
from minilm_jax.seq2seq import (
    Specials,
    decode_texts,
    encode,
    encode_sources,
    mlm_logits,
    offset,
    s2s_inputs,
    target_type,
)

Array = jax.Array
# Scores of impossible hypotheses and banned tokens: finite, so sums stay ordered and NaN-free.
_NEG = -1e9


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """Greedy (beam_size 1) or beam search; s2s-ft's QG decoding is beam 5, length penalty 0,
  duplicate trigrams forbidden except around "."."""
  max_length: int = 48          # generated tokens, the closing [SEP] included
  beam_size: int = 1
  # Beams are ranked by summed log-probability while searching (as s2s-ft does); the final pick
  # among the K beams divides by length ** length_penalty.
  length_penalty: float = 0.0
  no_repeat_ngram_size: int = 0  # 0: off
  ngram_ignore_words: tuple[str, ...] = ()  # n-grams containing these may repeat
  min_length: int = 0           # tokens before [SEP]


def _cached_decoder(model, source_ids: Array, num_source: Array, max_len: int, beams: int,
                    sp: Specials):
  """-> (first logits (B,V), state, step, reorder) for the cached algorithm.

  step(state, tokens (B,K,T), i) feeds [tokens[:, :, i-1] at target slot i-1, [MASK] at slot i]
  and returns the logits for slot i (B,K,V); reorder(state, beam (B,K)) follows the beams."""
  cfg = model.cfg
  b, s = source_ids.shape
  n, h, scale = cfg.num_heads, cfg.head_dim, 1.0 / math.sqrt(cfg.head_dim)
  dtype = cfg.compute_dtype
  inputs = s2s_inputs(cfg, source_ids, num_source, source_ids[:, :0], num_source * 0)
  _, src_kv = encode(model.encoder, **inputs)  # source rows only see the source
  src_bias = jnp.where(jnp.arange(s)[None, :] < num_source[:, None], 0.0, _NEG)  # BS
  src_bias = src_bias[:, None, None, None, :]  # B,K=1,N=1,T=1,S

  def run(ids, slots, cache, n_cached, k_beams):
    """ids (B,K,m) at target slots `slots` (m,), the last one the [MASK]; cache slots
    < n_cached are real. -> (logits of the last token (B,K,V), new (k, v) per layer)."""
    m = ids.shape[-1]
    pos = num_source[:, None, None] + slots[None, None, :] + offset(cfg)
    flat = lambda a: jnp.broadcast_to(a, (b, k_beams, m)).reshape(b * k_beams, m)
    x = model.encoder.embed(flat(ids), flat(jnp.full((1, 1, m), target_type(cfg))), flat(pos),
                            None)
    t_cache = cache[0][0].shape[2]
    cache_bias = jnp.where(jnp.arange(t_cache) < n_cached, 0.0, _NEG)
    own_bias = jnp.where(jnp.tril(jnp.ones((m, m), bool)), 0.0, _NEG)

    def core(i, q, k, v, rng):
      del rng
      (sk, sv), (ck, cv) = src_kv[i], cache[i]
      q, k, v = (a.reshape(b, k_beams, m, n, h) for a in (q, k, v))
      logits = jnp.concatenate([
          matmul("BKTNH,BSNH->BKNTS", q, sk, dtype) * scale + src_bias,
          matmul("BKTNH,BKSNH->BKNTS", q, ck, dtype) * scale + cache_bias,
          matmul("BKTNH,BKSNH->BKNTS", q, k, dtype) * scale + own_bias], axis=-1)
      probs = jax.nn.softmax(logits, axis=-1)
      ps, pc, po = jnp.split(probs, [s, s + t_cache], axis=-1)
      ctx = (matmul("BKNTS,BSNH->BKTNH", ps, sv, dtype)
             + matmul("BKNTS,BKSNH->BKTNH", pc, cv, dtype)
             + matmul("BKNTS,BKSNH->BKTNH", po, v, dtype))
      return ctx.reshape(b * k_beams, m, n, h).astype(dtype), {}

    x, out = model.encoder.layer_stack(x, None, [None] * cfg.num_layers, core=core)
    new_kv = [(k.reshape(b, k_beams, m, n, h), v.reshape(b, k_beams, m, n, h))
              for k, v in zip(out["k"], out["v"])]
    logits = mlm_logits(model, x[:, -1:])[:, 0]
    return logits.reshape(b, k_beams, -1), new_kv

  dtype = cfg.compute_dtype
  empty = [(jnp.zeros((b, beams, max_len, n, h), dtype),) * 2 for _ in range(cfg.num_layers)]
  mask_tok = jnp.full((1, 1, 1), sp.mask, jnp.int32)
  first, _ = run(mask_tok, jnp.zeros((1,), jnp.int32), [(c[:, :1], c[:, :1]) for c, _ in empty],
                 0, 1)

  def step(cache, tokens, i):
    prev = jax.lax.dynamic_slice_in_dim(tokens, i - 1, 1, axis=2)  # BK1
    ids = jnp.concatenate([prev, jnp.broadcast_to(mask_tok, prev.shape)], axis=2)
    logits, new_kv = run(ids, jnp.stack([i - 1, i]), cache, i - 1, beams)
    # Only y_{i-1} enters the cache; the [MASK]'s keys/values are dropped.
    cache = [(jax.lax.dynamic_update_slice_in_dim(ck, k[:, :, :1].astype(ck.dtype), i - 1, 2),
              jax.lax.dynamic_update_slice_in_dim(cv, v[:, :, :1].astype(cv.dtype), i - 1, 2))
             for (ck, cv), (k, v) in zip(cache, new_kv)]
    return logits, cache

  def reorder(cache, beam):
    take = lambda c: jnp.take_along_axis(c, beam[:, :, None, None, None], axis=1)
    return [(take(ck), take(cv)) for ck, cv in cache]

  return first[:, 0], empty, step, reorder


def _recompute_decoder(model, source_ids: Array, num_source: Array, max_len: int, beams: int,
                       sp: Specials):
  """The reference algorithm: every step re-encodes [source | y_{<i} [MASK] pad...] with the
  UniLM mask and reads the [MASK]'s output. Same interface as `_cached_decoder`; no state."""
  cfg = model.cfg
  b, s = source_ids.shape

  def logits_at(tokens, i, k_beams):
    slots = jnp.arange(max_len)
    buf = jnp.where(slots < i, tokens, sp.pad)
    buf = jnp.where(slots == i, sp.mask, buf).reshape(b * k_beams, max_len)
    rep = lambda a: jnp.repeat(a, k_beams, axis=0)
    inputs = s2s_inputs(cfg, rep(source_ids), rep(num_source), buf,
                        jnp.full((b * k_beams,), i + 1))
    hidden, _ = encode(model.encoder, **inputs)
    at = jax.lax.dynamic_slice_in_dim(hidden, s + i, 1, axis=1)
    return mlm_logits(model, at)[:, 0].reshape(b, k_beams, -1)

  first = logits_at(jnp.full((b, 1, max_len), sp.pad), 0, 1)[:, 0]
  step = lambda state, tokens, i: (logits_at(tokens, i, beams), state)
  return first, (), step, lambda state, beam: state


def _process(logp: Array, tokens: Array, i: Array, dc: DecodeConfig, sp: Specials) -> Array:
  """Bans [PAD]/[CLS]/[MASK] always, [SEP] before min_length, and tokens completing an n-gram
  already generated. logp (B,K,V), tokens (B,K,T) of which slots < i are generated."""
  # An untrained head happily emits these; a [PAD] would also read as "finished".
  logp = logp.at[:, :, jnp.array([sp.pad, sp.cls, sp.mask])].set(_NEG)
  if dc.min_length:
    logp = logp.at[:, :, sp.sep].set(jnp.where(i < dc.min_length, _NEG, logp[:, :, sp.sep]))
  ng = dc.no_repeat_ngram_size
  if not ng:
    return logp
  b, k, t = tokens.shape
  rows = tokens.reshape(b * k, t)
  padded = jnp.concatenate([rows, jnp.full((b * k, ng), sp.pad, rows.dtype)], axis=1)
  window = lambda m: padded[:, m:m + t]  # token m places after each start j
  prefix = jax.lax.dynamic_slice_in_dim(padded, jnp.maximum(i - ng + 1, 0), ng, axis=1)
  # An earlier n-gram starting at j whose first n-1 tokens equal the last n-1 generated ones
  # bans its last token; it must lie wholly before slot i.
  match = (jnp.arange(t)[None, :] <= i - ng) & (i >= ng - 1)
  for m in range(ng - 1):
    match &= window(m) == prefix[:, m:m + 1]
  for m in range(ng):
    for w in sp.ignore:
      match &= window(m) != w
  banned = jnp.zeros((b * k, logp.shape[-1]), bool)
  banned = banned.at[jnp.arange(b * k)[:, None], window(ng - 1)].max(match)
  return jnp.where(banned.reshape(b, k, -1), _NEG, logp)


def _greedy(first, state, step, dc: DecodeConfig, sp: Specials):
  b = first.shape[0]
  t = dc.max_length

  def choose(logits, tokens, score, done, i):
    logp = _process(jax.nn.log_softmax(logits.astype(jnp.float32)), tokens, i, dc, sp)
    tok = logp.argmax(-1)[:, 0]
    best = logp.max(-1)[:, 0]
    tok = jnp.where(done, sp.pad, tok)
    score = score + jnp.where(done, 0.0, best)
    tokens = tokens.at[:, 0, i].set(tok)
    return tokens, score, done | (tok == sp.sep)

  tokens = jnp.full((b, 1, t), sp.pad, jnp.int32)
  tokens, score, done = choose(first[:, None], tokens, jnp.zeros(b), jnp.zeros(b, bool), 0)

  def cond(c):
    return (c[0] < t) & ~jnp.all(c[3])

  def body(c):
    i, tokens, score, done, state = c
    logits, state = step(state, tokens, i)
    tokens, score, done = choose(logits, tokens, score, done, i)
    return i + 1, tokens, score, done, state

  _, tokens, score, _, _ = jax.lax.while_loop(cond, body,
                                              (jnp.int32(1), tokens, score, done, state))
  return tokens[:, 0], score


def _beam(first, state, step, reorder, dc: DecodeConfig, sp: Specials):
  """Beam search over K beams, finished beams carried over unchanged (s2s-ft's scheme: a
  finished beam keeps its slot and score, so beam size 1 is exactly greedy)."""
  b, v = first.shape
  k, t = dc.beam_size, dc.max_length

  def choose(logits, c, i):
    tokens, score, done, state = c
    logp = _process(jax.nn.log_softmax(logits.astype(jnp.float32)), tokens, i, dc, sp)
    # A finished beam's only continuation is padding, at no cost.
    carry = jnp.where(jnp.arange(v) == sp.pad, 0.0, _NEG)
    logp = jnp.where(done[:, :, None], carry, logp)
    cand = (score[:, :, None] + logp).reshape(b, k * v)
    score, idx = jax.lax.top_k(cand, k)
    beam, tok = idx // v, idx % v
    tokens = jnp.take_along_axis(tokens, beam[:, :, None], axis=1).at[:, :, i].set(tok)
    done = jnp.take_along_axis(done, beam, axis=1) | (tok == sp.sep)
    return tokens, score, done, reorder(state, beam)

  logits = jnp.broadcast_to(first[:, None], (b, k, v))
  # One live hypothesis to start with: the K first tokens must be K distinct ones.
  score = jnp.where(jnp.arange(k) == 0, 0.0, _NEG) * jnp.ones((b, 1))
  c = (jnp.full((b, k, t), sp.pad, jnp.int32), score, jnp.zeros((b, k), bool), state)
  c = choose(logits, c, 0)

  def body(carry):
    i, c = carry
    logits, state = step(c[3], c[0], i)
    return i + 1, choose(logits, (*c[:3], state), i)

  _, (tokens, score, done, _) = jax.lax.while_loop(
      lambda carry: (carry[0] < t) & ~jnp.all(carry[1][2]), body, (jnp.int32(1), c))
  length = jnp.where(done, (tokens != sp.pad).sum(-1), t).astype(jnp.float32)
  norm = score / length ** dc.length_penalty if dc.length_penalty else score
  best = norm.argmax(-1)
  pick = lambda a: jnp.take_along_axis(a, best[:, None, None] if a.ndim == 3 else best[:, None],
                                       axis=1)[:, 0]
  return pick(tokens), pick(norm)


def decode_batch(model, source_ids: Array, num_source: Array, dc: DecodeConfig, sp: Specials,
                 *, cache: bool = True, greedy: bool | None = None) -> tuple[Array, Array]:
  """Greedy or beam search -> (ids (B, max_length) int32, score (B,) float32).

  Ids run to the first [SEP] and are padding after it; the score is the summed log-probability
  (beam: divided by length ** length_penalty). `greedy` defaults to beam_size == 1 (False runs
  the beam code with one beam). `cache=False` re-encodes the whole prefix at every step: the
  reference the cached path is tested against. Traceable: jit it."""
  if source_ids.shape[1] + dc.max_length > model.cfg.max_length:
    raise ValueError(f"source width {source_ids.shape[1]} + max_length {dc.max_length} exceeds "
                     f"the model's {model.cfg.max_length} positions")
  if dc.beam_size < 1 or dc.max_length < 1:
    raise ValueError(f"beam_size and max_length must be >= 1, got {dc}")
  make = _cached_decoder if cache else _recompute_decoder
  greedy = dc.beam_size == 1 if greedy is None else greedy
  k = 1 if greedy else dc.beam_size
  first, state, step, reorder = make(model, source_ids, num_source, dc.max_length, k, sp)
  if greedy:
    return _greedy(first, state, step, dc, sp)
  return _beam(first, state, step, reorder, dc, sp)


def make_decode_fn(graphdef, dc: DecodeConfig, sp: Specials, mesh=None, *, cache: bool = True):
  """jit(params, source_ids, num_source) -> (ids, scores), split -> jit -> merge; with a mesh the
  batch is split over it and the parameters replicated, as in training."""
  def fn(params, source_ids, num_source):
    return decode_batch(nnx.merge(graphdef, params), source_ids, num_source, dc, sp, cache=cache)
  if mesh is None:
    return jax.jit(fn)
  from minilm_jax import sharding
  rows = sharding.batch_sharding(mesh)
  return jax.jit(fn, in_shardings=(None, rows, rows), out_shardings=(rows, rows))


# --- the notebook API ---------------------------------------------------------------------------

_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def generate(pretrained, sources: Sequence[str | tuple[str, str]] | str, *, batch_size: int = 32,
             max_source_len: int = 464, mesh=None, return_scores: bool = False,
             **decode_kwargs) -> list[str] | tuple[list[str], np.ndarray]:
  """Generates a target text per source with a `Pretrained` loaded with task "mlm".

  decode_kwargs are `DecodeConfig` fields: max_length, beam_size, length_penalty,
  no_repeat_ngram_size, ngram_ignore_words, min_length. A source may be a (paragraph, answer)
  pair (question generation). Sources are padded to one width (a multiple of 16, at most
  max_source_len) and batches to `batch_size` rows, so one compilation serves the call.
  """
  if pretrained.task != "mlm":
    raise ValueError(f"generate needs a model loaded with task 'mlm', got {pretrained.task!r}")
  single = isinstance(sources, str)
  sources = [sources] if single else list(sources)
  dc = DecodeConfig(**{k: tuple(v) if k == "ngram_ignore_words" else v
                       for k, v in decode_kwargs.items()})
  cfg, tok = pretrained.config, pretrained.tokenizer
  max_source_len = min(max_source_len, cfg.max_length - dc.max_length)
  if max_source_len < 3:
    raise ValueError(f"max_length={dc.max_length} leaves no room for a source in the model's "
                     f"{cfg.max_length} positions")
  ids, lengths = encode_sources(tok, sources, max_source_len)
  width = min(max_source_len, -(-int(lengths.max(initial=2)) // 16) * 16)
  ids = ids[:, :width]

  from minilm_jax import sharding
  mesh = mesh or sharding.make_mesh()
  per = mesh.devices.size
  batch_size = -(-min(batch_size, max(len(sources), 1)) // per) * per
  cached = _COMPILED.setdefault(pretrained, {})
  key = (dc, mesh)
  if key not in cached:
    graphdef, params = nnx.split(pretrained.model)
    params = jax.device_put(params, sharding.replicated(mesh))
    sp = Specials.from_tokenizer(tok, dc.ngram_ignore_words)
    cached[key] = (make_decode_fn(graphdef, dc, sp, mesh), params, sp)
  fn, params, sp = cached[key]
  out_ids, out_scores = [], []
  for start in range(0, len(sources), batch_size):
    rows = ids[start:start + batch_size]
    lens = lengths[start:start + batch_size]
    n = len(rows)
    if n < batch_size:  # a fixed batch shape: pad with copies of the first row
      rows = np.concatenate([rows, np.repeat(rows[:1], batch_size - n, 0)])
      lens = np.concatenate([lens, np.repeat(lens[:1], batch_size - n, 0)])
    gen, score = fn(params, jnp.asarray(rows), jnp.asarray(lens))
    out_ids.append(np.asarray(gen)[:n])
    out_scores.append(np.asarray(score)[:n])
  gen = np.concatenate(out_ids) if out_ids else np.zeros((0, dc.max_length), np.int32)
  texts = decode_texts(tok, gen, sp.sep)
  if single:
    texts = texts[0]
  if return_scores:
    return texts, np.concatenate(out_scores) if out_scores else np.zeros(0)
  return texts
