"""Stopping a training loop cleanly: SIGTERM (a preemption notice) or Ctrl-C (a notebook's
interrupt) asks the loop to finish its step, save a checkpoint and return (`trainer._train`)."""

from __future__ import annotations

import logging
import signal

import jax

log = logging.getLogger(__name__)


class StopRequest:
  """SIGTERM (a preemption notice) or Ctrl-C: finish the current step, checkpoint, stop cleanly.

  One process: Python handlers set a flag that the loop reads once per step. Python runs
  handlers between bytecodes, so a signal during compilation or a checkpoint write takes effect
  when that call returns, and the step in flight still completes. Ctrl-C (SIGINT; a notebook's
  interrupt) works the same way, and a second Ctrl-C raises KeyboardInterrupt at once.

  Several processes: saving is collective, so all must stop after the same step, yet a notice
  may reach only some of them. `jax.distributed.initialize()` installs JAX's own SIGTERM
  notifier, which tells the coordination service; `reached_preemption_sync_point(step)` then
  turns true on every process at the same step (one past the furthest). Installing a Python
  handler there would replace JAX's and hide the notice, so none is installed.
  """

  def __init__(self):
    self.requested = self.interrupted = False
    self._old: dict = {}
    self._multi = jax.process_count() > 1

  def __enter__(self):
    if self._multi:
      return self
    for sig, handler in ((signal.SIGTERM, self._handle), (signal.SIGINT, self._interrupt)):
      try:
        self._old[sig] = signal.signal(sig, handler)
      except ValueError:  # not in the main thread
        pass
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def _interrupt(self, signum, frame):
    del frame
    if self.interrupted:  # the second Ctrl-C: stop now
      signal.signal(signum, self._old.get(signum, signal.default_int_handler))
      raise KeyboardInterrupt
    log.warning("interrupted: stopping after this step (Ctrl-C again to stop at once)")
    self.requested = self.interrupted = True

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
    for sig, old in self._old.items():
      signal.signal(sig, old)
