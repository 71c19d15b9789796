"""Sentence-embedding training and encoding, ours against sentence-transformers' PyTorch.

  python -m bench.contrastive                          # all three cases, fp32 and bf16
  python -m bench.contrastive --case step --batch 64 --dtype bfloat16
  python -m bench.contrastive --case memory --batch 512

Real text: the (summary, description) pairs of the installed manual pages (data/manpages.py).
  step    one training step on the packaged all-MiniLM-L6-v2: ours is `trainer.make_train_step`
          with `contrastive.objective` (in-batch negatives, scale 20, mean pooling + normalise)
          and AdamW; theirs `SentenceTransformer` in train mode, `MultipleNegativesRankingLoss`,
          backward, `torch.optim.AdamW`. The same tokenised batch (padded to its longest text),
          dropout 0.1 in both. bf16: our bfloat16 compute against torch.autocast(bfloat16).
  encode  `Pretrained.encode` against `SentenceTransformer.encode` over the descriptions, same
          batch size, same max_seq_length (256).
  memory  GradCache: `compiled.memory_analysis()` of the direct step and of the cached one
          (chunks of `--chunk` texts) at `--batch` pairs: temporaries and total.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from bench import common


def pairs(n: int) -> list[dict]:
  from minilm_jax.data import manpages
  out = [p for p in manpages.read_pairs() if not p["page"].startswith(manpages.GENERATED)]
  return (out * (n // len(out) + 1))[:n]


def tokenised(tok, texts, max_length=128) -> dict:
  enc = tok(texts, max_length=max_length)  # padded to the longest
  return {k: np.asarray(enc[k], np.int32) for k in ("input_ids", "attention_mask",
                                                     "token_type_ids")}


def step_case(args, dtype: str):
  import jax
  import torch
  from sentence_transformers import SentenceTransformer
  from sentence_transformers.sentence_transformer import losses as st_losses

  from minilm_jax import contrastive, pretrained, trainer
  from minilm_jax.optim import OptimConfig
  model_dir = pretrained.packaged_checkpoint()
  m = pretrained.from_pretrained(model_dir, dtype=dtype)
  rows = pairs(args.batch)
  a = tokenised(m.tokenizer, [r["summary"] for r in rows])
  p = tokenised(m.tokenizer, [r["description"] for r in rows])
  host = {f"anchor_{k}": v for k, v in a.items()} | {f"positive_{k}": v for k, v in p.items()}
  host["positive_text_id"] = np.arange(args.batch, dtype=np.int32)
  host["weights"] = np.ones(args.batch, np.float32)
  optim = OptimConfig(learning_rate=2e-5, warmup_steps=10)
  graphdef, state, tx, schedule = trainer.init_state(m.model, optim, 10_000, 0)
  step = jax.jit(trainer.make_train_step(graphdef, contrastive.objective(m.pooling), tx,
                                         schedule), donate_argnums=0)
  batch = jax.device_put(host)
  box = {"state": state}

  def ours():
    box["state"], metrics = step(box["state"], batch)
    return jax.block_until_ready(metrics)

  st = SentenceTransformer(str(model_dir), device="cpu").train()
  loss = st_losses.MultipleNegativesRankingLoss(st, scale=20.0)
  opt = torch.optim.AdamW(st.parameters(), lr=2e-5)
  feats = [{k: torch.from_numpy(v.astype(np.int64)) for k, v in x.items()} for x in (a, p)]

  def theirs():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      value = loss(feats, None)
    value.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return value

  return ours, theirs, a["input_ids"].shape[1], p["input_ids"].shape[1]


def encode_case(args, dtype: str):
  import torch
  from sentence_transformers import SentenceTransformer

  from minilm_jax import pretrained
  model_dir = pretrained.packaged_checkpoint()
  m = pretrained.from_pretrained(model_dir, dtype=dtype)
  texts = [r["description"] for r in pairs(args.texts)]
  st = SentenceTransformer(str(model_dir), device="cpu")

  def ours():
    return m.encode(texts, batch_size=args.batch, show_progress=False)

  def theirs():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      return st.encode(texts, batch_size=args.batch, show_progress_bar=False)

  return ours, theirs, texts


def memory_case(args) -> None:
  import flax.nnx as nnx
  import jax
  import jax.numpy as jnp

  from minilm_jax import contrastive, pretrained
  m = pretrained.from_pretrained(pretrained.packaged_checkpoint())
  graphdef, params = nnx.split(m.model)
  b, t = args.batch, 128
  ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
  batch = {f"{r}_{k}": ids for r in ("anchor", "positive")
           for k in ("input_ids", "attention_mask", "token_type_ids")}
  batch |= {"positive_text_id": jax.ShapeDtypeStruct((b,), jnp.int32),
            "weights": jax.ShapeDtypeStruct((b,), jnp.float32)}
  direct = contrastive.objective(m.pooling)

  def direct_grads(params, batch):
    def weighted(params):
      per, _ = direct.loss_fn(nnx.merge(graphdef, params), batch, None)
      return jnp.sum(per * batch["weights"]) / batch["weights"].sum()
    return jax.value_and_grad(weighted)(params)

  cached = contrastive.objective(m.pooling, grad_cache_chunk=args.chunk)
  cached_grads = lambda params, batch: cached.loss_and_grads(graphdef, params, batch, None)
  print(f"\nGradCache memory, B{b} pairs x S{t}, chunks of {args.chunk} texts "
        "(compiled.memory_analysis(), XLA:CPU):")
  for name, fn in (("direct", direct_grads), ("GradCache", cached_grads)):
    t0 = time.perf_counter()
    mem = jax.jit(fn).lower(params, batch).compile().memory_analysis()
    print(f"  {name:10s} temporaries {mem.temp_size_in_bytes / 2**20:9.1f} MiB, arguments "
          f"{mem.argument_size_in_bytes / 2**20:7.1f} MiB, outputs "
          f"{mem.output_size_in_bytes / 2**20:7.1f} MiB (compiled in "
          f"{time.perf_counter() - t0:.0f} s)", flush=True)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--case", choices=("all", "step", "encode", "memory"), default="all")
  p.add_argument("--dtype", choices=("both", "float32", "bfloat16"), default="both")
  p.add_argument("--batch", type=int, default=0, help="pairs (step, memory) or texts (encode) a "
                 "batch; default 32 / 64 / 512")
  p.add_argument("--texts", type=int, default=1024, help="encode: texts encoded per call")
  p.add_argument("--chunk", type=int, default=32, help="memory: GradCache chunk (texts)")
  common.add_args(p, repeats=5, warmup=2)
  args = p.parse_args(argv)
  common.setup_torch()
  print(common.describe_env())
  print(f"command: {common.command_line()}")
  dtypes = ("float32", "bfloat16") if args.dtype == "both" else (args.dtype,)
  cases = ("step", "encode", "memory") if args.case == "all" else (args.case,)
  for case in cases:
    if case == "memory":
      args.batch = args.batch if args.case == "memory" and args.batch else 512
      memory_case(args)
      continue
    for dtype in dtypes:
      if case == "step":
        args.batch = args.batch if args.case == "step" and args.batch else 32
        ours, theirs, ta, tp = step_case(args, dtype)
        what = f"step B{args.batch} pairs (anchors S{ta}, positives S{tp})"
      else:
        args.batch = args.batch if args.case == "encode" and args.batch else 64
        ours, theirs, texts = encode_case(args, dtype)
        what = f"encode {len(texts)} descriptions, batch {args.batch}"
      t = common.interleaved({"ours": ours, "theirs": theirs}, args.repeats, args.warmup)
      o, s = common.med(t["ours"]), common.med(t["theirs"])
      print(f"{what}, {dtype}: ours {o * 1e3:8.1f} ms ({common.spread(t['ours'])}), "
            f"sentence-transformers {s * 1e3:8.1f} ms ({common.spread(t['theirs'])}): "
            f"{s / o:.2f}x", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
