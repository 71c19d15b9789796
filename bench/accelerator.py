"""Accelerator benchmark: ours against transformers' PyTorch on the same GPU, same weights.

  python -m bench.accelerator                      # a GPU: every section, L12-H384 in bf16
  python -m bench.accelerator --sections train --seqs 512 --profile runs/profile
  python -m bench.accelerator --sections relation_memory   # any backend: compiles only
  python -m bench.accelerator --tiny               # smoke run of every section on a CPU

Sections (each prints ratios ours/torch and a RESULT json line):
  train            classification train step, B256 at each of --seqs: bf16 compute, fp32
                   params, AdamW; PyTorch: BertForSequenceClassification under
                   autocast(bfloat16) with SDPA, eager and torch.compile. MFU = model FLOPs /
                   time / the device's peak bf16 FLOP/s.
  infer            encoder forward, seq/s.
  distill          MiniLMv2 step: bf16 BERT-base teacher -> L6-H384 student, 48 relation heads.
  relation_memory  compiled.memory_analysis() of that step at the base recipe's 256 x 512 per
                   device, relation KLs all heads at once vs in chunks (losses.head_chunk).
Compile time is the first call of each side; device memory is memory_analysis() (ours) and
torch.cuda.max_memory_allocated (theirs), and the process peak from memory_stats().
Attention dropout is 0 on both sides (--attention-dropout): the fused kernels have none
(minilm_jax/attention); hidden dropout stays 0.1.
`--profile DIR` traces ours for a few steps of the last train case and prints where device time
goes (the trace's top ops), which is what a missed target is explained with.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import sys
import time
from collections import Counter
from pathlib import Path

from bench import common

TRAIN_FLOPS = "train FLOPs/seq = 3 * forward (backward = 2 x forward)"
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "A10": 125e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
             "TPU v5p": 459e12, "TPU v6": 918e12}  # dense bf16, per chip


def peak_flops(override: float | None) -> float | None:
  import jax
  if override:
    return override * 1e12
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_BF16.items() if k.lower() in kind.lower()), None)


def torch_device():
  import torch
  return "cuda" if torch.cuda.is_available() else "cpu"


def sync_torch():
  import torch
  if torch.cuda.is_available():
    torch.cuda.synchronize()


def torch_peak_mb(fn) -> float | None:
  import torch
  if not torch.cuda.is_available():
    return None
  torch.cuda.reset_peak_memory_stats()
  fn()
  return torch.cuda.max_memory_allocated() / 2**20


def compile_stats(jitted, *args) -> tuple[float, float]:
  """(seconds to lower and compile, device MiB XLA assigned to one call: arguments, outputs and
  temporaries). The jitted function's first call then reuses this executable."""
  t0 = time.perf_counter()
  m = jitted.lower(*args).compile().memory_analysis()
  seconds = time.perf_counter() - t0
  return seconds, (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes) / 2**20


