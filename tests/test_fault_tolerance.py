"""Fault tolerance of `python -m train.finetune`: runs killed with SIGKILL or stopped with SIGTERM
at seeded random moments resume to bitwise-identical parameters; a truncated newest checkpoint
falls back to the previous one; corrupt model directories, mismatched configs and malformed data
files fail with errors that name the culprit and leave saved files alone.

Runs are CLI subprocesses on the tiny random BERT of test_finetune. They share a persistent
compilation cache, so only the first run pays for XLA compilation: a cached executable is the
same program, and the bitwise comparisons below also check that.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_finetune import (
  ROOT,
  WORDS,
  history,
  sentiment_rows,
  write_csv,
)

from minilm_jax import checkpoint, pretrained
from minilm_jax.config import TINY
from minilm_jax.recipes import finetune as ft
from train import cli

STEPS = 24         # 3 epochs of 8 batches
SAVE_EVERY = 2
EVAL_EVERY = 8


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
  d = tmp_path_factory.mktemp("ft_data")
  write_csv(d / "train.csv", sentiment_rows(64))
  write_csv(d / "eval.csv", sentiment_rows(24, seed=1))
  return d


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
  return {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
          "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "PYTHONPATH": str(ROOT)}


def flat_cfg(model_dir, data_dir, out, **over) -> dict:
  flat = {"model.path": str(model_dir), "data.source": "csv",
          "data.train_path": str(data_dir / "train.csv"),
          "data.eval_path": str(data_dir / "eval.csv"), "data.max_length": 16,
          "data.buckets": "8,16", "optim.learning_rate": 1e-3, "loop.output_dir": str(out),
          "loop.batch_size": 8, "loop.eval_batch_size": 16, "loop.log_every": 1,
          "loop.progress": False, "loop.max_steps": STEPS, "loop.save_every": SAVE_EVERY,
          "loop.eval_every": EVAL_EVERY, "export_hf": False}
  flat.update(over)
  return flat


def cli_args(flat: dict) -> list[str]:
  return [f"--{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
          for k, v in flat.items()]


class Run:
  """A CLI subprocess; a thread drains its output (a full pipe would stall the child)."""

  def __init__(self, flat: dict, env: dict):
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "train.finetune", *cli_args(flat)], cwd=ROOT,
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    self.lines: list[str] = []
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.proc.stdout:
      self.lines.append(line)

  @property
  def log(self) -> str:
    return "".join(self.lines)

  def wait_until(self, cond, what: str, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while not cond():
      if self.proc.poll() is not None:
        raise AssertionError(f"exited ({self.proc.returncode}) before {what}:\n{self.log}")
      if time.monotonic() > deadline:
        self.proc.kill()
        raise AssertionError(f"timed out waiting for {what}:\n{self.log}")
      time.sleep(0.01)

  def started_training(self) -> bool:
    # Logged after restore and history rewrite, just before the first step compiles.
    return "training steps" in self.log

  def send(self, sig):
    assert self.proc.poll() is None, f"the run ended before the signal:\n{self.log}"
    self.proc.send_signal(sig)

  def finish(self, timeout: float = 600) -> tuple[int, str]:
    rc = self.proc.wait(timeout)
    self._reader.join()
    return rc, self.log


def last_logged_step(out: Path) -> int:
  try:
    text = (out / "history.jsonl").read_text()
  except FileNotFoundError:
    return 0
  steps = [0]
  for line in text.splitlines():
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:  # a line being written
      continue
    if rec.get("kind") == "train":
      steps.append(rec["step"])
  return max(steps)


def saved_steps(out: Path) -> list[int]:
  ckpts = out / "checkpoints"
  return sorted(int(c.name) for c in ckpts.iterdir() if c.name.isdigit()) if ckpts.exists() else []


def run_to_end(flat, env) -> str:
  rc, log = Run(flat, env).finish()
  assert rc == 0, log
  return log


def final_params(out: Path) -> dict[str, np.ndarray]:
  m = pretrained.from_pretrained(out / "final")
  return {k: np.asarray(v) for k, v in pretrained.flat_params(m.model).items()}


def assert_same_run(out: Path, ref: Path):
  """Bitwise: every logged train loss, every eval, every final parameter."""
  got, want = history(out), history(ref)
  assert [r["step"] for r in got] == list(range(1, STEPS + 1))
  for g, w in zip(got, want, strict=True):
    assert (g["loss"], g["grad_norm"]) == (w["loss"], w["grad_norm"]), (g, w)
  drop = lambda recs: [{k: v for k, v in r.items() if k != "kind"} for r in recs]
  assert drop(history(out, "eval")) == drop(history(ref, "eval"))
  a, b = final_params(out), final_params(ref)
  assert a.keys() == b.keys()
  different = [k for k in a if not np.array_equal(a[k], b[k])]
  assert not different, f"not bitwise equal: {different}"


@pytest.fixture(scope="module")
def reference(tiny_hf_dir, data_dir, env, tmp_path_factory) -> Path:
  """The uninterrupted run (the first, compiling one)."""
  out = tmp_path_factory.mktemp("reference") / "run"
  run_to_end(flat_cfg(tiny_hf_dir, data_dir, out), env)
  assert saved_steps(out) == [STEPS - SAVE_EVERY, STEPS]  # keep_checkpoints=2
  return out


# --- SIGKILL / SIGTERM -----------------------------------------------------------------------

@pytest.mark.slow
def test_sigkill_three_times_then_resume_is_bitwise_identical(tiny_hf_dir, data_dir, env,
                                                             reference, tmp_path):
  rng = np.random.default_rng(20240611)
  out = tmp_path / "run"
  kills = []
  for i in range(3):
    resume_at = saved_steps(out)[-1] if saved_steps(out) else 0
    # A step a few past the restored one, then a random delay: the kill lands anywhere in a
    # step, an async checkpoint write or an eval.
    target = resume_at + int(rng.integers(1, 6))
    delay = float(rng.uniform(0.0, 0.25))
    run = Run(flat_cfg(tiny_hf_dir, data_dir, out, **{"loop.resume": i > 0}), env)
    run.wait_until(run.started_training, "the training loop")
    run.wait_until(lambda: last_logged_step(out) >= target, f"step {target}")
    time.sleep(delay)
    run.send(signal.SIGKILL)
    run.finish()
    kills.append((resume_at, last_logged_step(out), saved_steps(out)))
    assert STEPS not in saved_steps(out), f"the run finished before the kill: {kills}"
  log = run_to_end(flat_cfg(tiny_hf_dir, data_dir, out, **{"loop.resume": True}), env)
  print("kills (resumed at, last logged step, checkpoints):", kills)
  assert f"resumed at step {kills[-1][2][-1]}" in log, (kills, log)
  assert_same_run(out, reference)


@pytest.mark.slow
def test_sigterm_saves_the_step_it_stopped_at_and_resume_is_bitwise_identical(
    tiny_hf_dir, data_dir, env, reference, tmp_path):
  out = tmp_path / "run"

  def stop(run) -> int:
    rc, log = run.finish()
    assert rc == 0, log
    n = int(re.search(r"preempted at step (\d+)", log).group(1))
    assert saved_steps(out)[-1] == n, (saved_steps(out), log)  # a complete checkpoint at n
    assert last_logged_step(out) == n
    assert not (out / "final").exists()  # a preempted run exports nothing
    return n

  # 1. While the first step is being traced and compiled: the step still completes.
  run = Run(flat_cfg(tiny_hf_dir, data_dir, out), env)
  run.wait_until(run.started_training, "the training loop")
  run.send(signal.SIGTERM)
  assert stop(run) == 1

  # 2. After resuming, past a seeded random step, while an async checkpoint write is in flight
  #    (orbax writes to <step>.orbax-checkpoint-tmp-* and renames it when done).
  target = int(np.random.default_rng(7).integers(4, 15))
  run = Run(flat_cfg(tiny_hf_dir, data_dir, out, **{"loop.resume": True}), env)
  run.wait_until(run.started_training, "the training loop")
  writing = lambda: any(".orbax-checkpoint-tmp" in c.name for c in (out / "checkpoints").iterdir())
  run.wait_until(lambda: last_logged_step(out) >= target and writing(),
                 f"a checkpoint write after step {target}")
  run.send(signal.SIGTERM)
  n = stop(run)
  assert target <= n < STEPS
  assert not writing()  # the write in flight was finished, not abandoned

  log = run_to_end(flat_cfg(tiny_hf_dir, data_dir, out, **{"loop.resume": True}), env)
  assert f"resumed at step {n}" in log
  assert_same_run(out, reference)


# --- truncated checkpoints and model directories ----------------------------------------------

def largest_file(d: Path) -> Path:
  return max((p for p in d.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def truncate(path: Path):
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(
    tiny_hf_dir, data_dir, env, reference, tmp_path):
  out = tmp_path / "run"
  shutil.copytree(reference, out)
  victim = largest_file(out / "checkpoints" / str(STEPS) / "state")  # array data
  truncate(victim)
  log = run_to_end(flat_cfg(tiny_hf_dir, data_dir, out, **{"loop.resume": True}), env)
  assert f"checkpoint at step {STEPS} is unreadable" in log, log
  assert f"restored step {STEPS - SAVE_EVERY} after 1 unreadable" in log, log
  assert f"resumed at step {STEPS - SAVE_EVERY}" in log
  # Kept for inspection under a name orbax ignores; the step was saved again.
  assert (out / "checkpoints" / f"{STEPS}.unreadable").is_dir()
  assert saved_steps(out) == [STEPS - SAVE_EVERY, STEPS]
  assert_same_run(out, reference)


CORRUPTIONS = {
    "truncated array data": lambda params: truncate(largest_file(params / "ocdbt.process_0")),
    "garbage metadata": lambda params: (params / "_METADATA").write_bytes(b"\x00garbage{"),
    "garbage manifest": lambda params: (params / "manifest.ocdbt").write_bytes(
        os.urandom((params / "manifest.ocdbt").stat().st_size)),
}


@pytest.mark.parametrize("corrupt", list(CORRUPTIONS))
# orbax's background reads of the other arrays fail too and are reported as unraisable.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_model_dir_params_is_a_clear_error_naming_the_path(
    data_dir, reference, tmp_path, corrupt):
  model = tmp_path / "model"
  shutil.copytree(reference / "final", model)
  CORRUPTIONS[corrupt](model / "params")
  cfg = cli.merge(ft.FinetuneConfig(), flat_cfg(model, data_dir, tmp_path / "run"))
  with pytest.raises(ValueError, match="corrupt or mismatched checkpoint at "
                     + re.escape(str(model / "params"))):
    ft.run(cfg)


# --- mismatched configs -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def wide_hf_dir(tiny_hf_dir, tmp_path_factory) -> Path:
  """tiny_hf_dir's vocab with hidden size 48 instead of 32."""
  d = tmp_path_factory.mktemp("wide_hf")
  shutil.copy(tiny_hf_dir / "vocab.txt", d / "vocab.txt")
  cfg = TINY.replace(hidden_size=48, intermediate_size=96)
  pretrained.export_hf(pretrained.build(cfg, "encoder", seed=1), cfg, d)
  return d


