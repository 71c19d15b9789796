"""HF checkpoint directory -> minilm_jax model directory (orbax params + config + tokenizer).

  python -m convert.from_hf SRC DST [--task encoder|classification|qa|mlm] [--num-labels N]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from minilm_jax import pretrained


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("src", type=Path, help="HF directory: config.json + model.safetensors or .bin")
  p.add_argument("dst", type=Path, help="output minilm_jax model directory")
  p.add_argument("--task", default="encoder", choices=pretrained.TASKS)
  p.add_argument("--num-labels", type=int, default=None)
  p.add_argument("--param-dtype", default=None, choices=["float32", "bfloat16"])
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  overrides = {"param_dtype": args.param_dtype} if args.param_dtype else {}
  m = pretrained.from_pretrained(args.src, args.task, args.num_labels, **overrides)
  out = m.save(args.dst)
  n = sum(x.size for x in pretrained.flat_params(m.model).values())
  print(f"wrote {out} ({m.task}, {n:,} parameters, tokenizer {m.tokenizer.kind})")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
