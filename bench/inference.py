"""Inference throughput: the minilm_jax encoder vs transformers' BertModel, same weights and batch.

  python -m bench.inference                                  # L6 and L12 H384, B32, S128 and 512
  python -m bench.inference --presets minilm-l12-h384-uncased --seqs 128 --repeats 10
  python -m bench.inference --variant fused_qkv              # a bench-local model change

Ours: `Encoder` split -> jax.jit(forward) -> last hidden state, inputs already on device.
PyTorch: `BertModel` in eval mode under `torch.inference_mode()`, transformers' default attention
("sdpa": torch's fused CPU kernel; `--torch-attn eager` for the unfused one). `--dtype bfloat16`
runs our mixed precision (bf16 matmul operands, fp32 accumulation and params) against torch
autocast(bfloat16); `--torch-dtype float32` pins PyTorch to float32 eager instead.
"""

from __future__ import annotations

import argparse
import sys

from bench import common

DEFAULT_PRESETS = ("all-minilm-l6-v2", "minilm-l12-h384-uncased")


def build_case(preset: str, batch: int, seq: int, dtype: str, variant: str, torch_attn: str,
               torch_dtype: str = "same"):
  """-> (cfg, jax step, torch step, max |ours - torch| on the last hidden state)."""
  import flax.nnx as nnx
  import jax
  import numpy as np
  torch = common.setup_torch()

  from bench import variants
  from minilm_jax import pretrained
  from minilm_jax.config import get_preset
  variants.apply(variant)

  cfg = get_preset(preset, dtype=dtype)
  model = pretrained.build(cfg, "encoder", seed=0)
  graphdef, state = nnx.split(model)
  host = common.random_batch(cfg, batch, seq)
  dev = {k: jax.device_put(v) for k, v in host.items()}

  @jax.jit
  def forward(state, input_ids, attention_mask, token_type_ids):
    hidden, _ = nnx.merge(graphdef, state)(input_ids, attention_mask, token_type_ids)
    return hidden

  def ours():
    return jax.block_until_ready(forward(state, dev["input_ids"], dev["attention_mask"],
                                         dev["token_type_ids"]))

  tm = common.torch_model(model, cfg, "encoder", attn=torch_attn).eval()
  tb = {k: torch.from_numpy(v.astype(np.int64)) for k, v in host.items()}
  autocast = common.torch_autocast(torch_dtype, dtype)

  def theirs():
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
      return tm(**tb).last_hidden_state

  diff = float(np.abs(np.asarray(ours(), np.float32) - theirs().float().numpy()).max())
  return cfg, ours, theirs, diff


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS))
  p.add_argument("--seqs", nargs="+", type=int, default=[128, 512])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--variant", default="none", help="bench-local model change (bench/variants.py)")
  p.add_argument("--torch-attn", default="sdpa", choices=("sdpa", "eager"))
  common.add_args(p, repeats=5, warmup=2)
  args = p.parse_args(argv)

  if args.only:  # child: one framework, one case, memory only
    _, ours, theirs, _ = build_case(args.presets[0], args.batch, args.seqs[0], args.dtype,
                                      args.variant, args.torch_attn, args.torch_dtype)
    common.report_memory(ours, theirs, args.only, args.warmup)
    return 0

  print(common.describe_env())
  print(common.FORWARD_FORMULA)
  print(f"command: {common.command_line()}")
  for preset in args.presets:
    for seq in args.seqs:
      cfg, ours, theirs, diff = build_case(preset, args.batch, seq, args.dtype, args.variant,
                                           args.torch_attn, args.torch_dtype)
      t = common.interleaved({"jax": ours, "torch": theirs}, args.repeats, args.warmup)
      flops = common.forward_flops(cfg, seq) * args.batch
      child_argv = common.strip_flag(argv, ("--presets", "--seqs", "--json", "--repeats"))
      mem = common.child_memories("bench.inference",
                                  child_argv + ["--presets", preset, "--seqs", str(seq)],
                                  not args.no_memory)
      row = {"bench": "inference", "preset": preset, "batch": args.batch, "seq": seq,
             "dtype": args.dtype, "torch_dtype": args.torch_dtype, "variant": args.variant,
             "torch_attn": args.torch_attn,
             "max_abs_diff": diff, **common.compare(t, args.batch, flops, mem)}
      print(f"{preset} B{args.batch} S{seq} {args.dtype} (torch {args.torch_dtype}) "
            f"[{args.variant}]: "
            f"{common.fmt_compare(row)}, max|diff| {diff:.1e}; {common.fmt_peak_rss(mem)}",
            flush=True)
      common.emit(row, args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())
