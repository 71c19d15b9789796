"""Hugging Face <-> minilm_jax weights: one explicit name table, exact key-set and shape checks.

The table maps each HF tensor name to a path in our parameter tree plus a layout transform
(PyTorch `Linear` stores (out, in); we store einsum kernels such as (D, N, H)). Every transform
is a pure reshape/transpose, so HF -> minilm_jax -> HF is bit-identical.

Reads `model.safetensors` (also sharded, via its index) and `pytorch_model.bin` (needs torch,
imported only then). Accepts bare `BertModel`/`RobertaModel` keys and `bert.`/`roberta.`-prefixed
keys of the `*For*` task models.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from minilm_jax.config import ModelConfig

log = logging.getLogger(__name__)

# HF buffers that are not parameters.
_IGNORED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")
# Old TF-converted checkpoints name LayerNorm params gamma/beta.
_LEGACY = {".gamma": ".weight", ".beta": ".bias"}
# Head weights we can drop when loading into a model without that head (logged).
_HEAD_PREFIXES = ("classifier.", "qa_outputs.", "cls.", "lm_head.")


class Rule(NamedTuple):
  hf: str                                        # HF tensor name
  ours: str                                      # "/"-joined path in our state
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


def _identity(x):
  return x


def _linear(x):
  return np.ascontiguousarray(x.T)


def _rules(cfg: ModelConfig, hf_prefix: str, ours_prefix: str) -> list[Rule]:
  """The encoder's table; `hf_prefix` "", "bert." or "roberta.", `ours_prefix` "" or "encoder/"."""
  d, n, h = cfg.hidden_size, cfg.num_heads, cfg.head_dim
  qkv_w = (lambda w: np.ascontiguousarray(w.T.reshape(d, n, h)),
           lambda k: np.ascontiguousarray(k.reshape(d, n * h).T))
  qkv_b = (lambda b: b.reshape(n, h), lambda b: b.reshape(n * h))
  out_w = (lambda w: np.ascontiguousarray(w.T.reshape(n, h, d)),
           lambda k: np.ascontiguousarray(k.reshape(n * h, d).T))
  ident, lin = (_identity, _identity), (_linear, _linear)

  table = [
      ("embeddings.word_embeddings.weight", "embed/word", ident),
      ("embeddings.position_embeddings.weight", "embed/position", ident),
      ("embeddings.token_type_embeddings.weight", "embed/token_type", ident),
      ("embeddings.LayerNorm.weight", "embed/ln/scale", ident),
      ("embeddings.LayerNorm.bias", "embed/ln/bias", ident),
  ]
  for i in range(cfg.num_layers):
    hl, ol = f"encoder.layer.{i}.", f"layers/{i}/"
    table += [
        (hl + "attention.self.query.weight", ol + "attn/q/kernel", qkv_w),
        (hl + "attention.self.query.bias", ol + "attn/q/bias", qkv_b),
        (hl + "attention.self.key.weight", ol + "attn/k/kernel", qkv_w),
        (hl + "attention.self.key.bias", ol + "attn/k/bias", qkv_b),
        (hl + "attention.self.value.weight", ol + "attn/v/kernel", qkv_w),
        (hl + "attention.self.value.bias", ol + "attn/v/bias", qkv_b),
        (hl + "attention.output.dense.weight", ol + "attn/o/kernel", out_w),
        (hl + "attention.output.dense.bias", ol + "attn/o/bias", ident),
        (hl + "attention.output.LayerNorm.weight", ol + "attn_ln/scale", ident),
        (hl + "attention.output.LayerNorm.bias", ol + "attn_ln/bias", ident),
        (hl + "intermediate.dense.weight", ol + "mlp/wi/kernel", lin),
        (hl + "intermediate.dense.bias", ol + "mlp/wi/bias", ident),
        (hl + "output.dense.weight", ol + "mlp/wo/kernel", lin),
        (hl + "output.dense.bias", ol + "mlp/wo/bias", ident),
        (hl + "output.LayerNorm.weight", ol + "mlp_ln/scale", ident),
        (hl + "output.LayerNorm.bias", ol + "mlp_ln/bias", ident),
    ]
  if cfg.use_pooler:
    table += [("pooler.dense.weight", "pooler/kernel", lin),
              ("pooler.dense.bias", "pooler/bias", ident)]
  return [Rule(hf_prefix + a, ours_prefix + b, f[0], f[1]) for a, b, f in table]


