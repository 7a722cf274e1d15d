"""Real processes: 2 processes x 4 fake CPU devices on loopback (gloo collectives), started from the
CLI's flags, train as one process with 8 devices does; under launch/gpu_slurm.sh (stub srun, real
tasks found through SLURM's variables) a SIGTERM to one of them stops both at one agreed step with
one checkpoint, the job requeues, and the resumed run ends bit for bit where the uninterrupted one
did."""

import itertools
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from support.cli import finish
from support.cli import free_port
from support.cli import multiprocess_env
from support.cli import start_main
from support.codes import dataset as shared_dataset
from support.launch_stubs import install_stubs
from support.paths import ROOT

from npp_jax import checkpoints
from npp_jax.loop import EXIT_PREEMPTED

# The module-scoped code data set of 64 images (support/codes.py): pytest finds a fixture by
# its name in the module.
dataset = shared_dataset

# Four checkpoints (every 4 steps), all in the first stage (k = 4): one compiled step per process.
STEPS = 16
# 16 epochs put steps 0-16 in stage k = 4; the processes agree on stopping every 2 steps (a SIGTERM
# between agreements waits for the next one).
RUN = [
  "--config.train.epochs=16",
  f"--config.train.max_steps={STEPS}",
  "--config.train.preemption_sync_every_steps=2",
]
_launches = itertools.count()


def _start(workdir, dataset, processes):
  """`processes` CLI processes sharing 8 CPU devices; returns [(Popen, log path)]; logs go to
  files."""
  env = multiprocess_env(processes)
  cmd = [
    "--config=configs/tiny.py",
    f"--workdir={workdir}",
    f"--config.data.path={dataset}",
    *RUN,
  ]
  if processes > 1:
    cmd += [f"--coordinator_address=127.0.0.1:{free_port()}", f"--num_processes={processes}"]
  out, launch = [], next(_launches)
  for i in range(processes):
    log = f"{workdir}.{launch}.{i}.log"
    with open(log, "w") as f:
      extra = [f"--process_id={i}"] if processes > 1 else []
      out.append((start_main(*cmd, *extra, env=env, stdout=f, stderr=subprocess.STDOUT), log))
  return out


def _train(workdir, dataset, processes):
  procs = _start(workdir, dataset, processes)
  statuses = finish(procs)
  assert statuses == [0] * processes, "\n".join(open(log).read()[-3000:] for _, log in procs)
  return procs


def _params(workdir):
  return jax.tree.map(np.asarray, checkpoints.load_params(workdir))


@pytest.fixture(scope="module")
def two_processes(dataset, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("two") / "run")
  procs = _train(workdir, dataset, 2)
  for i, (_, log) in enumerate(procs):
    assert f"JAX process {i}/2, 4 local / 8 global devices (cpu)." in open(log).read()
  return workdir


@pytest.mark.timeout(400)
def test_two_processes_train_as_one_process_does(dataset, two_processes, tmp_path):
  one = str(tmp_path / "one")
  _train(one, dataset, 1)
  a, b = _params(two_processes), _params(one)
  # Same data, same global batch, same mesh (8, 1, 1); only the all-reduce differs (gloo across
  # processes vs. in-process), so sums may round differently: float32 round-off through the Adam
  # steps (measured 2026-11-25 over 16 steps: at most 9.6e-7 apart).
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=5e-6), a, b)
  assert (
    max(float(np.max(np.abs(x))) for x in jax.tree.leaves(a)) > 0.01
  )  # Not a vacuous comparison.


def _slurm_port():
  """A free port that JAX's SLURM detection will derive from the job id: 61440 + job_id % 4096."""
  for port in random.sample(range(61440, 65536), 50):
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", port))
        return port
      except OSError:
        continue
  pytest.fail("no free port in 61440-65535 for a SLURM job id")


def _sbatch(stub_env, workdir, dataset, term_after_checkpoint=None):
  """launch/gpu_slurm.sh as the batch job, its srun a stub that runs 2 real tasks with SLURM's
  variables.

  With term_after_checkpoint, SIGTERM goes to the batch script once that checkpoint exists, as
  SLURM's
  --signal=B:TERM does; the stub srun forwards it to task 1 only. Returns (status, the script's
  output, [task logs])."""
  logs = f"{workdir}.{next(_launches)}.{{}}.log"
  env = {
    **multiprocess_env(2),
    **stub_env,
    "SLURM_JOB_ID": str(_slurm_port() - 61440),
    "STUB_SRUN_RUNS": "2",
    "STUB_SRUN_TERM_TASKS": "1",
    "STUB_SRUN_LOG": logs,
  }
  cmd = [
    "bash",
    "launch/gpu_slurm.sh",
    "configs/tiny.py",
    workdir,
    dataset,
    "--config.model.dtype=float32",
    *RUN,
  ]
  script = subprocess.Popen(
    cmd,
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    start_new_session=True,
  )
  if term_after_checkpoint is not None:
    ckpt = os.path.join(workdir, "checkpoints", str(term_after_checkpoint))
    deadline = time.time() + 240
    while not os.path.isdir(ckpt) and script.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    assert script.poll() is None, "the run ended before the SIGTERM"
    script.send_signal(signal.SIGTERM)
  try:
    out, _ = script.communicate(timeout=200)
  except subprocess.TimeoutExpired:
    os.killpg(
      script.pid, signal.SIGKILL
    )  # The script, the stub srun and both tasks: its own session.
    pytest.fail(
      "the job step still ran 200 s after the SIGTERM (deadlock?):\n"
      + "\n".join(open(logs.format(i)).read()[-1500:] for i in range(2))
    )
  task_logs = [open(logs.format(i)).read() for i in range(2)]
  return script.returncode, out, task_logs


@pytest.mark.timeout(500)
def test_sigterm_to_one_process_stops_both_at_one_step_requeue_resumes_bit_exact(
  dataset, two_processes, tmp_path
):
  """Through launch/gpu_slurm.sh: the time limit's SIGTERM reaches one of the two tasks; both save
  one agreed step and exit "preempted", the script requeues; the requeued job resumes and ends where
  an uninterrupted run ends, bit for bit."""
  stub_env, calls = install_stubs(tmp_path, ("srun", "scontrol"))
  python = tmp_path / "bin" / "python"  # The real interpreter, whatever PATH holds.
  python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
  python.chmod(0o755)
  workdir = str(tmp_path / "run")
  status, out, logs = _sbatch(stub_env, workdir, dataset, term_after_checkpoint=4)
  assert status == EXIT_PREEMPTED, out + "\n".join(s[-3000:] for s in logs)
  assert (
    "'model.dtype': 'float32'" in logs[0]
  )  # The reference run's dtype, not the script's bfloat16.
  stopped = [re.findall(r"Preemption requested: saving step (\d+)", s) for s in logs]
  assert stopped[0] == stopped[1] and len(stopped[0]) == 1, (
    stopped
  )  # One agreed step on both tasks,
  step = int(stopped[0][0])
  assert 4 <= step < STEPS
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), keep=3)
  assert ckpt.latest_step() == step  # ... saved once, together,
  ckpt.close()
  assert [c["argv"][0] for c in calls("scontrol")] == ["requeue"]  # ... and the job requeued.
  status, out, logs = _sbatch(stub_env, workdir, dataset)  # The requeued job: resumes and finishes.
  assert status == 0, out + "\n".join(s[-3000:] for s in logs)
  assert len(calls("scontrol")) == 1  # Finished: no second requeue.
  jax.tree.map(np.testing.assert_array_equal, _params(two_processes), _params(workdir))
