"""Fine-tune a MiniLM as a UniLM sequence-to-sequence model: question generation, summarisation,
or any (source, target) text pairs.

  python -m train.seq2seq --config seq2seq_toy             # learnable toy task, minutes on CPU
  python -m train.seq2seq --config seq2seq_qg --data.train_path=... --data.eval_path=...
  python -m train.seq2seq --config seq2seq_qg --decode.beam_size=1 --loop.resume=true

Parse config -> load an MLM model and (source, target) pairs -> evaluate the untrained model ->
`trainer.train` with `seq2seq.objective` -> predictions.jsonl, metrics.json, final/, hf/.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from typing import Literal

import flax.nnx as nnx
import jax
import numpy as np

from minilm_jax import data, decoding, finetune, pretrained, seq2seq, sharding, squad, trainer
from minilm_jax.optim import OptimConfig
from minilm_jax.recipes.finetune import ModelSpec, resolve_model_path
from train import cli

log = logging.getLogger("seq2seq")


@dataclasses.dataclass(frozen=True)
class DataSpec:
  # jsonl: {"source", "target"} lines; squad_json: SQuAD-format files -> ((paragraph, answer),
  # question); toy: generated word sequences whose target is a function of the source.
  source: Literal["jsonl", "squad_json", "toy"] = "jsonl"
  train_path: str = ""
  eval_path: str = ""
  max_train_examples: int = 0           # 0: all
  max_eval_examples: int = 0
  # toy data
  toy_task: Literal["reverse", "copy", "first3"] = "reverse"
  toy_train_examples: int = 4000
  toy_eval_examples: int = 200
  toy_min_words: int = 3
  toy_max_words: int = 8


@dataclasses.dataclass(frozen=True)
class Seq2SeqRunConfig:
  model: ModelSpec = ModelSpec()
  data: DataSpec = DataSpec()
  objective: seq2seq.Seq2SeqConfig = seq2seq.Seq2SeqConfig()
  decode: decoding.DecodeConfig = decoding.DecodeConfig()
  optim: OptimConfig = OptimConfig()
  loop: trainer.LoopConfig = trainer.LoopConfig(output_dir="runs/seq2seq", best_metric="bleu4")
  eval_untrained: bool = True           # score the starting model first: the baseline
  export_hf: bool = True


# --- data --------------------------------------------------------------------------------

# Common lowercase words, one WordPiece token each in the BERT uncased vocabulary.
TOY_WORDS = tuple("""
time year people way day man thing woman life child world school state family student group
country problem hand part place case week company system program question work government number
night point home water room mother area money story fact month lot right study book eye job word
business issue side kind head house service friend father power hour game line end member law car
city name president team minute idea kid body information back parent face others level office
door health person art war history party result change morning reason research girl guy moment
air teacher force education foot boy age policy music market sense nation plan college interest
death experience effect class control care field development role effort rate heart drug show
leader light voice wife police mind price report decision son view relationship town road arm
""".split())


def toy_pairs(task: str, n: int, seed: int, min_words: int, max_words: int
              ) -> list[tuple[str, str]]:
  """Random word sequences; target = the words reversed, copied, or the first three."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    words = list(rng.choice(TOY_WORDS, int(rng.integers(min_words, max_words + 1))))
    target = {"reverse": words[::-1], "copy": words, "first3": words[:3]}[task]
    out.append((" ".join(words), " ".join(target)))
  return out


def load_pairs(spec: DataSpec, seed: int):
  if spec.source == "toy":
    args = (spec.toy_task, spec.toy_min_words, spec.toy_max_words)
    train = toy_pairs(args[0], spec.toy_train_examples, seed, *args[1:])
    evals = toy_pairs(args[0], spec.toy_eval_examples, seed + 1_000_003, *args[1:])
  elif spec.source == "jsonl":
    train = seq2seq.read_pairs_jsonl(spec.train_path)
    evals = seq2seq.read_pairs_jsonl(spec.eval_path) if spec.eval_path else []
  elif spec.source == "squad_json":
    train = seq2seq.squad_qg_pairs(squad.read_squad_json(spec.train_path))
    evals = (seq2seq.squad_qg_pairs(squad.read_squad_json(spec.eval_path)) if spec.eval_path
             else [])
  else:
    raise ValueError(f"unknown data.source {spec.source!r}")
  return _cap(train, spec.max_train_examples, seed), _cap(evals, spec.max_eval_examples, seed)


def _cap(pairs, n, seed):
  if not n or n >= len(pairs):
    return pairs
  keep = np.sort(np.random.default_rng(seed).permutation(len(pairs))[:n])
  return [pairs[i] for i in keep]


# --- main --------------------------------------------------------------------------------

