"""One way to run the package's command lines as the user does: `python -m npp_jax.main ...` (or
another module's CLI) in a child process, from the checkout's root; and the pieces multi-process
runs need (a free port, an environment without any launcher's variables)."""

import os
import socket
import subprocess
import sys
import time

import pytest

from support.paths import ROOT


def command(*args, module="npp_jax.main"):
  """The argv of `python -m module args...` with this interpreter."""
  return [sys.executable, "-m", module, *args]


def run_main(*args, module="npp_jax.main", env=None, cwd=ROOT, timeout=300):
  """Runs the CLI to its end; a CompletedProcess with stdout and stderr as text (the caller checks
  the status: many tests expect a failure)."""
  return subprocess.run(
    command(*args, module=module), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
  )


def start_main(*args, module="npp_jax.main", env=None, cwd=ROOT, **popen):
  """Starts the CLI and returns its Popen, for the tests that signal, kill or wait on it; `popen`
  are Popen's own arguments (stdout, stderr, text)."""
  return subprocess.Popen(command(*args, module=module), cwd=cwd, env=env, **popen)


def free_port():
  """A port on 127.0.0.1 nothing listens on now (for a coordinator or an emulator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def multiprocess_env(processes):
  """This environment without any launcher's variables, 8 // processes CPU devices per process."""
  env = {
    k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "TPU_", "OMPI_"))
  }
  env.update(
    JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // processes}"
  )
  if (
    processes == 1
  ):  # The run's compilation cache (conftest.py); multi-process runs compile their own.
    env.update(
      {k: v for k, v in os.environ.items() if k.startswith(("JAX_COMPILATION_", "JAX_PERSISTENT_"))}
    )
  return env


def finish(procs, timeout=150):
  """Exit statuses of [(Popen, log path)]; every process still alive at the deadline is killed (and
  the test fails, with the tail of every log)."""
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
