"""Bench-local model variants: candidate performance changes measured without touching the library.

Each variant monkeypatches `minilm_jax.model` in the benchmark process only, keeps the parameter
layout (so the same weights and the parity check still apply) and returns the same intermediates.
A variant that wins is proposed to the model owner as a diff; see bench/README.md.

  none        the library as it is
  fused_qkv   one (D, 3N, H) projection instead of three: the kernels are concatenated inside
              the jitted function (a 3*D*D copy per layer), one larger matmul instead of three
  bnth        projections emit (B, N, T, H) directly, so the attention matmuls see batch dims
              first and XLA needs no transposes around them; q/k/v intermediates are transposed
              back to (B, T, N, H) only if a caller reads them (dead code otherwise)
  fused_bnth  both of the above
  dpa         jax.nn.dot_product_attention(implementation="xla") for the attention core
  softmax_bsnh  the attention the library had before adopting this file's old "fast_attn"
              (heads-major operands, deferred softmax normalisation: 1.6x at S128): (B,T,N,H)
              einsums around a full softmax
  bits_dropout  dropout masks from raw uint32 bits compared with an integer threshold instead of
              bernoulli's uniform floats (inference unaffected)
  threefry_dropout  dropout masks from jax.random.bernoulli (threefry), what the library did
              before it adopted the counter-hash masks of `ops.dropout` (1.19x on the CPU
              fine-tuning step)
Combine with "+": e.g. softmax_bsnh+threefry_dropout (the library as it was).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from minilm_jax import heads as H
from minilm_jax import model as M
from minilm_jax.attention import as_mask
from minilm_jax.attention import xla as A

_ORIGINAL = {"attn_call": M.Attention.__call__, "dropout": M.dropout}


def _attention_core(cfg, q, k, v, bias, dropout_rng, layout: str):
  """q, k, v in `layout` ("BTNH" or "BNTH") -> context in the same layout, plus logits."""
  if layout == "BTNH":
    logits_eqn, ctx_eqn = "BTNH,BSNH->BNTS", "BNTS,BSNH->BTNH"
  else:
    logits_eqn, ctx_eqn = "BNTH,BNSH->BNTS", "BNTS,BNSH->BNTH"
  logits = jnp.einsum(logits_eqn, q, k, preferred_element_type=jnp.float32)
  logits = logits / math.sqrt(cfg.head_dim) + bias
  probs = jax.nn.softmax(logits, axis=-1).astype(cfg.compute_dtype)
  probs = M.dropout(probs, cfg.attention_dropout, dropout_rng)
  return jnp.einsum(ctx_eqn, probs, v), logits


def _make_call(fused: bool, layout: str):
  def __call__(self, x, mask, dropout_rng, core=None):
    bias = as_mask(mask).bias
    cfg = self.cfg
    dt = cfg.compute_dtype
    out_eqn = "BTD,DNH->BTNH" if layout == "BTNH" else "BTD,DNH->BNTH"
    if fused:
      kernel = jnp.concatenate([self.q.kernel[...], self.k.kernel[...], self.v.kernel[...]],
                               axis=1).astype(dt)  # (D, 3N, H)
      b = jnp.concatenate([self.q.bias[...], self.k.bias[...], self.v.bias[...]], 0).astype(dt)
      qkv = jnp.einsum(out_eqn, x.astype(dt), kernel)
      axis = 2 if layout == "BTNH" else 1
      qkv = qkv + (b[None, None] if layout == "BTNH" else b[None, :, None])
      q, k, v = jnp.split(qkv, 3, axis=axis)
    else:
      def proj(d):
        y = jnp.einsum(out_eqn, x.astype(dt), d.kernel[...].astype(dt))
        bb = d.bias[...].astype(dt)
        return y + (bb[None, None] if layout == "BTNH" else bb[None, :, None])
      q, k, v = proj(self.q), proj(self.k), proj(self.v)
    ctx, logits = _attention_core(cfg, q, k, v, bias, dropout_rng, layout)
    if layout == "BNTH":
      to_btnh = lambda a: a.transpose(0, 2, 1, 3)  # noqa: E731
      inter = {"q": to_btnh(q), "k": to_btnh(k), "v": to_btnh(v), "attention_logits": logits}
      o = jnp.einsum("BNTH,NHD->BTD", ctx, self.o.kernel[...].astype(dt))
    else:
      inter = {"q": q, "k": k, "v": v, "attention_logits": logits}
      o = jnp.einsum("BTNH,NHD->BTD", ctx, self.o.kernel[...].astype(dt))
    return o + self.o.bias[...].astype(dt), inter
  return __call__


def _softmax_bsnh_call(self, x, mask, dropout_rng, core=None):
  """The library's attention before it moved to heads-major operands and deferred
  normalisation: (B,T,N,H) einsums around a full softmax."""
  bias = as_mask(mask).bias
  cfg = self.cfg
  q, k, v = self.q(x), self.k(x), self.v(x)
  logits = jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=jnp.float32)
  logits = logits / math.sqrt(cfg.head_dim) + bias
  probs = jax.nn.softmax(logits, axis=-1).astype(cfg.compute_dtype)
  probs = M.dropout(probs, cfg.attention_dropout, dropout_rng)
  ctx = jnp.einsum("BNTS,BSNH->BTNH", probs, v)
  return self.o(ctx), {"q": q, "k": k, "v": v, "attention_logits": logits}


def _dpa_call(self, x, mask, dropout_rng, core=None):
  bias = as_mask(mask).bias
  cfg = self.cfg
  if dropout_rng is not None and cfg.attention_dropout > 0:
    raise ValueError("variant dpa has no attention dropout; use it for inference only")
  q, k, v = self.q(x), self.k(x), self.v(x)
  ctx = jax.nn.dot_product_attention(q, k, v, bias=bias.astype(q.dtype), implementation="xla")
  return self.o(ctx), {"q": q, "k": k, "v": v}


def _threefry_dropout(x, rate, rng):
  """The stock mask: jax.random.bernoulli (threefry) over the whole tensor."""
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _bits_dropout(x, rate, rng):
  if rng is None or rate == 0.0:
    return x
  # keep iff bits >= rate * 2^32: one integer compare per element, no float conversion.
  threshold = jnp.uint32(min(int(rate * 2.0**32), 2**32 - 1))
  keep = jax.random.bits(rng, x.shape, jnp.uint32) >= threshold
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


VARIANTS = ("none", "fused_qkv", "bnth", "fused_bnth", "dpa", "softmax_bsnh", "bits_dropout",
            "threefry_dropout")


def apply(name: str) -> None:
  """Installs variant(s) `name` ("a+b" combines); "none" restores the library."""
  M.Attention.__call__ = _ORIGINAL["attn_call"]
  _patch_dropout(_ORIGINAL["dropout"])
  for part in name.split("+"):
    if part == "none":
      continue
    if part == "fused_qkv":
      M.Attention.__call__ = _make_call(True, "BTNH")
    elif part == "bnth":
      M.Attention.__call__ = _make_call(False, "BNTH")
    elif part == "fused_bnth":
      M.Attention.__call__ = _make_call(True, "BNTH")
    elif part == "dpa":
      M.Attention.__call__ = _dpa_call
    elif part == "softmax_bsnh":
      M.Attention.__call__ = _softmax_bsnh_call
    elif part == "bits_dropout":
      _patch_dropout(_bits_dropout)
    elif part == "threefry_dropout":
      _patch_dropout(_threefry_dropout)
    else:
      raise ValueError(f"unknown variant {part!r}; known: {VARIANTS}")


def _patch_dropout(fn) -> None:
  # model.py, attention/xla.py and heads.py look `dropout` up as a module global at call time.
  M.dropout = fn
  A.dropout = fn
  H.dropout = fn


# --- side-by-side comparison --------------------------------------------------------------------

def _forward_cases(preset, batch, seq, dtype, names, with_torch: bool):
  """One jitted forward per variant, each traced while its patch is installed (+ torch)."""
  import flax.nnx as nnx

  from bench import common
  from minilm_jax import pretrained
  from minilm_jax.config import get_preset
  cfg = get_preset(preset, dtype=dtype)
  model = pretrained.build(cfg, "encoder", seed=0)
  graphdef, state = nnx.split(model)
  host = common.random_batch(cfg, batch, seq)
  dev = {k: jax.device_put(v) for k, v in host.items()}
  cases, outs = {}, {}
  for name in names:
    apply(name)

    @jax.jit
    def forward(state, ids, mask, types):
      return nnx.merge(graphdef, state)(ids, mask, types)[0]
    run = lambda f=forward: jax.block_until_ready(  # noqa: E731
        f(state, dev["input_ids"], dev["attention_mask"], dev["token_type_ids"]))
    outs[name] = run()  # traces and compiles under this variant's patch
    cases[name] = run
  apply("none")
  ref = outs[names[0]]
  for name in names[1:]:
    print(f"  {name}: max |out - {names[0]}| = {float(jnp.abs(outs[name] - ref).max()):.1e}")
  if with_torch:
    import numpy as np
    torch = common.setup_torch()
    tm = common.torch_model(model, cfg, "encoder").eval()
    tb = {k: torch.from_numpy(v.astype(np.int64)) for k, v in host.items()}

    def theirs():
      with torch.inference_mode():
        return tm(**tb).last_hidden_state
    cases["torch"] = theirs
  return cfg, cases


def _train_cases(preset, batch, seq, dtype, names, with_torch: bool):
  """One jitted fine-tuning step (trainer.make_train_step) per variant, plus torch's."""
  import numpy as np

  from bench import common
  from bench.train_step import torch_step
  from minilm_jax import finetune, pretrained, trainer
  from minilm_jax.config import get_preset
  from minilm_jax.optim import OptimConfig
  cfg = get_preset(preset, dtype=dtype)
  host = common.random_batch(cfg, batch, seq)
  host["labels"] = np.random.default_rng(1).integers(0, 2, batch).astype(np.int32)
  host["weights"] = np.ones(batch, np.float32)
  dev = {k: jax.device_put(v) for k, v in host.items()}
  optim = OptimConfig(learning_rate=5e-5, warmup_ratio=0.06)
  # Copied to torch before any step: our steps donate (delete) the params they start from.
  tm = common.torch_model(pretrained.build(cfg, "classification", 2, seed=0), cfg,
                          "classification", num_labels=2) if with_torch else None
  cases, losses = {}, {}
  for name in names:
    apply(name)
    model = pretrained.build(cfg, "classification", 2, seed=0)
    graphdef, state, tx, schedule = trainer.init_state(model, optim, 10_000, 0)
    step = jax.jit(trainer.make_train_step(graphdef, finetune.classification(2), tx, schedule),
                   donate_argnums=0)
    box = {"state": state}

    def run(step=step, box=box):
      box["state"], metrics = step(box["state"], dev)
      return jax.block_until_ready((box["state"], metrics))
    losses[name] = float(run()[1]["loss"])  # traces under this variant's patch
    cases[name] = run
  apply("none")
  print("  first-step loss per variant (same weights, same dropout keys): "
        + ", ".join(f"{n} {v:.6f}" for n, v in losses.items()))
  if with_torch:
    common.setup_torch()
    tm.train()
    cases["torch"] = torch_step(tm, host, optim.learning_rate, 10_000, 600)
  return cfg, cases


