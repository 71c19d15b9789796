"""runtime.tune_host_malloc: large XLA:CPU temporaries stop page-faulting once it is applied.

Each case runs in a fresh interpreter: the setting only takes effect before JAX starts, and the
pytest worker has long started it. Page faults are counted, not timed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")

_PROGRAM = """
import json, resource, sys
import minilm_jax
tuned = minilm_jax.tune_host_malloc() if sys.argv[1] == "tune" else None
import jax, jax.numpy as jnp
x = jnp.ones((16, 1024, 64), jnp.float32)
f = jax.jit(lambda x: jnp.einsum("bij,bkj->bik", x, x).sum())  # a 64 MB temporary
f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
  f(x).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
late = minilm_jax.tune_host_malloc() if sys.argv[1] == "late" else None
print(json.dumps({"tuned": tuned, "faults": faults, "late": late}))
"""


def _run(mode: str, **env) -> dict:
  out = subprocess.run([sys.executable, "-c", _PROGRAM, mode], capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", **env}, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_tuned_malloc_reuses_large_blocks():
  default, tuned = _run("default"), _run("tune")
  assert tuned["tuned"] is True
  # 64 MB of fresh pages is 16k faults per call with the default allocator.
  assert default["faults"] > 8000, default
  assert tuned["faults"] < 200, tuned


def test_opt_out_and_late_call_leave_malloc_alone():
  assert _run("tune", MINILM_JAX_TUNE_MALLOC="0")["tuned"] is False
  assert _run("late")["late"] is False  # after the backend started: warns, changes nothing


def test_accelerator_backends_leave_malloc_alone(monkeypatch):
  """A CPU-only trick: with JAX bound for a GPU or TPU, malloc is not touched (the program
  itself runs on CPU here, so only the decision is checked)."""
  from minilm_jax import runtime
  for platforms, expected in (("cuda", True), ("tpu,cpu", True), ("cpu", False)):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert runtime.accelerator_expected() is expected, platforms
  monkeypatch.delenv("JAX_PLATFORMS")
  monkeypatch.setattr(runtime.glob, "glob", lambda pattern: [pattern])  # devices present
  monkeypatch.setattr(runtime.importlib.util, "find_spec",
                      lambda name: object() if name == "libtpu" else None)
  assert runtime.accelerator_expected() is True
  monkeypatch.setattr(runtime.importlib.util, "find_spec", lambda name: None)
  assert runtime.accelerator_expected() is False  # no plugin: JAX runs on CPU
  monkeypatch.setattr(runtime, "accelerator_expected", lambda: True)
  monkeypatch.setattr(runtime, "_tuned", False)
  assert runtime.tune_host_malloc() is False
