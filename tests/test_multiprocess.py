"""Real processes: 2 processes x 4 fake CPU devices on loopback (gloo collectives), started from the CLI's
flags, train as one process with 8 devices does; SIGTERM to one of them stops both at one agreed step with
one checkpoint, and the resumed run ends bit for bit where the uninterrupted one did."""
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from npp_jax import checkpoints
from npp_jax import data
from npp_jax import loop
from test_train import make_codes  # noqa: E402  (tests/ is on sys.path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8  # Two checkpoints (every 4 steps) in the first stage (k = 4): one compiled step per process.
EXIT_PREEMPTED = getattr(loop, "EXIT_PREEMPTED", None)
_launches = itertools.count()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("codes") / "ds")
  codes, labels = make_codes(64)
  data.write_code_dataset(path, codes, labels, vocab_size=256, num_classes=10)
  return path


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir, dataset, processes):
  """`processes` CLI processes sharing 8 CPU devices; returns [(Popen, log path)]; logs go to files."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "TPU_", "OMPI_"))}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // processes}")
  cmd = [sys.executable, "-m", "npp_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
         f"--config.data.path={dataset}", f"--config.train.max_steps={STEPS}"]
  if processes > 1:
    cmd += [f"--coordinator_address=127.0.0.1:{_free_port()}", f"--num_processes={processes}"]
  out, launch = [], next(_launches)
  for i in range(processes):
    log = f"{workdir}.{launch}.{i}.log"
    with open(log, "w") as f:
      extra = [f"--process_id={i}"] if processes > 1 else []
      out.append((subprocess.Popen(cmd + extra, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT), log))
  return out


def _finish(procs, timeout=150):
  """Exit statuses; every process still alive at the deadline is killed (and the test fails)."""
  deadline = time.time() + timeout
  try:
    return [p.wait(timeout=max(1, deadline - time.time())) for p, _ in procs]
  except subprocess.TimeoutExpired:
    tails = "\n".join(open(log).read()[-1500:] for _, log in procs)
    pytest.fail(f"processes still running after {timeout} s (deadlock?):\n{tails}")
  finally:
    for p, _ in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def _train(workdir, dataset, processes):
  procs = _start(workdir, dataset, processes)
  statuses = _finish(procs)
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
  # Same data, same global batch, same mesh (8, 1, 1); only the all-reduce differs (gloo across processes
  # vs. in-process), so sums may round differently: float32 round-off, amplified by 8 Adam steps.
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), a, b)
  assert max(float(np.max(np.abs(x))) for x in jax.tree.leaves(a)) > 0.01  # Not a vacuous comparison.


@pytest.mark.timeout(400)
@pytest.mark.xfail(EXIT_PREEMPTED is None, run=False, strict=True,
                   reason="agreed preemption (npp_jax.loop.EXIT_PREEMPTED, issue 10 item 3) is not in yet: "
                          "today a SIGTERM to one of two processes deadlocks them")
def test_sigterm_to_one_process_stops_both_at_one_step_then_resume_is_bit_exact(dataset, two_processes, tmp_path):
  workdir = str(tmp_path / "run")
  procs = _start(workdir, dataset, 2)
  first = os.path.join(workdir, "checkpoints", "4")
  deadline = time.time() + 240
  while not os.path.isdir(first) and all(p.poll() is None for p, _ in procs) and time.time() < deadline:
    time.sleep(0.05)
  assert all(p.poll() is None for p, _ in procs), "a process ended before the SIGTERM"
  procs[1][0].send_signal(signal.SIGTERM)  # One process only, as a TPU maintenance event or SLURM may do.
  statuses = _finish(procs)
  logs = [open(log).read() for _, log in procs]
  assert statuses == [EXIT_PREEMPTED] * 2, [s[-3000:] for s in logs]
  stopped = [re.findall(r"Preemption requested: saving step (\d+)", s) for s in logs]
  assert stopped[0] == stopped[1] and len(stopped[0]) == 1, stopped  # Both stopped at one agreed step,
  step = int(stopped[0][0])
  assert 4 <= step < STEPS
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), keep=3)
  assert ckpt.latest_step() == step  # ... and saved it once, together.
  ckpt.close()
  _train(workdir, dataset, 2)  # The same command resumes and finishes.
  jax.tree.map(np.testing.assert_array_equal, _params(two_processes), _params(workdir))
