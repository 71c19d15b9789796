"""Shardings on 8 forced host devices (each test in a subprocess: the device count is fixed when
JAX starts): the train state is created sharded, and activations carry logical constraints
while the loop traces its steps."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_on_8_devices(code: str) -> str:
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stdout + res.stderr
  return res.stdout


def test_train_state_is_created_sharded():
  """Under FSDP on a 4 x 2 mesh, init_state's one jit creates params and AdamW moments with the
  params' logical shardings and replicated counters; nothing is built on one device first."""
  out = run_on_8_devices("""
    import jax
    from minilm_jax import pretrained, sharding, trainer
    from minilm_jax.config import TINY
    from minilm_jax.optim import OptimConfig
    mesh = sharding.make_mesh(4, 2)
    model = pretrained.build(TINY, "classification", 2)
    _, state, _, _ = trainer.init_state(model, OptimConfig(), 10, 0, mesh=mesh,
                                        rules=sharding.RULES_FSDP)
    params = jax.tree.leaves(state["params"])
    adam = state["opt_state"][1][0]  # clip, then (ScaleByAdamState, ...)
    for p, mu, nu in zip(params, jax.tree.leaves(adam.mu), jax.tree.leaves(adam.nu)):
      assert mu.sharding == p.sharding == nu.sharding, (p.sharding, mu.sharding)
    assert any("fsdp" in str(p.sharding.spec) for p in params)
    assert adam.count.sharding.is_fully_replicated and len(adam.count.devices()) == 8
    for k in ("step", "rng", "nonfinite"):
      assert state[k].sharding.is_fully_replicated and len(state[k].devices()) == 8
    print("ok")
  """)
  assert out.strip().endswith("ok")


def test_activations_are_constrained_by_logical_names_inside_the_loop():
  """Inside `activation_sharding` the encoder's hidden states carry with_sharding_constraint
  (embeddings + one per layer), split by batch only, also under FSDP; outside it, none. The
  constrained forward computes the same values."""
  out = run_on_8_devices("""
    import flax.nnx as nnx, jax, jax.numpy as jnp, numpy as np
    from minilm_jax import sharding
    from minilm_jax.config import TINY
    from minilm_jax.model import Encoder
    enc = Encoder(TINY.replace(inference_chunk_tokens=0), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(enc)
    ids = jnp.ones((8, 6), jnp.int32)
    fwd = lambda s, ids: nnx.merge(graphdef, s)(ids)[0]
    # Constraints are decided when a function is traced: a fresh function per trace (jit and
    # make_jaxpr cache traces by function).
    count = lambda: str(jax.make_jaxpr(lambda s, i: fwd(s, i))(state, ids)).count(
        "sharding_constraint")
    plain = jax.jit(lambda s, i: fwd(s, i))(state, ids)
    assert count() == 0
    for data, fsdp, rules in ((8, 1, sharding.RULES_DP), (4, 2, sharding.RULES_FSDP)):
      mesh = sharding.make_mesh(data, fsdp)
      with sharding.activation_sharding(mesh, rules):
        assert count() == TINY.num_layers + 1, count()
        got = jax.jit(lambda s, i: fwd(s, i))(state, ids)
        assert got.sharding.is_equivalent_to(sharding.batch_sharding(mesh), got.ndim), got.sharding
      np.testing.assert_allclose(np.asarray(got), np.asarray(plain), rtol=1e-6, atol=1e-6)
    print("ok")
  """)
  assert out.strip().endswith("ok")