def _head_rules(task: str, cfg: ModelConfig) -> list[Rule]:
  lin, ident = (_linear, _linear), (_identity, _identity)
  if task == "classification" and cfg.model_type == "roberta":
    table = [("classifier.dense.weight", "classifier/dense/kernel", lin),
             ("classifier.dense.bias", "classifier/dense/bias", ident),
             ("classifier.out_proj.weight", "classifier/out_proj/kernel", lin),
             ("classifier.out_proj.bias", "classifier/out_proj/bias", ident)]
  elif task == "classification":
    table = [("classifier.weight", "classifier/kernel", lin),
             ("classifier.bias", "classifier/bias", ident)]
  elif task == "qa":
    table = [("qa_outputs.weight", "qa/kernel", lin), ("qa_outputs.bias", "qa/bias", ident)]
  elif task == "mlm" and cfg.model_type == "roberta":
    table = [("lm_head.dense.weight", "mlm/transform/kernel", lin),
             ("lm_head.dense.bias", "mlm/transform/bias", ident),
             ("lm_head.layer_norm.weight", "mlm/ln/scale", ident),
             ("lm_head.layer_norm.bias", "mlm/ln/bias", ident),
             ("lm_head.bias", "mlm/bias", ident)]
  elif task == "mlm":
    p = "cls.predictions."
    table = [(p + "transform.dense.weight", "mlm/transform/kernel", lin),
             (p + "transform.dense.bias", "mlm/transform/bias", ident),
             (p + "transform.LayerNorm.weight", "mlm/ln/scale", ident),
             (p + "transform.LayerNorm.bias", "mlm/ln/bias", ident),
             (p + "bias", "mlm/bias", ident)]
  else:
    table = []
  return [Rule(a, b, f[0], f[1]) for a, b, f in table]


# Tied or duplicated HF tensors that we do not store (the decoder is the word embedding).
_TIED = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
         "lm_head.decoder.weight", "lm_head.decoder.bias")

HF_ARCH = {
    ("bert", "encoder"): "BertModel", ("roberta", "encoder"): "RobertaModel",
    ("bert", "classification"): "BertForSequenceClassification",
    ("roberta", "classification"): "RobertaForSequenceClassification",
    ("bert", "qa"): "BertForQuestionAnswering", ("roberta", "qa"): "RobertaForQuestionAnswering",
    ("bert", "mlm"): "BertForMaskedLM", ("roberta", "mlm"): "RobertaForMaskedLM",
}


def name_table(cfg: ModelConfig, task: str = "encoder", hf_prefix: str = "") -> list[Rule]:
  """All rules for `task` in {"encoder", "classification", "qa", "mlm"}."""
  if task == "encoder":
    return _rules(cfg, hf_prefix, "")
  if task == "qa" or task == "mlm":
    cfg = cfg.replace(use_pooler=False)
  elif task == "classification":  # as SequenceClassifier: a pooler for BERT only
    cfg = cfg.replace(use_pooler=cfg.model_type == "bert")
  return _rules(cfg, hf_prefix or f"{cfg.model_type}.", "encoder/") + _head_rules(task, cfg)


# --- reading HF files ------------------------------------------------------------------------

def read_hf_weights(path: str | Path) -> dict[str, np.ndarray]:
  """Every tensor of an HF checkpoint directory (or a single weights file) as numpy arrays."""
  path = Path(path)
  if path.is_dir():
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json"):
      if (path / name).exists():
        return read_hf_weights(path / name)
    raise FileNotFoundError(
        f"no weights in {path}: looked for model.safetensors, pytorch_model.bin "
        "(and their .index.json shards)")
  if not path.exists():
    raise FileNotFoundError(f"weights file {path} does not exist")
  if path.name.endswith(".index.json"):
    index = json.loads(path.read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
      out.update(read_hf_weights(path.parent / shard))
    return out
  try:
    if path.suffix == ".safetensors":
      from safetensors.numpy import load_file
      return dict(load_file(str(path)))
    if path.suffix in (".bin", ".pt", ".pth"):
      try:
        import torch
      except ImportError as e:
        raise ImportError(f"reading {path} needs torch; convert it to safetensors or "
                          "`pip install torch`") from e
      sd = torch.load(str(path), map_location="cpu", weights_only=True)
      return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
              for k, v in sd.items()}
  except ImportError:
    raise
  except Exception as e:
    # safetensors and torch.load raise their own types (SafetensorError, UnpicklingError) for a
    # truncated or foreign file.
    raise ValueError(f"corrupt or unreadable checkpoint file {path}: {e}") from e
  raise ValueError(f"unknown weights file type {path.name!r} (expected .safetensors or .bin)")


