"""Fine-tuning step throughput: forward, backward, clipping and AdamW, ours vs PyTorch.

  python -m bench.train_step                                    # L12-H384, B32, S128
  python -m bench.train_step --preset all-minilm-l6-v2 --seq 64
  python -m bench.train_step --prng rbg --variant bits_dropout  # levers, see bench/README.md

Ours is the real step: `trainer.init_state` + `trainer.make_train_step` with the
`finetune.classification` objective, jitted with the state donated, as `trainer.train` builds it.
PyTorch is what HF's Trainer runs: `BertForSequenceClassification` in train mode,
`loss.backward()`, `clip_grad_norm_(1.0)`, `torch.optim.AdamW` (no decay on biases and LayerNorm
weights) and `get_linear_schedule_with_warmup`. Both use dropout 0.1 and the same weights.
FLOPs per sequence: 3 x forward (backward = 2 x forward), optimizer excluded.
"""

from __future__ import annotations

import argparse
import sys
import time

from bench import common


def add_model_args(p: argparse.ArgumentParser):
  p.add_argument("--preset", default="minilm-l12-h384-uncased")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--variant", default="none", help="bench-local model change (bench/variants.py)")
  p.add_argument("--prng", default=None, choices=(None, "threefry2x32", "rbg", "unsafe_rbg"),
                 help="jax_default_prng_impl for the dropout keys (default: jax's, threefry)")
  p.add_argument("--remat", action="store_true", help="cfg.remat=True (per-layer checkpointing)")
  p.add_argument("--microbatches", type=int, default=1,
                 help="LoopConfig.microbatches: forward+backward over this many batch slices")
  p.add_argument("--no-dropout", action="store_true", help="dropout 0 in both frameworks")
  p.add_argument("--torch-attn", default="sdpa", choices=("sdpa", "eager"))


def torch_optimizer(tm, lr: float, total: int, warmup: int, weight_decay: float = 0.01):
  """HF Trainer's AdamW param groups: no decay on biases and LayerNorm weights."""
  import torch
  import transformers
  no_decay = ("bias", "LayerNorm.weight")
  groups = [
      {"params": [p for n, p in tm.named_parameters() if not n.endswith(no_decay)],
       "weight_decay": weight_decay},
      {"params": [p for n, p in tm.named_parameters() if n.endswith(no_decay)],
       "weight_decay": 0.0},
  ]
  opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
  sched = transformers.get_linear_schedule_with_warmup(opt, warmup, total)
  return opt, sched


def torch_update(loss, tm, opt, sched):
  """What HF's Trainer does with a loss: backward, clipping at 1.0, the optimizer and schedule
  steps, gradients cleared. Returns the loss."""
  import torch
  loss.backward()
  torch.nn.utils.clip_grad_norm_(tm.parameters(), 1.0)
  opt.step()
  sched.step()
  opt.zero_grad(set_to_none=True)
  return loss


def torch_step(tm, host: dict, lr: float, total: int, warmup: int, bf16: bool = False):
  """transformers' training step on one fixed batch: forward (autocast to bfloat16 if asked),
  backward, clipping at 1.0, AdamW (torch_optimizer), schedule step."""
  import numpy as np
  import torch
  opt, sched = torch_optimizer(tm, lr, total, warmup)
  tb = {k: torch.from_numpy(host[k].astype(np.int64))
        for k in ("input_ids", "attention_mask", "token_type_ids", "labels")}

  def theirs():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
      loss = tm(**tb).loss
    return torch_update(loss, tm, opt, sched)
  return theirs


def build_case(args, num_labels: int = 2):
  """-> (cfg, ours step, torch step, first-step seconds {jax, torch})."""
  import jax
  import numpy as np
  common.setup_torch()
  if args.prng:
    jax.config.update("jax_default_prng_impl", args.prng)

  from bench import variants
  from minilm_jax import finetune, pretrained, trainer
  from minilm_jax.config import get_preset
  from minilm_jax.optim import OptimConfig
  variants.apply(args.variant)

  over = {"dtype": args.dtype, "remat": args.remat}
  if args.no_dropout:
    over.update(hidden_dropout=0.0, attention_dropout=0.0)
  cfg = get_preset(args.preset, **over)
  model = pretrained.build(cfg, "classification", num_labels, seed=0)
  tm = common.torch_model(model, cfg, "classification", num_labels=num_labels,
                          attn=args.torch_attn).train()

  total, optim = 10_000, OptimConfig(learning_rate=5e-5, warmup_ratio=0.06)
  graphdef, state, tx, schedule = trainer.init_state(model, optim, total, 0)
  step_fn = jax.jit(trainer.make_train_step(graphdef, finetune.classification(num_labels), tx,
                                            schedule, microbatches=args.microbatches),
                    donate_argnums=0)
  host = common.random_batch(cfg, args.batch, args.seq)
  host["labels"] = np.random.default_rng(1).integers(0, num_labels, args.batch).astype(np.int32)
  host["weights"] = np.ones(args.batch, np.float32)
  batch = {k: jax.device_put(v) for k, v in host.items() if k != "index"}
  box = {"state": state}

  def ours():
    box["state"], metrics = step_fn(box["state"], batch)
    return jax.block_until_ready((box["state"], metrics))

  theirs = torch_step(tm, host, optim.learning_rate, total, int(0.06 * total),
                      bf16=common.torch_autocast(args.torch_dtype, args.dtype))

  first = {}
  for name, fn in (("jax", ours), ("torch", theirs)):
    t0 = time.perf_counter()
    fn()
    first[name] = time.perf_counter() - t0
  return cfg, ours, theirs, first


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  add_model_args(p)
  common.add_args(p, repeats=5, warmup=1)
  args = p.parse_args(argv)

  if args.only:
    _, ours, theirs, _ = build_case(args)
    common.report_memory(ours, theirs, args.only, args.warmup)
    return 0

  print(common.describe_env())
  print("train FLOPs/seq = 3 * (" + common.FORWARD_FORMULA.split(" = ", 1)[1] + ")")
  print(f"command: {common.command_line()}")
  cfg, ours, theirs, first = build_case(args)
  cpu = {}
  t = common.interleaved({"jax": ours, "torch": theirs}, args.repeats, args.warmup, cpu=cpu)
  flops = 3 * common.forward_flops(cfg, args.seq) * args.batch
  mem = common.child_memories("bench.train_step",
                              common.strip_flag(argv, ("--json", "--repeats")), not args.no_memory)
  row = {"bench": "train_step", "preset": args.preset, "batch": args.batch, "seq": args.seq,
         "dtype": args.dtype, "torch_dtype": args.torch_dtype, "variant": args.variant,
         "prng": args.prng or "default",
         "remat": args.remat, "microbatches": args.microbatches, "dropout": not args.no_dropout,
         "jax_first_step_s": first["jax"], "torch_first_step_s": first["torch"],
         **common.compare(t, args.batch, flops, mem, cpu)}
  print(f"{args.preset} B{args.batch} S{args.seq} {args.dtype} (torch {args.torch_dtype}) "
        f"[{args.variant}, prng {row['prng']}{', remat' if args.remat else ''}, "
        f"{args.microbatches} microbatch(es)]: "
        f"{common.fmt_compare(row)}; "
        f"first step ours {first['jax']:.1f} s (compile), torch {first['torch']:.1f} s; "
        f"{common.fmt_peak_rss(mem)}", flush=True)
  common.emit(row, args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())
