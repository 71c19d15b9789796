"""Train a sentence encoder contrastively: in-batch negatives over the global batch (every
device and host), hard negatives, Matryoshka, GradCache; STS and retrieval evaluation in the
loop; a sentence-transformers export.

  python -m train.embed                                    # packaged all-MiniLM-L6-v2 on man pages
  python -m train.embed --config embed_all_minilm          # the 2021 recipe (TPU v3-8 or larger)
  python -m train.embed --data.source=jsonl --data.train_paths=a.jsonl,b.jsonl \\
      --data.weights=3,1 --data.columns=query,answer --data.retrieval_path=dev.jsonl

The job (pair shards, loop, exports) is `minilm_jax.recipes.embed`, which the notebook API's
`encoder.fit(anchors, positives)` runs too; this file is its command line.
"""

from __future__ import annotations

import sys

from minilm_jax.recipes.embed import EmbedConfig, run
from train import cli


def _report(summary: dict, cfg: EmbedConfig) -> None:
  if summary.get("start"):
    print(f"before training: {cli.rounded(summary['start'])}")
  print(f"after {summary['steps']} steps: {cli.rounded(summary['final'])}")
  print(cli.outputs_line(cfg.loop.output_dir))


def main(argv=None) -> int:
  return cli.launch(EmbedConfig, run, argv, default="embed_manpages", doc=__doc__,
                    report=_report)


if __name__ == "__main__":
  sys.exit(main())
