"""UniLM sequence-to-sequence fine-tuning of a BERT encoder: masks, the pseudo-mask objective,
cached greedy and beam search, and `generate`.

One bidirectional encoder is both encoder and decoder; a (B, L, L) self-attention mask makes it a
sequence-to-sequence model (UniLM, arXiv 1905.03197; microsoft/unilm s2s-ft):
  source rows see every real source token; target rows see the source and the target tokens at
  or before themselves; no row sees padding. Source tokens have segment 0, target tokens 1.

Training uses s2s-ft's default ("v2", pseudo-mask) layout: the input is
[source | target | pseudo], where pseudo holds a corrupted copy of every target token ([MASK]
80%, a random token 10%, kept 10%) at the same position id. Pseudo token t sees the source, the
target tokens before t and itself, and nobody sees a pseudo token, so every pseudo output predicts
its target token from the true prefix: teacher forcing for all positions in one pass. As in s2s-ft
the visible target tokens are themselves corrupted with probability `target_mask_prob`, which
teaches the model to tolerate its own mistakes at decoding time. The loss (label-smoothed CE
through the tied-embedding MLM head) is taken at pseudo positions only and normalised by the
number of target tokens in the batch.

Decoding mirrors the pseudo tokens exactly: step t feeds the previous token y_{t-1} at target
position t-1 and a [MASK] at position t. The [MASK] sees the source, y_{<t} and itself, like
pseudo token t in training, and its MLM output gives y_t. y_{t-1}'s keys and values go to the
cache; the [MASK]'s never do. The source is encoded once and its keys/values are shared by all
beams; the target cache is (B, K, T, N, H) per layer and follows the beams. Every shape is fixed
(`lax.while_loop`), so one compilation serves a whole dataset.

This module runs the encoder's layers itself (through their submodules, `_block`) instead of
calling `Encoder.__call__`: the training input is longer than the position table
(S + 2T = 560 > 512 for the QG recipe, the pseudo tokens reusing the target's position ids) and
decoding needs the per-layer keys/values. tests/test_seq2seq.py checks `encode` against the
Encoder and against transformers' BertForMaskedLM.

Axis letters: B batch, K beams, L input length, S key positions (source), T target positions,
N heads, H head dim, D hidden, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import math
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from minilm_jax import losses
from minilm_jax.model import attend, attention_bias, dropout, matmul
from minilm_jax.trainer import Objective

Array = jax.Array
# Scores of impossible hypotheses and banned tokens: finite, so sums stay ordered and NaN-free.
_NEG = -1e9


@dataclasses.dataclass(frozen=True)
class Seq2SeqConfig:
  """Data layout and training objective (defaults: s2s-ft's run_seq2seq.py)."""
  max_source_len: int = 464     # [CLS] source [SEP], in tokens
  max_target_len: int = 48      # target [SEP]
  target_mask_prob: float = 0.5  # visible target tokens corrupted like the pseudo ones
  keep_prob: float = 0.1        # corruption: keep the token
  random_prob: float = 0.1      # corruption: a random token; otherwise [MASK]
  # Spread uniformly over the vocabulary (losses.token_cross_entropy); s2s-ft spreads it over
  # V - 2 classes, leaving out [PAD]: the same up to O(eps / V).
  label_smoothing: float = 0.1


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


@dataclasses.dataclass(frozen=True)
class Specials:
  """The token ids the objective and the decoder need, from the tokenizer."""
  pad: int
  cls: int
  sep: int
  mask: int
  vocab_size: int               # random replacements are drawn from [0, vocab_size)
  ignore: tuple[int, ...] = ()  # DecodeConfig.ngram_ignore_words as ids

  @classmethod
  def from_tokenizer(cls, tok, ignore_words: Sequence[str] = ()) -> Specials:
    ignore = sorted({i for w in ignore_words for i in tok.encode(w)})
    return cls(tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id, tok.vocab_size, tuple(ignore))


# --- data ------------------------------------------------------------------------------------

def read_pairs_jsonl(path: str | Path) -> list[tuple[str, str]]:
  """(source, target) pairs from JSON lines {"source": ..., "target": ...} (s2s-ft's "src"/"tgt"
  also accepted). Blank lines are skipped; anything else malformed raises with the line number."""
  path = Path(path)
  pairs = []
  for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}, line {n}: not valid JSON ({e})") from e
    src = rec.get("source", rec.get("src")) if isinstance(rec, dict) else None
    tgt = rec.get("target", rec.get("tgt")) if isinstance(rec, dict) else None
    if not isinstance(src, str) or not isinstance(tgt, str):
      raise ValueError(f"{path}, line {n}: expected an object with string 'source' and 'target'")
    pairs.append((src, tgt))
  return pairs


