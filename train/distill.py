"""Distil a MiniLM: MiniLM v1, MiniLMv2 or XtremeDistil stages, from a frozen teacher.

  python -m train.distill                                   # distill_packaged (all-MiniLM-L6-v2)
  python -m train.distill --config distill_minilmv2_base --teacher.path=ckpt/bert-base-uncased
  python -m train.distill --config path/to.yaml --loop.max_steps=1000 --loop.resume=true

The job (configs, corpus, teacher and student, loop, export) is `minilm_jax.recipes.distill`,
which the notebook API's `minilm_jax.distill` runs too; this file is its command line.
"""

from __future__ import annotations

import sys

from minilm_jax.recipes.distill import DistillConfig, run
from train import cli


def _report(summary: dict, cfg: DistillConfig) -> None:
  print(f"held-out distillation metrics after {summary['steps']} steps: "
        f"{cli.rounded(summary['final'], 5)}")
  print(cli.outputs_line(cfg.loop.output_dir))


def main(argv=None) -> int:
  return cli.launch(DistillConfig, run, argv, default="distill_packaged", doc=__doc__,
                    report=_report)


if __name__ == "__main__":
  sys.exit(main())
