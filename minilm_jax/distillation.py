"""Distillation objectives and student initialisation: MiniLM v1 self-attention distillation,
MiniLMv2 multi-head relation distillation and XtremeDistil-style hidden/logit transfer.

Each objective is a `trainer.Objective` whose `frozen` field holds the teacher's params: the loop
passes them to every step as a jit argument, so the teacher is never in the optimizer state or in
a checkpoint, and `jax.grad` over the student's params never sees it. The teacher's graphdef lives
in the objective's closure; its outputs go through `stop_gradient` anyway, so nothing downstream
can differentiate into it by accident.

The teacher runs only as deep as its objective reads (`depth`): a MiniLMv2 recipe reading
layer 20 of a 24-layer teacher never computes layers 21-24.

Losses are per example (the loop weights and averages them); `losses.py` holds the array math.
Layer indices are Python indices into the model's Transformer layers (0-based, -1 the last).
Hidden-state indices (XtremeDistil) count the embedding output as 0 and layer i as i + 1.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from minilm_jax import checkpoint, losses, packing, pretrained
from minilm_jax.config import ModelConfig
from minilm_jax.model import Dense, Encoder, encoder_of
from minilm_jax.trainer import Objective

log = logging.getLogger(__name__)


class StudentWithProjection(nnx.Module):
  """A student encoder plus one learned D_s -> D_t projection per student hidden state.

  XtremeDistil matches hidden states of a narrower student through dense projections; they belong
  to the student side so that the optimizer trains them and checkpoints hold them. Only
  `.encoder` is exported.
  """

  def __init__(self, encoder: Encoder, teacher_width: int, *, rngs: nnx.Rngs):
    cfg = encoder.cfg
    self.encoder = encoder
    d_s, d_t = cfg.hidden_size, teacher_width
    self.proj = nnx.List([
        Dense(cfg, "BTD,DE->BTE", (d_s, d_t), ("embed", None), (d_t,), (None,), rngs=rngs)
        for _ in range(cfg.num_layers + 1)])

  def __call__(self, *args, **kw):
    return self.encoder(*args, **kw)


# --- teacher -------------------------------------------------------------------------------

def _teacher_runner(teacher: nnx.Module, depth: int | None = None):
  """Splits the teacher into (graphdef, params); returns (run(frozen, batch), params).

  `depth`: run the teacher's encoder through that many layers only (its output is then the
  encoder's (hidden, intermediates) of those layers, whatever the teacher's task head)."""
  graphdef, params = nnx.split(teacher)

  def run(frozen, batch):
    model = nnx.merge(graphdef, frozen)
    if depth is None:
      out = model(**packing.model_inputs(batch))
    else:
      out = encoder_of(model)(**packing.model_inputs(batch), depth=depth)
    return jax.lax.stop_gradient(out)
  return run, params


def _teacher_index(teacher: nnx.Module, index: int) -> int:
  """A (possibly negative) teacher layer index as 0..L-1; raises if there is no such layer."""
  return _layer(range(encoder_of(teacher).cfg.num_layers), index, "teacher")


def cast_model(model: nnx.Module, dtype: str, task: str = "encoder",
               num_labels: int | None = None) -> nnx.Module:
  """The same model with params and compute in `dtype` (e.g. a bfloat16 teacher). The compute dtype
  is baked into the modules, so this rebuilds abstractly and refills rather than casting leaves."""
  cfg = encoder_of(model).cfg
  if cfg.dtype == dtype and cfg.param_dtype == dtype:
    return model
  new_cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
  abstract = nnx.eval_shape(lambda: pretrained.build(new_cfg, task, num_labels))
  graphdef, state = nnx.split(abstract)
  return nnx.merge(graphdef, pretrained.fill_params(state, pretrained.flat_params(model)))


# --- objectives ----------------------------------------------------------------------------

def _wmean(x, w):
  return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


def _objective(teacher: nnx.Module, per_example, *, extra_eval=None, extra_metrics=None,
               teacher_needed: bool = True, teacher_depth: int | None = None) -> Objective:
  """Wraps `per_example(model, t_out, s_out, batch) -> ((B,), {name: (B,)})` as an Objective.
  `teacher_depth`: how many teacher layers the objective reads (None: the whole teacher)."""
  run_teacher, params = _teacher_runner(teacher, teacher_depth)

  def outputs(model, frozen, batch, rng):
    t = run_teacher(frozen, batch) if teacher_needed else None
    s = model(**packing.model_inputs(batch), dropout_rng=rng)
    return t, s

  def loss_fn(model, batch, rng, frozen):
    t, s = outputs(model, frozen, batch, rng)
    per_ex, parts = per_example(model, t, s, batch)
    return per_ex, {k: _wmean(v, packing.example_weights(batch)) for k, v in parts.items()}

  def eval_fn(model, batch, frozen):
    t, s = outputs(model, frozen, batch, None)
    per_ex, parts = per_example(model, t, s, batch)
    res = {"loss": per_ex, **parts}
    if extra_eval is not None:
      res.update(extra_eval(t, s))
    return res

  def metrics_fn(out):
    res = {k: float(np.mean(v)) for k, v in out.items()
           if not k.startswith("_") and np.asarray(v).ndim == 1}
    if extra_metrics is not None:
      res = extra_metrics(out, res)
    return res

  return Objective(loss_fn, eval_fn, metrics_fn, best_metric="loss", frozen=params,
                   weights=packing.example_weights)


def _layer(seq: list, index: int, who: str):
  if not -len(seq) <= index < len(seq):
    raise ValueError(f"{who} layer {index} does not exist: the model has {len(seq)} layers "
                     f"(valid indices {-len(seq)}..{len(seq) - 1})")
  return seq[index]


def check_minilm_v1(teacher_cfg: ModelConfig, student_cfg: ModelConfig) -> None:
  if teacher_cfg.num_heads != student_cfg.num_heads:
    raise ValueError(
        f"MiniLM v1 compares attention distributions and value relations head by head, so the "
        f"student needs the teacher's head count: teacher has {teacher_cfg.num_heads} heads, "
        f"student {student_cfg.num_heads}. Use MiniLMv2 instead (objective kind 'minilm_v2', "
        f"distill.minilm_v2 with num_relation_heads): it re-splits both sides into relation heads "
        f"and allows any student head count.")


def check_minilm_v2(teacher_cfg: ModelConfig, student_cfg: ModelConfig,
                    num_relation_heads: int) -> None:
  for who, cfg in (("teacher", teacher_cfg), ("student", student_cfg)):
    if cfg.hidden_size % num_relation_heads:
      raise ValueError(f"MiniLMv2: num_relation_heads={num_relation_heads} must divide the "
                       f"{who}'s hidden size {cfg.hidden_size}")


def minilm_v1(teacher: nnx.Module, *, teacher_layer: int = -1, student_layer: int = -1,
              student_cfg: ModelConfig | None = None) -> Objective:
  """MiniLM v1: KL of attention distributions + KL of value relations, teacher layer vs student
  layer (the paper: last vs last). Needs equal head counts; pass `student_cfg` to check early."""
  if student_cfg is not None:
    check_minilm_v1(encoder_of(teacher).cfg, student_cfg)
  t_layer = _teacher_index(teacher, teacher_layer)

  def per_example(model, t, s, batch):
    (_, t_out), (_, s_out) = t, s
    pick = lambda out, name, i, who: _layer(out[name], i, who)
    tq, tk, tv = (pick(t_out, n, t_layer, "teacher") for n in "qkv")
    sq, sk, sv = (pick(s_out, n, student_layer, "student") for n in "qkv")
    if tq.shape[2] != sq.shape[2]:
      check_minilm_v1(encoder_of(teacher).cfg, encoder_of(model).cfg)
    mask, seg = packing.real_tokens(batch), batch.get("segment_ids")
    # Attention from q/k rather than out["attention_logits"]: the fused kernels (splash,
    # cuDNN) return no logits, and q/k let the loss go a chunk of heads at a time. Their sum
    # equals losses.minilm_v1_loss; kept apart for the curves.
    at = losses.qk_attention_kl(tq, tk, sq, sk, mask, segment_ids=seg)
    vr = losses.relation_kl(tv, sv, mask, num_relation_heads=None, segment_ids=seg)
    return at + vr, {"attention_kl": at, "value_kl": vr}

  return _objective(teacher, per_example, teacher_depth=t_layer + 1)


def minilm_v2(teacher: nnx.Module, *, num_relation_heads: int = losses.RELATION_HEADS_BASE,
              teacher_layer: int = -1, student_layer: int = -1,
              student_cfg: ModelConfig | None = None) -> Objective:
  """MiniLMv2: Q-Q, K-K and V-V relation KLs over `num_relation_heads` relation heads, one teacher
  layer (last for base teachers, upper-middle for large ones) vs the student's last layer."""
  if student_cfg is not None:
    check_minilm_v2(encoder_of(teacher).cfg, student_cfg, num_relation_heads)
  t_layer = _teacher_index(teacher, teacher_layer)

  def per_example(model, t, s, batch):
    (_, t_out), (_, s_out) = t, s
    parts = {}
    for name in "qkv":
      parts[f"{name}{name}_kl"] = losses.relation_kl(
          _layer(t_out[name], t_layer, "teacher"),
          _layer(s_out[name], student_layer, "student"), packing.real_tokens(batch),
          num_relation_heads=num_relation_heads, segment_ids=batch.get("segment_ids"))
    return sum(parts.values()), parts

  return _objective(teacher, per_example, teacher_depth=t_layer + 1)