def _normalise_keys(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for k, v in sd.items():
    if k.endswith(_IGNORED_SUFFIXES):
      continue
    for old, new in _LEGACY.items():
      if k.endswith(old) and "LayerNorm" in k:
        k = k[: -len(old)] + new
    out[k] = v
  return out


def detect_prefix(sd: dict[str, np.ndarray]) -> str:
  for p in ("bert.", "roberta."):
    if any(k.startswith(p + "embeddings.") for k in sd):
      return p
  if any(k.startswith("embeddings.") for k in sd):
    return ""
  raise ValueError("not a BERT/RoBERTa checkpoint: no 'embeddings.*', 'bert.embeddings.*' or "
                   "'roberta.embeddings.*' tensors found")


def hf_to_flat(sd: dict[str, np.ndarray], cfg: ModelConfig, task: str = "encoder", *,
               allow_missing_head: bool = False, dtype=None) -> dict[str, np.ndarray]:
  """HF state dict -> {our path: array}. Asserts the key sets and every shape match."""
  sd = _normalise_keys(sd)
  prefix = detect_prefix(sd)
  if task == "encoder":
    rules = name_table(cfg, "encoder", prefix)
  else:
    rules = name_table(cfg, task, prefix or f"{cfg.model_type}.")
    if not prefix:  # a bare encoder checkpoint loaded into a task model
      sd = {f"{cfg.model_type}.{k}": v for k, v in sd.items()}
  expected = {r.hf for r in rules}
  missing = sorted(expected - set(sd))
  head_missing = [k for k in missing if k.startswith(_HEAD_PREFIXES)]
  pooler_missing = [k for k in missing if "pooler." in k]
  if head_missing and allow_missing_head:
    log.info("checkpoint has no %s head; it will be initialised fresh", task)
    missing = [k for k in missing if k not in head_missing]
  if pooler_missing and task == "classification" and allow_missing_head:
    log.warning("checkpoint ships no pooler weights; the pooler is initialised fresh")
    missing = [k for k in missing if k not in pooler_missing]
  unexpected = sorted(set(sd) - expected - set(_TIED))
  dropped = [k for k in unexpected if k.startswith(_HEAD_PREFIXES)
             or k.startswith(("bert.pooler.", "roberta.pooler.", "pooler."))]
  unexpected = [k for k in unexpected if k not in dropped]
  if missing or unexpected:
    raise KeyError(
        f"checkpoint keys do not match the {cfg.num_layers}-layer {cfg.model_type} {task} model: "
        f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)}), "
        f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)})")
  if dropped:
    log.warning("dropping %d head/pooler tensors the %s model has no place for: %s",
                len(dropped), task, dropped[:4])
  flat = {}
  for r in rules:
    if r.hf not in sd:
      continue
    try:
      x = r.to_ours(np.asarray(sd[r.hf]))
    except ValueError as e:  # a head/width reshape that cannot fit: the config is wrong
      raise ValueError(
          f"checkpoint tensor {r.hf} of shape {np.shape(sd[r.hf])} does not fit the model config "
          f"(hidden_size {cfg.hidden_size}, {cfg.num_heads} heads of {cfg.head_dim}): {e}") from e
    flat[r.ours] = x.astype(dtype) if dtype is not None else x
  return flat


def check_shapes(flat: dict[str, np.ndarray], target: dict[str, tuple]) -> None:
  """`target` maps our paths to expected shapes (from an abstract model)."""
  bad = [f"{k}: checkpoint {flat[k].shape} vs model {target[k]}" for k in sorted(flat)
         if k in target and tuple(flat[k].shape) != tuple(target[k])]
  extra = sorted(set(flat) - set(target))
  if bad or extra:
    raise ValueError("checkpoint does not fit the model config: "
                     + "; ".join(bad[:8] + [f"no parameter {k}" for k in extra[:8]]))


def flat_to_hf(flat: dict[str, np.ndarray], cfg: ModelConfig, task: str = "encoder",
               ) -> dict[str, np.ndarray]:
  rules = name_table(cfg, task)
  ours = {r.ours for r in rules}
  if set(flat) != ours:
    raise KeyError(f"parameter tree does not match the {task} table: missing "
                   f"{sorted(ours - set(flat))[:8]}, unexpected {sorted(set(flat) - ours)[:8]}")
  return {r.hf: np.ascontiguousarray(r.to_hf(np.asarray(flat[r.ours]))) for r in rules}


def save_hf(path: str | Path, sd: dict[str, np.ndarray], cfg: ModelConfig, task: str = "encoder",
            extra_config: dict | None = None) -> None:
  """Writes `model.safetensors` + `config.json` that transformers' AutoModel* loads."""
  from safetensors.numpy import save_file
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  hf_cfg = cfg.to_hf()
  hf_cfg["architectures"] = [HF_ARCH[(cfg.model_type, task)]]
  hf_cfg["torch_dtype"] = cfg.param_dtype
  hf_cfg.update(extra_config or {})
  tmp = path / "model.safetensors.tmp"
  save_file(sd, str(tmp), metadata={"format": "pt"})
  tmp.replace(path / "model.safetensors")
  (path / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
