"""The training loop every objective shares: sharded jit step, eval, orbax checkpoints, resume,
preemption, NaN guards, progress bar, TensorBoard, metrics.json and a PNG of the curves.

An objective supplies an `Objective`: a pure `loss_fn(model, batch, rng) -> (per_example, aux)`,
an `eval_fn(model, batch) -> per-example outputs`, and a host-side `metrics_fn` over an epoch of
eval outputs. The train state is one pytree {step, params, opt_state, rng, nonfinite}; the step is
`step(state, batch) -> (state, metrics)`, jitted with shardings and donation where the loop is
built (STYLE: split -> jit -> merge, because nnx.jit re-traverses the graph on every call).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from minilm_jax import model as model_lib
from minilm_jax import sharding
from minilm_jax.optim import OptimConfig, make_optimizer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  output_dir: str = "runs/default"
  num_epochs: float = 1.0
  max_steps: int | None = None          # overrides num_epochs when set (micro-steps)
  batch_size: int = 32                  # global, per micro-step
  # Forward and backward over this many slices of each batch (lax.scan), gradients summed before
  # one update: less activation memory; on CPU in bf16 the slices stay in cache (L12-H384 B32
  # S128, 2 slices: 1.04-1.12x; slower in float32). batch_size must divide by it.
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
  progress: bool = True
  best_metric: str | None = None        # e.g. "accuracy"; None: the objective's default
  best_mode: Literal["max", "min"] = "max"


@dataclasses.dataclass
class Objective:
  """What a task plugs into the loop. All callables are pure functions of arrays."""
  loss_fn: Callable[..., tuple[jax.Array, dict]]       # (model, batch, rng) -> ((B,), aux)
  eval_fn: Callable[..., dict] | None = None           # (model, batch) -> {name: (B, ...)}
  metrics_fn: Callable[[dict], dict] | None = None     # host: concatenated eval outputs -> metrics
  best_metric: str | None = None
  frozen: Any = None   # e.g. a teacher's params: passed to loss_fn, never trained


class NonFiniteLoss(RuntimeError):
  pass


# --- the pure step --------------------------------------------------------------------------

def make_train_step(graphdef, objective: Objective, tx: optax.GradientTransformation,
                    schedule, nan_policy: str, grad_accum: int = 1, microbatches: int = 1):
  """The jittable step: loss and gradients of the weighted mean per-example loss, one optimizer
  update. `microbatches` > 1 runs forward and backward over that many slices of the batch in a
  `lax.scan` and sums their gradients before the update (`LoopConfig.microbatches`)."""
  def weighted_sum(params, batch, rng, frozen):
    model = nnx.merge(graphdef, params)
    args = (model, batch, rng) if frozen is None else (model, frozen, batch, rng)
    per_example, aux = objective.loss_fn(*args)
    w = batch["weights"]
    return jnp.sum(per_example * w), (aux, jnp.sum(w))

  grad_fn = jax.value_and_grad(weighted_sum, has_aux=True)

  def loss_and_grads(params, batch, rng, frozen):
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
    metrics = {"loss": loss, "grad_norm": grad_norm,
               "lr": schedule(state["step"] // grad_accum), **aux}
    return new_state, metrics
  return step


def make_eval_step(graphdef, objective: Objective):
  def step(params, batch, frozen=None):
    model = nnx.merge(graphdef, params)
    return objective.eval_fn(model, batch) if frozen is None else objective.eval_fn(
        model, frozen, batch)
  return step


# --- checkpoints ----------------------------------------------------------------------------

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
    """`spec` describes what `data_state` (a Batcher position) means; see `batcher_spec`."""
    data = {"position": data_state, "spec": spec}
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)), force=True)
    if wait:
      self.manager.wait_until_finished()

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


def batcher_spec(batches) -> dict:
  """What a Batcher position means: the same (epoch, batch) names the same rows only with the
  same global batch size, buckets, seed and data. The process count is left out on purpose: a
  run may resume on a different number of hosts with the same global batch."""
  spec = {k: getattr(batches, k) for k in ("batch_size", "buckets", "seed", "shuffle",
                                           "drop_remainder", "batches_per_epoch")
          if hasattr(batches, k)}
  if hasattr(batches, "features"):
    spec["examples"] = len(batches.features)
  elif hasattr(batches, "n"):
    spec["examples"] = batches.n
  return json.loads(json.dumps(spec, default=int))


# --- the loop -------------------------------------------------------------------------------

class _Preemption:
  """SIGTERM (a preemption notice): finish the current step, checkpoint, exit cleanly.

  One process: a Python handler sets a flag that the loop reads once per step. Python runs
  handlers between bytecodes, so a SIGTERM during compilation or a checkpoint write takes effect
  when that call returns, and the step in flight still completes.

  Several processes: saving is collective, so all must stop after the same step, yet a notice
  may reach only some of them. `jax.distributed.initialize()` installs JAX's own SIGTERM
  notifier, which tells the coordination service; `reached_preemption_sync_point(step)` then
  turns true on every process at the same step (one past the furthest). Installing a Python
  handler there would replace JAX's and hide the notice, so none is installed.
  """

  def __init__(self):
    self.requested = False
    self._old = None
    self._multi = jax.process_count() > 1

  def __enter__(self):
    if self._multi:
      return self
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not in the main thread
      self._old = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def should_stop(self, step: int) -> bool:
    """Call once after every step (the multi-process protocol counts the calls)."""
    if not self._multi:
      return self.requested
    from jax.experimental import multihost_utils
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # jax_enable_preemption_service=False: no coordinated stop
      return False

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


@dataclasses.dataclass
class Result:
  state: Any
  model: nnx.Module
  history: list[dict]
  evals: list[dict]
  best: dict | None
  preempted: bool = False


def init_state(model: nnx.Module, optim: OptimConfig, total_updates: int, num_layers: int,
               seed: int):
  graphdef, params = nnx.split(model)
  tx, schedule = make_optimizer(optim, params, total_updates, num_layers)
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
           "rng": jax.random.PRNGKey(seed), "nonfinite": jnp.zeros((), jnp.int32)}
  return graphdef, state, tx, schedule


def train(model: nnx.Module, objective: Objective, train_batches, loop: LoopConfig,
          optim: OptimConfig, *, eval_batches=None, num_layers: int = 12,
          on_eval: Callable[[nnx.Module, dict, bool], None] | None = None,
          mesh=None, logger=None) -> Result:
  """Runs the loop. `train_batches` is a `data.Batcher`: `batches_per_epoch`, `state()`,
  `restore(state)`, iteration advancing the state. `on_eval(model, metrics, is_best)` lets the
  caller export the best model."""
  # The SIGTERM handler goes in first: a notice during set-up, restore or the first
  # compilation still ends with a completed step and a checkpoint.
  with _Preemption() as preemption:
    return _train(preemption, model, objective, train_batches, loop, optim,
                  eval_batches=eval_batches, num_layers=num_layers, on_eval=on_eval, mesh=mesh,
                  logger=logger)


def _train(preemption: _Preemption, model, objective, train_batches, loop, optim, *,
           eval_batches, num_layers, on_eval, mesh, logger) -> Result:
  size = getattr(train_batches, "batch_size", loop.batch_size)
  if loop.microbatches < 1 or size % loop.microbatches:
    raise ValueError(f"loop.microbatches={loop.microbatches} must be >= 1 and divide the batch "
                     f"size {size}")
  out_dir = Path(loop.output_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  mesh = mesh or sharding.make_mesh(loop.mesh_data, loop.mesh_fsdp)
  accum = max(optim.grad_accum_steps, 1)
  per_epoch = train_batches.batches_per_epoch
  if per_epoch == 0:  # otherwise num_epochs gives 0 steps and an untrained model is exported
    raise ValueError(f"no training batches: every length bucket holds fewer than the global "
                     f"batch_size {size} examples and the remainder is dropped; lower "
                     f"loop.batch_size or use fewer buckets")
  total = loop.max_steps or int(math.ceil(loop.num_epochs * per_epoch))
  graphdef, state, tx, schedule = init_state(model, optim, total // accum, num_layers, loop.seed)

  rules = sharding.RULES_FSDP if loop.fsdp else sharding.RULES_DP
  param_sh = sharding.param_shardings(state["params"], mesh, rules)
  rep = sharding.replicated(mesh)
  state["params"] = jax.device_put(state["params"], param_sh)
  # mu/nu inherit the params' shardings; scalars (counts) would land on one device: replicate.
  everywhere = set(mesh.devices.flat)
  state["opt_state"] = jax.tree.map(
      lambda x: x if x.sharding.device_set == everywhere else jax.device_put(x, rep),
      jax.jit(tx.init)(state["params"]))
  state = {k: (v if k in ("params", "opt_state") else jax.device_put(v, rep))
           for k, v in state.items()}
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  frozen = objective.frozen
  if frozen is not None:
    frozen = jax.device_put(frozen, sharding.param_shardings(frozen, mesh, rules))

  step_fn = jax.jit(make_train_step(graphdef, objective, tx, schedule, loop.nan_policy, accum,
                                    loop.microbatches),
                    in_shardings=(state_sh, sharding.batch_sharding(mesh), None),
                    out_shardings=(state_sh, rep), donate_argnums=0)
  eval_fn = (jax.jit(make_eval_step(graphdef, objective)) if objective.eval_fn else None)

  ckpt = Checkpoints(out_dir / "checkpoints", loop.keep_checkpoints)
  data_spec = batcher_spec(train_batches)
  start = 0
  if loop.resume:
    # Before anything is written to out_dir: a mismatched config raises here and leaves the
    # run directory as it was.
    restored = ckpt.restore_latest(jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state), data_spec)
    if restored is None:
      log.warning("--resume: no checkpoint in %s, starting from scratch", ckpt.directory)
    else:
      start, state, data_state = restored
      train_batches.restore(data_state)
      log.info("resumed at step %d (data %s)", start, data_state)

  logger = logger or MetricLogger(out_dir, enabled=jax.process_index() == 0)
  history, evals, best = logger.load_history(start)
  best_key = loop.best_metric or objective.best_metric
  if jax.process_count() > 1 and best_key:
    best = _agree_on_best(best, best_key)
  eval_every = loop.eval_every or per_epoch
  save_every = loop.save_every or eval_every
  batches: Iterator = iter(train_batches)  # advances train_batches.state()
  preempted = False

  def evaluate(step):
    nonlocal best
    model_now = nnx.merge(graphdef, state["params"])
    metrics = run_eval(eval_fn, state["params"], eval_batches, objective, mesh, frozen)
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
  while step < total:
    host_batch = next(batches)
    batch = sharding.shard_batch(host_batch, mesh)
    state, metrics = step_fn(state, batch, frozen)
    pending.append(metrics)
    seen += int(host_batch["weights"].shape[0]) * jax.process_count()
    step += 1
    bar.update(1)
    last = step == total
    stop = preemption.should_stop(step)  # read once: log, save and exit agree on it
    if step % loop.log_every == 0 or last or stop:
      host = jax.device_get(pending)  # metrics leave the device only here
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
      ckpt.save(step, state, train_batches.state(), wait=stop, spec=data_spec)
    if stop and not last:
      log.warning("SIGTERM: saved step %d, exiting", step)
      preempted = True
      break
  bar.close()
  ckpt.close()
  logger.finish(history, evals, best)
  model = nnx.merge(graphdef, state["params"])
  return Result(state, model, history, evals, best, preempted)


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


def run_eval(eval_fn, params, eval_batches, objective: Objective, mesh, frozen=None) -> dict:
  """One pass over the eval set; outputs of every process are gathered, dummy rows dropped."""
  outs: dict[str, list] = {}
  for host_batch in eval_batches.iter_epoch():
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


class MetricLogger:
  """TensorBoard events, `history.jsonl`, `metrics.json` and `curves.png` in the output dir."""

  def __init__(self, out_dir: Path, enabled: bool = True):
    self.out_dir, self.enabled = Path(out_dir), enabled
    self.writer = None
    if enabled:
      from tensorboardX import SummaryWriter
      self.writer = SummaryWriter(str(self.out_dir / "tensorboard"))

  def load_history(self, start: int):
    """On resume, keep the records up to the restored step."""
    history, evals, best = [], [], None
    path = self.out_dir / "history.jsonl"
    # Only the writer reads: other processes would race with its rewrite below.
    if start and self.enabled and path.exists():
      for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec["step"] <= start:
          (evals if rec.pop("kind") == "eval" else history).append(rec)
      best = json.loads((self.out_dir / "metrics.json").read_text()).get("best") if (
          self.out_dir / "metrics.json").exists() else None
    if self.enabled:
      with path.open("w") as f:
        for kind, recs in (("train", history), ("eval", evals)):
          for r in recs:
            f.write(json.dumps({"kind": kind, **r}) + "\n")
    return history, evals, best

  def _append(self, rec):
    with (self.out_dir / "history.jsonl").open("a") as f:
      f.write(json.dumps(rec) + "\n")

  def log_train(self, step, rec):
    if not self.enabled:
      return
    for k, v in rec.items():
      if k != "step":
        self.writer.add_scalar(f"train/{k}", v, step)
    self._append({"kind": "train", **rec})

  def log_eval(self, step, metrics, best):
    if not self.enabled:
      return
    for k, v in metrics.items():
      if k != "step" and isinstance(v, (int, float)):
        self.writer.add_scalar(f"eval/{k}", v, step)
    self._append({"kind": "eval", **metrics})
    self._write_metrics(metrics, best)
    summary = " ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                       if isinstance(v, float) and k != "step")
    log.info("eval @ %d: %s", step, summary)

  def _write_metrics(self, final, best, extra=None):
    data = {"final": final, "best": best, **(extra or {})}
    (self.out_dir / "metrics.json").write_text(json.dumps(data, indent=2, default=float) + "\n")

  def finish(self, history, evals, best):
    if not self.enabled:
      return
    self.writer.flush()
    self._write_metrics(evals[-1] if evals else None, best,
                        {"train_final": history[-1] if history else None})
    plot_curves(self.out_dir / "curves.png", history, evals)


def plot_curves(path: Path, history: list[dict], evals: list[dict]) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  eval_keys = sorted({k for e in evals for k, v in e.items()
                      if k != "step" and isinstance(v, (int, float))})
  n = 1 + len(eval_keys[:3])
  fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.2), squeeze=False)
  ax = axes[0, 0]
  if history:
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss")
  for e_key in ("loss",):
    if evals and e_key in evals[0]:
      ax.plot([e["step"] for e in evals], [e[e_key] for e in evals], "o-", label="eval loss")
  ax.set_xlabel("step")
  ax.set_title("loss")
  ax.legend()
  for ax, key in zip(axes[0, 1:], [k for k in eval_keys if k != "loss"][:3]):
    ax.plot([e["step"] for e in evals], [e.get(key, np.nan) for e in evals], "o-")
    ax.set_title(f"eval {key}")
    ax.set_xlabel("step")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
