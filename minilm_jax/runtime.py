"""Process settings that make XLA:CPU fast: one call, before JAX starts its backend.

    import minilm_jax
    minilm_jax.tune_host_malloc()   # first thing in a notebook or script that runs on CPU

XLA:CPU allocates each step's temporaries afresh: hundreds of MB per step (the float32 attention
logits of L12-H384 at batch 32 and length 512 are 400 MB per layer). glibc serves blocks that
large with `mmap` and hands them back with `munmap`, so every step touches every page anew: on
the 2-core machine in bench/README.md an L12 bfloat16 training step took 630,000 page faults and
1.1 s of kernel time per step. With one malloc arena, no `mmap` and no trimming, freed blocks
are reused and the faults drop to zero: the step took 2.25 s instead of 2.81 s, and S512
inference ran 1.45x faster.

The cost: the process keeps its peak heap mapped instead of returning it to the OS, as PyTorch's
and JAX's GPU caching allocators do. A CPU-only trick: where JAX will run on a GPU or TPU (its
buffers are not malloc'd there) the call leaves malloc alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.util
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

# mallopt(3) parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -3, -4, -8
# MINILM_JAX_TUNE_MALLOC -> mallopt settings ("0": none).
MODES = {
    "1": ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)),
    "arena": ((_M_ARENA_MAX, 1),),
    "mmap64": ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, 64 << 20), (_M_TRIM_THRESHOLD, 64 << 20)),
}
_tuned = False


def tune_host_malloc() -> bool:
  """Configure glibc malloc to keep and reuse large blocks; returns whether it is in effect.

  A no-op off Linux/glibc and when the environment sets `MINILM_JAX_TUNE_MALLOC=0`. It must run
  before the first JAX computation: XLA's worker threads choose their malloc arena when they
  start, and a thread on its own arena would still `mmap` every large block. Called later it
  does nothing and warns. Idempotent. The train/ entry points and bench/ scripts call it."""
  global _tuned
  if _tuned:
    return True
  mode = os.environ.get("MINILM_JAX_TUNE_MALLOC", "1")
  if mode == "0" or not sys.platform.startswith("linux"):
    return False
  if mode not in MODES:
    raise ValueError(f"MINILM_JAX_TUNE_MALLOC={mode!r}: expected 0 or one of {sorted(MODES)}")
  if accelerator_expected():
    return False
  from jax._src import xla_bridge
  if xla_bridge.backends_are_initialized():
    log.warning("tune_host_malloc() called after JAX started its backend: malloc left as is. "
                "Call it before the first JAX computation.")
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # musl and other libcs have no mallopt
    return False
  # M_TRIM_THRESHOLD takes an int that glibc stores as size_t: -1 means "never trim".
  ok = all(mallopt(param, value) == 1 for param, value in MODES[mode])
  _tuned = ok
  return ok


# JAX's accelerator plugins (jax_plugins entry points) and the device files they open.
_PLUGINS = {"gpu": ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_rocm7_plugin",
                    "jax_rocm60_plugin"), "tpu": ("libtpu",)}
_DEVICES = {"gpu": ("/dev/nvidia[0-9]*", "/dev/kfd"), "tpu": ("/dev/accel*", "/dev/vfio/[0-9]*")}


def accelerator_expected() -> bool:
  """Whether JAX will start on a GPU or TPU, decided without starting it: JAX_PLATFORMS when
  set (its first entry), else an installed accelerator plugin with its device present."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip() not in ("cpu", "")
  return any(any(importlib.util.find_spec(m) for m in _PLUGINS[kind])
             and any(glob.glob(pattern) for pattern in _DEVICES[kind]) for kind in _PLUGINS)


DEFAULT_CACHE_BYTES = 4 << 30
# Executables that compile faster than this are not worth a disk round trip: with no floor the
# cache fills with thousands of op-by-op executables (jit_add, jit_slice ...) of eager code, and
# JAX's size-capped cache rescans its directory on every write. JAX's own default is 1 s; the
# steps of small models on a CPU compile in a fraction of a second to a few seconds.
MIN_COMPILE_SECS = 0.3


def default_cache_dir() -> Path:
  """Where compiled executables are kept by default: $MINILM_JAX_CACHE, else
  $XDG_CACHE_HOME/minilm_jax or ~/.cache/minilm_jax, in `jax-<jaxlib>-<machine>`. The machine
  tag hashes the CPU's model and feature flags: XLA:CPU compiles for the host's instruction set,
  so a home directory shared by Intel and AMD machines (or older and newer ones) keeps one cache
  each instead of loading code a CPU cannot run."""
  import jaxlib
  base = os.environ.get("MINILM_JAX_CACHE") or Path(
      os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minilm_jax"
  return Path(base) / f"jax-{jaxlib.__version__}-{_machine_tag()}"


def _machine_tag() -> str:
  import hashlib
  import platform
  facts = [platform.machine()]
  try:
    with open("/proc/cpuinfo") as f:
      facts += sorted({line.strip() for line in f
                       if line.startswith(("model name", "flags", "Features", "CPU part"))})
  except OSError:
    facts.append(platform.processor())
  return hashlib.sha256("\n".join(facts).encode()).hexdigest()[:12]


def enable_compilation_cache(path: str | os.PathLike) -> Path | None:
  """JAX's persistent compilation cache in `path` ("default": `default_cache_dir()`; "": off),
  for every executable that takes `MIN_COMPILE_SECS` or more to compile (JAX's default: 1 s).
  Callable at any time: the cache is reset so that the new directory takes effect for the
  compilations that follow. A directory that cannot be created leaves the cache off, with a
  warning: the run goes on compiling as usual. -> the directory, or None when off."""
  if not path:
    return None
  import jax
  from jax.experimental.compilation_cache import compilation_cache as cc
  default = str(path) == "default"
  path = default_cache_dir() if default else Path(path).expanduser()
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    log.warning("compilation cache off: cannot create %s (%s)", path, e)
    return None
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  if default and importlib.util.find_spec("filelock"):
    # The default directory is in the user's home: least recently used entries go past 4 GiB
    # (JAX's eviction, which also locks writes between processes).
    jax.config.update("jax_compilation_cache_max_size", DEFAULT_CACHE_BYTES)
  else:
    jax.config.update("jax_compilation_cache_max_size", -1)
  cc.reset_cache()
  return path