def uniform_layer_map(student_layers: int, teacher_layers: int) -> tuple[int, ...]:
  """Hidden-state index of the teacher for each student hidden state (embeddings included):
  0 -> 0 and student layer j -> teacher layer round(j * L / M), so the last maps to the last."""
  return tuple(int(round(j * teacher_layers / student_layers)) for j in range(student_layers + 1))


def xtreme_hidden(teacher: nnx.Module, *, layer_map: Sequence[int] | None = None,
                  include_embeddings: bool = True, tokens: str = "all") -> Objective:
  """XtremeDistil stage 1: MSE between (projected) student hidden states and teacher hidden states.

  `layer_map[j]` is the teacher hidden-state index matched by student hidden state j (length
  M + 1, entry 0 the embeddings); None maps uniformly. A student narrower than the teacher must be
  a `StudentWithProjection`. tokens="cls" matches only the first token (classification transfer),
  "all" every real token (tagging / general transfer).
  """
  if tokens not in ("all", "cls"):
    raise ValueError(f"tokens must be 'all' or 'cls', got {tokens!r}")
  t_cfg = encoder_of(teacher).cfg
  # The deepest teacher hidden state read; out-of-range maps keep the full teacher and fail
  # below with the message that names the valid range.
  depth = max(layer_map) if layer_map and 0 <= max(layer_map) <= t_cfg.num_layers else None

  def per_example(model, t, s, batch):
    (_, t_out), (_, s_out) = t, s
    t_h, s_h = t_out["hidden_states"], s_out["hidden_states"]
    lmap = tuple(layer_map) if layer_map is not None else uniform_layer_map(
        len(s_h) - 1, len(t_h) - 1)
    if len(lmap) != len(s_h) or not all(0 <= i < len(t_h) for i in lmap):
      raise ValueError(f"layer_map {lmap} must give one teacher hidden-state index in "
                       f"0..{len(t_h) - 1} for each of the student's {len(s_h)} hidden states")
    mask, seg = packing.real_tokens(batch), batch.get("segment_ids")
    if tokens == "cls":  # each example's first token, in packed rows each segment's
      first = (jnp.arange(mask.shape[1]) == 0)[None, :] if seg is None else (
          packing.segment_positions(seg) == 0)
      mask = mask * first
    parts = {}
    for j, i in enumerate(lmap):
      if j == 0 and not include_embeddings:
        continue
      h = s_h[j]
      if isinstance(model, StudentWithProjection):
        h = model.proj[j](h)
      elif h.shape[-1] != t_cfg.hidden_size:
        raise ValueError(f"student width {h.shape[-1]} != teacher width {t_cfg.hidden_size}: "
                         "wrap the student in distill.StudentWithProjection")
      parts[f"hidden_{j}_mse"] = losses.hidden_mse(h, t_h[i], mask, segment_ids=seg)
    return sum(parts.values()) / len(parts), parts

  return _objective(teacher, per_example, teacher_depth=depth)


