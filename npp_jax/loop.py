"""The part of a training loop that is not the step: progress hooks, logging, the finiteness check,
periodic saves and stopping on preemption. The GPT trainer (train.py) and the VQ trainer
(train_vq.py) share it.

A trainer runs its own steps and calls `Loop.end_of_step` after each one:

  lp = loop.Loop(total_steps=..., log_every=..., checkpoint_every=..., writer=writer,
  preemption=preempt,
                 reached_preemption=ckpt.reached_preemption, last_saved=ckpt.latest_step,
                 wait=ckpt.wait)
  while step < total:
    state, metrics = step_fn(state, batch)
    step += 1
    if lp.end_of_step(step, metrics, save=lambda s: ckpt.save(s, state, ...)):
      break  # Preempted, after saving this step.
"""

import time
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import jax
import numpy as np

# The exit status of a run that saved and stopped early on SIGTERM (os.EX_TEMPFAIL: "try again"): a
# launcher tells it from 0 ("finished") and requeues or re-runs the same command, which resumes.
EXIT_PREEMPTED = 75


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is True on any: a collective, so all processes call it
  together."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils

  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


class Loop:
  """Decides, after every step, whether to log, save and stop; writes the logged scalars.

  Preemption is agreed: a SIGTERM reaches the processes of a pod at different moments (or only one
  of them), and a process that stops alone leaves the others blocked in the next collective. So
  every `sync_every` steps the processes all-reduce their stop flags, and all of them save the same
  step and stop there. One process needs no agreement and checks every step.

  preemption: an object whose `.requested` turns True on SIGTERM (checkpoints.Preemption).
  reached_preemption(step): the checkpoint manager's own preemption signal (orbax), or None.
  last_saved() / wait(): the latest finished checkpoint step and a wait for pending async saves,
  used
    only to say in an error which checkpoint is the last good one.
  excluded_s(): seconds to leave out of the measured step time (e.g. compilation done in between).
  sync_every: steps between agreements when there are several processes (each costs a host round
  trip). agree: the all-reduce of the flags (any_process; tests pass a stand-in).
  on_log(step, scalars): called after each logged line (a console progress bar, e.g. the demo's).
  """

  def __init__(
    self,
    *,
    total_steps: int,
    log_every: int,
    checkpoint_every: int,
    writer,
    preemption: Any,
    last_saved: Callable[[], Any],
    wait: Callable[[], None] = lambda: None,
    reached_preemption: Callable[[int], bool] | None = None,
    hooks: Sequence[Callable] = (),
    excluded_s: Callable[[], float] = lambda: 0.0,
    what: str = "",
    start: int = 0,
    sync_every: int = 1,
    agree: Callable[[bool], bool] | None = None,
    process_count: int | None = None,
    on_log: Callable[[int, Mapping[str, float]], None] | None = None,
  ):
    self.total_steps, self.log_every, self.checkpoint_every = (
      total_steps,
      log_every,
      checkpoint_every,
    )
    self.writer, self.preemption, self.hooks = writer, preemption, list(hooks)
    self.last_saved, self.wait, self.reached_preemption = last_saved, wait, reached_preemption
    self.excluded_s, self.what = excluded_s, what
    self.sync_every = max(int(sync_every), 1)
    self.agree = agree or any_process
    self.on_log = on_log
    self.process_count = jax.process_count() if process_count is None else process_count
    self.last: dict[str, float] = {}  # The scalars of the latest log step.
    self.stopped_early = False
    self._t_log, self._step_log, self._excluded_log = time.perf_counter(), start, excluded_s()

  def should_stop(self, step: int) -> bool:
    """True when this step is the one to save and stop at, the same step on every process."""
    # Read the flag once: a SIGTERM landing mid-save stops the loop at a later step, after its own
    # save.
    local = bool(self.preemption.requested)
    if self.reached_preemption is not None:
      local = bool(self.reached_preemption(step)) or local
    if self.process_count == 1:
      return local
    if step % self.sync_every and step != self.total_steps:
      return False  # The flag stays set: the next agreement sees it.
    return self.agree(local)

  def end_of_step(
    self,
    step: int,
    metrics: Mapping[str, Any],
    save: Callable[[int], Any],
    extra: Callable[[int, float], Mapping[str, float]] | None = None,
    note: str = "",
  ) -> bool:
    """Hooks, then log / check / save as the intervals and preemption say; True means stop now.

    metrics: the step's (device) scalars; read back only on log and save steps. extra(step, step_s):
    scalars added to a log line (throughput, cost, ...). note: said after the step in an error, e.g.
    " (k=2)".
    """
    for hook in self.hooks:
      hook(step)
    stop = self.should_stop(step)
    log_now = step % self.log_every == 0 or step == self.total_steps
    save_now = stop or step % self.checkpoint_every == 0 or step == self.total_steps
    if log_now or save_now:
      # Checked before every save too, so no checkpoint ever holds non-finite weights whatever the
      # log and checkpoint intervals (the metrics include a norm of the updated parameters).
      metrics = {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}
      if not all(np.isfinite(v) for v in metrics.values()):
        self.wait()
        raise FloatingPointError(
          f"non-finite {self.what}metrics at step {step}{note}: {metrics}; stopped without saving, "
          f"the last good checkpoint is step {self.last_saved()}"
        )
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
    if self.on_log is not None:
      self.on_log(step, self.last)
