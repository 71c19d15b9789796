"""orbax checkpoints: model directories (params + config + tokenizer) and the training-state
manager of a run (`Checkpoints`), with the checks that keep a resume honest.

A minilm_jax model directory holds `minilm_jax.json` (model config, task, head size), `params/`
(an orbax StandardCheckpointer tree) and the tokenizer files it was converted with. Params are
restored into abstract shapes, so loading never runs a random init first.

Every write first checks the free space of its file system (`ensure_space`): a full disk is a
`DiskFull` naming the path and the bytes needed, raised before anything is written, so the last
complete checkpoint stays as it was.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from minilm_jax.config import ModelConfig

log = logging.getLogger(__name__)
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
  ensure_space(path, tree_bytes(params), f"the model directory {path}")
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


# --- free space ----------------------------------------------------------------------------

class DiskFull(OSError):
  """Not enough free space for a write; raised before writing, so nothing saved is touched."""

  def __init__(self, message: str):
    super().__init__(errno.ENOSPC, message)
    self.message = message

  def __str__(self) -> str:
    return self.message


def tree_bytes(tree: Any) -> int:
  """Bytes of the arrays in a pytree (global sizes: all shards on a shared file system)."""
  return sum(int(math.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree) if hasattr(x, "shape") and hasattr(x, "dtype"))


def ensure_space(directory: Path, nbytes: int, what: str, hint: str = "") -> None:
  """Raises DiskFull unless `directory`'s file system has room for `nbytes` (plus 10% and 1 MiB
  for orbax's metadata and tensorstore's chunk headers)."""
  need = int(nbytes * 1.1) + (1 << 20)
  probe = Path(directory)
  while not probe.exists():
    probe = probe.parent
  free = shutil.disk_usage(probe).free
  if free < need:
    raise DiskFull(f"no space left for {what}: it needs about {need / 2**20:.1f} MiB and the file "
                   f"system of {probe} has {free / 2**20:.1f} MiB free. Nothing was written. "
                   f"{hint}".rstrip())


# --- the training state of a run -----------------------------------------------------------

class CheckpointMismatch(ValueError):
  """A readable checkpoint written by a run with other shapes, state tree or data settings."""


class Checkpoints:
  """orbax CheckpointManager over {state, data position}.

  Resuming tells two failures apart. A checkpoint whose files cannot be read (a write cut short,
  a bad disk) is skipped with a warning: the previous one is restored, and the unreadable ones
  are renamed to `<step>.unreadable` (kept for inspection, invisible to orbax) so the run can
  save those steps again and max_to_keep does not count them. A readable checkpoint whose
  shapes, tree or data settings differ from this run is a `CheckpointMismatch`: nothing is
  restored, renamed or deleted, because falling back would silently train something else.
  """

  def __init__(self, directory: Path, keep: int):
    self.directory = directory.absolute()
    # Handlers named up front: without them a fresh manager's item_metadata() is None until
    # the first restore, and a mismatched newest checkpoint would pass for an unreadable one.
    self.manager = ocp.CheckpointManager(
        self.directory, item_handlers={"state": ocp.StandardCheckpointHandler(),
                                       "data": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def save(self, step: int, state, data_state: dict, *, wait: bool = False,
           spec: dict | None = None) -> None:
    """`spec` describes what `data_state` (a data position) means; see `data_spec`.

    Raises DiskFull before writing when the file system lacks room for the state; the
    checkpoints already saved are left as they are."""
    latest = self.manager.latest_step()
    ensure_space(self.directory, tree_bytes(state), f"the checkpoint of step {step}",
                 f"The newest complete checkpoint ({'none' if latest is None else latest}) in "
                 f"{self.directory} is intact: free space or move loop.output_dir, then rerun "
                 f"with --loop.resume=true.")
    data = {"position": data_state, "spec": spec}
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)), force=True)
      if wait:
        self.manager.wait_until_finished()
    except OSError as e:
      if e.errno == errno.ENOSPC:  # the estimate was short: orbax never renames a partial write
        raise DiskFull(f"the file system of {self.directory} filled up while writing the "
                       f"checkpoint of step {step} ({e}); the newest complete checkpoint "
                       f"({latest}) is intact") from e
      raise

  def restore_latest(self, abstract_state, spec: dict | None = None
                     ) -> tuple[int, Any, dict] | None:
    """(step, state, data position) of the newest readable checkpoint; None if there is none.

    Raises `CheckpointMismatch` if the newest checkpoint with readable metadata does not fit
    `abstract_state` (or was written with another data `spec`), ValueError if none is readable.
    """
    self.manager.wait_until_finished()
    steps = sorted(self.manager.all_steps(), reverse=True)
    unreadable = []
    for step in steps:
      self._check_tree(step, abstract_state)
      try:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        data = dict(out["data"])
      except Exception as e:  # noqa: BLE001 - tensorstore raises bare Exceptions for bad bytes
        log.warning("checkpoint at step %d is unreadable (%s); trying an older one", step,
                    str(e).splitlines()[0][:300])
        unreadable.append(step)
        continue
      # Checkpoints from before the data spec was saved hold the bare position.
      position, saved_spec = (data["position"], data.get("spec")) if "position" in data else (
          data, None)
      self._check_spec(step, saved_spec, spec)
      if unreadable:
        log.warning("restored step %d after %d unreadable newer checkpoint(s) %s; renamed "
                    "them to <step>.unreadable", step, len(unreadable), unreadable)
        self._set_aside(unreadable)
      return step, out["state"], dict(position)
    if steps:
      raise ValueError(f"no readable checkpoint in {self.directory} (steps {steps})")
    return None

  def _check_tree(self, step: int, abstract_state) -> None:
    try:
      saved = ocp.tree.to_flat_dict(self.manager.item_metadata(step)["state"].tree)
    except Exception:  # noqa: BLE001 - unreadable metadata: the restore fails and says why
      return
    # Params first: they are what the examples in the message should show.
    want = dict(sorted(ocp.tree.to_flat_dict(abstract_state).items(),
                       key=lambda kv: (kv[0][0] != "params", kv[0])))
    name = "/".join
    diffs = [f"{name(k)} missing from the checkpoint" for k in want if k not in saved]
    diffs += [f"{name(k)} only in the checkpoint" for k in saved if k not in want]
    for k in want:
      if k in saved:
        a, b = saved[k], want[k]
        if tuple(a.shape) != tuple(b.shape) or np.dtype(a.dtype) != np.dtype(b.dtype):
          diffs.append(f"{name(k)}: checkpoint {a.dtype}{list(a.shape)}, "
                       f"this run {b.dtype}{list(b.shape)}")
    if diffs:
      raise CheckpointMismatch(
          f"the checkpoint at step {step} in {self.directory} does not match this run's "
          f"config ({len(diffs)} differences, e.g. {'; '.join(diffs[:3])}). Resume with the "
          f"model and optimizer settings it was written with, or use a new loop.output_dir; "
          f"nothing was restored or deleted")

  def _check_spec(self, step: int, saved: dict | None, spec: dict | None) -> None:
    if saved is None or spec is None:
      return
    spec = json.loads(json.dumps(spec))  # tuples -> lists, as the saved JSON has them
    diffs = [f"{k}: checkpoint {saved.get(k)}, this run {spec.get(k)}"
             for k in sorted(set(saved) | set(spec)) if saved.get(k) != spec.get(k)]
    if diffs:
      raise CheckpointMismatch(
          f"the checkpoint at step {step} in {self.directory} was written with other data "
          f"settings ({'; '.join(diffs)}), so its data position means other batches. Resume "
          f"with the settings it was written with, or use a new loop.output_dir; nothing was "
          f"restored or deleted")

  def _set_aside(self, steps: list[int]) -> None:
    if jax.process_index() == 0:  # one process renames; the others wait at the barrier
      for step in steps:
        src = self.directory / str(step)
        dst, n = self.directory / f"{step}.unreadable", 0
        while dst.exists():
          n += 1
          dst = self.directory / f"{step}.unreadable.{n}"
        src.rename(dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("minilm_jax_checkpoints_set_aside")
    self.manager.reload()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def data_spec(batches) -> dict:
  """What a data position means (`batches.spec()`: the corpus id and fingerprint, global batch
  size, buckets or packing, seed): the same Grain state names the same rows only with the same
  spec. The process count is left out on purpose: a run may resume on another number of hosts
  with the same global batch (packed corpora: the same number of data shards)."""
  return json.loads(json.dumps(batches.spec(), default=int))
