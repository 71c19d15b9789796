"""The attention kernels (`minilm_jax.attention`) against XLA's dense core, on CPU.

Splash (TPU) runs in Pallas' interpreter (`pallas_interpret`), cuDNN's call through
`jax.nn.dot_product_attention(implementation="xla")` (`cudnn.IMPLEMENTATION`), with the
backend seen by `attention.platform()` set to the kernel's, so that `attention_impl="auto"` is
what picks them. Compared: hidden states at real positions and gradients, through the encoder
and through the MiniLM v1/v2 losses, for key-padding, packed and (B,T,S) masks.
"""

from __future__ import annotations

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_parity, count_loops, random_batch

from minilm_jax import attention, distillation, trainer
from minilm_jax.attention import cudnn
from minilm_jax.config import TINY
from minilm_jax.model import Encoder

CFG = TINY.replace(attention_dropout=0.0, hidden_dropout=0.0, inference_chunk_tokens=0)
BOUND = {"float32": 1e-5, "bfloat16": 2e-2}  # relative to the compared values' magnitude
KERNEL_BACKEND = {"splash": "tpu", "cudnn": "gpu"}


def _on(monkeypatch, kernel: str):
  monkeypatch.setattr(jax, "default_backend", lambda: KERNEL_BACKEND[kernel])
  monkeypatch.setattr(cudnn, "IMPLEMENTATION", "xla")


def _inputs(mask: str, batch: int = 2, length: int = 12) -> tuple[dict, np.ndarray]:
  """Encoder kwargs for a mask kind, and the (B,T) positions whose outputs count."""
  b = random_batch(CFG, batch, length, seed=1)
  if mask == "padded":
    return {k: jnp.asarray(v) for k, v in b.items()}, b["attention_mask"] > 0
  if mask == "packed":  # row 0: segments of 5, 4 and 3 tokens; row 1: 7 and 2, then padding
    seg = np.array([[1] * 5 + [2] * 4 + [3] * 3, [1] * 7 + [2] * 2 + [0] * 3], np.int32)
    return {"input_ids": jnp.asarray(b["input_ids"]), "segment_ids": jnp.asarray(seg)}, seg > 0
  # (B,T,S): UniLM's seq2seq mask, source of 5 seen by all, causal target after it.
  t = np.arange(length)
  full = (t[None, :] < 5) | (t[None, :] <= t[:, None])
  full = np.broadcast_to(full, (batch, length, length)).astype(np.int32)
  return {"input_ids": jnp.asarray(b["input_ids"]), "attention_mask": jnp.asarray(full)}, \
      np.ones((batch, length), bool)