def main(argv=None) -> int:
  import argparse

  from bench import common
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--variants", nargs="+", default=["none", "fused_qkv", "bnth", "fused_bnth",
                                                   "dpa"])
  p.add_argument("--preset", default="minilm-l12-h384-uncased")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--repeats", type=int, default=6)
  p.add_argument("--no-torch", action="store_true", help="leave transformers' BertModel out")
  p.add_argument("--json", default=None)
  p.add_argument("--bench", default="inference", choices=("inference", "train"),
                 help="forward only, or the fine-tuning step (trainer.make_train_step)")
  args = p.parse_args(argv)
  print(common.describe_env())
  print(f"command: {common.command_line()}")
  names = list(dict.fromkeys(args.variants))
  make = _forward_cases if args.bench == "inference" else _train_cases
  cfg, cases = make(args.preset, args.batch, args.seq, args.dtype, names, not args.no_torch)
  cpu = {}
  times = common.interleaved(cases, args.repeats, warmup=1, cpu=cpu)
  first = names[0]
  base, base_min, base_cpu = (common.med(times[first]), min(times[first]),
                              common.med(cpu[first]))
  flops = common.forward_flops(cfg, args.seq) * args.batch * (3 if args.bench == "train" else 1)
  rows = {}
  for name, ts in times.items():
    t = common.med(ts)
    rows[name] = {"seq_s": args.batch / t, "gflops": flops / t / 1e9,
                  "speedup": base / t, "speedup_min": base_min / min(ts),
                  "speedup_cpu": base_cpu / common.med(cpu[name]), "spread": common.spread(ts)}
    if "torch" in times:
      rows[name]["vs_torch"] = common.med(times["torch"]) / t
    print(f"{name:>14}: {args.batch / t:7.1f} seq/s  {flops / t / 1e9:6.1f} GFLOP/s  "
          + (f"ours/torch {rows[name]['vs_torch']:.3f}x  " if "torch" in times else "")
          + f"vs {first}: median {base / t:.3f}x, min {base_min / min(ts):.3f}x, "
          f"cpu-time {base_cpu / common.med(cpu[name]):.3f}x  (wall {common.spread(ts)}, "
          f"cpu {common.spread(cpu[name])})")
  common.emit({"bench": "variants", "kind": args.bench, "preset": args.preset,
               "batch": args.batch, "seq": args.seq, "dtype": args.dtype, "rows": rows,
               "command": common.command_line()}, args.json)
  return 0


if __name__ == "__main__":
  import sys
  sys.exit(main())
