"""minilm_jax model directory -> HF directory that transformers' AutoModel* loads.

  python -m convert.to_hf SRC DST
"""

from __future__ import annotations

import argparse
from pathlib import Path

from minilm_jax import pretrained


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("src", type=Path,
                 help="minilm_jax model directory (from convert.from_hf or training)")
  p.add_argument("dst", type=Path, help="output HF directory")
  args = p.parse_args(argv)
  m = pretrained.from_pretrained(args.src)
  out = m.export_hf(args.dst)
  print(f"wrote {out} ({m.task})")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