def logit_kd(teacher: nnx.Module, *, temperature: float = 1.0, soft_weight: float = 1.0,
             hard_weight: float = 0.0, kind: str = "kl") -> Objective:
  """XtremeDistil stages 2-3 / Hinton KD between classifiers: soft_weight * (T^2 KL of tempered
  softmaxes, or logit MSE) + hard_weight * CE on labels. Unlabeled rows (label < 0) get no CE."""
  if kind not in ("kl", "mse"):
    raise ValueError(f"kind must be 'kl' or 'mse', got {kind!r}")

  def per_example(model, t, s, batch):
    s_logits = s[0]
    parts = {}
    if soft_weight:
      t_logits = t[0]
      parts["soft"] = (losses.soft_logit_kd(s_logits, t_logits, temperature=temperature)
                       if kind == "kl" else losses.logit_mse(s_logits, t_logits))
    if hard_weight:
      labels = batch["labels"]
      known = labels >= 0
      ce = losses.cross_entropy(s_logits, jnp.where(known, labels, 0))
      parts["hard"] = jnp.where(known, ce, 0.0)
    total = soft_weight * parts.get("soft", 0.0) + hard_weight * parts.get("hard", 0.0)
    return total, parts

  def extra_eval(t, s):
    res = {"pred": s[0].argmax(-1)}
    if t is not None:
      res["teacher_pred"] = t[0].argmax(-1)
    return res

  def extra_metrics(out, res):
    res.pop("pred", None)
    res.pop("teacher_pred", None)
    if "teacher_pred" in out:
      res["agreement"] = float(np.mean(out["pred"] == out["teacher_pred"]))
    labels = out.get("_labels")
    if labels is not None and (labels >= 0).any():
      known = labels >= 0
      res["accuracy"] = float(np.mean(out["pred"][known] == labels[known]))
    return res

  return _objective(teacher, per_example, extra_eval=extra_eval, extra_metrics=extra_metrics,
                    teacher_needed=bool(soft_weight))