def run(cfg: Seq2SeqRunConfig) -> dict:
  out_dir = cli.start_run(cfg, cfg.loop)
  model_path = resolve_model_path(cfg.model.path)
  m = pretrained.from_pretrained(model_path, "mlm", seed=cfg.loop.seed,
                                **cfg.model.overrides())
  tok, mcfg = m.tokenizer, m.config

  s2s, dec = cfg.objective, cfg.decode
  if s2s.max_source_len + max(s2s.max_target_len, dec.max_length) > mcfg.max_length:
    raise ValueError(
        f"objective.max_source_len {s2s.max_source_len} + target length "
        f"{max(s2s.max_target_len, dec.max_length)} exceeds the model's {mcfg.max_length} "
        "positions (targets are placed after the source)")
  train_pairs, eval_pairs = load_pairs(cfg.data, cfg.loop.seed)
  if not train_pairs:
    raise ValueError("no training pairs")
  hosts = dict(process_index=jax.process_index(), process_count=jax.process_count())
  train_batches = data.ArrayBatches(seq2seq.encode_pairs(tok, train_pairs, s2s),
                                    batch_size=cfg.loop.batch_size, seed=cfg.loop.seed,
                                    shuffle=True, drop_remainder=cfg.loop.drop_remainder,
                                    **hosts)
  eval_batches = None
  if eval_pairs:
    eval_batches = data.ArrayBatches(seq2seq.encode_pairs(tok, eval_pairs, s2s),
                                     batch_size=cfg.loop.eval_batch_size, shuffle=False,
                                     **hosts)
  log.info("train %d pairs (%d batches/epoch), eval %d; e.g. %r -> %r", len(train_pairs),
           train_batches.batches_per_epoch, len(eval_pairs), *train_pairs[0])

  predictions: dict[int, str] = {}

  def keep_predictions(index, texts):
    predictions.clear()
    predictions.update(zip((int(i) for i in index), texts))

  objective = finetune.seq2seq(tok, s2s, dec, references=[p[1] for p in eval_pairs] or None,
                                lowercase=mcfg.do_lower_case, on_predictions=keep_predictions)
  mesh = sharding.make_mesh(cfg.loop.mesh_data, cfg.loop.mesh_fsdp)
  untrained = None
  if cfg.eval_untrained and eval_batches is not None:
    t0 = time.perf_counter()
    graphdef, params = nnx.split(m.model)
    eval_step = jax.jit(trainer.make_eval_step(graphdef, objective))
    untrained = trainer.run_eval(eval_step, params, eval_batches, objective, mesh)
    untrained["eval_seconds"] = time.perf_counter() - t0
    log.info("untrained: %s", cli.rounded(untrained))

  best_dir = out_dir / "best"

  def on_eval(model, metrics, is_best):
    if is_best:
      pretrained.Pretrained(model, mcfg, tok, model_path, "mlm").save(best_dir)

  t0 = time.perf_counter()
  res = trainer.train(m.model, objective, train_batches, cfg.loop, cfg.optim,
                      eval_batches=eval_batches, on_eval=on_eval,
                      mesh=mesh)
  train_seconds = time.perf_counter() - t0

  if predictions and jax.process_index() == 0:
    with (out_dir / "predictions.jsonl").open("w") as f:
      for i in sorted(predictions):
        src = eval_pairs[i][0]
        f.write(json.dumps({"source": src if isinstance(src, str) else list(src),
                            "reference": eval_pairs[i][1], "prediction": predictions[i]}) + "\n")
  # Preempted: the checkpoint is the output (no half-trained final/ or hf/); both collective.
  if not res.preempted:
    pretrained.Pretrained(res.model, mcfg, tok, model_path, "mlm").save(out_dir / "final")
    if cfg.export_hf:
      pretrained.export_hf(res.model, mcfg, out_dir / "hf", task="mlm", tokenizer_dir=model_path)
  summary = {"final": res.evals[-1] if res.evals else None, "best": res.best,
             "untrained": untrained, "steps": int(res.state["step"]),
             "train_seconds": train_seconds, "preempted": res.preempted}
  cli.update_metrics(out_dir, summary)
  return summary


def _report(summary: dict, cfg: Seq2SeqRunConfig) -> None:
  if summary.get("untrained"):
    print(f"untrained: {cli.rounded(summary['untrained'])}")
  print(f"after {summary['steps']} steps ({summary['train_seconds']:.0f} s): "
        f"{cli.rounded(summary['final'])}")
  if summary.get("best"):
    print(f"best: {cli.rounded(summary['best'])}")
  print(cli.outputs_line(cfg.loop.output_dir))


def main(argv=None) -> int:
  return cli.launch(Seq2SeqRunConfig, run, argv, default="seq2seq_toy", doc=__doc__,
                    report=_report)


if __name__ == "__main__":
  sys.exit(main())
