"""The part of a training loop that is not the step: progress hooks, logging, the finiteness check, periodic
saves and stopping on preemption. The GPT trainer (train.py) and the VQ trainer (train_vq.py) share it.

A trainer runs its own steps and calls `Loop.end_of_step` after each one:

  lp = loop.Loop(total_steps=..., log_every=..., checkpoint_every=..., writer=writer, preemption=preempt,
                 reached_preemption=ckpt.reached_preemption, last_saved=ckpt.latest_step, wait=ckpt.wait)
  while step < total:
    state, metrics = step_fn(state, batch)
    step += 1
    if lp.end_of_step(step, metrics, save=lambda s: ckpt.save(s, state, ...)):
      break  # Preempted, after saving this step.
"""
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from absl import logging


class Loop:
  """Decides, after every step, whether to log, save and stop; writes the logged scalars.

  preemption: an object whose `.requested` turns True on SIGTERM (checkpoints.Preemption).
  reached_preemption(step): the checkpoint manager's own preemption signal (orbax), or None.
  last_saved() / wait(): the latest finished checkpoint step and a wait for pending async saves, used
    only to say in an error which checkpoint is the last good one.
  excluded_s(): seconds to leave out of the measured step time (e.g. compilation done in between).
  """

  def __init__(self, *, total_steps: int, log_every: int, checkpoint_every: int, writer, preemption: Any,
               last_saved: Callable[[], Any], wait: Callable[[], None] = lambda: None,
               reached_preemption: Callable[[int], bool] | None = None, hooks: Sequence[Callable] = (),
               excluded_s: Callable[[], float] = lambda: 0.0, what: str = "", start: int = 0):
    self.total_steps, self.log_every, self.checkpoint_every = total_steps, log_every, checkpoint_every
    self.writer, self.preemption, self.hooks = writer, preemption, list(hooks)
    self.last_saved, self.wait, self.reached_preemption = last_saved, wait, reached_preemption
    self.excluded_s, self.what = excluded_s, what
    self.last: dict[str, float] = {}  # The scalars of the latest log step.
    self.stopped_early = False
    self._t_log, self._step_log, self._excluded_log = time.perf_counter(), start, excluded_s()

  def should_stop(self, step: int) -> bool:
    """True when this step is the one to save and stop at (SIGTERM or the manager's preemption signal)."""
    # Read the flag once: a SIGTERM landing mid-save stops the loop one step later, after its own save.
    stop = bool(self.preemption.requested)
    if self.reached_preemption is not None:
      stop = self.reached_preemption(step) or stop
    return stop

  def end_of_step(self, step: int, metrics: Mapping[str, Any], save: Callable[[int], Any],
                  extra: Callable[[int, float], Mapping[str, float]] | None = None) -> bool:
    """Hooks, then log / check / save as the intervals and preemption say; True means stop now.

    metrics: the step's (device) scalars; read back only on log and save steps. extra(step, step_s):
    scalars added to a log line (throughput, cost, ...).
    """
    for hook in self.hooks:
      hook(step)
    stop = self.should_stop(step)
    log_now = step % self.log_every == 0 or step == self.total_steps
    save_now = stop or step % self.checkpoint_every == 0 or step == self.total_steps
    if log_now or save_now:
      # Checked before every save too, so no checkpoint ever holds non-finite weights whatever the log and
      # checkpoint intervals (the metrics include a norm of the updated parameters).
      metrics = {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}
      if not all(np.isfinite(v) for v in metrics.values()):
        self.wait()
        raise FloatingPointError(
            f"non-finite {self.what}metrics at step {step}: {metrics}; stopped without saving, the last "
            f"good checkpoint is step {self.last_saved()}")
    if log_now:
      self._log(step, metrics, extra)
    if stop:
      logging.warning("Preemption requested: saving %sstep %d and stopping.", self.what, step)
      self.stopped_early = step < self.total_steps
    if save_now:
      save(step)
    return stop

  def _log(self, step, metrics, extra) -> None:
    # Seconds per step since the last log, less whatever the trainer excludes (compilation).
    now, excluded = time.perf_counter(), self.excluded_s()
    step_s = (now - self._t_log - (excluded - self._excluded_log)) / max(step - self._step_log, 1)
    self._t_log, self._step_log, self._excluded_log = now, step, excluded
    self.last = {**metrics, "step_s": step_s}
    if extra is not None:
      self.last.update({k: float(v) for k, v in extra(step, step_s).items()})
    self.writer.write_scalars(step, self.last)
