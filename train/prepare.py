"""Prepare a corpus: tokenise it with the model's tokenizer into ArrayRecord shards + manifest.

  python -m train.prepare --source text --input corpus.txt --output data/corpus
  python -m train.prepare --source documents --input 'dumps/*.txt' --output data/books \\
      --tokenizer checkpoints/bert-base-uncased --max-length 512
  python -m train.prepare --source tfds --tfds-name wikipedia/20230601.en --output data/wiki \\
      --tokenizer checkpoints/bert-base-uncased --max-length 512 \\
      --runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp
  python -m train.prepare --source csv --input train.csv --text-column sentence \\
      --label-column label --output data/train

An Apache Beam pipeline: the local FnApiRunner with one process a core by default; every option this
parser does not know (--runner=..., --direct_num_workers=..., Dataflow/Flink/Spark options)
goes to Beam. The manifest is written last: a crashed run never looks complete. Train from the
shards with corpus.source=prepared (train.distill) or data.source=prepared (train.finetune).
"""

from __future__ import annotations

import argparse
import glob
import logging
import sys

from minilm_jax import data
from minilm_jax.recipes.finetune import resolve_model_path
from train.cli import setup_logging


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--source", required=True, choices=[k for k in data.sources.KINDS
                                                     if k != "examples"])
  p.add_argument("--input", nargs="*", default=[], help="files (globs allowed)")
  p.add_argument("--output", required=True, help="the prepared directory")
  p.add_argument("--tokenizer", default="packaged:all-minilm-l6-v2",
                 help="the model directory whose tokenizer to use")
  p.add_argument("--max-length", type=int, default=128)
  p.add_argument("--text-column", default="text")
  p.add_argument("--pair-column", default=None)
  p.add_argument("--label-column", default=None)
  p.add_argument("--label-names", default=None, help="comma-separated: the class order")
  p.add_argument("--regression", action="store_true")
  p.add_argument("--encoding", default="utf-8")
  p.add_argument("--drop-empty", action="store_true")
  p.add_argument("--tfds-name", default="")
  p.add_argument("--split", default="train")
  p.add_argument("--data-dir", default=None)
  p.add_argument("--text-key", default="text")
  p.add_argument("--overwrite", action="store_true")
  return p.parse_known_args(argv)


def main(argv=None) -> int:
  args, beam_args = parse(argv)
  setup_logging()
  log = logging.getLogger("prepare")
  paths = []
  for pattern in args.input:
    found = sorted(glob.glob(pattern))
    if not found:
      log.error("%s: no such file", pattern)
      return 2
    paths += found
  source = data.Source(
      args.source, paths=tuple(paths), text_column=args.text_column,
      pair_column=args.pair_column, label_column=args.label_column,
      label_names=tuple(args.label_names.split(",")) if args.label_names else None,
      regression=args.regression, encoding=args.encoding, drop_empty=args.drop_empty,
      tfds_name=args.tfds_name, split=args.split, data_dir=args.data_dir,
      text_key=args.text_key)
  if beam_args and not any(a.startswith("--runner") for a in beam_args):
    beam_args = data.default_beam_args() + beam_args
  try:
    prepared = data.prepare_corpus(source, args.output,
                                   tokenizer_path=resolve_model_path(args.tokenizer),
                                   max_length=args.max_length, beam_args=beam_args or None,
                                   overwrite=args.overwrite)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    log.error("%s", e)
    return 2
  m = prepared.manifest
  print(f"prepared {args.output}: {m['examples']} examples, {m['tokens']} tokens, "
        f"{len(m['shards'])} shards, {m['truncated']} truncated, in {m['seconds']} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