def snapshot(d: Path) -> dict[str, str]:
  return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(d.rglob("*")) if p.is_file()}


MISMATCHES = {
    "model width": ({}, r"does not match this run's config \(\d+ differences, e\.g\. "
                        r"params/\S+: checkpoint float32\[32(, 2)?\], this run float32\[48"),
    "batch size": ({"loop.batch_size": 16}, r"other data settings .*batch_size: checkpoint 8, "
                                            r"this run 16"),
    "buckets": ({"data.buckets": "16"}, r"other data settings .*buckets: checkpoint \[8, 16\], "
                                         r"this run \[16\]"),
}


@pytest.mark.parametrize("what", list(MISMATCHES))
def test_resume_with_mismatched_config_fails_clearly_and_touches_nothing(
    tiny_hf_dir, wide_hf_dir, data_dir, reference, tmp_path, caplog, what):
  out = tmp_path / "run"
  shutil.copytree(reference, out)
  before = snapshot(out)
  over, message = MISMATCHES[what]
  model = wide_hf_dir if what == "model width" else tiny_hf_dir
  cfg = cli.merge(ft.FinetuneConfig(), flat_cfg(model, data_dir, out, **over,
                                                **{"loop.resume": True}))
  with pytest.raises(checkpoint.CheckpointMismatch, match=message) as e:
    ft.run(cfg)
  assert "nothing was restored or deleted" in str(e.value)
  assert "unreadable" not in caplog.text  # a mismatch is not mistaken for corruption
  after = snapshot(out)
  assert {k: v for k, v in after.items() if k in before} == before  # nothing changed or gone
  assert set(after) - set(before) <= {"config.resume.json"}


