"""Sentence-embedding training against sentence-transformers (the reference): pooling, the
in-batch-negatives loss with hard negatives, symmetric and Matryoshka variants, the
sentence-transformers export, and global negatives over 8 devices."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import assert_parity, check_error, random_hf_model, save_hf

from minilm_jax import contrastive, losses, pooling, pretrained
from minilm_jax.config import TINY

TEXTS = ["the cat sat on the mat", "hello world", "the dog is in the world",
         "a cat and a dog", "to the mat", "hello cat", "the end of the world", "sat on it"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  """A random TINY BERT as an HF directory with a vocabulary both libraries tokenize with."""
  return save_hf(random_hf_model(TINY, seed=3), tmp_path_factory.mktemp("tiny"), vocab=True)


def st_model(model_dir, mode="mean", normalize=True):
  from sentence_transformers import SentenceTransformer
  from sentence_transformers.sentence_transformer import modules
  mods = [modules.Transformer(str(model_dir)), modules.Pooling(TINY.hidden_size, mode)]
  return SentenceTransformer(modules=mods + ([modules.Normalize()] if normalize else []),
                             device="cpu")


def features(st, texts):
  import torch
  f = st.preprocess(texts)
  return {k: v for k, v in f.items() if isinstance(v, torch.Tensor)}


def batch_of(ours, groups: dict[str, list]) -> dict:
  """Our contrastive batch from role -> texts (negative: a list of K lists)."""
  out = {}
  for role, texts in groups.items():
    flat = [t for block in texts for t in block] if role == "negative" else texts
    enc = ours.tokenizer(flat, max_length=32)
    for k in ("input_ids", "attention_mask", "token_type_ids"):
      a = np.asarray(enc[k], np.int32)
      out[f"{role}_{k}"] = (a.reshape(len(texts), -1, a.shape[-1]).swapaxes(0, 1)
                            if role == "negative" else a)
    ids = np.asarray([hash(t) % 2**31 for t in flat], np.int32)
    out[f"{role}_text_id"] = ids.reshape(len(texts), -1).T if role == "negative" else ids
  out["weights"] = np.ones(len(groups["anchor"]), np.float32)
  return out


@pytest.mark.parametrize("mode", ["mean", "cls", "max"])
def test_pooling_matches_sentence_transformers(mode, tiny_dir):
  st = st_model(tiny_dir, mode)
  ours = pretrained.from_pretrained(tiny_dir)
  ours.pooling = pooling.Pooling(mode)
  texts = TEXTS[:5]
  want = st.encode(texts, convert_to_numpy=True)
  assert_parity(ours.encode(texts), want, 1e-5, what=f"{mode} pooling")


@pytest.mark.parametrize("variant", ["pairs", "hard_negatives", "symmetric", "matryoshka"])
def test_first_step_loss_matches_sentence_transformers(variant, tiny_dir):
  """Same random model, same batch: our objective's mean loss = sentence-transformers' loss."""
  import torch
  from sentence_transformers.sentence_transformer import losses as st_losses
  st = st_model(tiny_dir)
  ours = pretrained.from_pretrained(tiny_dir)
  groups = {"anchor": TEXTS[:4], "positive": TEXTS[4:]}
  if variant == "hard_negatives":  # two negatives each: (anchor, positive, neg1, neg2) rows
    groups["negative"] = [TEXTS[1:5], TEXTS[2:6]]
  kw = {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"} \
      if variant == "symmetric" else {}
  ref = st_losses.MultipleNegativesRankingLoss(st, scale=20.0, **kw)
  # sentence-transformers counts same-text candidates as negatives (its remedy is a sampler):
  # the negatives here repeat two positives, so compare with our masking off.
  cfg = contrastive.ContrastiveConfig(symmetric=variant == "symmetric", mask_duplicates=False)
  if variant == "matryoshka":
    ref = st_losses.MatryoshkaLoss(st, ref, [16, 8, 4], [1.0, 0.5, 0.25])
    cfg = dataclasses.replace(cfg, matryoshka_dims=(16, 8, 4),
                              matryoshka_weights=(1.0, 0.5, 0.25))
  roles = [groups["anchor"], groups["positive"], *groups.get("negative", [])]
  with torch.no_grad():
    want = float(ref([features(st, t) for t in roles], None))
  batch = batch_of(ours, groups)
  per, _ = contrastive.objective(ours.pooling, cfg).loss_fn(ours.model, batch, None)
  assert want > 0.5  # a random model: a loss of order log(batch), not a trivial one
  assert_parity(float(np.mean(per)), want, 1e-5, what=f"{variant} loss")


def test_duplicates_and_padding_are_masked():
  """A candidate with the same text as the anchor's positive leaves its softmax (positive 2 is
  positive 1's text: rows 1 and 2 each lose the other's column); padding rows leave all."""
  rng = np.random.default_rng(0)
  a, c = rng.normal(size=(4, 8)), rng.normal(size=(4, 8))
  c[2] = c[1]
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  s = 20 * unit(a) @ unit(c).T
  ce = lambda i, cols: np.log(np.exp(s[i, cols]).sum()) - s[i, i]
  same = np.zeros((4, 4), bool)
  same[1, 2] = same[2, 1] = True
  masked = np.asarray(losses.in_batch_negatives(a, c, same=same))
  want = [ce(0, [0, 1, 2, 3]), ce(1, [0, 1, 3]), ce(2, [0, 2, 3]), ce(3, [0, 1, 2, 3])]
  tol = 1e-6 * np.abs(s).max()  # float32 logits of up to 20 against float64
  np.testing.assert_allclose(masked, want, rtol=1e-5, atol=tol)
  padded = np.asarray(losses.in_batch_negatives(a, c, valid=np.array([1, 1, 1, 0], bool)))
  np.testing.assert_allclose(padded[:3], [ce(i, [0, 1, 2]) for i in range(3)], rtol=1e-5,
                             atol=tol)


def test_bad_inputs_fail_clearly():
  a = np.ones((1, 8))
  with pytest.raises(ValueError, match="at least 2"):
    losses.in_batch_negatives(a, a)
  with pytest.raises(ValueError, match=r"dims \[16, 8\] must lie in 1..8"):
    losses.matryoshka(losses.in_batch_negatives, np.ones((2, 8)), np.ones((2, 8)), [16, 8])


def test_sentence_transformers_export_matches(tmp_path, gt_model_dir):
  from sentence_transformers import SentenceTransformer
  ours = pretrained.from_pretrained(gt_model_dir)
  path = ours.export_sentence_transformers(tmp_path / "st")
  st = SentenceTransformer(str(path), device="cpu")
  texts = TEXTS + ["a much longer sentence " * 40]  # past the 256-token max_seq_length
  got, want = ours.encode(texts), st.encode(texts, convert_to_numpy=True)
  assert np.abs(got - want).max() < 1e-5
  assert pooling.read(path) == pooling.Pooling("mean", normalize=True)
  assert pooling.max_seq_length(path) == 256 == ours.max_seq_length


GLOBAL_STEP = """
import os, sys
import flax.nnx as nnx, jax, jax.numpy as jnp, numpy as np
from minilm_jax import contrastive, pooling, sharding
from minilm_jax.config import TINY
from minilm_jax.model import Encoder
sharding.initialize_distributed()
enc = Encoder(TINY.replace(inference_chunk_tokens=0), rngs=nnx.Rngs(0))
graphdef, params = nnx.split(enc)
rng = np.random.default_rng(0)
batch = {"weights": np.ones(16, np.float32)}
for role in ("anchor", "positive"):
  batch[role + "_input_ids"] = rng.integers(5, 128, (16, 12)).astype(np.int32)
  lengths = rng.integers(3, 13, (16, 1))
  batch[role + "_attention_mask"] = (np.arange(12) < lengths).astype(np.int32)
  batch[role + "_token_type_ids"] = np.zeros((16, 12), np.int32)
  batch[role + "_text_id"] = rng.integers(0, 2**31, 16).astype(np.int32)
