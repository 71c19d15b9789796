"""Streaming distillation end to end: packed rows from prepared shards through `train.distill`.

Exact resume on the stream (3 SIGKILLs, each followed by a resume, bitwise equal to the
uninterrupted run), resumes with other data settings refused, and 2 processes x 4 devices
reading disjoint rows and training like 1 process x 8 devices.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_distill import ROOT, _cfg, _overrides, assets, compilation_cache  # noqa: F401
from test_multihost import free_port

from minilm_jax import checkpoint, data, pretrained
from minilm_jax.recipes import distill as distill_main

STEPS = 20


def stream_args(assets, out, *extra):  # noqa: F811
  """Packed rows of 32 tokens (2-14 word lines: several a row), dropout on, a checkpoint every
  2 steps, evaluation only at the end."""
  return _overrides(assets, f"--loop.output_dir={out}", f"--loop.max_steps={STEPS}",
                    "--loop.save_every=2", "--loop.eval_every=1000", "--corpus.seq_len=32",
                    "--corpus.held_out=16", "--student.hidden_dropout=0.1", *extra)


def train_log(out: Path) -> list[dict]:
  recs = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
  return [r for r in recs if r["kind"] == "train"]


def final_params(out: Path) -> dict[str, np.ndarray]:
  m = pretrained.from_pretrained(out / "final")
  return {k: np.asarray(v) for k, v in pretrained.flat_params(m.model).items()}


def saved(out: Path) -> list[int]:
  return sorted(int(p.name) for p in (out / "checkpoints").glob("*") if p.name.isdigit())


@pytest.mark.slow
def test_three_sigkills_resume_bitwise(assets, tmp_path, compilation_cache):  # noqa: F811
  env = {**os.environ, **compilation_cache, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  cmd = lambda out, *extra: [sys.executable, "-m", "train.distill",
                             *stream_args(assets, out, *extra)]
  straight = tmp_path / "straight"
  proc = subprocess.run(cmd(straight), cwd=ROOT, env=env, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]

  out, rng = tmp_path / "killed", np.random.default_rng(16)
  kills = sorted(int(k) for k in rng.choice(np.arange(3, STEPS - 2), 3, replace=False))
  for i, target in enumerate(kills):
    p = subprocess.Popen(cmd(out, *(["--loop.resume=true"] if i else [])), cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not (
        (out / "checkpoints").is_dir() and saved(out) and saved(out)[-1] >= target):
      time.sleep(0.02)
    time.sleep(rng.uniform(0, 0.4))  # anywhere in a step, a save or a log write
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, (target, p.stderr.read()[-3000:])
  proc = subprocess.run(cmd(out, "--loop.resume=true"), cwd=ROOT, env=env, capture_output=True,
                        text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed at step" in proc.stderr

  got, want = train_log(out), train_log(straight)
  assert [r["step"] for r in got] == list(range(1, STEPS + 1))
  assert [r["loss"] for r in got] == [r["loss"] for r in want]  # bitwise: same batches, state
  a, b = final_params(out), final_params(straight)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_resume_with_other_seed_batch_or_corpus_fails_clearly(assets, tmp_path):  # noqa: F811
  out = tmp_path / "run"
  distill_main.run(_cfg(assets, out, "--corpus.seq_len=32", "--loop.save_every=2"))
  assert saved(out) == [2]
  for extra, what in ((["--loop.seed=1"], "seed: checkpoint 0, this run 1"),
                      (["--loop.batch_size=4"], "batch_size: checkpoint 8, this run 4")):
    with pytest.raises(checkpoint.CheckpointMismatch, match=what):
      distill_main.run(_cfg(assets, out, "--corpus.seq_len=32", "--loop.resume=true",
                            "--loop.max_steps=4", *extra))
  other = tmp_path / "other.txt"
  other.write_text("a different corpus\nof two lines\n" * 20)
  with pytest.raises(data.PreparedError, match="run being resumed was prepared from text .*"
                     "train.txt, this run reads text .*other.txt"):
    distill_main.run(_cfg(assets, out, "--corpus.seq_len=32", "--loop.resume=true",
                          "--loop.max_steps=4", f"--corpus.train_path={other}"))
  assert saved(out) == [2]  # nothing checkpointed was lost
  assert data.open_prepared(out / "data" / "train").manifest["source"].endswith("train.txt")


_HOST_SCRIPT = """
import json, sys
import jax
from minilm_jax import data, sharding
from minilm_jax.recipes import distill
from train import cli
sharding.initialize_distributed()
cfg, _ = cli.load(distill.DistillConfig, "distill_packaged", {overrides!r}, default="x")
summary = distill.run(cfg)
# The batches this process trained on, rebuilt the way distill.run builds them.
corpus = data.open_prepared(cfg.loop.output_dir + "/data/train")
held = cfg.corpus.held_out
batches = data.PackedBatches(corpus, batch_size=cfg.loop.batch_size, seq_len=cfg.corpus.seq_len,
                             seed=cfg.loop.seed, keys=(held, corpus.num_examples),
                             num_shards=cfg.corpus.num_shards or None,
                             process_index=jax.process_index(),
                             process_count=jax.process_count())
ids = [sorted(set(b["example_index"][b["example_index"] >= 0].tolist()))
       for _, b in zip(range({steps}), batches)]
own = sorted(int(k) for s in batches.own_shards for k in batches._shard_keys(s))
print("RESULT" + json.dumps({{"loss": [h["loss"] for h in summary["history"]], "ids": ids,
                              "epoch": own}}))
"""


@pytest.mark.slow
def test_two_processes_read_disjoint_rows_and_train_like_one(assets, tmp_path,  # noqa: F811
                                                             compilation_cache):  # noqa: F811
  steps = 4
  def launch(out, processes):
    over = _overrides(assets, f"--loop.output_dir={out}", f"--loop.max_steps={steps}",
                      "--loop.save_every=1000", "--corpus.seq_len=32", "--corpus.held_out=16",
                      "--corpus.num_shards=2", "--loop.eval_every=1000")
    env = {**os.environ, **compilation_cache, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // processes}"}
    dist = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}",
            "JAX_NUM_PROCESSES": str(processes)}
    script = _HOST_SCRIPT.format(overrides=over, steps=steps)
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**env, **(dist if processes > 1 else {}),
                                   "JAX_PROCESS_ID": str(i)})
             for i in range(processes)]
    results = []
    for p in procs:
      stdout, stderr = p.communicate(timeout=600)
      assert p.returncode == 0, stderr[-3000:]
      results.append(json.loads(stdout.split("RESULT", 1)[1]))
    return results

  one = launch(tmp_path / "one", 1)[0]
  pair = launch(tmp_path / "pair", 2)
  n = data.open_prepared(tmp_path / "one" / "data" / "train").num_examples
  # Disjoint rows whose union is the epoch: the example ids each process reads.
  a, b = set(pair[0]["epoch"]), set(pair[1]["epoch"])
  assert not a & b and a | b == set(range(16, n)) == set(one["epoch"])
  for step in range(steps):
    assert not set(pair[0]["ids"][step]) & set(pair[1]["ids"][step])
    assert sorted(pair[0]["ids"][step] + pair[1]["ids"][step]) == one["ids"][step]
  # The same global batches, so the same losses (up to the cross-process sum's order).
  assert pair[0]["loss"] == pair[1]["loss"]  # one all-reduced value on both
  np.testing.assert_allclose(pair[0]["loss"], one["loss"], rtol=1e-5, atol=1e-7)
