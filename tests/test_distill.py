"""Distillation: objectives at model level (zero for student == teacher, finite under padding,
gradients vs finite differences), student init, the frozen teacher kept out of optimizer state and
checkpoints, `recipes.distill.run` end to end, 8 devices vs 1, resume after a kill.

Everything uses tiny models (the shared TINY config; 1 layer, 2 for end-to-end teachers) and a
small local text corpus written from the tiny WordPiece vocabulary. Compilation dominates the
runtime, so tests share compiled functions where they can and the end-to-end runs share a
persistent compilation cache.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_batch, write_tiny_vocab

from minilm_jax import distillation, losses, pretrained, sharding
from minilm_jax.config import TINY
from minilm_jax.heads import SequenceClassifier
from minilm_jax.model import Encoder
from minilm_jax.recipes import distill as distill_main
from train import cli

ROOT = Path(__file__).resolve().parents[1]
# A wider init than TINY's 0.02 so that relations are far from uniform and losses are O(1).
# One layer (teachers in end-to-end runs get 2): compilations are as small as they get.
CFG = TINY.replace(num_layers=1, initializer_range=0.3, hidden_dropout=0.0,
                   attention_dropout=0.0)
NARROW = CFG.replace(hidden_size=16, num_heads=2, intermediate_size=32)
WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "hello", "world", "is", "of", "and",
         "to", "in", "sing", "walked"]


def _batch(cfg=CFG):
  """Heavy padding: lengths 12, 1, 4, and a dummy row with no real token at all (weight 0)."""
  b = random_batch(cfg, batch=4, length=12, seed=3)
  mask = (np.arange(12)[None] < np.array([12, 1, 4, 0])[:, None]).astype(np.int32)
  b = {k: np.where(mask == 1, v, 0).astype(np.int32) for k, v in b.items()}
  b["attention_mask"] = mask
  b["weights"] = np.array([1, 1, 1, 0], np.float32)
  b["labels"] = np.array([0, 2, -1, 0], np.int32)
  return {k: jnp.asarray(v) for k, v in b.items()}


def _models(kind, same: bool, narrow: bool = False, hard_weight: float = 0.0):
  """(teacher, student, objective): the student is a copy of the teacher or another init."""
  s_cfg = NARROW if narrow else CFG
  if kind == "logit_kd":
    make = lambda cfg, seed: SequenceClassifier(cfg, 3, rngs=nnx.Rngs(seed))
  else:
    make = lambda cfg, seed: Encoder(cfg, rngs=nnx.Rngs(seed))
  teacher = make(CFG, 0)
  student = make(s_cfg, 0 if same else 1)
  if kind == "minilm_v1":
    obj = distillation.minilm_v1(teacher)
  elif kind == "minilm_v2":
    obj = distillation.minilm_v2(teacher, num_relation_heads=4)
  elif kind == "xtreme_hidden":
    obj = distillation.xtreme_hidden(teacher)
    if narrow:
      student = distillation.StudentWithProjection(student, CFG.hidden_size, rngs=nnx.Rngs(2))
  else:
    obj = distillation.logit_kd(teacher, temperature=2.0, soft_weight=1.0, hard_weight=hard_weight)
  return teacher, student, obj


def _evaluator(obj, teacher, model, batch):
  """A jitted (params) -> (eval outputs, teacher and student intermediates) for models shaped like
  `model`: one compilation serves every model of that shape (tiny models run op by op slowly)."""
  graphdef, _ = nnx.split(model)
  args = [batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")]
  teacher_graph = nnx.split(teacher)[0]

  @jax.jit
  def fn(params, frozen):
    student = nnx.merge(graphdef, params)
    _, t_out = nnx.merge(teacher_graph, frozen)(*args)
    _, s_out = student(*args)
    return obj.eval_fn(student, batch, frozen), t_out, s_out
  return lambda m: jax.tree.map(np.asarray, fn(nnx.state(m), obj.frozen))


def _loss_and_grad(obj, teacher, model, batch):
  """A jitted params -> ((weighted mean loss, (per-example loss, loss parts, teacher and student
  intermediates)), gradient), the way the loop reduces; results come back as numpy."""
  graphdef, teacher_graph = nnx.split(model)[0], nnx.split(teacher)[0]
  args = [batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")]

  def f(params, frozen):
    student = nnx.merge(graphdef, params)
    per_ex, parts = obj.loss_fn(student, batch, None, frozen)
    # The forwards again, for the checks; XLA shares them with the loss's own.
    t_out, s_out = nnx.merge(teacher_graph, frozen)(*args)[1], student(*args)[1]
    w = batch["weights"]
    return jnp.sum(per_ex * w) / jnp.sum(w), (per_ex, parts, t_out, s_out)
  fn = jax.jit(jax.value_and_grad(f, has_aux=True))
  return lambda params: jax.tree.map(np.asarray, fn(params, obj.frozen))


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


# --- objectives at model level -------------------------------------------------------------

@pytest.mark.parametrize("kind,narrow", [("minilm_v1", False), ("minilm_v2", True),
                                         ("xtreme_hidden", True), ("logit_kd", False)])
def test_objective_zero_for_teacher_positive_finite_and_gradient(kind, narrow):
  """0 when the student is the teacher; otherwise positive, finite under heavy padding, and its
  gradient matches central finite differences. Narrow: a student of another width and head
  count (MiniLMv2 relation heads; XtremeDistil projections)."""
  batch = _batch()
  teacher, other, obj = _models(kind, same=False, narrow=narrow, hard_weight=0.5)
  same = _models(kind, same=True)[1]
  run_other = _loss_and_grad(obj, teacher, other, batch)
  run_same = run_other if not narrow else _loss_and_grad(obj, teacher, same, batch)
  (loss, (per_ex, parts, _, _)), _ = run_same(nnx.state(same))
  # logit_kd: the soft (teacher) part vanishes; the hard-label CE is no distance to the teacher.
  np.testing.assert_allclose(parts["soft"] if kind == "logit_kd" else per_ex, 0.0, atol=1e-6)

  params = nnx.state(other)
  (loss, (per_ex, parts, t, s)), grads = run_other(params)
  # Row 1 has one token: every relation is a one-key softmax, identical for any model.
  assert np.all(np.isfinite(per_ex)) and np.all(per_ex[[0, 2]] > 1e-3), per_ex
  assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  if kind == "minilm_v1":  # the objective's two parts sum to the paper's loss
    want = losses.minilm_v1_loss(*(t[n][-1] for n in "qkv"), *(s[n][-1] for n in "qkv"),
                                 batch["attention_mask"])
    np.testing.assert_allclose(per_ex, want, rtol=1e-5, atol=1e-7)

  # LayerNorm statistics are float32 by design, so this is a float32 check: central differences
  # along one random unit direction, at a step where rounding and curvature errors are ~1e-4.
  # (numpy for the direction: eager jax ops would compile a kernel per parameter shape.)
  # Half random, half along the gradient: a well-conditioned derivative whatever the draw.
  leaves, treedef = jax.tree.flatten(jax.tree.map(np.asarray, params))
  unit = lambda xs: [x / np.sqrt(sum(float(np.sum(y * y)) for y in xs)) for x in xs]
  rng = np.random.default_rng(0)
  direction = unit([r + g for r, g in zip(
      unit([rng.standard_normal(x.shape).astype(x.dtype) for x in leaves]),
      unit(jax.tree.leaves(grads)))])
  analytic = sum(float(np.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads), direction))
  eps = 3e-3
  shifted = lambda e: float(run_other(jax.tree.unflatten(
      treedef, [x + e * d for x, d in zip(leaves, direction)]))[0][0])
  numeric = (shifted(eps) - shifted(-eps)) / (2 * eps)
  assert abs(analytic) > 1e-3, analytic
  np.testing.assert_allclose(numeric, analytic, rtol=2e-2)
  if kind == "xtreme_hidden":  # the projections get gradients: they train with the student
    assert np.abs(grads["proj"][0]["kernel"][...]).sum() > 0


def test_v2_with_relation_heads_equal_to_heads_is_the_per_head_formula():
  batch = _batch()
  teacher, student, _ = _models("minilm_v2", same=False)
  obj = distillation.minilm_v2(teacher, num_relation_heads=CFG.num_heads)
  out, t, s = _evaluator(obj, teacher, student, batch)(student)
  lengths = np.asarray(batch["attention_mask"]).sum(-1)
  want = np.zeros(len(lengths))
  for b, n in enumerate(lengths):
    if n == 0:
      continue
    for name in "qkv":  # per model head: softmax(X_h X_h^T / sqrt(d_h)), cropped to the length
      tx = np.asarray(t[name][-1][b, :n], np.float64)
      sx = np.asarray(s[name][-1][b, :n], np.float64)
      for h in range(CFG.num_heads):
        lt = _log_softmax(tx[:, h] @ tx[:, h].T / np.sqrt(tx.shape[-1]))
        ls = _log_softmax(sx[:, h] @ sx[:, h].T / np.sqrt(sx.shape[-1]))
        want[b] += (np.exp(lt) * (lt - ls)).sum() / (CFG.num_heads * n)
  np.testing.assert_allclose(out["loss"], want, rtol=1e-4, atol=1e-6)


def test_v1_head_mismatch_names_minilmv2():
  teacher = Encoder(CFG, rngs=nnx.Rngs(0))
  student_cfg = CFG.replace(num_heads=2)
  with pytest.raises(ValueError, match="MiniLMv2"):
    distillation.minilm_v1(teacher, student_cfg=student_cfg)
  # no config given: tracing the first step fails, same message
  obj = distillation.minilm_v1(teacher)
  student = Encoder(student_cfg, rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="MiniLMv2"):
    jax.eval_shape(lambda: obj.eval_fn(student, _batch(), obj.frozen))
  distillation.minilm_v2(teacher, num_relation_heads=4, student_cfg=student_cfg)  # the way out
  with pytest.raises(ValueError, match="num_relation_heads=5 must divide"):
    distillation.minilm_v2(teacher, num_relation_heads=5, student_cfg=student_cfg)


def test_init_from_teacher_layers_copies_embeddings_and_chosen_layers():
  teacher = Encoder(CFG.replace(num_layers=4), rngs=nnx.Rngs(0))
  student = distillation.init_from_teacher_layers(teacher, CFG.replace(num_layers=2), (1, 3),
                                                  seed=5)
  t, s = pretrained.flat_params(teacher), pretrained.flat_params(student)
  for name, value in s.items():
    src = re.sub(r"^layers/(\d)/", lambda m: f"layers/{(1, 3)[int(m.group(1))]}/", name)
    np.testing.assert_array_equal(value, t[src], err_msg=name)
  assert not any(a is b for a, b in zip(jax.tree.leaves(nnx.state(teacher)),
                                        jax.tree.leaves(nnx.state(student))))
  with pytest.raises(ValueError, match="teacher's shapes"):
    distillation.init_from_teacher_layers(teacher, NARROW.replace(num_layers=2), (1, 3))
  with pytest.raises(ValueError, match="2 teacher layers given for a 3-layer"):
    distillation.init_from_teacher_layers(teacher, CFG.replace(num_layers=3), (1, 3))


def test_cast_model_bfloat16_teacher():
  teacher = Encoder(CFG, rngs=nnx.Rngs(0))
  bf16 = distillation.cast_model(teacher, "bfloat16")
  assert {x.dtype for x in jax.tree.leaves(nnx.state(bf16))} == {jnp.dtype(jnp.bfloat16)}
  obj = distillation.minilm_v2(bf16, num_relation_heads=4)
  per_ex = _evaluator(obj, bf16, teacher, _batch())(teacher)[0]["loss"]
  assert np.all(np.isfinite(per_ex)) and float(np.max(per_ex)) < 0.05


# --- train.distill end to end --------------------------------------------------------------

_CACHE_OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                  "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """Every run builds fresh closures, so jit would recompile identical steps run after run; a
  persistent cache for this module (and its subprocesses) compiles each distinct step once.
  The previous settings come back afterwards: other test files are unaffected."""
  from jax.experimental.compilation_cache import compilation_cache as cc
  path = str(tmp_path_factory.mktemp("jax_cache"))
  old = {k: getattr(jax.config, k) for k in _CACHE_OPTIONS}
  for k, v in zip(_CACHE_OPTIONS, (path, 0, 0)):
    jax.config.update(k, v)
  cc.reset_cache()
  yield {k.upper(): str(v) for k, v in zip(_CACHE_OPTIONS, (path, 0, 0))}
  for k, v in old.items():
    jax.config.update(k, v)
  cc.reset_cache()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  """A 2-layer tiny teacher as an HF directory, a classification teacher, and a text corpus."""
  root = tmp_path_factory.mktemp("distill")
  t_cfg = CFG.replace(num_layers=2)
  teacher_dir = root / "teacher_hf"
  pretrained.export_hf(Encoder(t_cfg, rngs=nnx.Rngs(0)), t_cfg, teacher_dir)
  write_tiny_vocab(teacher_dir)
  clf_dir = root / "teacher_clf"
  pretrained.Pretrained(SequenceClassifier(t_cfg, 3, rngs=nnx.Rngs(0)), t_cfg, None,
                        teacher_dir, "classification", 3).save(clf_dir)
  rng = np.random.default_rng(0)
  lines = [" ".join(rng.choice(WORDS, rng.integers(2, 14))) for _ in range(160)]
  (root / "train.txt").write_text("\n".join(lines) + "\n")
  return {"root": root, "teacher": str(teacher_dir), "clf": str(clf_dir),
          "train": str(root / "train.txt")}


def _overrides(assets, *extra, kind="minilm_v2"):
  """Tiny runs: 2 steps, no evaluation unless `--corpus.held_out=N` is added, constant lr (so a
  run's steps do not depend on its length: resumed and straight runs are comparable)."""
  return [
      f"--teacher.path={assets['clf'] if kind == 'logit_kd' else assets['teacher']}",
      "--student.init=teacher_layers", "--student.layers=1",
      f"--objective.kind={kind}", "--objective.num_relation_heads=4",
      "--corpus.source=text", f"--corpus.train_path={assets['train']}", "--corpus.eval_path=",
      "--corpus.held_out=0",
      "--corpus.max_length=16", "--corpus.buckets=16",
      "--optim.learning_rate=1e-3", "--optim.schedule=constant", "--optim.warmup_ratio=0",
      "--loop.batch_size=8", "--loop.eval_batch_size=16", "--loop.max_steps=2",
      "--loop.log_every=1", "--loop.eval_every=2", "--loop.progress=false", *extra]


def _cfg(assets, out, *extra, kind="minilm_v2"):
  cfg, _ = cli.load(distill_main.DistillConfig, "distill_packaged",
                    _overrides(assets, f"--loop.output_dir={out}", *extra, kind=kind),
                    default="distill_packaged")
  return cfg


def test_run_v2_teacher_out_of_state_and_checkpoint_exports_hf(assets, tmp_path):
  cfg = _cfg(assets, tmp_path / "run", "--teacher.dtype=bfloat16", "--corpus.held_out=16")
  summary = distill_main.run(cfg)
  assert summary["steps"] == 2 and np.isfinite(summary["final"]["loss"])
  # The checkpoint holds the 1-layer student, its optimizer moments, and nothing of the teacher.
  ckpt = tmp_path / "run" / "checkpoints" / "2" / "state"
  meta = json.loads((ckpt / "_METADATA").read_text())
  names = ["/".join(str(k["key"]) for k in v["key_metadata"])
           for v in meta["tree_metadata"].values()]
  params = [n for n in names if n.startswith("params/")]
  student = pretrained.build(distill_main.student_config(cfg.student, CFG.replace(num_layers=2)))
  assert len(params) == len(pretrained.flat_params(student))
  assert not any("layers/1" in n for n in names), names  # the teacher's second layer
  assert sum("opt_state" in n for n in names) >= 2 * len(params)
  hf = json.loads((tmp_path / "run" / "hf" / "config.json").read_text())
  assert hf["num_hidden_layers"] == 1 and hf["hidden_size"] == CFG.hidden_size
  m = pretrained.from_pretrained(tmp_path / "run" / "hf")
  exported = pretrained.flat_params(m.model)["layers/0/attn/q/kernel"]
  trained = pretrained.flat_params(distill_main.pretrained.from_pretrained(
      tmp_path / "run" / "final").model)["layers/0/attn/q/kernel"]
  np.testing.assert_array_equal(exported, trained)
  for name in ("metrics.json", "curves.png", "history.jsonl", "best", "final"):
    assert (tmp_path / "run" / name).exists(), name
  assert list((tmp_path / "run" / "tensorboard").iterdir())


@pytest.mark.parametrize("kind,extra", [
    ("xtreme_hidden", ("--student.init=random", "--student.hidden_size=16",
                       "--student.num_heads=2", "--student.num_layers=1")),
    ("logit_kd", ("--objective.temperature=2", "--objective.hard_weight=0.5")),
    ("mlm", ("--student.init=random", "--student.num_layers=1")),
])
def test_run_other_objectives(assets, tmp_path, kind, extra):
  summary = distill_main.run(_cfg(assets, tmp_path / "run", "--corpus.held_out=16", *extra,
                                  kind=kind))
  assert summary["steps"] == 2 and np.isfinite(summary["final"]["loss"])
  if kind == "logit_kd":
    assert 0.0 <= summary["final"]["agreement"] <= 1.0
  if kind == "xtreme_hidden":  # exported without the projections, at the student's width
    hf = json.loads((tmp_path / "run" / "hf" / "config.json").read_text())
    assert hf["hidden_size"] == 16
  if kind == "mlm":  # the no-distillation baseline: exported as an encoder, no MLM head
    assert 0.0 <= summary["final"]["mlm_accuracy"] <= 1.0
    m = pretrained.from_pretrained(tmp_path / "run" / "final")
    assert m.task == "encoder" and m.config.num_layers == 1
    assert not any(k.startswith("mlm/") for k in pretrained.flat_params(m.model))


def test_run_v1_head_mismatch_fails_before_training(assets, tmp_path):
  cfg = _cfg(assets, tmp_path / "run", "--student.init=random", "--student.num_heads=2",
             kind="minilm_v1")
  with pytest.raises(ValueError, match="Use MiniLMv2"):
    distill_main.run(cfg)
  assert not (tmp_path / "run" / "checkpoints").exists()


_DEVICES_SCRIPT = """
import json
import jax
from minilm_jax.recipes import distill
from train import cli
assert len(jax.devices()) == 8, jax.devices()
cfg, _ = cli.load(distill.DistillConfig, "distill_packaged", {overrides!r}, default="x")
print("RESULT" + json.dumps([h["loss"] for h in distill.run(cfg)["history"]]))
"""


@pytest.mark.slow
def test_8_devices_match_1_device(assets, tmp_path, compilation_cache):
  """The same run on 8 host devices (a subprocess: the device count is fixed at JAX start-up) as
  data 4 x fsdp 2, so the batch is split 8 ways and student and teacher params 2 ways."""
  # One checkpoint, at the end: orbax slices every FSDP shard eagerly, a compilation per shape.
  overrides = _overrides(assets, "--loop.max_steps=3", f"--loop.output_dir={tmp_path / '8'}",
                         "--loop.mesh_data=4", "--loop.mesh_fsdp=2", "--loop.fsdp=true",
                         "--loop.save_every=1000")
  env = {**os.environ, **compilation_cache, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  proc = subprocess.Popen([sys.executable, "-c", _DEVICES_SCRIPT.format(overrides=overrides)],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  # Meanwhile, one device in this process (whatever device count the test session has).
  one = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  single = distill_main.run(_cfg(assets, tmp_path / "1", "--loop.max_steps=3",
                                 "--loop.save_every=1000"), mesh=one)
  stdout, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 0, stderr[-3000:]
  eight = json.loads(stdout.split("RESULT", 1)[1])
  assert len(eight) == 3
  np.testing.assert_allclose(eight, [h["loss"] for h in single["history"]], rtol=1e-5,
                             atol=1e-7)


@pytest.mark.slow
def test_resume_after_kill_continues_from_saved_step_with_same_batches(assets, tmp_path,
                                                                     compilation_cache):
  """SIGKILL the CLI mid-run; --loop.resume=true continues from the newest saved step, and its
  losses are those of an uninterrupted run (same batches, same optimizer state)."""
  out = tmp_path / "killed"
  args = [sys.executable, "-m", "train.distill", *_overrides(
      assets, f"--loop.output_dir={out}", "--loop.max_steps=100000", "--loop.save_every=4")]
  proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          env={**os.environ, **compilation_cache, "JAX_PLATFORMS": "cpu"})
  ckpts = out / "checkpoints"
  saved_steps = lambda: [int(p.name) for p in ckpts.glob("*") if p.name.isdigit()]
  deadline = time.time() + 300
  try:
    while time.time() < deadline and proc.poll() is None:
      if any(s >= 8 for s in saved_steps()):
        break
      time.sleep(0.1)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]
  saved = max(saved_steps())
  assert saved >= 8 and saved % 4 == 0

  resumed = distill_main.run(_cfg(assets, out, f"--loop.max_steps={saved + 2}",
                                  "--loop.resume=true"))
  straight = distill_main.run(_cfg(assets, tmp_path / "straight",
                                   f"--loop.max_steps={saved + 2}"))
  assert resumed["steps"] == saved + 2
  new = [h for h in resumed["history"] if h["step"] > saved]
  assert [h["step"] for h in new] == [saved + 1, saved + 2]
  want = {h["step"]: h["loss"] for h in straight["history"]}
  np.testing.assert_allclose([h["loss"] for h in new], [want[h["step"]] for h in new],
                             rtol=1e-5)


@pytest.mark.parametrize("name", ["wikipedia/20230601.en", "c4/en"])
def test_tfds_corpus_with_mock_data(name, assets, tmp_path):
  """A tfds corpus is prepared split by split (index ranges) into windows of max_length, and
  the held-out records come first and are not trained on."""
  tfds = pytest.importorskip("tensorflow_datasets")
  spec = distill_main.CorpusSpec(source="tfds", tfds_name=name, held_out=3)
  with tfds.testing.mock_data(num_examples=10):
    train, train_keys, ev, eval_keys = distill_main.load_corpus(
        spec, tmp_path, Path(assets["teacher"]), 16)
  assert ev is train and eval_keys == (0, 3) and train_keys == (3, train.num_examples)
  assert train.num_examples >= 10 and train.manifest["source"].startswith(f"tfds {name}")
  assert max(np.flatnonzero(train.manifest["length_histogram"])) <= 16


def test_configs_parse():
  for path in sorted((ROOT / "train" / "configs").glob("distill_*.yaml")):
    cfg, _ = cli.load(distill_main.DistillConfig, str(path), [], default="x")
    assert cfg.loop.best_mode == "min" and cfg.loop.best_metric == "loss", path.name


# --- partial loads and the teacher's depth ---------------------------------------------------

def test_copy_params_refuses_mismatched_shapes_and_names_them():
  """A parameter both models have under one name but with other shapes used to be skipped
  silently, leaving the student partly random. It is an error naming each one, unless opted in
  by prefix (the intended case: a head with another label count stays fresh)."""
  src = SequenceClassifier(CFG, 3, rngs=nnx.Rngs(0))
  wide = SequenceClassifier(CFG.replace(intermediate_size=CFG.intermediate_size * 2), 3,
                            rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match=r"encoder/layers/0/mlp/wi/kernel: source \(32, 64\), "
                                       r"destination \(32, 128\)") as e:
    distillation.copy_params(src, wide)
  assert "fresh=" in str(e.value)
  other_head = SequenceClassifier(CFG, 2, rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="classifier/kernel"):
    distillation.copy_params(src, other_head)
  before = np.asarray(other_head.classifier.kernel[...])
  copied = distillation.copy_params(src, other_head, fresh=("classifier/",))
  assert "encoder/layers/0/mlp/wi/kernel" in copied and "classifier/kernel" not in copied
  np.testing.assert_array_equal(other_head.classifier.kernel[...], before)
  np.testing.assert_array_equal(other_head.encoder.embed.word[...], src.encoder.embed.word[...])


def _dots(fn, *args) -> int:
  return str(jax.make_jaxpr(fn)(*args)).count("dot_general")


@pytest.mark.parametrize("kind", ["minilm_v1", "minilm_v2", "xtreme_hidden"])
def test_teacher_stops_at_the_deepest_layer_the_objective_reads(kind):
  """A 3-layer teacher read at layer 0 (hidden state 1) runs one layer: the loss's jaxpr holds
  two teacher layers' matmuls fewer than when read at its last layer, and the truncated
  teacher's outputs are the full teacher's first layer."""
  teacher = Encoder(CFG.replace(num_layers=3, inference_chunk_tokens=0), rngs=nnx.Rngs(0))
  student = Encoder(CFG, rngs=nnx.Rngs(1))
  make = {"minilm_v1": lambda i: distillation.minilm_v1(teacher, teacher_layer=i),
          "minilm_v2": lambda i: distillation.minilm_v2(teacher, num_relation_heads=4,
                                                   teacher_layer=i),
          "xtreme_hidden": lambda i: distillation.xtreme_hidden(teacher,
                                                                layer_map=(0, i + 1))}[kind]
  batch = _batch()
  dots = {}
  for i in (0, 2):
    obj = make(i)
    dots[i] = _dots(lambda frozen, obj=obj: obj.loss_fn(student, batch, None, frozen)[0],
                    obj.frozen)
    assert np.isfinite(np.asarray(obj.loss_fn(student, batch, None, obj.frozen)[0])).all()
  per_layer = (dots[2] - dots[0]) / 2
  assert per_layer >= 6, dots  # q, k, v, o, wi, wo (and the attention products)
  (run_1, params) = distillation._teacher_runner(teacher, 1)
  (run_all, _) = distillation._teacher_runner(teacher)
  (_, one), (_, full) = run_1(params, batch), run_all(params, batch)
  assert len(one["q"]) == 1 and len(one["hidden_states"]) == 2 and "pooled" not in one
  for name in ("q", "k", "v"):
    np.testing.assert_array_equal(one[name][0], full[name][0])
  np.testing.assert_array_equal(one["hidden_states"][1], full["hidden_states"][1])
