"""orbax checkpoints: model directories (params + config + tokenizer) and training-state managers.

A minilm_jax model directory holds `minilm_jax.json` (model config, task, head size), `params/`
(an orbax StandardCheckpointer tree) and the tokenizer files it was converted with. Params are
restored into abstract shapes, so loading never runs a random init first.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from minilm_jax.config import ModelConfig

META = "minilm_jax.json"
TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.json", "sentencepiece.bpe.model", "vocab.json", "merges.txt")


def is_model_dir(path: str | Path) -> bool:
  return (Path(path) / META).exists()


def copy_tokenizer_files(src: str | Path | None, dst: str | Path) -> None:
  if src is None:
    return
  for name in TOKENIZER_FILES:
    if (Path(src) / name).exists() and Path(src).resolve() != Path(dst).resolve():
      shutil.copy2(Path(src) / name, Path(dst) / name)


def save_model_dir(path: str | Path, params: Any, cfg: ModelConfig, *, task: str = "encoder",
                   num_labels: int | None = None, tokenizer_dir: str | Path | None = None,
                   extra: dict | None = None) -> Path:
  """Writes params (an nnx.State or pytree of arrays) and metadata; returns the directory."""
  path = Path(path).absolute()
  path.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    # Collective with several processes. force=True: orbax removes an old params/ on the
    # primary process only and syncs before writing (an rmtree on every process would race).
    ckptr.save(path / "params", params, force=True)
    ckptr.wait_until_finished()
  if jax.process_index() == 0:
    meta = {"config": dataclasses.asdict(cfg), "task": task, "num_labels": num_labels,
            **(extra or {})}
    (path / META).write_text(json.dumps(meta, indent=2) + "\n")
    copy_tokenizer_files(tokenizer_dir, path)
  return path


def read_meta(path: str | Path) -> dict:
  path = Path(path)
  try:
    meta = json.loads((path / META).read_text())
  except FileNotFoundError:
    raise FileNotFoundError(f"{path} is not a minilm_jax model directory (no {META})") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"corrupt {path / META}: {e}") from e
  meta["config"] = config_from_dict(meta["config"])
  return meta


def config_from_dict(d: dict) -> ModelConfig:
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise ValueError(f"unknown model config keys {unknown}")
  return ModelConfig(**d)


def restore_params(path: str | Path, abstract: Any) -> Any:
  """Restores `path/params` into the structure, shapes and shardings of `abstract`."""
  path = Path(path).absolute() / "params"
  if not path.exists():
    raise FileNotFoundError(f"no params checkpoint at {path}")
  # Leaves without a sharding go to this process's first device. Otherwise orbax takes the
  # saved shardings and refuses with "Topology mismatch" whenever the device count differs
  # from the writer's (e.g. a model trained on 8 devices or 2 hosts, loaded on a laptop).
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=local)
      if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None else x, abstract)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(path, abstract)
  except Exception as e:  # orbax/tensorstore raise bare Exceptions for unreadable array data
    raise ValueError(f"corrupt or mismatched checkpoint at {path}: {e}") from e


def abstract_like(state: Any) -> Any:
  """ShapeDtypeStructs (with shardings where the arrays have them) for a restore target."""
  def to_sds(x):
    if isinstance(x, jax.Array) or hasattr(x, "shape"):
      sharding = getattr(x, "sharding", None)
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return x
  return jax.tree.map(to_sds, state)