# --- students ------------------------------------------------------------------------------

_LAYER = re.compile(r"^layers/(\d+)/")


def _encoder_keyed(flat: dict) -> dict:
  # Task models prefix encoder params with "encoder/"; match encoder params across tasks.
  return {k.removeprefix("encoder/"): v for k, v in flat.items()}


def copy_params(src: nnx.Module, dst: nnx.Module, layers: Sequence[int] | None = None, *,
                fresh: Sequence[str] = ()) -> list:
  """Copies every param of `src` into `dst` by name (encoder params matched across task
  models); with `layers`, dst layer j takes src layer layers[j]. Returns the dst names copied.

  A param both have under one name but with different shapes is an error listing every such
  name and both shapes: skipping it would leave the student partly random without a word.
  `fresh` opts in by name prefix (e.g. "classifier/" for a head with another label count): those
  keep their fresh initialisation, and the log says so. Params only `dst` has (a new head) are
  left as initialised."""
  src_flat = _encoder_keyed(pretrained.flat_params(src))
  dst_flat = pretrained.flat_params(dst)
  new, copied, mismatched, kept = {}, [], [], []
  for name, old in dst_flat.items():
    key = name.removeprefix("encoder/")
    m = _LAYER.match(key)
    if m and layers is not None:
      key = _LAYER.sub(f"layers/{layers[int(m.group(1))]}/", key)
    value = src_flat.get(key)
    if value is None:
      continue
    if tuple(value.shape) != tuple(old.shape):
      (kept if name.startswith(tuple(fresh)) else mismatched).append(
          f"{name}: source {tuple(value.shape)}, destination {tuple(old.shape)}")
      continue
    # A real copy: sharing buffers with the teacher would break the loop's donation of the
    # student's params (the teacher's are passed to the same step).
    new[name] = jnp.array(value, copy=True)
    copied.append(name)
  if mismatched:
    raise ValueError(
        f"{len(mismatched)} parameter(s) have other shapes in the source than in the model they "
        f"would initialise: {'; '.join(mismatched[:8])}{' ...' if len(mismatched) > 8 else ''}. "
        f"Use a source of the same architecture, or opt in to fresh values for them by name "
        f"prefix (fresh=...)")
  if kept:
    log.info("kept %d freshly initialised parameter(s) whose shapes differ from the source: %s",
             len(kept), "; ".join(kept))
  state = nnx.state(dst, nnx.Param)
  nnx.update(dst, pretrained.fill_params(state, new))
  return copied


