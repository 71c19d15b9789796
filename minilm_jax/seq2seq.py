"""UniLM sequence-to-sequence fine-tuning of a BERT encoder: the input layout and masks, data
encoding, and the pseudo-mask loss. Decoding lives in `decoding.py`, the objective in
`finetune.seq2seq`.

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

The Encoder runs this layout as it is: with explicit position ids the input may be longer than
the position table (S + 2T = 560 > 512 for the QG recipe, the pseudo tokens reusing the target's
position ids), and its intermediates hold the per-layer keys/values decoding caches.
tests/test_seq2seq.py checks `encode` against transformers' BertForMaskedLM.

Axis letters: B batch, K beams, L input length, S key positions (source), T target positions,
N heads, H head dim, D hidden, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from minilm_jax import losses

Array = jax.Array


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
  """The fixed-shape arrays the objective reads (ArrayBatches input)."""
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


def offset(cfg) -> int:
  # RoBERTa-style checkpoints count positions from padding_idx + 1.
  return cfg.pad_token_id + 1 if cfg.position_style == "roberta" else 0


def target_type(cfg) -> int:
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
          [jnp.zeros((b, s), jnp.int32)] + [jnp.full((b, t), target_type(cfg), jnp.int32)] * n_tgt,
          axis=1),
      "position_ids": jnp.concatenate([src_pos] + [tgt_pos] * n_tgt, axis=1) + offset(cfg),
  }


# --- the encoder over the UniLM layout --------------------------------------------------------

def encode(encoder, input_ids: Array, attention_mask: Array, token_type_ids: Array,
           position_ids: Array, *, dropout_rng: Array | None = None
           ) -> tuple[Array, list[tuple[Array, Array]]]:
  """The Encoder on a full (B, L, L) mask -> (hidden (B,L,D), per-layer (k, v) (B,L,N,H)).

  The Encoder itself, given explicit position ids: the length may exceed the position table
  (the pseudo tokens reuse the target's positions)."""
  hidden, out = encoder(input_ids, attention_mask, token_type_ids, position_ids,
                        dropout_rng=dropout_rng)
  return hidden, list(zip(out["k"], out["v"]))


def mlm_logits(model, hidden: Array) -> Array:
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
  logits = mlm_logits(model, hidden[:, s + t:])  # BTV, pseudo tokens only
  valid = jnp.arange(t)[None, :] < nt[:, None]
  ls = cfg.label_smoothing if label_smoothing is None else label_smoothing
  ce = losses.token_cross_entropy(logits, tgt, valid, label_smoothing=ls)
  return ce, logits.argmax(-1), valid
