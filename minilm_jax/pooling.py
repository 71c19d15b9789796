"""Sentence embeddings from token states, as sentence-transformers' `Pooling` and `Normalize`
modules compute them, and the files of a sentence-transformers directory that say which.

  <dir>/modules.json              [Transformer, Pooling (1_Pooling), Normalize (2_Normalize)]
  <dir>/1_Pooling/config.json     word_embedding_dimension, pooling_mode_{cls,mean,max}_tokens
  <dir>/sentence_bert_config.json max_seq_length, do_lower_case

`read(dir)` gives the pooling a checkpoint was trained with (mean + normalise when the directory
is a plain HF checkpoint); `write(...)` adds these files next to an exported HF model, so that
`sentence_transformers.SentenceTransformer(dir)` loads it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp

from minilm_jax import losses

MODES = ("mean", "cls", "max")
# 1_Pooling/config.json's key for each mode (sentence-transformers spells the CLS one singular).
_KEYS = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token",
         "max": "pooling_mode_max_tokens"}
_ST = "sentence_transformers.models."


@dataclasses.dataclass(frozen=True)
class Pooling:
  mode: Literal["mean", "cls", "max"] = "mean"
  normalize: bool = True

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"pooling mode {self.mode!r}; known: {MODES}")

  def __call__(self, hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """hidden (B, T, D), mask (B, T) -> (B, D) float32."""
    h = hidden.astype(jnp.float32)
    m = mask.astype(jnp.float32)[..., None]
    if self.mode == "mean":  # sum over real tokens / max(count, 1e-9), as Pooling does
      out = (h * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
    elif self.mode == "cls":
      out = h[:, 0]
    else:                    # padding set to -1e9 before the max, as Pooling does
      out = jnp.where(m > 0, h, -1e9).max(1)
    return losses.l2_normalize(out) if self.normalize else out


def read(model_dir: str | Path) -> Pooling:
  """The pooling of a sentence-transformers directory; mean + normalise without modules.json."""
  model_dir = Path(model_dir)
  modules_path = model_dir / "modules.json"
  if not modules_path.is_file():
    return Pooling()
  modules = json.loads(modules_path.read_text())
  kinds = {m["type"].rsplit(".", 1)[-1]: m for m in modules}
  if "Pooling" not in kinds:
    raise ValueError(f"{modules_path}: no Pooling module among {sorted(kinds)}")
  config_path = model_dir / kinds["Pooling"]["path"] / "config.json"
  cfg = json.loads(config_path.read_text())
  modes = [m for m in MODES if cfg.get(_KEYS[m])]
  others = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v
            and k not in _KEYS.values()]
  if len(modes) != 1 or others:
    raise ValueError(f"{config_path}: pooling {[_KEYS[m] for m in modes] + others}; "
                     f"supported: exactly one of {list(_KEYS.values())}")
  return Pooling(modes[0], normalize="Normalize" in kinds)


def max_seq_length(model_dir: str | Path) -> int | None:
  """sentence_bert_config.json's truncation length (all-MiniLM-L6-v2: 256 of its 512
  positions), which `SentenceTransformer.encode` applies; None without the file."""
  path = Path(model_dir) / "sentence_bert_config.json"
  return json.loads(path.read_text()).get("max_seq_length") if path.is_file() else None


def write(pooling: Pooling, model_dir: str | Path, *, dim: int, max_seq_length: int) -> None:
  """The sentence-transformers files for `pooling` in `model_dir` (an exported HF model); the
  tokenizer itself lowercases, so sentence-transformers must not (do_lower_case false)."""
  model_dir = Path(model_dir)
  modules = [{"idx": 0, "name": "0", "path": "", "type": _ST + "Transformer"},
             {"idx": 1, "name": "1", "path": "1_Pooling", "type": _ST + "Pooling"}]
  if pooling.normalize:
    modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": _ST + "Normalize"})
    (model_dir / "2_Normalize").mkdir(parents=True, exist_ok=True)
  (model_dir / "1_Pooling").mkdir(parents=True, exist_ok=True)
  config = {"word_embedding_dimension": dim,
            **{_KEYS[m]: m == pooling.mode for m in MODES},
            "pooling_mode_mean_sqrt_len_tokens": False}
  (model_dir / "1_Pooling" / "config.json").write_text(json.dumps(config, indent=2))
  (model_dir / "modules.json").write_text(json.dumps(modules, indent=2))
  (model_dir / "sentence_bert_config.json").write_text(json.dumps(
      {"max_seq_length": max_seq_length, "do_lower_case": False}, indent=2))
