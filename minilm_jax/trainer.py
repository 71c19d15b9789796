"""The training loop every objective shares: sharded jit step, eval, checkpoints, resume,
preemption, NaN guards, progress bar and metric logs.

An objective supplies an `Objective`: a pure `loss_fn(model, batch, rng, frozen) -> (per_example,
aux)`, an `eval_fn(model, batch, frozen) -> per-example outputs`, and a host-side `metrics_fn`
over an epoch of eval outputs. The train state is one pytree {step, params, opt_state, rng,
nonfinite}; the step is `step(state, batch, frozen) -> (state, metrics)`, jitted with shardings
and donation where the loop is built (STYLE: split -> jit -> merge, because nnx.jit re-traverses
the graph on every call). Checkpoints live in `checkpoint.py`, the logs in `metric_log.py`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from minilm_jax import model as model_lib
from minilm_jax import runtime, sharding
from minilm_jax.checkpoint import Checkpoints, data_spec
from minilm_jax.metric_log import MetricLogger
from minilm_jax.optim import OptimConfig, make_optimizer
from minilm_jax.preemption import StopRequest

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  output_dir: str = "runs/default"
  num_epochs: float = 1.0
  max_steps: int | None = None          # overrides num_epochs when set
  batch_size: int = 32                  # global: rows per optimizer update
  # Forward and backward over this many slices of each batch (lax.scan), gradients summed before
  # one update: gradient accumulation, and less activation memory; on CPU in bf16 the slices
  # stay in cache (L12-H384 B32 S128, 2 slices: 1.04-1.12x; slower in float32). batch_size must
  # divide by it.
  microbatches: int = 1
  eval_batch_size: int = 128
  eval_every: int = 0                   # steps; 0: once per epoch
  log_every: int = 20
  save_every: int = 0                   # steps; 0: at every eval
  keep_checkpoints: int = 2
  seed: int = 0
  mesh_data: int = -1
  mesh_fsdp: int = 1
  fsdp: bool = False
  nan_policy: Literal["stop", "skip"] = "stop"
  resume: bool = False
  # A fresh run (resume false) into a directory that holds an earlier run is refused unless
  # this is set; then the earlier run's checkpoints, logs and exports are deleted first.
  overwrite: bool = False
  # Keep each epoch's last partial training batch (per length bucket, padded with zero-weight
  # rows) as HF does, or drop it. Evaluation never drops rows.
  drop_remainder: bool = False
  progress: bool = True
  # Batches on their way to the devices while a step runs (host-to-device prefetch).
  prefetch: int = 2
  # jax.transfer_guard level around the steady-state steps (all but the first, outside log,
  # eval and save): "disallow" makes any implicit host<->device transfer, a hidden sync, an error.
  transfer_guard: Literal["allow", "log", "disallow"] = "allow"
  # JAX's persistent compilation cache: a rerun with the same shapes loads its executables from
  # here instead of compiling them (seconds on a CPU, minutes for a large model on a TPU).
  # "default": $MINILM_JAX_CACHE or ~/.cache/minilm_jax, one folder per jaxlib and CPU kind;
  # a directory; "" turns it off.
  compilation_cache_dir: str = "default"
  best_metric: str | None = None        # e.g. "accuracy"; None: the objective's default
  best_mode: Literal["max", "min"] = "max"


@dataclasses.dataclass
class Objective:
  """What a task plugs into the loop. All callables are pure functions of arrays, and every
  objective has the same signatures whether or not it has frozen arrays (then `frozen` is None).

  The loop minimises sum(w * loss) / sum(w) over the global batch, where w is `weights(batch)`
  (default: the batch's row weights, 0 for dummy rows). An objective whose natural unit is not
  the example (seq2seq: target tokens) returns per-example means and weights them by their
  counts, which makes the normalisation global under any `microbatches`. Aux values must be
  means under the same weights."""
  loss_fn: Callable[..., tuple[jax.Array, dict]]  # (model, batch, rng, frozen) -> ((B,), aux)
  eval_fn: Callable[..., dict] | None = None      # (model, batch, frozen) -> {name: (B, ...)}
  metrics_fn: Callable[[dict], dict] | None = None  # host: concatenated eval outputs -> metrics
  best_metric: str | None = None
  frozen: Any = None   # e.g. a teacher's params: passed to loss_fn and eval_fn, never trained
  weights: Callable[[dict], jax.Array] | None = None  # batch -> (B,) loss weights
  # Replaces the loop's value_and_grad when the loss couples the batch's rows and is
  # differentiated in parts (GradCache): (graphdef, params, batch, rng, frozen) -> (weighted
  # mean loss, aux, gradients of it). Not combinable with microbatches.
  loss_and_grads: Callable[..., tuple[jax.Array, dict, Any]] | None = None


class NonFiniteLoss(RuntimeError):
  pass


class RunExists(ValueError):
  """A fresh run pointed at the output directory of an earlier one."""


# What a run leaves in its output directory (config.json is rewritten by every launch).
RUN_ARTIFACTS = ("checkpoints", "history.jsonl", "metrics.json", "tensorboard", "curves.png",
                 "final", "best", "hf", "sentence-transformers", "predictions.jsonl")


def prepare_output_dir(loop: LoopConfig) -> Path:
  """Creates `loop.output_dir`. A fresh run into a directory that holds an earlier run raises
  `RunExists` and touches nothing, unless `loop.overwrite` (the earlier run is deleted first)."""
  out = Path(loop.output_dir)
  found = [name for name in RUN_ARTIFACTS if (out / name).exists()
           and not ((out / name).is_dir() and not any((out / name).iterdir()))]
  if found and not (loop.resume or loop.overwrite):
    raise RunExists(
        f"{out} holds an earlier run ({', '.join(found)}). Continue it with "
        f"--loop.resume=true, or replace it with --loop.overwrite=true; nothing was changed")
  if loop.overwrite and not loop.resume:
    _sync("minilm_jax_overwrite_scanned")  # every process looked before anything is deleted
    if found and jax.process_index() == 0:
      log.warning("--loop.overwrite: deleting the earlier run in %s (%s)", out, ", ".join(found))
      for name in found:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    _sync("minilm_jax_overwrite_deleted")
  out.mkdir(parents=True, exist_ok=True)
  return out


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


# --- the pure step --------------------------------------------------------------------------

def make_train_step(graphdef, objective: Objective, tx: optax.GradientTransformation,
                    schedule, microbatches: int = 1):
  """The jittable step: loss and gradients of the weighted mean per-example loss, one optimizer
  update. `microbatches` > 1 runs forward and backward over that many slices of the batch in a
  `lax.scan` and sums their gradients before the update (`LoopConfig.microbatches`): the
  weighted sums are normalised once, by the whole batch's weight, so the update equals the
  whole-batch one."""
  weights_of = objective.weights or (lambda batch: batch["weights"])

  def weighted_sum(params, batch, rng, frozen):
    model = nnx.merge(graphdef, params)
    per_example, aux = objective.loss_fn(model, batch, rng, frozen)
    w = weights_of(batch).astype(jnp.float32)
    return jnp.sum(per_example * w), (aux, jnp.sum(w))

  grad_fn = jax.value_and_grad(weighted_sum, has_aux=True)

  if objective.loss_and_grads is not None and microbatches > 1:
    raise ValueError("this objective differentiates its batch itself (GradCache chunks); "
                     "set loop.microbatches to 1")

  def loss_and_grads(params, batch, rng, frozen):
    if objective.loss_and_grads is not None:
      return objective.loss_and_grads(graphdef, params, batch, rng, frozen)
    if microbatches == 1:
      (total, (aux, wsum)), grads = grad_fn(params, batch, rng, frozen)
    else:
      def sums(i, part):  # -> (weighted loss sum, weight sum, weighted aux, gradients)
        (total, (aux, wsum)), grads = grad_fn(params, part, jax.random.fold_in(rng, i), frozen)
        # The objectives' aux values are weighted means over their (micro)batch.
        return total, wsum, jax.tree.map(lambda a: a * wsum, aux), grads

      def add(carry, xs):
        return jax.tree.map(jnp.add, carry, sums(*xs)), None

      parts = jax.tree.map(lambda a: model_lib.split_batch(a, microbatches), batch)
      zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(
          sums, 0, jax.tree.map(lambda a: a[0], parts)))
      (total, wsum, aux, grads), _ = jax.lax.scan(add, zeros, (jnp.arange(microbatches), parts))
      aux = jax.tree.map(lambda a: a / jnp.maximum(wsum, 1.0), aux)
    scale = 1.0 / jnp.maximum(wsum, 1.0)
    return total * scale, aux, jax.tree.map(lambda g: g * scale, grads)

  def step(state, batch, frozen=None):
    rng = jax.random.fold_in(state["rng"], state["step"])
    loss, aux, grads = loss_and_grads(state["params"], batch, rng, frozen)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # A non-finite step never touches params or optimizer state: "skip" goes on, "stop" ends
    # the run on the host with the last checkpoint intact.
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = {
        "step": state["step"] + 1,
        "params": keep(params, state["params"]),
        "opt_state": keep(opt_state, state["opt_state"]),
        "rng": state["rng"],
        "nonfinite": state["nonfinite"] + (~finite).astype(jnp.int32),
    }
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]), **aux}
    return new_state, metrics
  return step


def make_eval_step(graphdef, objective: Objective):
  def step(params, batch, frozen=None):
    return objective.eval_fn(nnx.merge(graphdef, params), batch, frozen)
  return step


# --- the loop -------------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
  state: Any
  model: nnx.Module
  history: list[dict]
  evals: list[dict]
  best: dict | None
  preempted: bool = False    # stopped early by SIGTERM or Ctrl-C, a checkpoint saved
  interrupted: bool = False  # by Ctrl-C


def init_state(model: nnx.Module, optim: OptimConfig, total_updates: int, seed: int = 0, *,
               mesh=None, rules=sharding.RULES_DP):
  """-> (graphdef, state, tx, schedule): the train state placed on `mesh` (default: every device).

  The optimizer state is never built unsharded: its shardings come from the params' logical
  axes through `optax.tree_map_params` on `jax.eval_shape(tx.init)`, and one jit with those
  `out_shardings` creates it on the devices that hold it. Layer-wise LR decay counts the
  model's own layers (`encoder_of(model).cfg.num_layers`)."""
  mesh = mesh or sharding.make_mesh()
  graphdef, params = nnx.split(model)
  num_layers = model_lib.encoder_of(model).cfg.num_layers
  tx, schedule = make_optimizer(optim, params, total_updates, num_layers)
  rep = sharding.replicated(mesh)
  param_sh = sharding.param_shardings(params, mesh, rules)
  opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, jax.eval_shape(tx.init, params), param_sh,
                                 transform_non_params=lambda _: rep)
  state_sh = {"step": rep, "params": param_sh, "opt_state": opt_sh, "rng": rep, "nonfinite": rep}

  def init(params):
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "rng": jax.random.PRNGKey(seed), "nonfinite": jnp.zeros((), jnp.int32)}
  state = jax.jit(init, out_shardings=state_sh)(jax.device_put(params, param_sh))
  return graphdef, state, tx, schedule


