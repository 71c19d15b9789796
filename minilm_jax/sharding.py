"""Mesh, logical-axis rules, and the shardings of train state, batches and activations.

Model code names logical axes (`batch, embed, vocab, heads, kv, mlp` for parameters,
`act_batch, act_length, act_embed` for activations); this module alone maps them to the mesh axes
`data` and `fsdp`. Data parallelism splits the batch over both axes; FSDP additionally splits
every parameter's `embed` dimension (and so the optimizer state) over `fsdp`, while activations
stay split by batch only (MaxText's `activation_*` names: under FSDP a hidden state sharded
both ways would need the fsdp axis twice). `constrain` pins activations to that layout while a
training loop traces its steps (`activation_sharding`), so XLA cannot pick layouts that fight
the batch sharding; outside a loop (a notebook forward) it does nothing.
The same code runs on 1 device, 8 host devices, a GPU, or several hosts after
`jax.distributed.initialize()`.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import flax.nnx as nnx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis (None: replicated).
_ACTIVATIONS = (("act_batch", BATCH_AXES), ("act_length", None), ("act_embed", None))
RULES_DP = (("batch", BATCH_AXES), ("embed", None), ("vocab", None), ("heads", None),
            ("kv", None), ("mlp", None)) + _ACTIVATIONS
RULES_FSDP = (("batch", BATCH_AXES), ("embed", "fsdp"), ("vocab", None), ("heads", None),
              ("kv", None), ("mlp", None)) + _ACTIVATIONS


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
  """A (data, fsdp) mesh over all devices; -1 takes whatever is left."""
  devices = devices if devices is not None else jax.devices()
  n = len(devices)
  if data == -1:
    if n % fsdp:
      raise ValueError(f"fsdp={fsdp} does not divide the {n} devices")
    data = n // fsdp
  if data * fsdp > n:
    raise ValueError(f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices, have {n}")
  devices = devices[:data * fsdp]  # e.g. mesh_data=1 on a multi-device host
  # Auto axes: XLA propagates shardings from the inputs (GSPMD); model code stays mesh-agnostic.
  auto = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh((data, fsdp), MESH_AXES, devices=devices, axis_types=auto)


def logical_to_spec(axes, shape, rules, mesh: Mesh) -> P:
  """PartitionSpec for a param; a dim that the mesh axis does not divide stays replicated."""
  table = dict(rules)
  spec = []
  for dim, name in zip(shape, axes or (None,) * len(shape)):
    mesh_axis = table.get(name) if name else None
    spec.append(mesh_axis if mesh_axis and dim % _axis_size(mesh, mesh_axis) == 0 else None)
  return P(*spec)


def _axis_size(mesh: Mesh, mesh_axis) -> int:
  """Devices along a mesh axis, a tuple of axes, or None (1)."""
  axes = mesh_axis if isinstance(mesh_axis, tuple) else (mesh_axis,)
  return int(np.prod([mesh.shape[a] for a in axes if a]))


def param_shardings(state: nnx.State, mesh: Mesh, rules=RULES_DP):
  """NamedShardings for an nnx.State of Params, from each Param's `logical_axes` metadata, in a
  tree of the same structure as `state` (Variables holding shardings), so that it also serves
  as the `rest` tree of `optax.tree_map_params` and as jit `out_shardings`."""
  def one(v):
    axes = v.get_metadata().get("logical_axes") if isinstance(v, nnx.Variable) else None
    return NamedSharding(mesh, logical_to_spec(axes, v.shape, rules, mesh))
  per_variable = jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return jax.tree.unflatten(jax.tree.structure(state), jax.tree.leaves(per_variable))


_ACTIVE = threading.local()


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules=RULES_DP):
  """While active (the training loop traces its steps inside it), `constrain` applies."""
  previous = getattr(_ACTIVE, "value", None)
  _ACTIVE.value = (mesh, rules)
  try:
    yield
  finally:
    _ACTIVE.value = previous


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
  """`with_sharding_constraint` of an activation by logical axis names, under the active mesh;
  `x` unchanged outside `activation_sharding`, on one device, or where a named dimension does
  not divide its mesh axes (a batch slice of an inference chunk, say), which a constraint would
  otherwise force to replicate."""
  active = getattr(_ACTIVE, "value", None)
  if active is None or active[0].size == 1:
    return x
  mesh, rules = active
  table = dict(rules)
  if any(dim % _axis_size(mesh, table.get(name) if name else None)
         for dim, name in zip(x.shape, axes)):
    return x
  return jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, logical_to_spec(axes, x.shape, rules, mesh)))


def per_batch_shard(fn):
  """`fn` (arrays with a leading batch axis -> one such array) run on each device's rows via
  `shard_map` under the active mesh, for kernels GSPMD cannot partition (a Pallas call would be
  gathered onto every device); `fn` itself outside `activation_sharding` or on one device."""
  def run(*args):
    active = getattr(_ACTIVE, "value", None)
    if active is None or active[0].size == 1:
      return fn(*args)
    mesh = active[0]
    axes = tuple(a for a in BATCH_AXES if args[0].shape[0] % _axis_size(mesh, a) == 0)
    if args[0].shape[0] % _axis_size(mesh, axes):
      return fn(*args)
    spec = P(axes)
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * len(args), out_specs=spec,
                         check_vma=False)(*args)
  return run


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local numpy rows -> global arrays split over the batch axes.

  With several processes each passes only its own rows (the data pipeline slices per process);
  `make_array_from_process_local_data` stitches them into one global batch.
  """
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return {k: jax.device_put(v, sharding) for k, v in batch.items()}
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def initialize_distributed() -> None:
  """`jax.distributed.initialize()` when launched as one of several processes.

  Set JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID;
  or MINILM_JAX_DISTRIBUTED=1 to let JAX detect the cluster (TPU pods, SLURM, Open MPI).
  CPU processes talk through gloo (MINILM_JAX_CPU_COLLECTIVES, default gloo).
  """
  import os
  addr = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if not addr and os.environ.get("MINILM_JAX_DISTRIBUTED", "0") != "1":
    return
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation",
                      os.environ.get("MINILM_JAX_CPU_COLLECTIVES", "gloo"))
  if addr:
    jax.distributed.initialize(addr, int(os.environ["JAX_NUM_PROCESSES"]),
                               int(os.environ["JAX_PROCESS_ID"]))
  else:
    jax.distributed.initialize()


def to_host(tree: Any) -> Any:
  """Fully-replicated or addressable values back to numpy (gathers across hosts if needed)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    tree = multihost_utils.process_allgather(tree, tiled=True)
  return jax.tree.map(np.asarray, tree)
