"""The entry points' command line: a YAML file or preset, then `--section.key=value` overrides,
read into the typed configs of `minilm_jax.configs` (unknown keys and unreadable values are one
readable error line); `--help` lists every key.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from minilm_jax.configs import (  # noqa: F401  (the entry points' run-directory helpers)
  describe,
  flatten,
  merge,
  start_run,
  to_dict,
  update_metrics,
)

CONFIG_DIR = Path(__file__).parent / "configs"


def load(cls, config: str | None, overrides: list[str], default: str):
  """`config`: a YAML path or the name of a file in train/configs/ (without .yaml)."""
  cfg = cls()
  name = config or default
  path = Path(name)
  if not path.exists():
    path = CONFIG_DIR / f"{name}.yaml"
  if not path.exists():
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"no config {name!r}: not a file and not one of {known}")
  data = yaml.safe_load(path.read_text()) or {}
  cfg = merge(cfg, flatten(data))
  pairs = {}
  for item in overrides:
    if not item.startswith("--") or "=" not in item:
      raise ValueError(f"override {item!r} must look like --section.key=value")
    k, v = item[2:].split("=", 1)
    pairs[k.replace("-", "_")] = v
  return merge(cfg, pairs), path


def setup_logging() -> None:
  """INFO lines with timestamps on stderr, without orbax's per-save chatter, "no TPU found" or
  Beam's worker start-up."""
  import logging
  # force: importing orbax/absl already gave the root logger a WARNING-level handler, which
  # would make a plain basicConfig a no-op and hide every INFO line.
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                      datefmt="%H:%M:%S", force=True)
  for noisy in ("absl", "jax._src.xla_bridge", "apache_beam"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def launch(cls, run, argv, *, default: str, doc: str | None, report) -> int:
  """An entry point's main: parse `--config` and overrides into `cls`, join the other processes
  (a no-op for one), `run(cfg)`, then `report(summary, cfg)` unless the run was preempted.

  Exit codes: 0 done or preempted (resume with --loop.resume=true), 2 a checkpoint that does
  not match the config or an output directory that holds an earlier run, 3 a non-finite loss
  under nan_policy=stop, 4 a full disk (nothing saved was lost)."""
  import argparse
  import logging

  from minilm_jax import checkpoint, data, runtime, sharding, trainer
  runtime.tune_host_malloc()  # before JAX starts its backend; see runtime.py
  p = argparse.ArgumentParser(
      description=doc, formatter_class=argparse.RawTextHelpFormatter,
      epilog="overrides (--section.key=value; defaults before any --config file):\n"
      + "\n".join(describe(cls())))
  p.add_argument("--config", default=None,
                 help=f"YAML file or a name in train/configs/ (default: {default})")
  args, overrides = p.parse_known_args(argv)
  setup_logging()
  log = logging.getLogger(default)
  sharding.initialize_distributed()  # no-op unless launched as one of several processes
  try:
    cfg, path = load(cls, args.config, overrides, default=default)
  except (KeyError, ValueError, FileNotFoundError) as e:  # a config error: one line, no traceback
    log.error("%s", e.args[0] if isinstance(e, KeyError) and e.args else e)
    return 2
  log.info("config %s", path)
  try:
    summary = run(cfg)
  except trainer.NonFiniteLoss as e:
    log.error("%s", e)
    return 3
  except (checkpoint.CheckpointMismatch, trainer.RunExists, data.PreparedError) as e:
    # config or data errors that name their file: one line, no traceback
    log.error("%s", e)
    return 2
  except checkpoint.DiskFull as e:
    log.error("%s", e)
    return 4
  if summary.get("preempted"):
    print(f"preempted at step {summary['steps']}; resume with --loop.resume=true")
    return 0
  report(summary, cfg)
  return 0


def outputs_line(out_dir) -> str:
  """"outputs in DIR: ..." naming every artifact the run left there (directories with a /)."""
  from minilm_jax import trainer
  out = Path(out_dir)
  names = [n + ("/" if (out / n).is_dir() else "") for n in ("config.json", "data",
                                                                 *trainer.RUN_ARTIFACTS)
           if (out / n).exists()]
  return f"outputs in {out}: {', '.join(names)}"


def rounded(metrics: dict | None, digits: int = 4) -> dict:
  return {k: round(v, digits) for k, v in (metrics or {}).items() if isinstance(v, float)}