def train(model: nnx.Module, objective: Objective, train_batches, loop: LoopConfig,
          optim: OptimConfig, *, eval_batches=None,
          on_eval: Callable[[nnx.Module, dict, bool], None] | None = None,
          mesh=None, logger=None) -> Result:
  """Runs the loop. `train_batches` is one of `data.pipeline`'s Grain pipelines:
  `batches_per_epoch`, `spec()`, `state()`, `restore(state)`, iteration advancing the state.
  `on_eval(model, metrics, is_best)` lets the caller export the best model."""
  runtime.enable_compilation_cache(loop.compilation_cache_dir)
  mesh = mesh or sharding.make_mesh(loop.mesh_data, loop.mesh_fsdp)
  rules = sharding.RULES_FSDP if loop.fsdp else sharding.RULES_DP
  # The SIGTERM handler goes in first: a notice during set-up, restore or the first
  # compilation still ends with a completed step and a checkpoint. Steps are traced inside
  # `activation_sharding`, so the model's activation constraints see this mesh.
  with StopRequest() as preemption, sharding.activation_sharding(mesh, rules):
    return _train(preemption, model, objective, train_batches, loop, optim, mesh, rules,
                  eval_batches=eval_batches, on_eval=on_eval, logger=logger)


def _train(preemption: StopRequest, model, objective, train_batches, loop, optim, mesh, rules,
           *, eval_batches, on_eval, logger) -> Result:
  size = getattr(train_batches, "batch_size", loop.batch_size)
  if loop.microbatches < 1 or size % loop.microbatches:
    raise ValueError(f"loop.microbatches={loop.microbatches} must be >= 1 and divide the batch "
                     f"size {size}")
  if loop.prefetch < 1:
    raise ValueError(f"loop.prefetch={loop.prefetch} must be >= 1 (batches in flight)")
  out_dir = prepare_output_dir(loop)
  per_epoch = train_batches.batches_per_epoch
  if per_epoch == 0:  # otherwise num_epochs gives 0 steps and an untrained model is exported
    raise ValueError(f"no training batches: every length bucket holds fewer than the global "
                     f"batch_size {size} examples and the remainder is dropped; lower "
                     f"loop.batch_size or use fewer buckets")
  total = loop.max_steps or int(math.ceil(loop.num_epochs * per_epoch))
  graphdef, state, tx, schedule = init_state(model, optim, total, loop.seed, mesh=mesh,
                                             rules=rules)
  rep = sharding.replicated(mesh)
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  frozen = objective.frozen
  if frozen is not None:
    frozen = jax.device_put(frozen, sharding.param_shardings(frozen, mesh, rules))

  step_fn = jax.jit(make_train_step(graphdef, objective, tx, schedule, loop.microbatches),
                    in_shardings=(state_sh, sharding.batch_sharding(mesh), None),
                    out_shardings=(state_sh, rep), donate_argnums=0)
  eval_fn = (jax.jit(make_eval_step(graphdef, objective)) if objective.eval_fn else None)
  ckpt = Checkpoints(out_dir / "checkpoints", loop.keep_checkpoints)
  spec = data_spec(train_batches)
  start = 0
  if loop.resume:
    # Before anything is written to out_dir: a mismatched config raises here and leaves the
    # run directory as it was.
    restored = ckpt.restore_latest(jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state), spec)
    if restored is None:
      log.warning("--resume: no checkpoint in %s, starting from scratch", ckpt.directory)
    else:
      start, state, data_state = restored
      train_batches.restore(data_state)
      # The data state's scalars; a packer's open rows (lists of example ids) only counted.
      brief = {k: f"{len(v)} items" if isinstance(v, (list, tuple, dict)) else v
               for k, v in data_state.items()} if isinstance(data_state, dict) else data_state
      log.info("resumed at step %d (data %s)", start, brief)

  logger = logger or MetricLogger(out_dir, enabled=jax.process_index() == 0)
  history, evals, best = logger.load_history(start)
  best_key = loop.best_metric or objective.best_metric
  if jax.process_count() > 1 and best_key:
    best = _agree_on_best(best, best_key)
  eval_every = loop.eval_every or per_epoch
  save_every = loop.save_every or eval_every
  batches: Iterator = iter(train_batches)  # advances train_batches.state()

  def fetch():
    """The next batch on its way to the devices (device_put is asynchronous, so the copy
    overlaps the step in flight), with the data position after it: what a checkpoint saved
    after this batch's step must record, whatever has been fetched since."""
    host_batch = next(batches)
    position = train_batches.state()
    return host_batch, sharding.shard_batch(host_batch, mesh), position

  preempted = False

  def evaluate(step):
    nonlocal best
    model_now = nnx.merge(graphdef, state["params"])
    metrics = run_eval(eval_fn, state["params"], eval_batches, objective, mesh, frozen,
                       progress=loop.progress and logger.enabled)
    metrics["step"] = step
    is_best = False
    if best_key and best_key in metrics:
      sign = 1 if loop.best_mode == "max" else -1
      is_best = best is None or sign * metrics[best_key] > sign * best[best_key]
      if is_best:
        best = dict(metrics)
    evals.append(metrics)
    logger.log_eval(step, metrics, best)
    if on_eval is not None:
      on_eval(model_now, metrics, is_best)
    return metrics

  from tqdm.auto import tqdm
  bar = tqdm(total=total, initial=start, disable=not (loop.progress and logger.enabled),
             unit="step", dynamic_ncols=True)
  t0, seen, pending = time.perf_counter(), 0, []
  log.info("training steps %d..%d (the first one compiles)", start + 1, total)
  step = start
  ahead = collections.deque(fetch() for _ in range(min(loop.prefetch, total - step)))
  while step < total:
    host_batch, batch, position = ahead.popleft()
    # Steady state: the step and the next transfer dispatch without waiting for the device.
    with jax.transfer_guard(loop.transfer_guard if step > start else "allow"):
      state, metrics = step_fn(state, batch, frozen)
      if step + len(ahead) + 1 < total:
        ahead.append(fetch())  # host-to-device prefetch, `loop.prefetch` batches ahead
    pending.append(metrics)
    seen += int(host_batch["weights"].shape[0]) * jax.process_count()
    step += 1
    if len(pending) > 1:  # the bar counts finished steps: wait for the one before this one
      jax.block_until_ready(pending[-2])
      bar.update(1)
    last = step == total
    stop = preemption.should_stop(step)  # read once: log, save and exit agree on it
    if step % loop.log_every == 0 or last or stop:
      host = jax.device_get(pending)  # metrics leave the device only here
      bar.update(1)
      pending = []
      nonfinite = int(jax.device_get(state["nonfinite"]))
      rec = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
      dt = time.perf_counter() - t0
      rec.update(step=step, seq_per_s=seen / max(dt, 1e-9), nonfinite=nonfinite)
      history.append(rec)
      logger.log_train(step, rec)
      bar.set_postfix(loss=f"{rec['loss']:.4f}", seq_s=f"{rec['seq_per_s']:.1f}")
      t0, seen = time.perf_counter(), 0
      if nonfinite and loop.nan_policy == "stop":
        bar.close()
        ckpt.close()
        raise NonFiniteLoss(
            f"non-finite loss or gradient at or before step {step}; parameters were not "
            f"updated and the last checkpoint in {ckpt.directory} is intact")
    if eval_fn is not None and eval_batches is not None and (step % eval_every == 0 or last):
      evaluate(step)
    if step % save_every == 0 or last or stop:
      ckpt.save(step, state, position, wait=stop, spec=spec)
    if stop and not last:
      log.warning("%s: saved step %d, stopping", "Ctrl-C" if preemption.interrupted
                  else "SIGTERM", step)
      preempted = True
      break
  bar.close()
  ckpt.close()
  logger.finish(history, evals, best)
  model = nnx.merge(graphdef, state["params"])
  return Result(state, model, history, evals, best, preempted,
                interrupted=preempted and preemption.interrupted)