def _head_prefixes(model: nnx.Module) -> tuple[str, ...]:
  """Name prefixes of a task model's head params (everything outside its encoder)."""
  return tuple(sorted({name.split("/", 1)[0] + "/" for name in pretrained.flat_params(model)
                       if not name.startswith("encoder/")}))


def init_random(student_cfg: ModelConfig, *, task: str = "encoder",
                num_labels: int | None = None, seed: int = 0) -> nnx.Module:
  return pretrained.build(student_cfg, task, num_labels, seed=seed)


def init_from_teacher_layers(teacher: nnx.Module, student_cfg: ModelConfig,
                             layers: Sequence[int] = (0, 2, 4), *, task: str = "encoder",
                             num_labels: int | None = None, seed: int = 0) -> nnx.Module:
  """A student whose embeddings, pooler and (shape-compatible) head come from the teacher and whose
  layer j is a copy of teacher layer `layers[j]`. Layers are copied whole, so hidden size, heads
  and feed-forward size must equal the teacher's."""
  t_cfg = encoder_of(teacher).cfg
  layers = [int(i) % t_cfg.num_layers if -t_cfg.num_layers <= i < t_cfg.num_layers else None
            for i in layers]
  if None in layers:
    raise ValueError(f"teacher layers must be in 0..{t_cfg.num_layers - 1}")
  if len(layers) != student_cfg.num_layers:
    raise ValueError(f"{len(layers)} teacher layers given for a {student_cfg.num_layers}-layer "
                     "student")
  fields = ("hidden_size", "num_heads", "intermediate_size", "vocab_size",
            "max_position_embeddings", "type_vocab_size")
  diff = {f: (getattr(t_cfg, f), getattr(student_cfg, f)) for f in fields
          if getattr(t_cfg, f) != getattr(student_cfg, f)}
  if diff:
    raise ValueError("init_from_teacher_layers copies whole layers, so the student must have the "
                     f"teacher's shapes; (teacher, student) differ in {diff}. Use a random init "
                     "(with a teacher assistant for much narrower students) instead.")
  student = init_random(student_cfg, task=task, num_labels=num_labels, seed=seed)
  # The encoder's shapes were checked above; a teacher head of another size stays fresh.
  copy_params(teacher, student, layers, fresh=_head_prefixes(student))
  return student


def init_from_checkpoint(path, *, task: str = "encoder", num_labels: int | None = None,
                         seed: int = 0, **overrides) -> tuple[nnx.Module, ModelConfig]:
  """A student from an HF or minilm_jax directory, as a `task` model: when the directory holds
  another task (e.g. an encoder from a previous stage), its encoder params go into a fresh model
  of this task."""
  m = pretrained.from_pretrained(path, task, num_labels, seed=seed, **(
      {} if checkpoint.is_model_dir(path) else overrides))
  if m.task == task and (task != "classification" or m.num_labels == num_labels):
    return m.model, m.config
  student = init_random(m.config, task=task, num_labels=num_labels, seed=seed)
  # Another task's or label count's head is replaced on purpose; the encoder must match.
  copy_params(m.model, student, fresh=_head_prefixes(student))
  return student, m.config
