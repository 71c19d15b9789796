"""Generation throughput: minilm_jax's UniLM seq2seq decoding vs the same decoding in PyTorch, on
the same weights, sources and device.

  python -m bench.generate                                   # all-MiniLM-L6-v2 shape, B16 S128 T32
  python -m bench.generate --preset minilm-l12-h384-uncased --batch 32 --source-len 464 --max-len 48
  python -m bench.generate --cases jax_greedy torch_greedy --repeats 5

Every case generates exactly `max_len` tokens per row: [SEP] is banned at every step
(min_length = max_length), so all implementations do the same amount of work and tokens/s is
batch * max_len / seconds. Weights are a random init of the preset (speed does not depend on
them); the greedy outputs of all implementations are compared token for token.

Cases:
  jax_greedy      `decoding.decode_batch`, jitted: source K/V computed once, target K/V cache,
                  fixed shapes in a lax.while_loop.
  jax_beam        the same with beam_size K (--beam); output tokens/s (K hypotheses per row).
  jax_recompute   greedy re-encoding [source | prefix | MASK] every step (the cache's reference).
  torch_greedy    the same cached algorithm written with transformers' BertForMaskedLM submodules
                  (query/key/value/output, torch SDPA attention, growing K/V lists: eager PyTorch).
  torch_recompute BertForMaskedLM as is, run on [source | prefix | MASK] with a 4D mask every step
                  (what one gets from transformers without a UniLM cache).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from bench import common

CASES = ("jax_greedy", "jax_beam", "jax_recompute", "torch_greedy", "torch_recompute")
DEFAULT_CASES = ("jax_greedy", "jax_beam", "torch_greedy", "torch_recompute")


def make_sources(cfg, batch: int, seq: int, sp, seed: int = 0):
  """[CLS] random ids [SEP] padded; real lengths between seq/2 and seq."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1000, cfg.vocab_size, (batch, seq)).astype(np.int32)
  lengths = rng.integers(max(seq // 2, 3), seq + 1, batch).astype(np.int32)
  lengths[0] = seq
  ids[:, 0] = sp.cls
  for b, n in enumerate(lengths):
    ids[b, n - 1], ids[b, n:] = sp.sep, sp.pad
  return ids, lengths


# --- PyTorch ----------------------------------------------------------------------------------

def _ban(logits, i, min_len, sp):
  """The decoder's logit processing for this benchmark: specials never, [SEP] before min_len."""
  logits[:, [sp.pad, sp.cls, sp.mask]] = -1e9
  if i < min_len:
    logits[:, sp.sep] = -1e9
  return logits


def torch_greedy_cached(tm, src, ns, max_len: int, min_len: int, sp):
  """UniLM decoding with a K/V cache in eager PyTorch, from BertForMaskedLM's own submodules."""
  import torch
  import torch.nn.functional as F
  cfg = tm.config
  n, d = cfg.num_attention_heads, cfg.hidden_size
  bert, b, s = tm.bert, src.shape[0], src.shape[1]
  neg = torch.finfo(torch.float32).min
  src_ok = torch.arange(s)[None, :] < ns[:, None]  # BS
  src_bias = torch.where(src_ok, 0.0, neg)[:, None, None, :]  # B11S

  def layer_fwd(layer, x, prefix_k, prefix_v, bias):
    sa, m = layer.attention.self, x.shape[1]
    heads = lambda t: t.view(b, m, n, d // n).transpose(1, 2)  # BNmH
    q, k, v = heads(sa.query(x)), heads(sa.key(x)), heads(sa.value(x))
    ka = k if prefix_k is None else torch.cat([prefix_k, k], 2)
    va = v if prefix_v is None else torch.cat([prefix_v, v], 2)
    ctx = F.scaled_dot_product_attention(q, ka, va, attn_mask=bias)
    a = layer.attention.output(ctx.transpose(1, 2).reshape(b, m, d), x)
    return layer.output(layer.intermediate(a), a), k, v

  with torch.inference_mode():
    pos = torch.arange(s)[None, :].expand(b, s)
    x = bert.embeddings(input_ids=src, token_type_ids=torch.zeros_like(src), position_ids=pos)
    src_kv = []
    for layer in bert.encoder.layer:
      x, k, v = layer_fwd(layer, x, None, None, src_bias.expand(b, 1, s, s))
      src_kv.append((k, v))
    cache = [[] for _ in src_kv]  # per layer: the K/V of generated tokens, one (k, v) per step
    out = torch.full((b, max_len), sp.pad, dtype=torch.long)
    mask_tok = torch.full((b, 1), sp.mask, dtype=torch.long)
    for i in range(max_len):
      ids = mask_tok if i == 0 else torch.cat([out[:, i - 1:i], mask_tok], 1)
      m = ids.shape[1]
      slots = torch.arange(i - m + 1, i + 1)
      x = bert.embeddings(input_ids=ids, token_type_ids=torch.ones_like(ids),
                          position_ids=ns[:, None] + slots[None, :])
      own = torch.where(torch.tril(torch.ones(m, m, dtype=torch.bool)), 0.0, neg)
      bias = torch.cat([src_bias.expand(b, 1, m, s), torch.zeros(b, 1, m, i - m + 1),
                        own.expand(b, 1, m, m)], -1)
      for layer, (sk, sv), c in zip(bert.encoder.layer, src_kv, cache):
        pk = torch.cat([sk] + [kk for kk, _ in c], 2)
        pv = torch.cat([sv] + [vv for _, vv in c], 2)
        x, k, v = layer_fwd(layer, x, pk, pv, bias)
        if i > 0:
          c.append((k[:, :, :1], v[:, :, :1]))  # y_{i-1}; the [MASK] is never cached
      logits = _ban(tm.cls(x[:, -1]), i, min_len, sp)
      out[:, i] = logits.argmax(-1)
  return out


def torch_greedy_recompute(tm, src, ns, max_len: int, min_len: int, sp):
  """BertForMaskedLM on [source | y_<i [MASK]] with the UniLM mask, every step."""
  import torch
  b, s = src.shape
  out = torch.full((b, max_len), sp.pad, dtype=torch.long)
  src_ok = torch.arange(s)[None, :] < ns[:, None]
  with torch.inference_mode():
    for i in range(max_len):
      t = i + 1
      ids = torch.cat([src, out[:, :i], torch.full((b, 1), sp.mask, dtype=torch.long)], 1)
      long = dict(dtype=torch.long)
      types = torch.cat([torch.zeros(b, s, **long), torch.ones(b, t, **long)], 1)
      pos = torch.cat([torch.arange(s)[None, :].expand(b, s), ns[:, None] + torch.arange(t)], 1)
      causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
      rows_src = torch.cat([src_ok[:, None, :].expand(b, s, s),
                            torch.zeros(b, s, t, dtype=torch.bool)], 2)
      rows_tgt = torch.cat([src_ok[:, None, :].expand(b, t, s), causal.expand(b, t, t)], 2)
      mask = torch.cat([rows_src, rows_tgt], 1)[:, None]
      logits = tm(input_ids=ids, token_type_ids=types, position_ids=pos,
                  attention_mask=mask).logits[:, -1]
      out[:, i] = _ban(logits, i, min_len, sp).argmax(-1)
  return out


def torch_mlm(model, cfg):
  """transformers' BertForMaskedLM holding exactly `model`'s parameters (hf.flat_to_hf)."""
  import torch
  import transformers

  from minilm_jax import hf, pretrained
  flat = {k: np.asarray(v) for k, v in pretrained.flat_params(model).items()}
  tm = transformers.BertForMaskedLM(transformers.BertConfig(**cfg.to_hf()))
  sd = {k: torch.from_numpy(np.array(v)) for k, v in hf.flat_to_hf(flat, cfg, "mlm").items()}
  _, unexpected = tm.load_state_dict(sd, strict=False)
  if unexpected:
    raise KeyError(f"unexpected keys {unexpected[:4]}")
  tm.tie_weights()
  return tm.eval()


# --- the benchmark ----------------------------------------------------------------------------

def build(args):
  import flax.nnx as nnx
  import jax
  import jax.numpy as jnp

  from minilm_jax import decoding, pretrained
  from minilm_jax import seq2seq as s2s
  from minilm_jax.config import get_preset
  torch = common.setup_torch()

  cfg = get_preset(args.preset, dtype=args.dtype, hidden_dropout=0.0, attention_dropout=0.0)
  model = pretrained.build(cfg, "mlm", seed=0)
  # BERT uncased ids: [PAD] 0, [CLS] 101, [SEP] 102, [MASK] 103.
  sp = s2s.Specials(pad=0, cls=101, sep=102, mask=103, vocab_size=cfg.vocab_size)
  ids, lengths = make_sources(cfg, args.batch, args.source_len, sp)
  dev = jnp.asarray(ids), jnp.asarray(lengths)
  t = args.max_len
  cases, outputs = {}, {}

  graphdef, params = nnx.split(model)  # params as arguments: closing over them makes constants

  def jax_case(name, dc, **kw):
    fn = decoding.make_decode_fn(graphdef, dc, sp, **kw)
    cases[name] = lambda: jax.block_until_ready(fn(params, *dev))
    outputs[name] = lambda: np.asarray(fn(params, *dev)[0])

  greedy = decoding.DecodeConfig(max_length=t, min_length=t)
  if "jax_greedy" in args.cases:
    jax_case("jax_greedy", greedy)
  if "jax_beam" in args.cases:
    jax_case("jax_beam", decoding.DecodeConfig(max_length=t, min_length=t, beam_size=args.beam))
  if "jax_recompute" in args.cases:
    jax_case("jax_recompute", greedy, cache=False)
  if any(c.startswith("torch") for c in args.cases):
    tm = torch_mlm(model, cfg)
    tsrc, tns = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(lengths.astype(np.int64))
    for name, fn in (("torch_greedy", torch_greedy_cached),
                     ("torch_recompute", torch_greedy_recompute)):
      if name in args.cases:
        cases[name] = (lambda fn=fn: fn(tm, tsrc, tns, t, t, sp))
        outputs[name] = (lambda fn=fn: fn(tm, tsrc, tns, t, t, sp).numpy())
  return cfg, cases, outputs


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="all-minilm-l6-v2")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--source-len", type=int, default=128)
  p.add_argument("--max-len", type=int, default=32, help="generated tokens per row")
  p.add_argument("--beam", type=int, default=5)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), choices=CASES)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--json", default=None, help="append result rows to this JSONL file")
  args = p.parse_args(argv)

  print(common.describe_env())
  print(f"command: {common.command_line()}")
  cfg, cases, outputs = build(args)
  # Parity first (also the warm-up that compiles): greedy outputs must agree token for token.
  ref_name = next((c for c in ("jax_greedy", "torch_greedy") if c in outputs), None)
  ref = outputs[ref_name]() if ref_name else None
  parity = {}
  for name, get in outputs.items():
    if name != ref_name and "beam" not in name:
      parity[name] = float((get() == ref).mean())
  if parity:
    print(f"greedy token agreement with {ref_name}: "
          + ", ".join(f"{k} {v:.4f}" for k, v in parity.items()))
  times = common.interleaved(cases, args.repeats, args.warmup)
  tokens = args.batch * args.max_len
  base = common.med(times["torch_greedy"]) if "torch_greedy" in times else None
  for name, ts in times.items():
    sec = common.med(ts)
    row = {"bench": "generate", "case": name, "preset": args.preset, "batch": args.batch,
           "source_len": args.source_len, "max_len": args.max_len, "dtype": args.dtype,
           "beam": args.beam if "beam" in name else 1, "seconds": sec, "tokens_per_s": tokens / sec,
           "spread": common.spread(ts), "speedup_vs_torch_greedy": base / sec if base else None,
           "token_agreement": parity.get(name), "command": common.command_line()}
    vs = f", {base / sec:.2f}x torch_greedy" if base else ""
    print(f"{name:16s} {tokens / sec:9.1f} tokens/s ({sec:.3f} s per batch, {row['spread']}{vs})",
          flush=True)
    common.emit(row, args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())
