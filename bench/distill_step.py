"""MiniLMv2 distillation step: frozen teacher forward, student forward + backward, AdamW.

  python -m bench.distill_step                          # BERT-base teacher -> L6-H384, B32 S128
  python -m bench.distill_step --teacher minilm-l12-h384-uncased --seq 64 --repeats 3

Ours is the real step: `distillation.minilm_v2` (Q-Q, K-K, V-V relation KLs over 48 relation heads,
teacher's last layer vs student's last layer) run by `trainer.make_train_step`, jitted with the
student state donated and the teacher's params passed as the frozen argument.
PyTorch: transformers' BertModel teacher under `torch.no_grad()` and a BertModel student in train
mode; q/k/v are read with forward hooks on the chosen layer's query/key/value Linear modules; the
same relation-KL loss written in torch; clip_grad_norm_ + AdamW + linear schedule.

Equal work: under jit, XLA drops whatever the loss does not read -- the rest of the teacher's last
layer after its q/k/v projections and the student's last attention output and MLP. By default
the PyTorch models stop there too (the value hook raises once q/k/v are captured), so both sides
compute the same FLOPs; `--torch-full-forward` lets PyTorch run the whole models, as a naive
script would.
FLOPs per step (nominal, full models): B * (teacher forward + 3 * student forward).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from bench import common


class _Captured(Exception):
  """Raised by the value hook: q/k/v are in hand, the rest of the forward is dead code."""


def torch_relation_kl(t_x, s_x, mask, num_relation_heads: int):
  """losses.relation_kl in torch: (B, T, D_t), (B, T, D_s), (B, T) -> (B,)."""
  import torch

  def rel(x):
    b, t, d = x.shape
    x = x.float().reshape(b, t, num_relation_heads, d // num_relation_heads).transpose(1, 2)
    return x @ x.transpose(-1, -2) / math.sqrt(d // num_relation_heads)  # (B, R, T, S)
  valid = mask > 0
  key_ok = valid[:, None, None, :]
  t_l = rel(t_x).masked_fill(~key_ok, -1e9)
  s_l = rel(s_x).masked_fill(~key_ok, -1e9)
  log_pt = torch.log_softmax(t_l, -1)
  log_ps = torch.log_softmax(s_l, -1)
  kl = torch.where(key_ok, log_pt.exp() * (log_pt - log_ps), 0.0).sum(-1)  # (B, R, T)
  kl = torch.where(valid[:, None, :], kl, 0.0).sum((1, 2))
  num_real = valid.sum(-1).clamp(min=1).to(kl.dtype)
  return kl / (num_relation_heads * num_real)


def _hook_qkv(tm, layer: int, store: dict, stop: bool):
  attn = tm.encoder.layer[layer].attention.self

  def grab(name):
    def hook(module, inputs, output):
      store[name] = output
      if name == "v" and stop:
        raise _Captured
    return hook
  for name, mod in (("q", attn.query), ("k", attn.key), ("v", attn.value)):
    mod.register_forward_hook(grab(name))


def build_case(args):
  import jax
  import numpy as np
  torch = common.setup_torch()
  if args.prng:
    jax.config.update("jax_default_prng_impl", args.prng)

  from bench import variants
  from bench.train_step import torch_optimizer, torch_update
  from minilm_jax import distillation, pretrained, trainer
  from minilm_jax.config import get_preset
  from minilm_jax.optim import OptimConfig
  variants.apply(args.variant)

  t_cfg = get_preset(args.teacher, use_pooler=False, dtype=args.teacher_dtype)
  s_cfg = get_preset(args.student, use_pooler=False, dtype=args.dtype)
  teacher = pretrained.build(t_cfg, "encoder", seed=1)
  student = pretrained.build(s_cfg, "encoder", seed=0)
  t_tm = common.torch_model(teacher, t_cfg, "encoder", attn=args.torch_attn).eval()
  s_tm = common.torch_model(student, s_cfg, "encoder", attn=args.torch_attn).train()
  for p in t_tm.parameters():
    p.requires_grad_(False)

  objective = distillation.minilm_v2(teacher, num_relation_heads=args.relation_heads,
                                teacher_layer=args.teacher_layer, student_layer=-1,
                                student_cfg=s_cfg)
  total, optim = 10_000, OptimConfig(learning_rate=1e-4, warmup_ratio=0.01)
  graphdef, state, tx, schedule = trainer.init_state(student, optim, total, 0)
  step_fn = jax.jit(trainer.make_train_step(graphdef, objective, tx, schedule,
                                            microbatches=args.microbatches), donate_argnums=0)
  frozen = objective.frozen
  host = common.random_batch(s_cfg, args.batch, args.seq)
  host["weights"] = np.ones(args.batch, np.float32)
  batch = {k: jax.device_put(v) for k, v in host.items()}
  box = {"state": state}

  def ours():
    box["state"], metrics = step_fn(box["state"], batch, frozen)
    return jax.block_until_ready((box["state"], metrics))

  stop = not args.torch_full_forward
  t_store, s_store = {}, {}
  _hook_qkv(t_tm, args.teacher_layer, t_store, stop)
  _hook_qkv(s_tm, -1, s_store, stop)
  opt, sched = torch_optimizer(s_tm, optim.learning_rate, total, int(0.01 * total))
  tb = {k: torch.from_numpy(host[k].astype(np.int64))
        for k in ("input_ids", "attention_mask", "token_type_ids")}
  mask = tb["attention_mask"]
  t_autocast = common.torch_autocast(args.torch_dtype, args.teacher_dtype)
  s_autocast = common.torch_autocast(args.torch_dtype, args.dtype)

  def run(model, autocast):
    try:
      with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(**tb)
    except _Captured:
      pass

  def theirs():
    with torch.no_grad():
      run(t_tm, t_autocast)
    run(s_tm, s_autocast)
    loss = sum(torch_relation_kl(t_store[n], s_store[n], mask, args.relation_heads)
               for n in "qkv").mean()
    return torch_update(loss, s_tm, opt, sched)

  # The first step of each side starts from the same weights: the losses must agree.
  first, losses = {}, {}
  t0 = time.perf_counter()
  losses["jax"] = float(ours()[1]["loss"])
  first["jax"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  losses["torch"] = float(theirs())
  first["torch"] = time.perf_counter() - t0
  flops = args.batch * (common.forward_flops(t_cfg, args.seq)
                        + 3 * common.forward_flops(s_cfg, args.seq))
  return flops, ours, theirs, first, losses


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--teacher", default="bert-base-uncased")
  p.add_argument("--student", default="minilmv2-l6-h384-distilled-from-bert-base")
  p.add_argument("--relation-heads", type=int, default=48)
  p.add_argument("--teacher-layer", type=int, default=-1)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="student compute dtype (torch: autocast)")
  p.add_argument("--teacher-dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--variant", default="none")
  p.add_argument("--prng", default=None, choices=(None, "threefry2x32", "rbg", "unsafe_rbg"))
  p.add_argument("--torch-attn", default="sdpa", choices=("sdpa", "eager"))
  p.add_argument("--microbatches", type=int, default=1,
                 help="LoopConfig.microbatches: forward+backward over this many batch slices")
  p.add_argument("--torch-full-forward", action="store_true",
                 help="let PyTorch run the layers the loss never reads")
  common.add_args(p, repeats=3, warmup=1)
  args = p.parse_args(argv)

  if args.only:
    _, ours, theirs, _, _ = build_case(args)
    common.report_memory(ours, theirs, args.only, args.warmup)
    return 0

  print(common.describe_env())
  print("distill FLOPs/step = B * (teacher_fwd + 3 * student_fwd), fwd/seq = "
        + common.FORWARD_FORMULA.split(" = ", 1)[1])
  print(f"command: {common.command_line()}")
  flops, ours, theirs, first, losses = build_case(args)
  cpu = {}
  t = common.interleaved({"jax": ours, "torch": theirs}, args.repeats, args.warmup, cpu=cpu)
  mem = common.child_memories("bench.distill_step",
                              common.strip_flag(argv, ("--json", "--repeats")), not args.no_memory)
  row = {"bench": "distill_step", "teacher": args.teacher, "student": args.student,
         "batch": args.batch, "seq": args.seq, "dtype": args.dtype, "torch_dtype": args.torch_dtype,
         "teacher_dtype": args.teacher_dtype, "variant": args.variant,
         "microbatches": args.microbatches,
         "prng": args.prng or "default", "torch_full_forward": args.torch_full_forward,
         "first_loss_jax": losses["jax"], "first_loss_torch": losses["torch"],
         "jax_first_step_s": first["jax"], "torch_first_step_s": first["torch"],
         **common.compare(t, args.batch, flops, mem, cpu)}
  print(f"{args.teacher} -> {args.student} B{args.batch} S{args.seq} {args.dtype} "
        f"(teacher {args.teacher_dtype}, torch {args.torch_dtype}, {args.microbatches} "
        f"microbatch(es)): {common.fmt_compare(row)}; "
        f"first-step loss ours "
        f"{losses['jax']:.5f} torch {losses['torch']:.5f}; first step ours {first['jax']:.1f} s "
        f"(compile), torch {first['torch']:.1f} s; {common.fmt_peak_rss(mem)}", flush=True)
  common.emit(row, args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())
