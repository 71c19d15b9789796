"""Why does a distilled student fine-tune the way it does? Three readings of a finished
distillation study (bench/distill_study.py), no training:

  .venv/bin/python -m bench.distill_diagnose --out runs/distill_study_1h \
      --results bench/results/distill_study_3600_e10.json

- closeness: each student's last layer against the teacher's last layer on the test texts of
  both tasks: KL(teacher || student) of the attention maps (nats, per head and real query) and
  the linear CKA of the mean-pooled sentence embeddings (any two widths); the same against the
  untrained init.
- untouched: which parameters of each student's last layer distillation never moved. The
  arm's init is rebuilt from its config (the same seed), and a tensor counts as untouched when
  it equals its init up to weight decay (kernels shrink by (1 - lr * wd) a step, nothing else).
  MiniLM v1 and v2 read only the last layer's queries, keys and values: its attention output,
  feed-forward and LayerNorms get no gradient, so a random-init student fine-tunes them from
  random.
- per class: each fine-tuned cell's test F1 per class, mean over seeds (cells that kept their
  predictions).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from sklearn import metrics

from bench import distill_study as study
from minilm_jax import losses, optim, pooling, pretrained
from minilm_jax.recipes import distill as distill_recipe
from train import cli


def students(out: Path, teacher: str) -> dict[str, Path]:
  """{model: its exported directory} for the teacher, the untrained init and every arm run."""
  found = {"teacher": distill_recipe.resolve_model_path(teacher),
           study.UNTRAINED: out / "students" / "untrained" / "final"}
  for name in study.RUNNABLE:
    path = out / "students" / name.replace(" ", "_") / "final"
    if path.is_dir():
      found[name] = path
  return {k: v for k, v in found.items() if Path(v).is_dir()}


MEAN = pooling.Pooling("mean", normalize=False)


def last_layer(m) -> Callable:
  """`m`'s jitted forward: batch -> (mean-pooled last hidden states (B, D), the last layer's
  attention maps (B, N, T, S))."""
  graphdef, state = nnx.split(m.encoder)

  @jax.jit
  def forward(state, ids, mask):
    hidden, out = nnx.merge(graphdef, state)(ids, mask)
    return MEAN(hidden, mask), jax.nn.softmax(out["attention_logits"][-1], -1)
  return lambda batch: [np.asarray(x) for x in forward(state, batch["input_ids"],
                                                       batch["attention_mask"])]


def closeness(models: dict, texts: list[str]) -> dict:
  """{model: {emb_cka_teacher, emb_cka_init, attn_kl_teacher, attn_kl_init}} on `texts`: the
  linear CKA of the mean-pooled embeddings, the attention maps' KL where the head counts match."""
  tok = models["teacher"].tokenizer
  forwards = {k: last_layer(m) for k, m in models.items()}
  runs = {k: ([], []) for k in models}
  masks = []
  for s in range(0, len(texts), 64):
    b = {k: jnp.asarray(v) for k, v in
         tok(texts[s:s + 64], max_length=study.SEQ_LEN, padding="max_length").items()}
    masks.append(np.asarray(b["attention_mask"], bool))
    for k, forward in forwards.items():
      emb, att = forward(b)
      runs[k][0].append(emb)
      runs[k][1].append(att)
  mask = np.concatenate(masks)
  emb = {k: np.concatenate(v[0]) for k, v in runs.items()}
  att = {k: np.concatenate(v[1]) for k, v in runs.items()}

  def cka(a, b):  # linear CKA over the texts: any two widths, 1 for the same geometry
    a, b = a - a.mean(0), b - b.mean(0)
    return float(np.linalg.norm(b.T @ a) ** 2 / np.linalg.norm(a.T @ a) / np.linalg.norm(b.T @ b))

  def kl(p, q):  # the MiniLM v1 attention loss, mean over the texts
    if p.shape != q.shape:
      return None
    return float(np.mean(losses.attention_kl(np.log(p + 1e-30), np.log(q + 1e-30), mask)))
  init = emb.get(study.UNTRAINED)
  return {k: {"emb_cka_teacher": cka(emb[k], emb["teacher"]),
              "emb_cka_init": None if init is None else cka(emb[k], init),
              "attn_kl_teacher": kl(att["teacher"], att[k]),
              "attn_kl_init": None if init is None else kl(att[study.UNTRAINED], att[k])}
          for k in models}


