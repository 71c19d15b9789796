"""Optax chains: AdamW with warmup + decay, no decay on biases/LayerNorm, clipping, layer-wise
learning-rate decay.

Matches PyTorch's `torch.optim.AdamW` with HF's two parameter groups (no decay for biases and
LayerNorm weights) + `get_linear_schedule_with_warmup` + `clip_grad_norm_` when given the same
numbers (optax multiplies decay by the learning rate, as PyTorch does; warmup from a ratio is
rounded up, as `TrainingArguments.get_warmup_steps` does). Gradient accumulation is not an
optimizer wrapper here: `LoopConfig.microbatches` sums the slices of one batch inside the step.
"""

from __future__ import annotations

import dataclasses
import math
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
  layer_decay: float | None = None   # e.g. 0.9: layer l gets lr * 0.9 ** (L + 1 - l)


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """Per optimizer update, like the HF schedulers; warmup_ratio rounds up (HF's `ceil`)."""
  total = max(int(total_steps), 1)
  warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total)
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


def param_name(path) -> str:
  """"encoder/layers/0/attn/k/bias" for a key path into params, an nnx.State or a pure dict.

  An nnx.State's leaves sit under their Variable's `.value` attribute; that key is no part of
  the parameter's name (reading the last key as the name made every leaf look like "value")."""
  keys = [p for p in path if not (isinstance(p, jax.tree_util.GetAttrKey) and p.name == "value")]
  return "/".join(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in keys)


def decays(name: str) -> bool:
  """Weight decay applies to kernels and embedding tables, never to biases or LayerNorm (HF's
  `no_decay = ["bias", "LayerNorm.weight"]`; our LayerNorm weight is `scale`, and the MLM
  head's output bias is `mlm/bias`)."""
  return name.rsplit("/", 1)[-1] not in ("bias", "scale")


def decay_mask(params):
  """True where weight decay applies (`decays`), as a tree like `params`."""
  return jax.tree_util.tree_map_with_path(lambda path, _: decays(param_name(path)), params)


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
      lambda p, _: decay ** (num_layers + 1 - layer_index(param_name(p), num_layers)), params)

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(cfg: OptimConfig, params, total_steps: int, num_layers: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`total_steps` counts optimizer updates; `num_layers` (the model's, for layer-wise decay)
  comes from the model's config in `trainer.train`. Returns (tx, schedule)."""
  schedule = make_schedule(cfg, total_steps)
  parts = []
  if cfg.max_grad_norm:
    parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
  parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask(params)))
  if cfg.layer_decay:
    parts.append(_scale_by_layer(params, cfg.layer_decay, num_layers))
  return optax.chain(*parts), schedule