def squad_qg_pairs(examples: Sequence[dict]) -> list[tuple[tuple[str, str], str]]:
  """Question generation pairs from `squad.read_squad_json` examples: ((paragraph, answer),
  question). The first answer is used; unanswerable questions are skipped."""
  out = []
  for ex in examples:
    texts = ex["answers"]["text"]
    if ex.get("is_impossible", False) or not texts:
      continue
    out.append(((ex["context"], texts[0]), ex["question"].strip()))
  return out


def encode_sources(tok, sources: Sequence[str | tuple[str, str]], max_len: int,
                   pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """-> ids (N, pad_to or max_len) int32 `[CLS] source [SEP]`, lengths (N,).

  A (paragraph, answer) source becomes `[CLS] paragraph [SEP] answer [SEP]` with the paragraph
  truncated, never the answer: it is what the question is about.
  """
  width = pad_to or max_len
  ids = np.full((len(sources), width), tok.pad_id, np.int32)
  lengths = np.zeros(len(sources), np.int32)
  for i, src in enumerate(sources):
    if isinstance(src, str):
      row = [tok.cls_id] + tok.encode(src)[:max_len - 2] + [tok.sep_id]
    else:
      context, answer = src
      ans = tok.encode(answer)[:max(max_len // 4, 1)]
      row = ([tok.cls_id] + tok.encode(context)[:max(max_len - 3 - len(ans), 0)] + [tok.sep_id]
             + ans + [tok.sep_id])
    ids[i, :len(row)] = row
    lengths[i] = len(row)
  return ids, lengths


def encode_targets(tok, targets: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """-> ids (N, max_len) int32 `target [SEP]` (the [SEP] is what decoding stops at), lengths."""
  ids = np.full((len(targets), max_len), tok.pad_id, np.int32)
  lengths = np.zeros(len(targets), np.int32)
  for i, tgt in enumerate(targets):
    row = tok.encode(tgt)[:max_len - 1] + [tok.sep_id]
    ids[i, :len(row)] = row
    lengths[i] = len(row)
  return ids, lengths


def encode_pairs(tok, pairs: Sequence[tuple[Any, str]], cfg: Seq2SeqConfig
                 ) -> dict[str, np.ndarray]:
  """The fixed-shape arrays the objective reads (ArrayBatcher input)."""
  src, ns = encode_sources(tok, [p[0] for p in pairs], cfg.max_source_len)
  tgt, nt = encode_targets(tok, [p[1] for p in pairs], cfg.max_target_len)
  return {"source_ids": src, "num_source": ns, "target_ids": tgt, "num_target": nt}


def decode_texts(tok, ids: np.ndarray, sep: int) -> list[str]:
  """Generated ids (N, T) -> strings, cut at the first [SEP]."""
  out = []
  for row in np.asarray(ids):
    row = list(row)
    if sep in row:
      row = row[:row.index(sep)]
    out.append(tok.decode(row))
  return out


# --- masks and inputs ------------------------------------------------------------------------

def s2s_attention_mask(num_source: Array, num_target: Array, source_len: int, target_len: int,
                       *, pseudo: bool = False) -> Array:
  """(B, L, L) bool, True where row (query) may attend to column (key).

  Layout [source (source_len) | target (target_len)] and, with `pseudo`, a third block of
  target_len pseudo tokens. The first num_source / num_target positions of each block are real.
  """
  b = num_source.shape[0]
  s, t = source_len, target_len
  src_real = jnp.arange(s)[None, :] < num_source[:, None]  # BS
  tgt_real = jnp.arange(t)[None, :] < num_target[:, None]  # BT
  pos = jnp.arange(t)
  at_or_before = pos[:, None] >= pos[None, :]  # TT: row position >= key position
  see_src = lambda rows: jnp.broadcast_to(src_real[:, None, :], (b, rows, s))
  none = lambda rows, cols: jnp.zeros((b, rows, cols), bool)
  tgt_keys = tgt_real[:, None, :]  # B1T
  blocks = [
      [see_src(s), none(s, t)],
      [see_src(t), at_or_before[None] & tgt_keys],
  ]
  if pseudo:
    blocks[0].append(none(s, t))
    blocks[1].append(none(t, t))
    before = pos[:, None] > pos[None, :]
    itself = jnp.eye(t, dtype=bool)[None]
    blocks.append([see_src(t), before[None] & tgt_keys, itself & tgt_keys])
  return jnp.concatenate([jnp.concatenate(row, axis=2) for row in blocks], axis=1)


def _offset(cfg) -> int:
  # RoBERTa-style checkpoints count positions from padding_idx + 1.
  return cfg.pad_token_id + 1 if cfg.position_style == "roberta" else 0


def _target_type(cfg) -> int:
  return 1 if cfg.type_vocab_size > 1 else 0  # RoBERTa has one segment embedding


def s2s_inputs(cfg, source_ids: Array, num_source: Array, target_ids: Array, num_target: Array,
               pseudo_ids: Array | None = None) -> dict[str, Array]:
  """input_ids, attention_mask (B,L,L), token_type_ids and position_ids of
  [source | target (| pseudo)]. Target (and pseudo) token t sits at position num_source + t,
  right after the real source tokens, as in s2s-ft."""
  b, s = source_ids.shape
  t = target_ids.shape[1]
  tgt_pos = num_source[:, None] + jnp.arange(t)[None, :]
  blocks = [source_ids, target_ids] + ([pseudo_ids] if pseudo_ids is not None else [])
  n_tgt = len(blocks) - 1
  src_pos = jnp.broadcast_to(jnp.arange(s)[None, :], (b, s))
  return {
      "input_ids": jnp.concatenate(blocks, axis=1),
      "attention_mask": s2s_attention_mask(num_source, num_target, s, t,
                                           pseudo=pseudo_ids is not None),
      "token_type_ids": jnp.concatenate(
          [jnp.zeros((b, s), jnp.int32)] + [jnp.full((b, t), _target_type(cfg), jnp.int32)] * n_tgt,
          axis=1),
      "position_ids": jnp.concatenate([src_pos] + [tgt_pos] * n_tgt, axis=1) + _offset(cfg),
  }


# --- the encoder, layer by layer ------------------------------------------------------------

def _block(layer, x: Array, attend: Callable, rng: Array | None):
  """`model.Layer.__call__` with the attention core supplied by `attend(q, k, v, rng) ->
  (context, extra)`: same submodules, same dropout keys, so training matches the Encoder."""
  cfg = layer.cfg
  r = jax.random.split(rng, 3) if rng is not None else (None,) * 3
  attn = layer.attn
  ctx, extra = attend(attn.q(x), attn.k(x), attn.v(x), r[0])
  x = layer.attn_ln(x + dropout(attn.o(ctx), cfg.hidden_dropout, r[1]))
  x = layer.mlp_ln(x + dropout(layer.mlp(x), cfg.hidden_dropout, r[2]))
  return x, extra


def encode(encoder, input_ids: Array, attention_mask: Array, token_type_ids: Array,
           position_ids: Array, *, dropout_rng: Array | None = None
           ) -> tuple[Array, list[tuple[Array, Array]]]:
  """The Encoder on a full (B, L, L) mask -> (hidden (B,L,D), per-layer (k, v) (B,L,N,H)).

  Unlike `Encoder.__call__` the length may exceed the position table: only the position ids
  index it."""
  cfg = encoder.cfg
  keys = (jax.random.split(dropout_rng, cfg.num_layers + 1) if dropout_rng is not None
          else (None,) * (cfg.num_layers + 1))
  x = encoder.embed(input_ids, token_type_ids, position_ids, keys[0])
  bias = attention_bias(attention_mask)  # B1LL

  def run(layer, x, bias, rng):
    def core(q, k, v, rng):
      return attend(q, k, v, bias, cfg, rng)[0], (k, v)
    return _block(layer, x, core, rng)

  if cfg.remat:
    run = nnx.remat(run)
  kvs = []
  for layer, key in zip(encoder.layers, keys[1:]):
    x, kv = run(layer, x, bias, key)
    kvs.append(kv)
  return x, kvs


def _mlm_logits(model, hidden: Array) -> Array:
  return model.mlm(hidden, model.encoder.embed.word[...])


# --- the training objective ------------------------------------------------------------------

def corrupt(rng: Array, ids: Array, sp: Specials, keep_prob: float, random_prob: float) -> Array:
  """s2s-ft's get_masked_token per position: keep / random token / [MASK]."""
  r_choice, r_tok = jax.random.split(rng)
  u = jax.random.uniform(r_choice, ids.shape)
  rand = jax.random.randint(r_tok, ids.shape, 0, sp.vocab_size, ids.dtype)
  return jnp.where(u < keep_prob, ids, jnp.where(u < keep_prob + random_prob, rand, sp.mask))


def pseudo_mask_loss(model, batch: dict, rng: Array | None, cfg: Seq2SeqConfig, sp: Specials,
                     *, label_smoothing: float | None = None):
  """-> (per-example summed token CE (B,), predictions (B,T), target mask (B,T)).

  rng None: evaluation (all pseudo tokens [MASK], clean visible target, no dropout)."""
  tgt, nt = batch["target_ids"], batch["num_target"]
  if rng is not None:
    r_pseudo, r_visible, r_drop = jax.random.split(rng, 3)
    pseudo = corrupt(r_pseudo, tgt, sp, cfg.keep_prob, cfg.random_prob)
    # The same corrupted token stands in for the visible target, with target_mask_prob.
    visible = jnp.where(jax.random.uniform(r_visible, tgt.shape) < cfg.target_mask_prob,
                        pseudo, tgt)
  else:
    pseudo, visible, r_drop = jnp.full_like(tgt, sp.mask), tgt, None
  inputs = s2s_inputs(model.cfg, batch["source_ids"], batch["num_source"], visible, nt, pseudo)
  hidden, _ = encode(model.encoder, **inputs, dropout_rng=r_drop)
  s, t = batch["source_ids"].shape[1], tgt.shape[1]
  logits = _mlm_logits(model, hidden[:, s + t:])  # BTV, pseudo tokens only
  valid = jnp.arange(t)[None, :] < nt[:, None]
  ls = cfg.label_smoothing if label_smoothing is None else label_smoothing
  ce = losses.token_cross_entropy(logits, tgt, valid, label_smoothing=ls)
  return ce, logits.argmax(-1), valid


def objective(tok, cfg: Seq2SeqConfig, decode: DecodeConfig, *,
              references: Sequence[str] | None = None, lowercase: bool = True,
              on_predictions: Callable[[np.ndarray, list[str]], None] | None = None
              ) -> Objective:
  """The s2s objective for `trainer.train`. Batches: `encode_pairs` arrays.

  Eval decodes with `decode` inside the jitted eval step and scores the text against
  `references` (indexed by the batcher's "index"): BLEU-4, ROUGE-L, METEOR where available, plus
  the teacher-forced token loss ("loss", no label smoothing). `on_predictions(index, texts)`
  receives every eval's generated texts (e.g. to write them out).
  """
  sp = Specials.from_tokenizer(tok, decode.ngram_ignore_words)

  def loss_fn(model, batch, rng):
    ce, pred, valid = pseudo_mask_loss(model, batch, rng, cfg, sp)
    # The loop averages per-example values with the row weights; scaling by
    # sum(weights) / tokens turns that average into s2s-ft's sum over tokens / number of tokens.
    tokens = jnp.maximum(valid.sum(), 1)
    per_ex = ce * batch["weights"].sum() / tokens
    acc = ((pred == batch["target_ids"]) & valid).sum() / tokens
    return per_ex, {"token_accuracy": acc}

  def eval_fn(model, batch):
    ce, _, valid = pseudo_mask_loss(model, batch, None, cfg, sp, label_smoothing=0.0)
    ids, _ = decode_batch(model, batch["source_ids"], batch["num_source"], decode, sp)
    return {"generated": ids, "nll_sum": ce, "num_tokens": valid.sum(-1)}

  def metrics_fn(out):
    from minilm_jax import generation_metrics
    res = {"loss": float(out["nll_sum"].sum() / max(out["num_tokens"].sum(), 1))}
    hyps = decode_texts(tok, out["generated"], sp.sep)
    if references is not None:
      refs = [references[i] for i in out["_index"]]
      res.update(generation_metrics.score(hyps, refs, lowercase=lowercase))
    if on_predictions is not None:
      on_predictions(out["_index"], hyps)
    return res

  return Objective(loss_fn, eval_fn, metrics_fn,
                   best_metric="bleu4" if references is not None else None)


# --- decoding --------------------------------------------------------------------------------

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
    pos = num_source[:, None, None] + slots[None, None, :] + _offset(cfg)
    flat = lambda a: jnp.broadcast_to(a, (b, k_beams, m)).reshape(b * k_beams, m)
    x = model.encoder.embed(flat(ids), flat(jnp.full((1, 1, m), _target_type(cfg))), flat(pos),
                            None)
    t_cache = cache[0][0].shape[2]
    cache_bias = jnp.where(jnp.arange(t_cache) < n_cached, 0.0, _NEG)
    own_bias = jnp.where(jnp.tril(jnp.ones((m, m), bool)), 0.0, _NEG)
    new_kv = []
    for layer, (sk, sv), (ck, cv) in zip(model.encoder.layers, src_kv, cache):
      def attend(q, k, v, rng, sk=sk, sv=sv, ck=ck, cv=cv):
        del rng
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
        return ctx.reshape(b * k_beams, m, n, h).astype(dtype), (k, v)
      x, kv = _block(layer, x, attend, None)
      new_kv.append(kv)
    logits = _mlm_logits(model, x[:, -1:])[:, 0]
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
    return _mlm_logits(model, at)[:, 0].reshape(b, k_beams, -1)

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


# --- the notebook API ------------------------------------------------------------------------

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
