"""Shared benchmark plumbing: threads, FLOP formulas, interleaved timing, peak memory, and the
same weights in both frameworks.

Every benchmark measures minilm_jax against transformers' PyTorch model on the same config,
batch and weights, in the same process, with repeats interleaved (ours, torch, torch, ours, ...).
On a shared or throttled machine the absolute numbers drift; the ratio of two interleaved
medians is what survives, so that is what the tables report first.

Peak memory is measured per framework in a child process (`--only jax|torch`): in one process
the two frameworks' weights, caches and allocator pools would be counted together. The child
resets the kernel's high-water mark (`/proc/self/clear_refs`, Linux) after warm-up, so
"step peak" is the extra resident memory one step needs on top of weights and compiled code.
`jax.devices()[0].memory_stats()` is None on the CPU backend; on GPU it is reported as well.

XLA flags are read when jax initialises: pass them in the environment
(`XLA_FLAGS=... python -m bench.inference`); every script prints the flags in effect.

Importing this module applies `minilm_jax.tune_host_malloc()` (glibc malloc keeps and reuses
large blocks; see minilm_jax/runtime.py) before jax starts, as the train/ entry points do. It is
process-wide, so PyTorch in the same process runs with the same allocator settings.
`MINILM_JAX_TUNE_MALLOC=0` measures without it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from minilm_jax import runtime

MALLOC_TUNED = runtime.tune_host_malloc()

ROOT = Path(__file__).resolve().parent.parent


# --- environment ----------------------------------------------------------------------------

def setup_torch():
  """One intra-op thread per core, as the jax CPU client uses; quiet transformers."""
  import torch
  torch.set_num_threads(os.cpu_count())
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  import transformers
  transformers.logging.set_verbosity_error()
  return torch


def describe_env() -> str:
  import jax
  import torch
  import transformers
  cpu = "?"
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  return (f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}; "
          f"{os.cpu_count()} cores, {cpu}; load avg {load:.1f}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '') or '(none)'}; "
          f"malloc {'tuned' if MALLOC_TUNED else 'default'}")


def add_args(p: argparse.ArgumentParser, repeats: int = 5, warmup: int = 2):
  p.add_argument("--repeats", type=int, default=repeats,
                 help="timed steps per framework (interleaved); the median is reported")
  p.add_argument("--warmup", type=int, default=warmup,
                 help="untimed steps per framework first (jax: compilation)")
  p.add_argument("--only", choices=("jax", "torch"), default=None,
                 help="child-process mode: one framework, report memory as a JSON line")
  p.add_argument("--no-memory", action="store_true",
                 help="skip the per-framework child processes that measure peak memory")
  p.add_argument("--json", default=None, help="append result rows to this JSONL file")
  p.add_argument("--torch-dtype", default="same", choices=("same", "float32", "bfloat16"),
                 help="PyTorch's precision: 'same' as ours (bfloat16 = torch.autocast), or "
                      "pinned, e.g. float32 eager against our bfloat16 mixed precision")
  return p


def torch_autocast(torch_dtype: str, ours_dtype: str) -> bool:
  """Whether PyTorch runs under autocast(bfloat16) for `--torch-dtype` against our dtype."""
  return (ours_dtype if torch_dtype == "same" else torch_dtype) != "float32"


# --- FLOPs ----------------------------------------------------------------------------------

FORWARD_FORMULA = ("forward FLOPs/seq = 2*P_mm*T + 4*L*T^2*D, P_mm = L*(4*D^2 + 2*D*F) "
                   "(Q,K,V,O + FFN matmul weights; embeddings, pooler and head ignored)")


def forward_flops(cfg, seq_len: int) -> float:
  """Matmul FLOPs of one sequence through the encoder (multiply-add = 2 FLOPs)."""
  L, D, F, T = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, seq_len
  p_mm = L * (4 * D * D + 2 * D * F)
  return 2.0 * p_mm * T + 4.0 * L * T * T * D


# --- timing ---------------------------------------------------------------------------------

def interleaved(cases: dict[str, Callable[[], object]], repeats: int, warmup: int,
                pause: float = 0.02, cpu: dict | None = None) -> dict[str, list[float]]:
  """Wall seconds per call of each case, repeats interleaved; order reversed every other round
  so neither side always runs right after the other. Each callable must block until its result
  exists (jax.block_until_ready; torch CPU ops are synchronous).

  `pause` lets the previous framework's worker threads stop spinning (OpenMP, Eigen) before the
  next timed call; it is not timed. If `cpu` is a dict it receives the process CPU seconds
  (all threads) per call: on a machine shared with other jobs that is closer to the work done
  than wall time, though spinning worker threads inflate it in both frameworks.
  """
  names = list(cases)
  for name in names:
    for _ in range(warmup):
      cases[name]()
  times = {n: [] for n in names}
  if cpu is not None:
    cpu.update({n: [] for n in names})
  for r in range(repeats):
    for name in (names if r % 2 == 0 else names[::-1]):
      time.sleep(pause)
      c0, t0 = time.process_time(), time.perf_counter()
      cases[name]()
      t1, c1 = time.perf_counter(), time.process_time()
      times[name].append(t1 - t0)
      if cpu is not None:
        cpu[name].append(c1 - c0)
  return times


def med(xs: list[float]) -> float:
  return statistics.median(xs)


def spread(xs: list[float]) -> str:
  """min..max as a percentage of the median: how noisy the machine was."""
  m = med(xs)
  return f"{100 * (min(xs) - m) / m:+.0f}/{100 * (max(xs) - m) / m:+.0f}%"


# --- memory ---------------------------------------------------------------------------------

def _status_kb(field: str) -> int:
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith(field + ":"):
      return int(line.split()[1])
  return 0


def rss_mb() -> float:
  return _status_kb("VmRSS") / 1024


def peak_rss_mb() -> float:
  return _status_kb("VmHWM") / 1024


def reset_peak() -> bool:
  """Resets VmHWM to the current RSS (Linux >= 4.0). False where that is not possible."""
  try:
    Path("/proc/self/clear_refs").write_text("5")
    return True
  except OSError:
    return False


def memory_probe(step: Callable[[], object], warmup: int, steps: int = 2) -> dict:
  """Run in a child process: resident memory around warm-up (compilation) and steady steps."""
  before = rss_mb()
  for _ in range(warmup):
    step()
  warm_peak = peak_rss_mb()
  ok = reset_peak()
  base = rss_mb()
  for _ in range(steps):
    step()
  out = {"rss_before_mb": before, "peak_with_warmup_mb": warm_peak,
         "step_peak_mb": peak_rss_mb() if ok else float("nan"),
         "step_extra_mb": (peak_rss_mb() - base) if ok else float("nan")}
  try:
    import jax
    stats = jax.devices()[0].memory_stats()
    if stats:
      out["device_peak_mb"] = stats.get("peak_bytes_in_use", 0) / 2**20
  except Exception:  # noqa: BLE001 - memory_stats is best-effort
    pass
  return out


def report_memory(ours: Callable[[], object], theirs: Callable[[], object], only: str,
                  warmup: int) -> None:
  """The child's side (`--only jax|torch`): probe that framework's step, print one MEMORY line."""
  step = ours if only == "jax" else theirs
  print("MEMORY " + json.dumps(memory_probe(step, warmup)), flush=True)


def child_memories(module: str, argv: list[str], enabled: bool = True) -> dict:
  """The parent's side: {"jax": probe, "torch": probe}, one child process each; {} if disabled."""
  if not enabled:
    return {}
  return {fw: child_memory(module, argv, fw) for fw in ("jax", "torch")}