# --- malformed data files (the reader-level cases live in test_data.py) -----------------------

def test_malformed_data_files_fail_before_training_naming_the_file(tiny_hf_dir, data_dir,
                                                                   tmp_path):
  def run(**over):
    ft.run(cli.merge(ft.FinetuneConfig(), flat_cfg(tiny_hf_dir, data_dir, tmp_path / "run",
                                                   **over)))

  header_only = tmp_path / "header.csv"
  header_only.write_text("text,label\n")
  # Used to surface as "eval.csv: unknown label 'neg'; label_names are []".
  with pytest.raises(ValueError, match=re.escape(f"{header_only}") + ".*no examples"):
    run(**{"data.train_path": str(header_only)})
  with pytest.raises(ValueError, match=re.escape(f"{header_only}") + ".*empty source, no examples"):
    run(**{"data.eval_path": str(header_only)})  # used to skip evaluation silently
  bad_eval = write_csv(tmp_path / "bad_eval.csv", [("good movie", "pos"), ("bad film", "meh")])
  with pytest.raises(ValueError, match=re.escape(f"{bad_eval}, line 3: unknown label 'meh'")):
    run(**{"data.eval_path": str(bad_eval)})
  missing = tmp_path / "nope.csv"
  with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
    run(**{"data.train_path": str(missing)})
  # Fewer examples than one global batch with the remainder dropped: used to "train" 0 steps
  # and export the random head. (Kept, the default, they make one padded batch.)
  few = write_csv(tmp_path / "few.csv", [(" ".join(WORDS[:3]), "pos"), ("bad film", "neg")])
  with pytest.raises(ValueError, match="no training batches.*batch_size 8"):
    run(**{"data.train_path": str(few), "loop.max_steps": None, "loop.drop_remainder": True})
  assert not (tmp_path / "run" / "checkpoints").exists()