def first_call(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def _cfg(args, name: str, dtype: str = "bfloat16"):
  from minilm_jax.config import TINY, get_preset
  over = dict(dtype=dtype, attention_dropout=args.attention_dropout)
  return TINY.replace(vocab_size=2048, **over) if args.tiny else get_preset(name, **over)


def _batch(cfg, batch: int, seq: int, labels: int = 0) -> dict:
  import numpy as np
  host = common.random_batch(cfg, batch, seq)
  if labels:
    host["labels"] = np.random.default_rng(1).integers(0, labels, batch).astype(np.int32)
  host["weights"] = np.ones(batch, np.float32)
  return host


def _torch_inputs(host: dict, keys=("input_ids", "attention_mask", "token_type_ids", "labels")):
  import numpy as np
  import torch
  return {k: torch.from_numpy(host[k].astype(np.int64)).to(torch_device())
          for k in keys if k in host}


def _torch_cases(make_step, with_compile: bool) -> tuple[dict, dict]:
  """({'torch': eager step, 'torch_compile': compiled step (if it compiles)}, each blocking;
  the seconds of each one's first call: torch.compile compiles then)."""
  def blocking(step):
    def run():
      out = step()
      sync_torch()
      return out
    return run
  cases = {"torch": blocking(make_step(compiled=False))}
  first = {"torch": first_call(cases["torch"])}
  if with_compile:
    try:
      step = blocking(make_step(compiled=True))
      first["torch_compile"] = first_call(step)  # a failure shows now, not inside the timing
      cases["torch_compile"] = step
    except Exception as e:  # noqa: BLE001 - torch.compile fails in many backend-specific ways
      print(f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
  return cases, first


def _report(name: str, cases: dict, first: dict, args, batch: int, flops: float, extra: dict):
  times = common.interleaved(cases, args.repeats, args.warmup)
  peak = peak_flops(args.peak_tflops)
  row = {"bench": "accelerator", "section": name, "batch": batch, **extra,
         "first_call_s": first, "command": common.command_line()}
  parts = []
  for k, ts in times.items():
    t = common.med(ts)
    row[f"{k}_seq_s"] = batch / t
    row[f"{k}_tflops"] = flops / t / 1e12
    mfu = f", MFU {100 * flops / t / peak:.1f}%" if peak else ""
    if peak:
      row[f"{k}_mfu"] = flops / t / peak
    parts.append(f"{k} {batch / t:.1f} seq/s ({flops / t / 1e12:.1f} TFLOP/s{mfu}, "
                 f"{common.spread(ts)})")
  for k in times:
    if k != "jax":
      row[f"ratio_vs_{k}"] = common.med(times[k]) / common.med(times["jax"])
  ratios = ", ".join(f"ours/{k} {row[f'ratio_vs_{k}']:.2f}x" for k in times if k != "jax")
  firsts = ", ".join(f"{k} {v:.1f} s" for k, v in first.items())
  mem = ", ".join(f"{k} {v:.0f} MiB" for k, v in extra.get("memory_mb", {}).items() if v)
  what = ", ".join(f"{k} {v}" for k, v in extra.items() if k != "memory_mb")
  print(f"{name} B{batch} {what}: {'; '.join(parts)}; {ratios}; compile / first call "
        f"{firsts}; device memory {mem or '-'}", flush=True)
  common.emit(row, args.json)


def train_case(args, seq: int):
  import jax
  import torch

  from bench.train_step import torch_optimizer, torch_update
  from minilm_jax import finetune, pretrained, trainer
  from minilm_jax.optim import OptimConfig
  cfg = _cfg(args, args.preset)
  model = pretrained.build(cfg, "classification", 2, seed=0)
  tm = common.torch_model(model, cfg, "classification", num_labels=2).to(torch_device()).train()
  optim = OptimConfig(learning_rate=5e-5, warmup_ratio=0.06)
  graphdef, state, tx, schedule = trainer.init_state(model, optim, 10_000, 0)
  step_fn = jax.jit(trainer.make_train_step(graphdef, finetune.classification(2), tx, schedule),
                    donate_argnums=0)
  host = _batch(cfg, args.batch, seq, labels=2)
  batch = {k: jax.device_put(v) for k, v in host.items()}
  compile_s, mib = compile_stats(step_fn, state, batch)
  box = {"state": state}

  def ours():
    box["state"], metrics = step_fn(box["state"], batch)
    return jax.block_until_ready(metrics)

  tb = _torch_inputs(host)
  opt, sched = torch_optimizer(tm, optim.learning_rate, 10_000, 600)

  def make_step(compiled: bool):
    fwd = torch.compile(tm) if compiled else tm

    def step():
      with torch.autocast(torch_device(), dtype=torch.bfloat16):
        loss = fwd(**tb).loss
      return torch_update(loss, tm, opt, sched)
    return step

  theirs, first = _torch_cases(make_step, not args.no_torch_compile)
  memory = {"jax": mib, "torch": torch_peak_mb(theirs["torch"])}
  flops = 3 * common.forward_flops(cfg, seq) * args.batch
  cases, first = {"jax": ours, **theirs}, {"jax": compile_s, **first}
  _report("train", cases, first, args, args.batch, flops,
          {"seq": seq, "preset": "tiny" if args.tiny else args.preset, "memory_mb": memory})
  return ours


def infer_case(args, seq: int):
  import flax.nnx as nnx
  import jax
  import torch

  from minilm_jax import pretrained
  cfg = _cfg(args, args.preset)
  model = pretrained.build(cfg, "encoder", seed=0)
  tm = common.torch_model(model, cfg, "encoder").to(torch_device()).eval()
  graphdef, params = nnx.split(model)
  fwd = jax.jit(lambda p, b: nnx.merge(graphdef, p)(
      b["input_ids"], b["attention_mask"], b["token_type_ids"])[0])
  host = _batch(cfg, args.batch, seq)
  batch = {k: jax.device_put(v) for k, v in host.items() if k != "weights"}
  ours = lambda: jax.block_until_ready(fwd(params, batch))  # noqa: E731
  tb = _torch_inputs(host, ("input_ids", "attention_mask", "token_type_ids"))

  def make_step(compiled: bool):
    run = torch.compile(tm) if compiled else tm

    def step():
      with torch.no_grad(), torch.autocast(torch_device(), dtype=torch.bfloat16):
        return run(**tb).last_hidden_state
    return step

  compile_s, mib = compile_stats(fwd, params, batch)
  theirs, first = _torch_cases(make_step, not args.no_torch_compile)
  memory = {"jax": mib, "torch": torch_peak_mb(theirs["torch"])}
  cases, first = {"jax": ours, **theirs}, {"jax": compile_s, **first}
  _report("infer", cases, first, args, args.batch, common.forward_flops(cfg, seq) * args.batch,
          {"seq": seq, "memory_mb": memory})


def _distill_parts(args, batch: int, seq: int, relation_heads: int, **over):
  import jax

  from minilm_jax import distillation, pretrained, trainer
  from minilm_jax.optim import OptimConfig
  t_cfg = _cfg(args, args.teacher).replace(use_pooler=False, **over)
  s_cfg = _cfg(args, args.student).replace(use_pooler=False, **over)
  if args.tiny:
    s_cfg = s_cfg.replace(num_layers=1)
  teacher = pretrained.build(t_cfg, "encoder", seed=1)
  student = pretrained.build(s_cfg, "encoder", seed=0)
  objective = distillation.minilm_v2(teacher, num_relation_heads=relation_heads, student_cfg=s_cfg)
  graphdef, state, tx, schedule = trainer.init_state(student, OptimConfig(learning_rate=1e-4),
                                                     10_000, 0)
  step_fn = jax.jit(trainer.make_train_step(graphdef, objective, tx, schedule), donate_argnums=0)
  host = _batch(s_cfg, batch, seq)
  return t_cfg, s_cfg, teacher, student, objective, state, step_fn, host


def distill_case(args):
  import jax
  import torch

  from bench.distill_step import _Captured, _hook_qkv, torch_relation_kl
  from bench.train_step import torch_optimizer, torch_update
  heads = 4 if args.tiny else 48
  t_cfg, s_cfg, teacher, student, objective, state, step_fn, host = _distill_parts(
      args, args.distill_batch, args.distill_seq, heads)
  batch = {k: jax.device_put(v) for k, v in host.items()}
  frozen = objective.frozen
  compile_s, mib = compile_stats(step_fn, state, batch, frozen)
  box = {"state": state}

  def ours():
    box["state"], metrics = step_fn(box["state"], batch, frozen)
    return jax.block_until_ready(metrics)

  dev = torch_device()
  t_tm = common.torch_model(teacher, t_cfg, "encoder").to(dev).eval()
  s_tm = common.torch_model(student, s_cfg, "encoder").to(dev).train()
  t_store, s_store = {}, {}
  _hook_qkv(t_tm, -1, t_store, True)
  _hook_qkv(s_tm, -1, s_store, True)
  opt, sched = torch_optimizer(s_tm, 1e-4, 10_000, 100)
  tb = _torch_inputs(host, ("input_ids", "attention_mask", "token_type_ids"))

  def make_step(compiled: bool):
    t_run, s_run = (torch.compile(t_tm), torch.compile(s_tm)) if compiled else (t_tm, s_tm)

    def forward(model):
      with contextlib.suppress(_Captured), torch.autocast(dev, dtype=torch.bfloat16):
        model(**tb)

    def step():
      with torch.no_grad():
        forward(t_run)
      forward(s_run)
      loss = sum(torch_relation_kl(t_store[n], s_store[n], tb["attention_mask"], heads)
                 for n in "qkv").mean()
      return torch_update(loss, s_tm, opt, sched)
    return step

  # torch.compile cannot trace the hooks' control-flow exception: eager only.
  theirs, first = _torch_cases(make_step, False)
  memory = {"jax": mib, "torch": torch_peak_mb(theirs["torch"])}
  cases, first = {"jax": ours, **theirs}, {"jax": compile_s, **first}
  b, s = args.distill_batch, args.distill_seq
  flops = b * (common.forward_flops(t_cfg, s) + 3 * common.forward_flops(s_cfg, s))
  _report("distill", cases, first, args, b, flops, {"seq": s, "memory_mb": memory})


def relation_memory(args):
  """memory_analysis() of the MiniLMv2 step with the relation KLs whole vs chunked, without the
  CPU tricks (dense XLA attention, no inference chunks): what an accelerator would hold. Only
  compiles, so it runs on any backend."""
  import jax

  from minilm_jax import losses
  b, s = (4, 64) if args.tiny else (args.relation_batch, 512)
  heads = 4 if args.tiny else 48
  dense = dict(attention_impl="xla", attention_query_block=0, inference_chunk_tokens=0)
  spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)  # noqa: E731
  budget, out = losses.RELATION_CHUNK_BYTES, {}
  for label, limit in (("all heads at once", float("inf")), ("chunked", budget)):
    losses.RELATION_CHUNK_BYTES = limit
    try:
      *_, objective, state, step_fn, host = _distill_parts(args, b, s, heads, **dense)
      m = step_fn.lower(*(jax.tree.map(spec, x) for x in (state, host, objective.frozen))
                        ).compile().memory_analysis()
    finally:
      losses.RELATION_CHUNK_BYTES = budget
    out[label] = {"temp_mb": m.temp_size_in_bytes / 2**20,
                  "argument_mb": m.argument_size_in_bytes / 2**20}
  chunk = losses.head_chunk(b, heads, s)
  print(f"relation_memory B{b} S{s}, {heads} relation heads (chunks of {chunk}): "
        + "; ".join(f"{k}: temp {v['temp_mb']:.0f} MiB, arguments {v['argument_mb']:.0f} MiB"
                    for k, v in out.items()), flush=True)
  common.emit({"bench": "accelerator", "section": "relation_memory", "batch": b, "seq": s,
               "relation_heads": heads, "head_chunk": chunk, **out,
               "command": common.command_line()}, args.json)


def profile(args, step, steps: int = 5, top: int = 15):
  """Traces `step` and prints the ops that took the most device time (the trace's own events,
  summed by name)."""
  import jax
  out = Path(args.profile)
  with jax.profiler.trace(str(out), create_perfetto_trace=True):
    for _ in range(steps):
      step()
  traces = sorted(out.rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
  if not traces:
    print(f"profile: no trace under {out}")
    return
  events = json.loads(gzip.open(traces[-1]).read())["traceEvents"]
  names = {e["pid"]: e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  device = {pid for pid, n in names.items() if any(d in n for d in ("GPU", "TPU", "gpu"))}
  busy = Counter()
  for e in events:
    if e.get("ph") == "X" and (not device or e["pid"] in device):
      busy[e["name"]] += e.get("dur", 0)
  total = sum(busy.values()) or 1
  print(f"profile ({traces[-1]}): {total / 1e3 / steps:.1f} ms device time a step; top ops:")
  for name, dur in busy.most_common(top):
    print(f"  {100 * dur / total:5.1f}%  {dur / 1e3 / steps:8.2f} ms  {name[:110]}")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sections", default="train,infer,distill,relation_memory")
  p.add_argument("--preset", default="minilm-l12-h384-uncased")
  p.add_argument("--teacher", default="bert-base-uncased")
  p.add_argument("--student", default="minilmv2-l6-h384-distilled-from-bert-base")
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--seqs", default="128,512")
  p.add_argument("--distill-batch", type=int, default=256)
  p.add_argument("--distill-seq", type=int, default=128)
  p.add_argument("--relation-batch", type=int, default=256,
                 help="per-device batch of relation_memory (the base recipe's)")
  p.add_argument("--attention-dropout", type=float, default=0.0)
  p.add_argument("--peak-tflops", type=float, default=None,
                 help="the device's peak bf16 TFLOP/s for MFU (default: by device kind)")
  p.add_argument("--no-torch-compile", action="store_true")
  p.add_argument("--profile", default=None, help="trace ours on the last train case here")
  p.add_argument("--tiny", action="store_true", help="tiny models and batches: a smoke run")
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--json", default=None, help="append result rows to this JSONL file")
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  if args.tiny:
    args.batch, args.distill_batch, args.seqs = 4, 4, "16"
    args.distill_seq, args.repeats, args.warmup = 16, 2, 1
  common.setup_torch()
  import jax
  sections = args.sections.split(",")
  print(common.describe_env())
  print(f"device: {jax.devices()[0].device_kind}; peak bf16 "
        f"{(peak_flops(args.peak_tflops) or 0) / 1e12:.0f} TFLOP/s; torch on {torch_device()}")
  print(f"{TRAIN_FLOPS}; {common.FORWARD_FORMULA}")
  print(f"command: {common.command_line()}")
  seqs = [int(s) for s in args.seqs.split(",")]
  step = None
  if "train" in sections:
    for seq in seqs:
      step = train_case(args, seq)
  if "infer" in sections:
    for seq in seqs:
      infer_case(args, seq)
  if "distill" in sections:
    distill_case(args)
  if "relation_memory" in sections:
    relation_memory(args)
  if args.profile and step is not None:
    profile(args, step)
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    print(f"jax device peak over the run: {stats['peak_bytes_in_use'] / 2**20:.0f} MiB")
  return 0


if __name__ == "__main__":
  sys.exit(main())