def _agree_on_best(best: dict | None, key: str) -> dict | None:
  """Process 0's best metric on every process. `is_best` triggers `on_eval`, a collective save,
  so all processes must decide alike, but only process 0 reads the history back on resume.
  The float64 travels as two uint32 words: without x64, a float64 broadcast would round."""
  from jax.experimental import multihost_utils
  value = best[key] if best and key in best else np.nan
  words = np.array([value], np.float64).view(np.uint32)
  value = float(np.asarray(multihost_utils.broadcast_one_to_all(words), np.uint32)
                .view(np.float64)[0])
  if np.isnan(value):
    return None
  return {**(best or {}), key: value}


def run_eval(eval_fn, params, eval_batches, objective: Objective, mesh, frozen=None, *,
             progress: bool = False) -> dict:
  """One pass over the eval set; outputs of every process are gathered, dummy rows dropped."""
  from tqdm.auto import tqdm
  outs: dict[str, list] = {}
  for host_batch in tqdm(eval_batches.iter_epoch(), desc="eval", unit="batch", leave=False,
                         total=getattr(eval_batches, "batches_per_epoch", None),
                         disable=not progress):
    batch = sharding.shard_batch(host_batch, mesh)
    res = dict(eval_fn(params, batch, frozen))
    for k in ("weights", "index", "labels"):
      if k in batch:
        res["_" + k] = batch[k]
    res = sharding.to_host(res)
    keep = res.pop("_weights") > 0
    for k, v in res.items():
      outs.setdefault(k, []).append(v[keep])
  cat = {k: np.concatenate(v) for k, v in outs.items()}
  return objective.metrics_fn(cat) if objective.metrics_fn else {}