# --- the output directory ----------------------------------------------------------------------

def _tree(path: Path) -> dict[str, bytes]:
  return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_fresh_run_into_an_earlier_run_refuses_and_touches_nothing(tiny_hf_dir, data_dir, env,
                                                                  tmp_path):
  """A second fresh run with the same output_dir used to delete the first run's checkpoints and
  history and exit 0. It must refuse, name both ways out, and change nothing; with
  --loop.overwrite=true it replaces the earlier run."""
  out = tmp_path / "run"
  flat = flat_cfg(tiny_hf_dir, data_dir, out, **{"loop.max_steps": 4})
  run_to_end(flat, env)
  before = _tree(out)
  assert saved_steps(out) == [2, 4] and (out / "history.jsonl").exists()
  rc, log = Run(flat, env).finish()
  assert rc == 2, log
  assert "holds an earlier run" in log and "--loop.resume=true" in log
  assert "--loop.overwrite=true" in log and "Traceback" not in log
  assert _tree(out) == before
  rc, log = Run({**flat, "loop.overwrite": "true", "loop.max_steps": 2}, env).finish()
  assert rc == 0, log
  assert saved_steps(out) == [2] and last_logged_step(out) == 2


def _mount_tmpfs(path: Path, size: str) -> None:
  path.mkdir(parents=True)
  res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
  if res.returncode:
    pytest.skip(f"cannot mount a small tmpfs here (needs root): {res.stderr.strip()}")


@pytest.mark.slow
def test_full_disk_is_a_clear_error_and_keeps_the_last_checkpoint(tiny_hf_dir, data_dir, env,
                                                                  tmp_path):
  """The output dir on a 4 MiB tmpfs: a run checkpoints step 2; the disk then fills (a ballast
  file), and the resumed run's next checkpoint cannot fit. It must exit 4 with a message that
  names the directory and the bytes needed, before orbax writes anything; step 2 stays
  restorable (a third run, with room again, resumes from it and finishes)."""
  disk = tmp_path / "disk"
  _mount_tmpfs(disk, "4m")
  try:
    out = disk / "run"
    flat = flat_cfg(tiny_hf_dir, data_dir, out, **{"loop.max_steps": 2})
    run_to_end(flat, env)
    assert saved_steps(out) == [2]
    ballast = disk / "ballast"
    free = shutil.disk_usage(disk).free
    ballast.write_bytes(b"\0" * (free - 64 * 1024))  # 64 KiB left: logs fit, a checkpoint not
    before = _tree(out / "checkpoints")
    resumed = {**flat, "loop.max_steps": 4, "loop.resume": "true"}
    rc, log = Run(resumed, env).finish()
    assert rc == 4, log
    assert "no space left for the checkpoint of step 4" in log, log
    assert str(out / "checkpoints") in log and "MiB" in log and "Traceback" not in log
    assert _tree(out / "checkpoints") == before
    ballast.unlink()
    rc, log = Run(resumed, env).finish()
    assert rc == 0, log
    assert "resumed at step 2" in log and saved_steps(out) == [2, 4]
  finally:
    subprocess.run(["umount", "-l", str(disk)], check=False)