def child_memory(module: str, argv: list[str], framework: str) -> dict:
  """Runs `python -m module argv --only framework` and parses its MEMORY JSON line."""
  cmd = [sys.executable, "-m", module, *argv, "--only", framework, "--no-memory"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
  for line in proc.stdout.splitlines():
    if line.startswith("MEMORY "):
      return json.loads(line[len("MEMORY "):])
  tail = (proc.stdout + proc.stderr)[-2000:]
  raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{tail}")


def strip_flag(argv: list[str], flags: tuple[str, ...]) -> list[str]:
  """argv without `flags` and their values, several for nargs="+" flags (a child gets its own
  --only/--json)."""
  out, skip = [], False
  for a in argv:
    if skip and not a.startswith("--"):
      continue
    skip = False
    if a in flags:
      skip = True
      continue
    if any(a.startswith(f + "=") for f in flags):
      continue
    out.append(a)
  return out


def compare(times: dict, batch: int, flops: float, mem: dict, cpu: dict | None = None) -> dict:
  """The row fields every side-by-side benchmark reports, from interleaved `times` (and CPU
  times) of "jax" and "torch": seq/s, GFLOP/s, spreads, ratio ours/torch, memory, command."""
  tj, tt = med(times["jax"]), med(times["torch"])
  row = {"jax_seq_s": batch / tj, "torch_seq_s": batch / tt, "ratio": tt / tj,
         "jax_gflops": flops / tj / 1e9, "torch_gflops": flops / tt / 1e9,
         "jax_spread": spread(times["jax"]), "torch_spread": spread(times["torch"]),
         "memory": mem, "command": command_line()}
  if cpu:
    row["ratio_cpu_time"] = med(cpu["torch"]) / med(cpu["jax"])
  return row


def fmt_compare(row: dict) -> str:
  """'ours X seq/s (G GFLOP/s, spread), torch ..., ours/torch R' from a `compare` row."""
  out = (f"ours {row['jax_seq_s']:.2f} seq/s ({row['jax_gflops']:.0f} GFLOP/s, "
         f"{row['jax_spread']}), torch {row['torch_seq_s']:.2f} seq/s "
         f"({row['torch_gflops']:.0f} GFLOP/s, {row['torch_spread']}), "
         f"ours/torch {row['ratio']:.2f}x")
  if "ratio_cpu_time" in row:
    out += f" (cpu-time {row['ratio_cpu_time']:.2f}x)"
  return out


def fmt_peak_rss(mem: dict) -> str:
  return f"peak RSS ours {fmt_mem(mem.get('jax'))}, torch {fmt_mem(mem.get('torch'))}"


def fmt_mem(m: dict | None) -> str:
  if not m:
    return "-"
  return f"{m['step_peak_mb']:.0f} MB (+{m['step_extra_mb']:.0f} per step)"


# --- the same weights in PyTorch --------------------------------------------------------------

def torch_model(model, cfg, task: str = "encoder", *, num_labels: int | None = None,
                attn: str = "sdpa"):
  """transformers' model for `task` holding exactly `model`'s parameters (via hf.flat_to_hf).

  attn: "sdpa" (transformers' default; torch's fused CPU attention) or "eager".
  """
  import torch
  import transformers

  from minilm_jax import hf, pretrained
  flat = {k: np.asarray(v) for k, v in pretrained.flat_params(model).items()}
  mcfg = getattr(model, "cfg", cfg)
  sd = hf.flat_to_hf(flat, mcfg, task)
  hf_cfg = mcfg.to_hf()
  if num_labels:
    hf_cfg["num_labels"] = num_labels
  config = transformers.BertConfig(**hf_cfg)
  config._attn_implementation = attn
  cls = {"encoder": transformers.BertModel,
         "classification": transformers.BertForSequenceClassification}[task]
  kw = {"add_pooling_layer": mcfg.use_pooler} if task == "encoder" else {}
  tm = cls(config, **kw)
  missing, unexpected = tm.load_state_dict({k: torch.from_numpy(np.array(v))
                                            for k, v in sd.items()}, strict=False)
  missing = [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))]
  if missing or unexpected:
    raise KeyError(f"torch {task} model: missing {missing[:4]}, unexpected {unexpected[:4]}")
  return tm


