"""What the notebook calls share: History, Predictions, input checks, keyword -> config
(`_config`), the run directory and the job summary."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
from typing import NamedTuple

import numpy as np

log = logging.getLogger("minilm_jax.api")


# fit(...) keyword -> config key
SHORTHANDS = {
    "epochs": "loop.num_epochs", "max_steps": "loop.max_steps", "batch_size": "loop.batch_size",
    "learning_rate": "optim.learning_rate", "weight_decay": "optim.weight_decay",
    "warmup_ratio": "optim.warmup_ratio", "seed": "loop.seed", "max_length": "data.max_length",
    "buckets": "data.buckets", "eval_every": "loop.eval_every", "output_dir": "loop.output_dir",
    "resume": "loop.resume", "overwrite": "loop.overwrite", "progress": "loop.progress",
    "dtype": "model.dtype",
}


@dataclasses.dataclass
class History:
  """What one `fit` did: `steps` (a record per logged step: loss, accuracy, seq/s, ...),
  `evals` (a record per evaluation), `best`, and whether Ctrl-C or SIGTERM cut it short (the
  model then holds the weights of the last finished step)."""
  steps: list[dict]
  evals: list[dict]
  best: dict | None = None
  interrupted: bool = False
  output_dir: str | None = None
  start: dict | None = None  # the metrics before training (sentence-embedding fits)

  def plot(self):
    """A matplotlib Figure of the loss and eval curves (shown inline in a notebook)."""
    from minilm_jax.metric_log import curves_figure
    return curves_figure(self.steps, self.evals)

  def __repr__(self) -> str:
    last = self.evals[-1] if self.evals else (self.steps[-1] if self.steps else {})
    shown = {k: round(v, 4) for k, v in last.items() if isinstance(v, float)}
    return (f"History({len(self.steps)} logged steps, {len(self.evals)} evals, last {shown}"
            + (", interrupted" if self.interrupted else "") + ")")


class Predictions(NamedTuple):
  labels: list              # label names (classification) or scores (regression)
  probabilities: np.ndarray | None  # (N, num_labels) softmax; None for regression


def _texts(texts, what: str) -> list[str]:
  if isinstance(texts, str):
    texts = [texts]
  texts = list(texts)
  if not texts:
    raise ValueError(f"{what}: no texts (an empty list)")
  for i, t in enumerate(texts):
    if not isinstance(t, str):
      raise TypeError(f"{what}: text {i} is a {type(t).__name__}, not a str: {t!r:.60}")
    if not t.strip():
      raise ValueError(f"{what}: text {i} is empty")
  return texts


def _pairs(pairs, n: int, what: str) -> list[str] | None:
  if pairs is None:
    return None
  pairs = _texts(pairs, what + " pairs")
  if len(pairs) != n:
    raise ValueError(f"{what}: {n} texts but {len(pairs)} pairs")
  return pairs


@contextlib.contextmanager
def _run_dir(cfg, given: bool, export: str = "export_hf"):
  """`cfg` with its run directory: the given one (the `export` flag on), else a temporary one
  that is deleted afterwards."""
  if given:
    yield dataclasses.replace(cfg, **{export: True})
    return
  with tempfile.TemporaryDirectory(prefix="minilm_") as tmp:
    yield dataclasses.replace(cfg, loop=dataclasses.replace(cfg.loop, output_dir=tmp))


def _history(m, summary: dict, cfg, given: bool) -> History:
  """`m.history` from a job's summary; a warning when Ctrl-C or SIGTERM cut the run short (a
  script that goes on after `fit` must check `history.interrupted`: the run is unfinished)."""
  out = cfg.loop.output_dir if given else None
  if summary["preempted"]:
    where = (f"; checkpoint in {out}/checkpoints: the same call with output_dir={out!r}, "
             f"resume=True continues" if given else "")
    log.warning("training %s after step %d; the model holds that step's weights%s",
                "interrupted" if summary["interrupted"] else "stopped by SIGTERM",
                summary["steps"], where)
  m.history = History(list(summary["history"]), list(summary["evals"]), summary["best"],
                      summary["preempted"], out, summary.get("start"))
  return m.history


def _loop_summary(summary: dict, res) -> dict:
  return {**summary, "history": res.history, "evals": res.evals, "preempted": res.preempted,
          "interrupted": res.interrupted}


def _config(cfg, shorthands: dict, overrides: dict, what: str):
  """`cfg` with keyword `overrides`: a shorthand or section__key each, type-checked."""
  from minilm_jax import configs
  flat = {}
  for key, value in overrides.items():
    if key in shorthands:
      flat[shorthands[key]] = value
    elif "__" in key:
      flat[key.replace("__", ".")] = value
    else:
      raise TypeError(f"{what}() got an unknown keyword {key!r}; use one of {sorted(shorthands)}"
                      f" or a config key as section__key (sections: "
                      f"{[f.name for f in dataclasses.fields(cfg)]}, e.g. optim__weight_decay)")
  try:
    return configs.merge(cfg, flat)
  except KeyError as e:
    raise TypeError(f"{what}(): {e.args[0]}") from None
