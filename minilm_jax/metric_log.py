"""What a run writes for people to read: TensorBoard events, `history.jsonl` (one record per log
and eval step, trimmed back to the restored step on resume), `metrics.json` and `curves.png`.

Only process 0 writes (`enabled`); the loop hands it host-side floats at log and eval steps.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class MetricLogger:
  """TensorBoard events, `history.jsonl`, `metrics.json` and `curves.png` in the output dir."""

  def __init__(self, out_dir: Path, enabled: bool = True):
    self.out_dir, self.enabled = Path(out_dir), enabled
    self.writer = None
    if enabled:
      from tensorboardX import SummaryWriter
      self.writer = SummaryWriter(str(self.out_dir / "tensorboard"))

  def load_history(self, start: int):
    """On resume, keep the records up to the restored step."""
    history, evals, best = [], [], None
    path = self.out_dir / "history.jsonl"
    # Only the writer reads: other processes would race with its rewrite below.
    if start and self.enabled and path.exists():
      for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec["step"] <= start:
          (evals if rec.pop("kind") == "eval" else history).append(rec)
      best = json.loads((self.out_dir / "metrics.json").read_text()).get("best") if (
          self.out_dir / "metrics.json").exists() else None
    if self.enabled:
      with path.open("w") as f:
        for kind, recs in (("train", history), ("eval", evals)):
          for r in recs:
            f.write(json.dumps({"kind": kind, **r}) + "\n")
    return history, evals, best

  def _append(self, rec):
    with (self.out_dir / "history.jsonl").open("a") as f:
      f.write(json.dumps(rec) + "\n")

  def log_train(self, step, rec):
    if not self.enabled:
      return
    for k, v in rec.items():
      if k != "step":
        self.writer.add_scalar(f"train/{k}", v, step)
    self._append({"kind": "train", **rec})

  def log_eval(self, step, metrics, best):
    if not self.enabled:
      return
    for k, v in metrics.items():
      if k != "step" and isinstance(v, (int, float)):
        self.writer.add_scalar(f"eval/{k}", v, step)
    self._append({"kind": "eval", **metrics})
    self._write_metrics(metrics, best)
    summary = " ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                       if isinstance(v, float) and k != "step")
    log.info("eval @ %d: %s", step, summary)

  def _write_metrics(self, final, best, extra=None):
    data = {"final": final, "best": best, **(extra or {})}
    (self.out_dir / "metrics.json").write_text(json.dumps(data, indent=2, default=float) + "\n")

  def finish(self, history, evals, best):
    if not self.enabled:
      return
    self.writer.flush()
    self._write_metrics(evals[-1] if evals else None, best,
                        {"train_final": history[-1] if history else None})
    plot_curves(self.out_dir / "curves.png", history, evals)


def plot_curves(path: Path, history: list[dict], evals: list[dict]) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  eval_keys = sorted({k for e in evals for k, v in e.items()
                      if k != "step" and isinstance(v, (int, float))})
  n = 1 + len(eval_keys[:3])
  fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.2), squeeze=False)
  ax = axes[0, 0]
  if history:
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss")
  for e_key in ("loss",):
    if evals and e_key in evals[0]:
      ax.plot([e["step"] for e in evals], [e[e_key] for e in evals], "o-", label="eval loss")
  ax.set_xlabel("step")
  ax.set_title("loss")
  ax.legend()
  for ax, key in zip(axes[0, 1:], [k for k in eval_keys if k != "loss"][:3]):
    ax.plot([e["step"] for e in evals], [e.get(key, np.nan) for e in evals], "o-")
    ax.set_title(f"eval {key}")
    ax.set_xlabel("step")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
