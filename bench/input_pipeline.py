"""The streaming data path's rates: Beam preparation, packed reading, padding.

  python -m bench.input_pipeline                  # real text (bench/corpus_text.py), 512 tokens
  python -m bench.input_pipeline --batches 400 --seq-len 512 --batch-size 32
  python -m bench.input_pipeline --prepared runs/bench/stream_memory/large.prepared  # reading only

Prints, in one invocation:
  - preparation: Beam (DirectRunner, one process a core) tokens/s against a plain
    single-process `tokenizers` loop over the same lines (the peer: what a script would do);
  - reading: packed rows of `seq_len` from the ArrayRecord shards through `PackedBatches`
    (shuffle, batched reads, first-fit packing, batching, prefetch), in tokens/s for one host
    process pinned to one core;
  - padding: the fraction of token slots that hold padding, packed against length buckets.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from bench import common, corpus_text
from minilm_jax import data, pretrained, tokenizer


def tokenizers_loop(tok, path: Path, max_length: int, chunk: int = 1024) -> tuple[int, float]:
  """(tokens, seconds): the peer, one process reading lines and encoding them in batches."""
  t0, tokens, buf = time.perf_counter(), 0, []
  with path.open() as f:
    for line in f:
      if line.strip():
        buf.append(line.strip())
      if len(buf) == chunk:
        tokens += sum(map(len, tok(buf, max_length=max_length, padding="do_not_pad")["input_ids"]))
        buf = []
  if buf:
    tokens += sum(map(len, tok(buf, max_length=max_length, padding="do_not_pad")["input_ids"]))
  return tokens, time.perf_counter() - t0


def distill_flops_per_token(seq_len: int) -> dict:
  """Matmul FLOPs a MiniLMv2 step spends per token: BERT-base teacher forward (L12 H768 F3072)
  + L12-H384 student forward and backward (3x), each `2*P_mm + 4*L*T*D` (bench/README.md)."""
  fwd = lambda L, D, F: 2 * L * (4 * D * D + 2 * D * F) + 4 * L * seq_len * D
  teacher, student = fwd(12, 768, 3072), fwd(12, 384, 1536)
  return {"teacher": teacher, "student": 3 * student, "total": teacher + 3 * student}


def read_rate(batches, n: int) -> tuple[float, float]:
  """(tokens/s, padding fraction) over n batches after a warm-up of 5."""
  it = iter(batches)
  for _ in range(5):
    next(it)
  t0, slots, real = time.perf_counter(), 0, 0
  for _ in range(n):
    b = next(it)
    slots += b["input_ids"].size
    real += int((b["attention_mask"] > 0).sum())
  return slots / (time.perf_counter() - t0), 1 - real / slots


def prepare(args, tok, model_dir) -> data.Prepared:
  """Prepares the corpus with Beam and prints its rate against the plain tokenizers loop."""
  out = Path(args.out)
  text = Path(args.text) if args.text else corpus_text.base_text(out / "text.txt")
  if args.kind == "documents":
    text = corpus_text.documents(text, out / "documents.txt")
  size = text.stat().st_size
  print(f"corpus {text} ({args.kind}): {size / 1e6:.1f} MB")
  peer_tokens, peer_s = (tokenizers_loop(tok, text, args.max_length) if args.kind == "text"
                         else (None, float("nan")))
  t0 = time.perf_counter()
  corpus = data.prepare_corpus(data.Source(args.kind, paths=(str(text),)),
                               out / f"prepared-{args.kind}",
                               tokenizer_path=model_dir, max_length=args.max_length,
                               overwrite=True, split_bytes=max(1 << 20, size // (4 * args.workers)),
                               beam_args=data.default_beam_args(args.workers))
  beam_s = time.perf_counter() - t0
  m = corpus.manifest
  assert peer_tokens is None or m["tokens"] == peer_tokens, (m["tokens"], peer_tokens)
  print(f"\npreparation, {m['examples']} examples, {m['tokens']} tokens, {len(m['shards'])} "
        f"shards:")
  print(f"  Beam DirectRunner x{args.workers} processes: {beam_s:7.1f} s  "
        f"{m['tokens'] / beam_s:12,.0f} tokens/s")
  if peer_tokens is not None:
    print(f"  plain tokenizers loop, 1 process:  {peer_s:7.1f} s  "
          f"{peer_tokens / peer_s:12,.0f} tokens/s")
    print(f"  ratio (Beam / loop): {peer_s / beam_s:.2f}x")

  return corpus


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--out", default="runs/bench/input_pipeline")
  p.add_argument("--text", default="", help="a text file, one example per line (default: real "
                 "package text, bench/corpus_text.py)")
  p.add_argument("--kind", choices=["text", "documents"], default="text",
                 help="text: one example per line; documents: 16 lines a document, cut into "
                      "max_length windows (a Wikipedia-like layout); the peer loop runs for text")
  p.add_argument("--prepared", default="", help="read this prepared corpus (no preparation, no "
                 "peer): the reading rate must not depend on the corpus's size")
  p.add_argument("--seq-len", type=int, default=512)
  p.add_argument("--max-length", type=int, default=128, help="per example, as distillation")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--batches", type=int, default=300)
  p.add_argument("--workers", type=int, default=os.cpu_count())
  args = p.parse_args(argv)
  print(common.describe_env())
  print(f"command: {common.command_line()}")
  model_dir = pretrained.packaged_checkpoint("all-minilm-l6-v2")
  tok = tokenizer.load(model_dir)
  if args.prepared:
    corpus = data.open_prepared(args.prepared, tokenizer=tok)
    args.max_length = corpus.manifest["fingerprint"]["max_length"]
  else:
    corpus = prepare(args, tok, model_dir)
  os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core from here on
  packed = data.PackedBatches(corpus, batch_size=args.batch_size, seq_len=args.seq_len, seed=0,
                              pad_id=tok.pad_id)
  rate, pad_packed = read_rate(packed, args.batches)
  m = corpus.manifest
  print(f"\nreading {corpus.path} ({m['examples']:,} examples, {len(m['shards'])} shards), one "
        f"process on one core, packed rows of {args.seq_len}, batch {args.batch_size}: "
        f"{rate:12,.0f} tokens/s ({rate / args.seq_len:,.0f} rows/s)")
  buckets = tuple(b for b in (32, 64, 128, 256, 512) if b <= args.max_length)
  bucketed = data.BucketedBatches(corpus, batch_size=args.batch_size, buckets=buckets, seed=0,
                                  pad_id=tok.pad_id)
  brate, pad_bucketed = read_rate(bucketed, args.batches)
  print(f"reading, length buckets {buckets}: {brate:12,.0f} token slots/s")
  print(f"\npadding: packed {100 * pad_packed:.2f}% of token slots, bucketed "
        f"{100 * pad_bucketed:.2f}%, padded to max_length {args.max_length}: "
        f"{100 * (1 - m['tokens'] / (m['examples'] * args.max_length)):.2f}%")
  lengths = np.asarray(corpus.lengths())
  print(f"example lengths: mean {lengths.mean():.1f}, median {np.median(lengths):.0f}, "
        f"max {lengths.max()} tokens")
  f = distill_flops_per_token(args.seq_len)
  v4_host = 4 * 275e12  # a v4-8 host: 4 chips x 275 TFLOP/s bf16 peak
  print(f"\nconsumption, MiniLMv2 BERT-base -> L12-H384 at seq {args.seq_len}: "
        f"{f['total'] / 1e6:.0f} MFLOP/token (teacher {f['teacher'] / 1e6:.0f}, student fwd+bwd "
        f"{f['student'] / 1e6:.0f})")
  print(f"  TPU v4-8 host at 100% / 50% MFU: {v4_host / f['total']:,.0f} / "
        f"{0.5 * v4_host / f['total']:,.0f} tokens/s; this CPU (bench/README.md distill_step, "
        f"~190 GFLOP/s achieved): {190e9 / f['total']:,.0f} tokens/s")
  print(f"  one reading core covers {rate / (0.5 * v4_host / f['total']):.2f} of a v4-8 host at "
        f"50% MFU and {rate / (190e9 / f['total']):,.0f}x this CPU's step")
  packed.close()
  bucketed.close()
  return 0


if __name__ == "__main__":
  sys.exit(main())
