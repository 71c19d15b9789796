"""The optimizer against PyTorch/HF practice: which parameters decay, one AdamW step element for
element, the warmup length, and layer-wise LR decay counted from the model's own depth."""

from __future__ import annotations

import math

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import random_hf_model, save_hf

from minilm_jax import data, finetune, hf, optim, pretrained, trainer
from minilm_jax.config import TINY
from minilm_jax.optim import OptimConfig


def test_decay_mask_on_a_real_model_tree():
  """On the nnx.State the loop hands optax (leaves under `.value`): kernels and embedding tables
  decay; biases, LayerNorm scales and shifts never do. Today's bug made all 25 leaves decay."""
  model = pretrained.build(TINY.replace(num_layers=1), "classification", 3)
  _, params = nnx.split(model)
  mask = optim.decay_mask(params)
  names = [optim.param_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  flags = dict(zip(names, jax.tree.leaves(mask), strict=True))
  assert len(flags) == 25 and not any(n.endswith("value") for n in flags)
  decayed = sorted(n for n, f in flags.items() if f)
  assert decayed == sorted([
      "classifier/kernel", "encoder/embed/position", "encoder/embed/token_type",
      "encoder/embed/word", "encoder/layers/0/attn/k/kernel", "encoder/layers/0/attn/o/kernel",
      "encoder/layers/0/attn/q/kernel", "encoder/layers/0/attn/v/kernel",
      "encoder/layers/0/mlp/wi/kernel", "encoder/layers/0/mlp/wo/kernel",
      "encoder/pooler/kernel"])
  assert not flags["encoder/layers/0/attn_ln/scale"] and not flags["encoder/embed/ln/bias"]


def test_one_adamw_step_equals_torch_with_hf_parameter_groups(tmp_path):
  """One step of our AdamW on a converted BertForSequenceClassification equals
  torch.optim.AdamW with HF's groups (no decay for biases and LayerNorm.weight), within 1e-6 on
  every parameter. lr 1e-2 and decay 0.1: a LayerNorm scale wrongly decayed moves by 1e-3."""
  import torch
  ref = random_hf_model(TINY, "BertForSequenceClassification", seed=7, num_labels=3)
  save_hf(ref, tmp_path)
  model, cfg = pretrained.load_hf_model(tmp_path, "classification", 3)
  gen = torch.Generator().manual_seed(0)
  grads = {n: torch.randn(p.shape, generator=gen) for n, p in ref.named_parameters()}

  lr, wd = 1e-2, 0.1
  no_decay = ("bias", "LayerNorm.weight")
  groups = [{"params": [p for n, p in ref.named_parameters() if not any(k in n for k in no_decay)],
             "weight_decay": wd},
            {"params": [p for n, p in ref.named_parameters() if any(k in n for k in no_decay)],
             "weight_decay": 0.0}]
  torch_opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
  for n, p in ref.named_parameters():
    p.grad = grads[n].clone()
  torch_opt.step()
  want = {k: v.detach().numpy() for k, v in ref.state_dict().items()}

  tx, _ = optim.make_optimizer(OptimConfig(learning_rate=lr, weight_decay=wd, schedule="constant",
                                           max_grad_norm=None), nnx.split(model)[1], 1,
                               cfg.num_layers)
  graphdef, params = nnx.split(model)
  g_flat = hf.hf_to_flat({n: g.numpy() for n, g in grads.items()}, cfg, "classification")
  g_state = pretrained.fill_params(jax.tree.map(jnp.zeros_like, params), g_flat)
  updates, _ = tx.update(g_state, tx.init(params), params)
  new = nnx.merge(graphdef, optax.apply_updates(params, updates))
  got = hf.flat_to_hf({k: np.asarray(v) for k, v in pretrained.flat_params(new).items()}, cfg,
                      "classification")
  assert set(got) <= set(want)
  diffs = {k: float(np.abs(got[k] - want[k]).max()) for k in got}
  worst = max(diffs, key=diffs.get)
  assert diffs[worst] < 1e-6, f"{worst}: {diffs[worst]:.2e}"


@pytest.mark.parametrize("ratio,total", [(0.06, 224), (0.1, 25), (0.01, 1000)])
def test_warmup_from_a_ratio_rounds_up_like_hf(ratio, total):
  """HF's TrainingArguments.get_warmup_steps is ceil(ratio * total): 0.06 * 224 = 13.44 -> 14
  warmup steps (round gave 13). The schedule then equals get_linear_schedule_with_warmup."""
  import torch
  import transformers
  sched = optim.make_schedule(OptimConfig(learning_rate=1.0, warmup_ratio=ratio), total)
  warmup = math.ceil(ratio * total)
  p = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.SGD([p], lr=1.0)
  ref = transformers.get_linear_schedule_with_warmup(opt, warmup, total)
  want = []
  for _ in range(total):
    want.append(opt.param_groups[0]["lr"])
    opt.step()
    ref.step()
  got = [float(sched(i)) for i in range(total)]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  assert got[warmup] == pytest.approx(1.0) and got[warmup - 1] < 1.0


def test_layer_decay_counts_the_models_own_layers(tmp_path):
  """trainer.train with layer_decay 0.5 on a 2-layer model: the first AdamW step moves every
  parameter by ~lr times its layer's scale, 0.5 ** (L + 1 - layer): embeddings 0.125, layer 0
  0.25, layer 1 0.5, the head 1. (A default of 12 layers scaled the embeddings by 0.5 ** 13.)"""
  rng = np.random.default_rng(0)
  feats = {"input_ids": rng.integers(5, TINY.vocab_size, (8, 8)).astype(np.int32),
           "attention_mask": np.ones((8, 8), np.int32),
           "token_type_ids": np.zeros((8, 8), np.int32),
           "labels": rng.integers(0, 2, 8).astype(np.int32)}
  batches = data.ArrayBatches(feats, batch_size=8, seed=0)
  model = pretrained.build(TINY.replace(hidden_dropout=0.0, attention_dropout=0.0),
                           "classification", 2)
  before = {k: np.asarray(v) for k, v in pretrained.flat_params(model).items()}
  loop = trainer.LoopConfig(output_dir=str(tmp_path / "run"), max_steps=1, batch_size=8,
                            progress=False)
  lr = 1e-3
  res = trainer.train(model, finetune.classification(2), batches, loop,
                      OptimConfig(learning_rate=lr, weight_decay=0.0, schedule="constant",
                                  max_grad_norm=None, layer_decay=0.5))
  after = pretrained.flat_params(res.model)
  step = {k: float(np.abs(np.asarray(after[k]) - before[k]).max()) for k in before}
  for name, scale in (("encoder/embed/word", 0.125), ("encoder/layers/0/mlp/wi/kernel", 0.25),
                      ("encoder/layers/1/mlp/wi/kernel", 0.5), ("classifier/kernel", 1.0)):
    assert step[name] == pytest.approx(lr * scale, rel=0.05), (name, step[name])
