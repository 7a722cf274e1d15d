"""The trainers' shared loop plumbing: when it logs, checks, saves and stops, and that processes
agree on the step at which a preemption stops them (two processes stood in for by two threads)."""

import threading

import numpy as np
import pytest

from npp_jax import loop


class Flag:
  requested = False


class Writer:
  def __init__(self):
    self.lines = []

  def write_scalars(self, step, scalars):
    self.lines.append((step, dict(scalars)))


def make_loop(preemption, writer=None, **kw):
  args = dict(
    total_steps=20,
    log_every=5,
    checkpoint_every=8,
    writer=writer or Writer(),
    preemption=preemption,
    last_saved=lambda: 8,
    process_count=1,
  )
  return loop.Loop(**{**args, **kw})


def test_logs_saves_and_finishes_on_schedule():
  writer, saved, seen = Writer(), [], []
  lp = make_loop(Flag(), writer, on_log=lambda step, scalars: seen.append((step, dict(scalars))))
  stops = [
    lp.end_of_step(
      s,
      {"loss": np.float32(s)},
      saved.append,
      extra=lambda step, step_s: {"k": 2, "per_s": 1 / step_s},
    )
    for s in range(1, 21)
  ]
  assert not any(stops) and not lp.stopped_early
  assert saved == [8, 16, 20]
  assert [step for step, _ in writer.lines] == [5, 10, 15, 20]
  step, last = writer.lines[-1]
  assert last["loss"] == 20.0 and last["k"] == 2 and last["step_s"] > 0 and lp.last == last
  assert seen == writer.lines


def test_sigterm_saves_that_step_and_stops():
  flag, saved = Flag(), []
  lp = make_loop(flag)
  for step in range(1, 21):
    flag.requested = step >= 6
    if lp.end_of_step(step, {"loss": 1.0}, saved.append):
      break
  assert (step, saved, lp.stopped_early) == (6, [6], True)


def test_non_finite_metrics_stop_before_the_save():
  saved = []
  lp = make_loop(Flag())
  match = r"non-finite metrics at step 8 \(k=1\).*last good checkpoint is step 8"
  with pytest.raises(FloatingPointError, match=match):
    lp.end_of_step(8, {"loss": np.float32("nan")}, saved.append, note=" (k=1)")
  assert saved == []


@pytest.mark.parametrize("term_at", [(6, None), (None, 3), (8, 9)])
def test_processes_agree_on_the_stop_step(term_at):
  """SIGTERM reaches one process (or both, at different steps): both save the same step and stop
  there."""
  n, sync_every = 2, 4
  barrier, flags, results = threading.Barrier(n, timeout=30), [False] * n, {}

  def agree(i):
    def fn(flag):  # A stand-in for the all-reduce over processes.
      flags[i] = flag
      barrier.wait()
      out = any(flags)
      barrier.wait()
      return out

    return fn

  def process(i):
    flag, saved = Flag(), []
    lp = make_loop(
      flag,
      total_steps=40,
      checkpoint_every=100,
      sync_every=sync_every,
      agree=agree(i),
      process_count=n,
    )
    for step in range(1, 41):
      flag.requested = term_at[i] is not None and step >= term_at[i]
      if lp.end_of_step(step, {"loss": 1.0}, saved.append):
        break
    results[i] = (step, saved)

  threads = [threading.Thread(target=process, args=(i,)) for i in range(n)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(60)
  first = min(t for t in term_at if t is not None)
  want = -(-first // sync_every) * sync_every  # The first agreement at or after the first SIGTERM.
  assert results[0] == results[1] == (want, [want])
