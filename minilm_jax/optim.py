"""Optax chains: AdamW with warmup + decay, no decay on biases/LayerNorm, clipping, accumulation,
layer-wise learning-rate decay.

Matches PyTorch's `torch.optim.AdamW` + `get_linear_schedule_with_warmup` + `clip_grad_norm_`
when given the same numbers (optax multiplies decay by the learning rate, as PyTorch does).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  learning_rate: float = 5e-5
  schedule: Literal["linear", "cosine", "constant"] = "linear"
  warmup_steps: int = 0
  warmup_ratio: float = 0.0          # used when warmup_steps == 0
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  max_grad_norm: float | None = 1.0
  grad_accum_steps: int = 1
  layer_decay: float | None = None   # e.g. 0.9: layer l gets lr * 0.9 ** (L + 1 - l)


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """Per optimizer update (after accumulation), like the HF schedulers."""
  total = max(int(total_steps), 1)
  warmup = cfg.warmup_steps or int(round(cfg.warmup_ratio * total))
  warmup = min(warmup, total)
  lr = cfg.learning_rate
  if cfg.schedule == "constant":
    decay = optax.constant_schedule(lr)
  elif cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(lr, max(total - warmup, 1))
  else:
    decay = optax.linear_schedule(lr, 0.0, max(total - warmup, 1))
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def _path_str(path) -> str:
  return "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def decay_mask(params):
  """True where weight decay applies: every kernel and embedding, never biases or LayerNorm."""
  def keep(path, _):
    name = _path_str(path)
    leaf = name.rsplit("/", 1)[-1]
    return not (leaf in ("bias", "scale") or name.endswith("/ln/scale"))
  return jax.tree_util.tree_map_with_path(keep, params)


def layer_index(name: str, num_layers: int) -> int:
  """0 for embeddings, i + 1 for Transformer layer i, num_layers + 1 for pooler and heads."""
  parts = name.split("/")
  if "embed" in parts:
    return 0
  if "layers" in parts:
    return int(parts[parts.index("layers") + 1]) + 1
  return num_layers + 1


def _scale_by_layer(params, decay: float, num_layers: int) -> optax.GradientTransformation:
  scales = jax.tree_util.tree_map_with_path(
      lambda p, _: decay ** (num_layers + 1 - layer_index(_path_str(p), num_layers)), params)

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(cfg: OptimConfig, params, total_steps: int, num_layers: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`total_steps` counts optimizer updates. Returns (tx, schedule)."""
  schedule = make_schedule(cfg, total_steps)
  parts = []
  if cfg.max_grad_norm:
    parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
  parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask(params)))
  if cfg.layer_decay:
    parts.append(_scale_by_layer(params, cfg.layer_decay, num_layers))
  tx = optax.chain(*parts)
  if cfg.grad_accum_steps > 1:
    # MultiSteps averages k micro-batch gradients and emits zero updates in between; the inner
    # schedule therefore advances once per k micro-steps.
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps)
  return tx, schedule
