"""Multi-process training on one machine: two `python -m train.finetune` processes on 127.0.0.1
(gloo CPU collectives, 4 host devices each) against one process with 8 devices.

The pair must train like the single process (same losses, evals and parameters up to float
summation order in the cross-process all-reduce) and leave one set of logs (process 0 writes
them). When only one of the pair gets SIGTERM, both must stop after the same step with a
checkpoint, and the resumed pair must carry on like the uninterrupted single process.
"""

from __future__ import annotations

import re
import signal
import socket

import numpy as np
import pytest
from test_fault_tolerance import Run, data_dir, env, flat_cfg, last_logged_step, saved_steps  # noqa: F401
from test_finetune import (
  history,
)

from minilm_jax import pretrained

STEPS = 8
TOL = dict(rtol=1e-5, atol=1e-6)


def flat(tiny_hf_dir, data_dir, out, **over):  # noqa: F811
  # One length bucket: one train and one eval program to compile (8-device compiles dominate).
  return flat_cfg(tiny_hf_dir, data_dir, out, **{
      "data.buckets": "16", "loop.max_steps": STEPS, "loop.save_every": 2,
      "loop.eval_every": 4, "export_hf": True, **over})


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(cfg: dict, env: dict, processes: int) -> list[Run]:  # noqa: F811
  devices = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // processes}"}
  if processes == 1:
    return [Run(cfg, {**env, **devices})]
  dist = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}",
          "JAX_NUM_PROCESSES": str(processes)}
  return [Run(cfg, {**env, **devices, **dist, "JAX_PROCESS_ID": str(i)})
          for i in range(processes)]


def finish_all(runs: list[Run]) -> list[str]:
  logs = []
  for r in runs:
    rc, log = r.finish()
    assert rc == 0, log
    logs.append(log)
  return logs


def final_params(out):
  m = pretrained.from_pretrained(out / "final")
  return {k: np.asarray(v) for k, v in pretrained.flat_params(m.model).items()}


def assert_trains_like(out, ref):
  got, want = history(out), history(ref)
  assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # one writer: no duplicates
  np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], **TOL)
  got_e, want_e = history(out, "eval"), history(ref, "eval")
  assert [e["step"] for e in got_e] == [e["step"] for e in want_e] == [4, 8]
  for g, w in zip(got_e, want_e, strict=True):
    assert g["accuracy"] == w["accuracy"]  # every eval example counted once
    np.testing.assert_allclose(g["loss"], w["loss"], **TOL)
  a, b = final_params(out), final_params(ref)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], err_msg=k, **TOL)


@pytest.fixture(scope="module")
def one_process(tiny_hf_dir, data_dir, env, tmp_path_factory):  # noqa: F811
  out = tmp_path_factory.mktemp("one_process") / "run"
  finish_all(launch(flat(tiny_hf_dir, data_dir, out), env, 1))
  return out


@pytest.mark.slow
def test_two_processes_match_one_process_with_eight_devices_across_a_preemption(
    tiny_hf_dir, data_dir, env, one_process, tmp_path):  # noqa: F811
  # One test, not two, because every pair of processes costs a minute on a small CPU box.
  out = tmp_path / "run"
  runs = launch(flat(tiny_hf_dir, data_dir, out), env, 2)
  for r in runs:
    r.wait_until(r.started_training, "the training loop")
  runs[0].wait_until(lambda: last_logged_step(out) >= 2, "step 2")
  # The notice reaches process 1 only; saving is collective, so both must stop after the
  # same step (JAX's preemption sync point), each with exit code 0.
  runs[1].send(signal.SIGTERM)
  stopped = {int(re.search(r"preempted at step (\d+)", log).group(1))
             for log in finish_all(runs)}
  assert len(stopped) == 1, stopped
  (n,) = stopped
  assert 2 <= n < STEPS and saved_steps(out)[-1] == n

  logs = finish_all(launch(flat(tiny_hf_dir, data_dir, out, **{"loop.resume": True}), env, 2))
  for log in logs:
    assert f"resumed at step {n}" in log and f"held-out metrics after {STEPS} steps" in log
  assert_trains_like(out, one_process)
  # Process 0 alone writes logs (one events file per launch) and the HF export.
  assert len(list((out / "tensorboard").glob("events.out.tfevents*"))) == 2
  assert (out / "hf" / "model.safetensors").is_file()
  assert saved_steps(out) == [STEPS - 2, STEPS]
