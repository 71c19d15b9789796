"""XLA:CPU flags, each in its own process, measured against PyTorch as the fixed yardstick.

  python -m bench.xla_flags                                   # the default flag sets below
  python -m bench.xla_flags --sets "" "--xla_cpu_use_xnnpack=false" --repeats 8

XLA reads XLA_FLAGS once, when jax starts, so two flag sets cannot share a process. Each set runs
`bench.variants --variants none` (our forward interleaved with transformers' BertModel) in a
child process; PyTorch ignores XLA_FLAGS, so ours/torch from different children is comparable
even when the machine's load changes between them. Unknown flags abort XLA; the error is shown.

Flags that jax 0.10's XLA:CPU no longer honours: --xla_cpu_use_thunk_runtime (always on, the
flag only warns). Intra-op threads: XLA:CPU sizes its pool from the CPUs the process may use
(`taskset` / cgroups), there is no flag; --xla_cpu_multi_thread_eigen=false makes dots
single-threaded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from bench import common

DEFAULT_SETS = (
    "",
    "--xla_cpu_use_xnnpack=false",
    "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot",
    "--xla_cpu_experimental_onednn_custom_call=true",
    "--xla_cpu_prefer_vector_width=512",
    "--xla_cpu_enable_fast_math=true",
    "--xla_cpu_multi_thread_eigen=false",
)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sets", nargs="+", default=list(DEFAULT_SETS))
  p.add_argument("--preset", default="minilm-l12-h384-uncased")
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--repeats", type=int, default=6)
  p.add_argument("--variant", default="none")
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  print(common.describe_env())
  print(f"command: {common.command_line()}")
  results = {}
  for flags in args.sets:
    env = dict(os.environ, XLA_FLAGS=flags)
    cmd = [sys.executable, "-m", "bench.variants", "--variants", args.variant, "--preset",
           args.preset, "--seq", str(args.seq), "--batch", str(args.batch), "--repeats",
           str(args.repeats)]
    proc = subprocess.run(cmd, cwd=common.ROOT, env=env, capture_output=True, text=True,
                          check=False)
    row = next((json.loads(line[7:]) for line in proc.stdout.splitlines()
                if line.startswith("RESULT ")), None)
    label = flags or "(default)"
    if row is None:
      print(f"{label}: failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
      continue
    ours, torch = row["rows"][args.variant], row["rows"]["torch"]
    results[label] = {"ours_seq_s": ours["seq_s"], "torch_seq_s": torch["seq_s"],
                      "ratio": ours["vs_torch"], "spread": ours["spread"]}
    print(f"{label:75s} ours {ours['seq_s']:6.1f} seq/s, torch {torch['seq_s']:6.1f} seq/s, "
          f"ours/torch {ours['vs_torch']:.3f}x ({ours['spread']})", flush=True)
  common.emit({"bench": "xla_flags", "preset": args.preset, "seq": args.seq,
               "batch": args.batch, "results": results, "command": common.command_line()},
              args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())