obj = contrastive.objective(pooling.Pooling())
def loss(params, batch):
  return obj.loss_fn(nnx.merge(graphdef, params), batch, None)[0].mean()
step = jax.jit(jax.value_and_grad(loss))
mesh = sharding.make_mesh(-1, 1)  # as the loop shards: rows over "data", params replicated
n, p = jax.process_count(), jax.process_index()
mine = {k: v[p * 16 // n:(p + 1) * 16 // n] for k, v in batch.items()}  # this host's rows
sharded = sharding.shard_batch(mine, mesh)
assert sharded["anchor_input_ids"].sharding.shard_shape((16, 12)) == (2, 12)
l8, g8 = sharding.to_host(step(jax.device_put(params, sharding.replicated(mesh)), sharded))
leaves = {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(g8)}
if n == 1:  # the single-device step, in the same process
  one = jax.devices()[0]
  l1, g1 = step(jax.device_put(params, one), jax.device_put(batch, one))
  np.savez(sys.argv[1] + "-one.npz", loss=np.asarray(l1),
           **{k: np.asarray(v) for k, v in zip(leaves, jax.tree.leaves(g1))})
if p == 0:
  np.savez(sys.argv[1] + f"-{n}x{8 // n}.npz", loss=np.asarray(l8), **leaves)
print("ok")
"""


def _run_global_step(out, processes: int):
  import os
  import subprocess
  import sys

  from test_multihost import free_port
  from test_sharding import ROOT
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // processes}"}
  if processes > 1:
    env |= {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}",
            "JAX_NUM_PROCESSES": str(processes)}
  procs = [subprocess.Popen([sys.executable, "-c", GLOBAL_STEP, str(out)], cwd=ROOT,
                            env={**env, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(processes)]
  for p in procs:
    log = p.communicate(timeout=600)[0]
    assert p.returncode == 0 and log.strip().endswith("ok"), log


def _grad_err(got, want) -> float:
  """Largest leaf error relative to the leaf's magnitude, floored at 1e-3 of the largest
  gradient (the key biases' gradient is zero in exact arithmetic: float noise)."""
  keys = [k for k in want.files if k != "loss"]
  top = max(np.abs(want[k]).max() for k in keys)
  return max(np.abs(got[k] - want[k]).max() / max(np.abs(want[k]).max(), 1e-3 * top)
             for k in keys)


@pytest.mark.slow
def test_global_negatives_8_devices_and_2_hosts_equal_1_device(tmp_path):
  """Loss and gradients of one global batch of 16 pairs: sharded over 8 devices of one process,
  and over 2 processes x 4 devices (gloo), each anchor scores all 15 negatives (XLA gathers
  the candidates across devices and hosts); both equal the single-device step."""
  out = tmp_path / "g"
  _run_global_step(out, 1)
  _run_global_step(out, 2)
  one, dev8, hosts = (np.load(f"{out}-{k}.npz") for k in ("one", "1x8", "2x4"))
  for got, what in ((dev8, "8 devices"), (hosts, "2 hosts x 4 devices")):
    assert abs(float(got["loss"]) - float(one["loss"])) <= 1e-6 * abs(float(one["loss"])), what
    check_error(_grad_err(got, one), 1e-5, f"global negatives, {what}")


def test_grad_cache_gradients_equal_the_direct_step(tiny_dir):
  """GradCache (chunks of 2 texts, hard negatives, Matryoshka, masked duplicates): the loss
  and every gradient equal the direct step's."""
  import flax.nnx as nnx
  import jax
  import jax.numpy as jnp
  ours = pretrained.from_pretrained(tiny_dir)
  batch = batch_of(ours, {"anchor": TEXTS[:4], "positive": TEXTS[4:],
                          "negative": [TEXTS[1:5], TEXTS[2:6]]})
  batch["weights"][3] = 0.0  # a padding row
  cfg = contrastive.ContrastiveConfig(matryoshka_dims=(16, 8))
  graphdef, params = nnx.split(ours.model)
  direct = contrastive.objective(ours.pooling, cfg)

  def weighted(params):
    per, _ = direct.loss_fn(nnx.merge(graphdef, params), batch, None)
    return jnp.sum(per * batch["weights"]) / batch["weights"].sum()

  want_loss, want = jax.jit(jax.value_and_grad(weighted))(params)
  cached = contrastive.objective(ours.pooling, cfg, grad_cache_chunk=2)
  loss, _, got = jax.jit(lambda p: cached.loss_and_grads(graphdef, p, batch, None))(params)
  assert_parity(float(loss), float(want_loss), 1e-6, what="GradCache loss")
  # Relative to each leaf's magnitude, floored at 1e-3 of the largest gradient: the key biases'
  # gradient is zero in exact arithmetic (softmax ignores a per-query constant), float noise.
  top = max(float(jnp.abs(w).max()) for w in jax.tree.leaves(want))
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                          strict=True):
    scale = max(float(jnp.abs(w).max()), 1e-3 * top)
    check_error(float(jnp.abs(g - w).max()) / scale, 1e-5,
                f"GradCache grad {jax.tree_util.keystr(path)}")
