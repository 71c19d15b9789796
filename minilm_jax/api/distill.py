"""`distill(teacher, texts, layers=3, ...)` over `recipes/distill.py` (`train.distill`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from minilm_jax.api.common import _config, _history, _run_dir, _texts

DISTILL_SHORTHANDS = {
    "steps": "loop.max_steps", "epochs": "loop.num_epochs", "batch_size": "loop.batch_size",
    "learning_rate": "optim.learning_rate", "seed": "loop.seed", "objective": "objective.kind",
    "relation_heads": "objective.num_relation_heads", "init": "student.init",
    "hidden_size": "student.hidden_size", "num_heads": "student.num_heads",
    "max_length": "corpus.max_length", "held_out": "corpus.held_out",
    "packing": "corpus.packing", "seq_len": "corpus.seq_len", "eval_every": "loop.eval_every",
    "output_dir": "loop.output_dir", "resume": "loop.resume", "overwrite": "loop.overwrite",
    "progress": "loop.progress", "dtype": "student.dtype",
}


def distill(teacher, texts, *, layers: int | Sequence[int] = 3, eval_texts=None, **config):
  """A student distilled from `teacher` (a loaded model or a path) on `texts` -> a Pretrained
  encoder, its `history` set. `layers`: the student's depth (its layers start from the
  teacher's, evenly spaced) or the teacher layers to copy; `init="random"` and `hidden_size`
  build other students. Held out for the distillation loss: `eval_texts`, else the first
  `held_out` texts (default a tenth, at most 1000). The job is `python -m train.distill`'s;
  keywords: `DISTILL_SHORTHANDS` or section__key, checked as for `fit`."""
  from minilm_jax.data import Source
  from minilm_jax.pretrained import Pretrained, from_pretrained
  from minilm_jax.recipes import distill as recipe
  if not isinstance(teacher, Pretrained):
    teacher = from_pretrained(teacher)
  texts = _texts(texts, "distill")
  cfg = recipe.DistillConfig(
      teacher=recipe.TeacherSpec(path=str(teacher.source)),
      corpus=recipe.CorpusSpec(source="examples",
                               held_out=0 if eval_texts is not None else
                               min(1000, len(texts) // 10)),
      export_hf=False)
  cfg = _config(cfg, DISTILL_SHORTHANDS, config, "distill")  # keyword errors first
  n = teacher.config.num_layers
  if isinstance(layers, int):
    if not 1 <= layers <= n:
      raise ValueError(f"distill: layers={layers}, the teacher has {n}")
    # evenly spaced, the last one the teacher's last (same output space): 6 -> 3 is 1, 3, 5
    layers = tuple(n - 1 - round((layers - 1 - i) * n / layers) for i in range(layers))
  cfg = dataclasses.replace(cfg, student=dataclasses.replace(
      cfg.student, layers=tuple(layers), num_layers=len(layers)))
  src = lambda ts: Source("examples", examples=tuple({"text": t} for t in ts))
  sources = (src(texts), src(_texts(eval_texts, "distill eval")) if eval_texts is not None
             else None)
  given = "output_dir" in config
  with _run_dir(cfg, given) as cfg:
    summary, student = recipe.run_job(cfg, teacher=teacher, sources=sources)
  _history(student, summary, cfg, given)
  return student