def _forward_and_grads(cfg, kwargs, real):
  enc = Encoder(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(enc)
  w = jax.random.normal(jax.random.PRNGKey(3), (*real.shape, cfg.hidden_size))
  w = w * jnp.asarray(real)[..., None]

  def f(params):
    hidden, _ = nnx.merge(graphdef, params)(**kwargs)
    return jnp.sum(hidden.astype(jnp.float32) * w), hidden
  (_, hidden), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
  return np.asarray(hidden, np.float32), jax.tree.map(lambda g: np.asarray(g, np.float32), grads)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mask", ["padded", "packed", "seq2seq"])
@pytest.mark.parametrize("kernel", ["splash", "cudnn"])
def test_kernel_matches_dense_through_the_encoder(monkeypatch, kernel, mask, dtype):
  cfg = CFG.replace(dtype=dtype, pallas_interpret=True)
  kwargs, real = _inputs(mask)
  want = _forward_and_grads(cfg.replace(attention_impl="xla", attention_query_block=0), kwargs,
                            real)
  _on(monkeypatch, kernel)
  # Splash serves segment masks; a (B,T,S) mask falls back to XLA (cuDNN takes any bias, in
  # 16-bit dtypes only).
  fused = kernel == "cudnn" and dtype != "float32" or kernel == "splash" and mask != "seq2seq"
  masks = {k: v for k, v in kwargs.items() if k in ("attention_mask", "segment_ids")}
  assert attention.choose(cfg, attention.Mask.of(**masks), False) == (kernel if fused else "xla")
  if kernel == "splash":
    traced = str(jax.make_jaxpr(lambda: Encoder(cfg, rngs=nnx.Rngs(0))(**kwargs)[0])())
    assert ("pallas_call" in traced) == fused
  got = _forward_and_grads(cfg, kwargs, real)
  bound = BOUND[dtype]
  assert_parity(got[0], want[0], bound, real[..., None], f"{kernel} {mask} {dtype} hidden")
  _check_grads(got[1], want[1], bound, f"{kernel} {mask} {dtype}")


def _check_grads(got, want, bound: float, what: str, zero_key_bias: bool = True) -> None:
  """Each gradient leaf to `bound` relative to its magnitude, but the key biases': a key bias
  shifts a query's logits by a constant, so its gradient is 0 in exact arithmetic and both
  sides hold rounding noise. Those must be noise: under `bound` relative to the largest."""
  scale = max(float(np.abs(w).max()) for w in jax.tree.leaves(want))
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    name = jax.tree_util.keystr(path)
    if zero_key_bias and "['k']['bias']" in name:
      assert max(np.abs(g).max(), np.abs(w).max()) < bound * scale, (what, name)
    else:
      assert_parity(g, w, bound, what=f"{what} grad {name}")


@pytest.mark.parametrize("objective", ["minilm_v1", "minilm_v2"])
def test_splash_student_and_teacher_give_the_dense_distillation_loss(monkeypatch, objective):
  """The relation losses read q/k/v, which the fused kernels return like the dense one (their
  attention comes from q/k, not from logits splash never forms): same loss, same gradients."""
  kwargs, real = _inputs("packed")
  batch = {**{k: np.asarray(v) for k, v in kwargs.items()}, "weights": np.ones(2, np.float32),
           "token_type_ids": np.zeros_like(kwargs["input_ids"])}

  def loss_and_grads(cfg):
    teacher = Encoder(cfg, rngs=nnx.Rngs(0))
    student = Encoder(cfg.replace(num_layers=1), rngs=nnx.Rngs(1))
    obj = (distillation.minilm_v1(teacher) if objective == "minilm_v1"
           else distillation.minilm_v2(teacher, num_relation_heads=2))
    graphdef, params = nnx.split(student)

    def f(params):
      per_example, _ = obj.loss_fn(nnx.merge(graphdef, params), batch, None, obj.frozen)
      return per_example.mean()
    return jax.jit(jax.value_and_grad(f))(params)

  want = loss_and_grads(CFG.replace(attention_impl="xla", attention_query_block=0))
  _on(monkeypatch, "splash")
  got = loss_and_grads(CFG.replace(pallas_interpret=True))
  assert float(want[0]) > 0
  # A KL is cross-entropy minus entropy: its relative error is that of its terms times their
  # ratio to it (1.2e-5 measured on AMD EPYC for v1 here, where q/k/v agree to ~1e-6).
  assert_parity(got[0], want[0], 5e-5, what=f"{objective} loss")
  # v2's K-K relations see the key biases; v1's attention distributions do not (0 gradient).
  _check_grads(got[1], want[1], 1e-5, objective, zero_key_bias=objective == "minilm_v1")


def test_forced_kernels_off_their_backend_are_clear_errors():
  kwargs, _ = _inputs("padded")
  for impl, words in (("splash", "TPU kernel and this backend is cpu"),
                      ("cudnn", "needs a GPU and this backend is cpu")):
    with pytest.raises(ValueError, match=f"attention_impl='{impl}' cannot run here: it .*"
                       f"{words}.*Alternatives: attention_impl='auto'.*'xla'"):
      Encoder(CFG.replace(attention_impl=impl), rngs=nnx.Rngs(0))(**kwargs)
  train = CFG.replace(attention_impl="splash", pallas_interpret=True, attention_dropout=0.1)
  with pytest.raises(ValueError, match="no attention dropout.*set attention_dropout=0"):
    Encoder(train, rngs=nnx.Rngs(0))(**kwargs, dropout_rng=jax.random.PRNGKey(0))
  seq2seq, _ = _inputs("seq2seq")
  with pytest.raises(ValueError, match=r"not a \(B,T,S\) mask"):
    Encoder(CFG.replace(attention_impl="splash", pallas_interpret=True),
            rngs=nnx.Rngs(0))(**seq2seq)
  with pytest.raises(ValueError, match="attention_impl must be one of auto, xla, splash, cudnn"):
    CFG.replace(attention_impl="flash")


def test_tpu_lowering_of_train_step_and_inference_has_no_cpu_loops(monkeypatch):
  """Traced as for a TPU (and lowered for one: JAX lowers Pallas TPU kernels without a TPU),
  the train step and the inference forward run splash with no query-block or chunk loop; the
  same functions traced for CPU keep the CPU loops."""
  cfg = CFG.replace(inference_chunk_tokens=None, attention_query_block=None)
  model = Encoder(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  big = {k: jnp.tile(jnp.asarray(v), (80, 4)) for k, v in random_batch(cfg, 3, 9).items()}
  infer = lambda p, b: nnx.merge(graphdef, p)(**b)[0]  # noqa: E731
  assert count_loops(jax.make_jaxpr(lambda p, b: infer(p, b))(params, big).jaxpr) >= 2
  tx = optax.adamw(1e-3)
  enc_step = trainer.make_train_step(graphdef, _encoder_objective(), tx, lambda s: 1e-3)
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
           "rng": jax.random.PRNGKey(0), "nonfinite": jnp.zeros((), jnp.int32)}
  small = {k: v[:8] for k, v in big.items()} | {"weights": jnp.ones(8)}

  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  for name, fn, args in (("inference", infer, (params, big)),
                         ("train step", enc_step, (state, small, None))):
    jaxpr = jax.make_jaxpr(lambda *a, fn=fn: fn(*a))(*args)
    assert count_loops(jaxpr.jaxpr) == 0, name
    assert "pallas_call" in str(jaxpr), name
    hlo = jax.jit(lambda *a, fn=fn: fn(*a)).trace(*args).lower(
        lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in hlo and "stablehlo.while" not in hlo, name


def _encoder_objective() -> trainer.Objective:
  """A per-example loss on the encoder's hidden states: the step around the encoder is what
  the test inspects."""
  def loss_fn(model, batch, rng, frozen):
    hidden, _ = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                      dropout_rng=rng)
    return jnp.mean(jnp.square(hidden), axis=(1, 2)), {}
  return trainer.Objective(loss_fn=loss_fn)


def test_splash_runs_per_device_under_a_training_mesh():
  """Under `activation_sharding` on 8 devices splash runs inside shard_map on the batch axes
  (a Pallas call has no GSPMD rule and would be gathered whole on every device) and gives the
  single-device values."""
  from test_sharding import run_on_8_devices
  out = run_on_8_devices("""
    import flax.nnx as nnx, jax, jax.numpy as jnp, numpy as np
    from minilm_jax import sharding
    from minilm_jax.config import TINY
    from minilm_jax.model import Encoder
    jax.default_backend = lambda: "tpu"  # what attention_impl="auto" decides by
    cfg = TINY.replace(pallas_interpret=True, inference_chunk_tokens=0)
    graphdef, state = nnx.split(Encoder(cfg, rngs=nnx.Rngs(0)))
    ids = jnp.asarray(np.random.default_rng(0).integers(5, 100, (8, 12)), jnp.int32)
    seg = jnp.asarray(np.repeat([[1] * 6 + [2] * 4 + [0] * 2], 8, 0), jnp.int32)
    fwd = lambda s, ids, seg: nnx.merge(graphdef, s)(ids, segment_ids=seg)[0]
    alone = jax.jit(lambda *a: fwd(*a))(state, ids, seg)
    mesh = sharding.make_mesh(8, 1)
    with sharding.activation_sharding(mesh):
      jaxpr = str(jax.make_jaxpr(lambda *a: fwd(*a))(state, ids, seg))
      assert jaxpr.count("shard_map") == TINY.num_layers and "pallas_call" in jaxpr
      got = jax.jit(lambda *a: fwd(*a))(state, ids, seg)
    real = np.asarray(seg)[..., None] > 0
    err = np.abs(np.asarray(got) - np.asarray(alone))[np.broadcast_to(real, got.shape)].max()
    assert err <= 1e-6 * np.abs(np.asarray(alone)).max(), err
    print("ok")
  """)
  assert out.strip().endswith("ok")
