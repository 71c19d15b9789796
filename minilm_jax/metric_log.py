"""What a run writes for people to read: TensorBoard events, `history.jsonl` (one record per log
and eval step, trimmed back to the restored step on resume), `metrics.json` and `curves.png`.

Only process 0 writes (`enabled`); the loop hands it host-side floats at log and eval steps.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

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
  curves_figure(history, evals).savefig(path, dpi=90)


def curves_figure(history: list[dict], evals: list[dict]):
  """Train and eval loss, then up to three eval metrics, one panel each (none left empty); a
  curve of one point is a marker labelled with its value. A bare `Figure` (no pyplot): no
  backend is switched, and a notebook shows it inline."""
  from matplotlib.figure import Figure
  keys = sorted({k for e in evals for k, v in e.items()
                 if k not in ("step", "loss") and isinstance(v, (int, float))})[:3]
  fig = Figure(figsize=(4.5 * (1 + len(keys)), 3.2))
  axes = fig.subplots(1, 1 + len(keys), squeeze=False)[0]

  def curve(ax, recs, key, style, label=None):
    pts = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float))]
    if not pts:
      return
    ax.plot(*zip(*pts), style, label=label)
    if len(pts) == 1:
      ax.annotate(f"{pts[0][1]:.4g}", pts[0], textcoords="offset points", xytext=(4, 4))

  curve(axes[0], history, "loss", "-", "train loss")
  curve(axes[0], evals, "loss", "o-", "eval loss")
  axes[0].set_title("loss")
  if history or any("loss" in e for e in evals):
    axes[0].legend()
  for ax, key in zip(axes[1:], keys):
    curve(ax, evals, key, "o-")
    ax.set_title(f"eval {key}")
  for ax in axes:
    ax.set_xlabel("step")
  fig.tight_layout()
  return fig
