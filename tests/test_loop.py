"""The input side of the training loop: batches prefetched to the devices, no host sync in the
steady state (`jax.transfer_guard`), checkpoints written while training goes on, the opt-in
persistent compilation cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from test_distill import compilation_cache  # noqa: F401 - autouse: each step compiles once

from minilm_jax import checkpoint, data, finetune, pretrained, sharding, trainer
from minilm_jax.config import TINY
from minilm_jax.optim import OptimConfig

ROOT = Path(__file__).resolve().parents[1]


def _batches(n: int = 24, batch_size: int = 4):
  rng = np.random.default_rng(0)
  feats = {"input_ids": rng.integers(5, TINY.vocab_size, (n, 8)).astype(np.int32),
           "attention_mask": np.ones((n, 8), np.int32),
           "token_type_ids": np.zeros((n, 8), np.int32),
           "labels": rng.integers(0, 2, n).astype(np.int32)}
  return data.ArrayBatches(feats, batch_size=batch_size, seed=0)


def _train(tmp_path, name: str, **loop):
  loop = trainer.LoopConfig(output_dir=str(tmp_path / name), batch_size=4, progress=False,
                            **{"max_steps": 6, "log_every": 3, **loop})
  model = pretrained.build(TINY, "classification", 2, seed=0)
  return trainer.train(model, finetune.classification(2), _batches(), loop, OptimConfig())


def test_steady_state_steps_make_no_implicit_transfer(tmp_path, monkeypatch):
  """Under transfer_guard("disallow") the loop trains as without it: batches go to the devices
  by explicit device_put, metrics come back only at log steps by device_get. The guard is
  really on: a batch handed to the step as numpy (an implicit transfer) fails."""
  plain = _train(tmp_path, "plain")
  guarded = _train(tmp_path, "guarded", transfer_guard="disallow")
  for a, b in zip(jax.tree.leaves(plain.state["params"]), jax.tree.leaves(guarded.state["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert [h["step"] for h in guarded.history] == [3, 6]

  monkeypatch.setattr(sharding, "shard_batch", lambda batch, mesh: batch)
  with pytest.raises(Exception, match="[Dd]isallowed host-to-device transfer"):
    _train(tmp_path, "implicit", transfer_guard="disallow")


@pytest.mark.parametrize("prefetch", [1, 3])
def test_prefetch_depth_changes_nothing_but_timing(tmp_path, prefetch):
  """Batches in flight ahead of the step: the same batches reach the same steps, and the data
  position saved with each checkpoint is that of its own step, not of the batches fetched."""
  want = _train(tmp_path, "two", save_every=2)
  got = _train(tmp_path, f"p{prefetch}", prefetch=prefetch, save_every=2)
  for a, b in zip(jax.tree.leaves(want.state["params"]), jax.tree.leaves(got.state["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  positions = {}
  for run in ("two", f"p{prefetch}"):
    ckpt = checkpoint.Checkpoints(tmp_path / run / "checkpoints", 2)
    positions[run] = [json.loads((ckpt.directory / str(s) / "data" / "metadata").read_text())
                      ["position"] for s in ckpt.manager.all_steps()]
    ckpt.close()
  assert positions["two"] == positions[f"p{prefetch}"] and len(positions["two"]) == 2
  with pytest.raises(ValueError, match="loop.prefetch=0 must be >= 1"):
    _train(tmp_path, "p0", prefetch=0)


def test_compilation_cache_dir_receives_the_steps_executables(tmp_path, monkeypatch):
  from minilm_jax import runtime
  monkeypatch.setattr(runtime, "MIN_COMPILE_SECS", 0)  # a tiny step may compile under the floor
  cache = tmp_path / "xla_cache"
  old = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir",
                                             "jax_persistent_cache_min_compile_time_secs",
                                             "jax_persistent_cache_min_entry_size_bytes")}
  try:
    _train(tmp_path, "cached", compilation_cache_dir=str(cache), max_steps=1)
    assert jax.config.jax_compilation_cache_dir == str(cache)
    names = [f.name for f in cache.iterdir()]
    assert any(n.startswith("jit_step-") for n in names) and len(names) >= 2, names
  finally:
    from jax.experimental.compilation_cache import compilation_cache as cc
    for k, v in old.items():
      jax.config.update(k, v)
    cc.reset_cache()


_KILLED_DURING_WRITE = """
import json, os, signal, sys
import jax, jax.numpy as jnp
from pathlib import Path
from minilm_jax import checkpoint
ckpt = checkpoint.Checkpoints(Path(sys.argv[1]), 3)
state = {"w": jnp.full((8192, 8192), 1.0), "step": jnp.asarray(1)}  # 256 MB
ckpt.save(1, state, {"i": 1}, wait=True)
state = {"w": jnp.full((8192, 8192), 2.0), "step": jnp.asarray(2)}
step = jax.jit(lambda w: (w[:8] @ w[:, :8]).sum()).lower(state["w"]).compile()
ckpt.save(2, state, {"i": 2})  # returns once the arrays are copied off the devices
writing = ckpt.manager.is_saving_in_progress()
y = step(state["w"]).block_until_ready()  # a (compiled) step while the write goes on
still_writing = ckpt.manager.is_saving_in_progress()  # checked last: the kill comes next
print(json.dumps({"writing": bool(writing), "still_writing": bool(still_writing),
                  "computed": float(y)}), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_kill_during_an_async_checkpoint_write_keeps_the_previous_one(tmp_path):
  """orbax writes in the background: save() returns while step 2 is being written and the
  program computes meanwhile. SIGKILL then lands mid-write: the half-written step 2 stays
  invisible (orbax commits by renaming a finished temporary directory), step 1 restores."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  res = subprocess.run([sys.executable, "-c", textwrap.dedent(_KILLED_DURING_WRITE),
                        str(tmp_path / "ckpt")], env=env, capture_output=True, text=True,
                       timeout=300)
  assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
  report = json.loads(res.stdout.strip().splitlines()[-1])
  assert report["writing"] and report["still_writing"] and report["computed"] > 0, report
  ckpt = checkpoint.Checkpoints(tmp_path / "ckpt", 3)
  abstract = {"w": jax.ShapeDtypeStruct((8192, 8192), np.float32),
              "step": jax.ShapeDtypeStruct((), np.int32)}
  step, state, position = ckpt.restore_latest(abstract)
  assert (step, position) == (1, {"i": 1}) and float(state["w"][0, 0]) == 1.0
  ckpt.close()