def untouched(name: str, student, teacher, steps: int, out: Path) -> dict:
  """{parameter of the last layer: relative change from the arm's init}, and the names of the
  ones distillation never moved (`name` an arm of `study.RUNNABLE`, `teacher` the loaded
  teacher its layers came from)."""
  cfg = study.arm_config(name, steps, out / "prepared", str(teacher.source), out)
  t = teacher
  init, _ = distill_recipe.build_student(cfg.student, t.model, t.config, t.tokenizer, "encoder",
                                         None, cfg.loop.seed)
  p0, p1 = pretrained.flat_params(init), pretrained.flat_params(student.encoder)
  last = f"layers/{student.config.num_layers - 1}/"
  # what weight decay alone does to a kernel over the run (AdamW: p *= 1 - lr_t * wd a step)
  decay = float(np.prod([1 - cfg.optim.weight_decay * lr for lr in learning_rates(cfg)]))
  moved, still = {}, []
  for key in sorted(k for k in p1 if k.startswith(last)):
    a, b = np.asarray(p0[key], np.float64), np.asarray(p1[key], np.float64)
    ref = a * decay if key.endswith("kernel") else a
    moved[key[len(last):]] = float(np.linalg.norm(b - a) / max(np.linalg.norm(a), 1e-12))
    if np.allclose(b, ref, rtol=1e-4, atol=1e-7):
      still.append(key[len(last):])
  return {"relative_change": moved, "untouched": still}


def learning_rates(cfg) -> np.ndarray:
  """The run's learning rate at every step, from the optimizer's own schedule."""
  schedule = optim.make_schedule(cfg.optim, cfg.loop.max_steps)
  return np.asarray(schedule(jnp.arange(cfg.loop.max_steps)), np.float64)


def per_class(results: dict) -> dict:
  """{model/task: {class: mean test F1 over the seeds that kept predictions}}."""
  out = {}
  for model in study.MODELS:
    for task in study.TASKS:
      preds = study.cell_predictions(results, model, task)
      if not preds:
        continue
      y = results["probe_labels"][task]
      names = sorted(set(y))
      f1 = np.mean([metrics.f1_score(y, p, labels=names, average=None) for p in preds], 0)
      out[f"{model}/{task}"] = dict(zip(names, map(float, f1)))
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--out", type=Path, default=Path("runs/distill_study"))
  p.add_argument("--results", type=Path, default=None, help="default <out>/results.json")
  p.add_argument("--texts", type=int, default=384, help="test texts a task for closeness")
  args = p.parse_args(argv)
  cli.setup_logging()
  results = json.loads((args.results or args.out / "results.json").read_text())
  settings = results["settings"]
  split = study.tasks(settings["train_examples"], settings["test_examples"])
  paths = students(args.out, settings["teacher"])
  models = {k: pretrained.from_pretrained(v, dtype="float32") for k, v in paths.items()}
  report = {"closeness": {t: closeness(models, split[t][2][:args.texts]) for t in study.TASKS},
            "untouched": {k: untouched(k, m, models["teacher"], settings["steps"], args.out)
                          for k, m in models.items() if k in study.RUNNABLE},
            "per_class_f1": per_class(results)}
  for task, rows in report["closeness"].items():
    print(f"\n{task}: last layer against the teacher's (and the untrained init's)\n")
    print("| model | embedding CKA, teacher | init | attention KL, teacher | init |")
    print("|---|---|---|---|---|")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    for k, r in rows.items():
      print(f"| {k} | {fmt(r['emb_cka_teacher'])} | {fmt(r['emb_cka_init'])} "
            f"| {fmt(r['attn_kl_teacher'])} | {fmt(r['attn_kl_init'])} |")
  print("\nlast-layer parameters distillation never moved:")
  for k, r in report["untouched"].items():
    print(f"  {k}: {', '.join(r['untouched']) or 'none'}")
  print("\ntest F1 per class (mean over seeds):")
  for k, r in report["per_class_f1"].items():
    print(f"  {k}: " + ", ".join(f"{c} {v:.3f}" for c, v in r.items()))
  (args.out / "diagnose.json").write_text(json.dumps(report, indent=1) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
