"""A host that dies: SIGKILL to one of two real training processes (2 x 4 CPU devices on loopback).

The survivor must not hang: within the heartbeat timeout (--heartbeat_timeout_seconds, 5 s here) it
ends with exit status EXIT_PROCESS_LOST and, as its last line on stderr, one line naming the lost
process and the step the same command resumes from (the last finished checkpoint). That the resumed
run is bit-exact is tests/test_multiprocess.py's (after a SIGTERM) and test_train.py's (a SIGKILL).
"""

import os
import re
import signal
import subprocess
import time

import pytest
from support.cli import free_port
from support.cli import multiprocess_env
from support.cli import start_main
from support.codes import dataset as shared_dataset

from npp_jax import distributed

# The module-scoped code data set of 64 images (support/codes.py): pytest finds a fixture by
# its name in the module.
dataset = shared_dataset

HEARTBEAT_S = 5


def _finished_steps(workdir):
  ckpt = os.path.join(workdir, "checkpoints")
  names = os.listdir(ckpt) if os.path.isdir(ckpt) else []
  return sorted(int(n) for n in names if n.isdigit())


@pytest.mark.timeout(300)
def test_sigkill_of_one_process_ends_the_other_with_one_line(dataset, tmp_path):
  workdir = str(tmp_path / "run")
  cmd = [
    "--config=configs/tiny.py",
    f"--workdir={workdir}",
    f"--config.data.path={dataset}",
    "--config.train.epochs=16",  # Long enough never to end by itself before the kill.
    "--config.train.checkpoint_every_steps=1",  # Something to resume from soon.
    f"--coordinator_address=127.0.0.1:{free_port()}",
    "--num_processes=2",
    f"--heartbeat_timeout_seconds={HEARTBEAT_S}",
  ]
  procs, errs = [], []
  for i in range(2):
    errs.append(tmp_path / f"stderr.{i}")
    with open(errs[-1], "w") as err:
      procs.append(
        start_main(
          *cmd,
          f"--process_id={i}",
          env=multiprocess_env(2),
          stdout=subprocess.DEVNULL,
          stderr=err,
        )
      )
  try:
    deadline = time.time() + 200
    while not _finished_steps(workdir):  # A checkpoint to resume from: the run is in its loop.
      assert all(p.poll() is None for p in procs), [open(e).read()[-2000:] for e in errs]
      assert time.time() < deadline, "no checkpoint after 200 s"
      time.sleep(0.2)
    first = _finished_steps(workdir)[-1]
    procs[1].send_signal(signal.SIGKILL)
    killed = time.time()
    status = procs[0].wait(timeout=HEARTBEAT_S + 60)
    detected_s = time.time() - killed
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  text = open(errs[0]).read()
  last = text.strip().splitlines()[-1]
  assert status == distributed.EXIT_PROCESS_LOST, text[-3000:]
  m = re.fullmatch(
    r"error: lost JAX process 1 \(its host died or it was killed: no heartbeat within "
    r"--heartbeat_timeout_seconds\); the same command resumes the run from step (\d+)",
    last,
  )
  assert m, text[-3000:]
  # The last finished checkpoint when the loss was found (one may finish after the kill).
  assert first <= int(m.group(1)) and int(m.group(1)) in _finished_steps(workdir), last
  print(f"survivor ended {detected_s:.1f} s after the SIGKILL (heartbeat {HEARTBEAT_S} s)")