def random_batch(cfg, batch: int, seq: int, seed: int = 0, *, lengths=None) -> dict:
  """Token ids in the vocab's upper range, [CLS]=101-style start; mask from `lengths`."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1000, cfg.vocab_size, size=(batch, seq), dtype=np.int32)
  mask = np.ones((batch, seq), np.int32)
  if lengths is not None:
    mask = (np.arange(seq)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    ids = np.where(mask > 0, ids, cfg.pad_token_id).astype(np.int32)
  return {"input_ids": ids, "attention_mask": mask,
          "token_type_ids": np.zeros((batch, seq), np.int32)}


# --- output -----------------------------------------------------------------------------------

def emit(row: dict, path: str | None):
  """Prints one machine-readable RESULT line and appends it to `path` (JSONL) if given."""
  line = json.dumps(row, default=float)
  print("RESULT " + line, flush=True)
  if path:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
      f.write(line + "\n")


def command_line() -> str:
  """The command that ran this benchmark, quoted so that it can be pasted back into a shell."""
  flags = os.environ.get("XLA_FLAGS")
  prefix = f"XLA_FLAGS={shlex.quote(flags)} " if flags else ""
  return prefix + "python -m " + shlex.join([_module(), *sys.argv[1:]])


def _module() -> str:
  path = Path(sys.argv[0]).resolve()
  try:
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join(rel.parts)
  except ValueError:
    return str(path)
