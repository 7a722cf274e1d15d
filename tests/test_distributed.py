"""Which processes make up a run: the flag/env resolution as a pure function, its one-line errors
through the real CLI, and two real processes on loopback that join from the CLI's flags (one from
JAX_* variables)."""

import re
import subprocess

import pytest
from support.cli import free_port
from support.cli import multiprocess_env
from support.cli import start_main

from npp_jax import distributed
from npp_jax.distributed import Launch

SLURM = {
  "SLURM_JOB_ID": "7",
  "SLURM_STEP_NODELIST": "node[1-2]",
  "SLURM_NTASKS": "2",
  "SLURM_PROCID": "1",
  "SLURM_LOCALID": "0",
}


@pytest.mark.parametrize(
  "mode, flags, env, expected",
  [
    ("auto", (None, None, None), {}, None),  # A laptop: one process.
    ("auto", (None, None, None), {**SLURM, "SLURM_NTASKS": "1"}, None),  # One SLURM task.
    ("false", (None, None, None), SLURM, None),
    ("auto", ("10.0.0.1:1234", 2, 1), {}, Launch("10.0.0.1:1234", 2, 1, None)),
    (
      "auto",
      (None, None, None),
      {"JAX_COORDINATOR_ADDRESS": "h:9", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"},
      Launch("h:9", 4, 3, None),
    ),
    # Flags win over the environment, field by field.
    (
      "auto",
      ("a:1", None, 0),
      {"JAX_COORDINATOR_ADDRESS": "h:9", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"},
      Launch("a:1", 4, 0, None),
    ),
    # On a scheduler, what is not given is left to JAX's detection.
    ("auto", (None, None, None), SLURM, Launch(None, None, None, "slurm")),
    ("auto", ("n1:5000", None, None), SLURM, Launch("n1:5000", None, None, "slurm")),
    (
      "auto",
      (None, None, None),
      {"TPU_WORKER_HOSTNAMES": "w0,w1"},
      Launch(None, None, None, "tpu"),
    ),
    ("true", (None, None, None), {}, Launch(None, None, None, None)),  # GCE TPU metadata: JAX asks.
    ("true", ("a:1", 1, 0), {}, Launch("a:1", 1, 0, None)),
  ],
)
def test_resolve(mode, flags, env, expected):
  assert distributed.resolve(mode, *flags, env) == expected


@pytest.mark.parametrize(
  "mode, flags, env, message",
  [
    (
      "auto",
      ("10.0.0.1:1234", None, None),
      {},
      "--coordinator_address=10.0.0.1:1234 also needs --num_processes (or JAX_NUM_PROCESSES) and "
      "--process_id",
    ),
    (
      "auto",
      (None, 2, None),
      {},
      "--num_processes=2 also needs --coordinator_address (or JAX_COORDINATOR_",
    ),
    (
      "auto",
      (None, None, None),
      {"JAX_COORDINATOR_ADDRESS": "h:9"},
      "JAX_COORDINATOR_ADDRESS=h:9 also needs",
    ),
    ("auto", ("a:1", 2, 2), {}, "--process_id=2 must be less than --num_processes=2"),
    (
      "auto",
      ("a:1", 2, None),
      {"JAX_PROCESS_ID": "5"},
      "JAX_PROCESS_ID=5 must be less than --num_processes=2",
    ),
    ("auto", ("a:1", 2, -1), {}, "--process_id=-1 must be 0 or more"),
    ("auto", ("a:1", 0, 0), {}, "--num_processes=0 must be at least 1"),
    ("auto", ("a", 2, 0), {}, "--coordinator_address='a' is not HOST:PORT"),
    (
      "auto",
      (None, None, None),
      {"JAX_COORDINATOR_ADDRESS": "h:9", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
      "JAX_NUM_PROCESSES='two' is not an integer",
    ),
    ("false", (None, 2, None), {}, "--distributed=false but --num_processes=2"),
  ],
)
def test_resolve_refuses(mode, flags, env, message):
  with pytest.raises(ValueError, match="^" + re.escape(message)):
    distributed.resolve(mode, *flags, env)


def _env(**extra):
  """A process of two: 4 CPU devices, no launcher's variables, `extra` on top."""
  return {**multiprocess_env(2), **extra}


def _main(*args, env, **kw):
  return start_main(
    "--config=configs/tiny.py",
    *args,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    **kw,
  )


@pytest.mark.parametrize(
  "args, env, message",
  [
    (["--num_processes=2"], {}, "error: --num_processes=2 also needs --coordinator_address"),
    (
      ["--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=2"],
      {},
      "error: --process_id=2 must be less than --num_processes=2 (ids run 0 .. 1)",
    ),
    (
      [],
      {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1"},
      "error: JAX_COORDINATOR_ADDRESS=127.0.0.1:1 also needs",
    ),
    (["--distributed=true"], {}, "error: --distributed=true found no cluster to join"),
  ],
)
def test_bad_combination_is_one_line_before_anything_starts(tmp_path, args, env, message):
  workdir = tmp_path / "run"
  proc = _main(f"--workdir={workdir}", "--config.data.path=/nonexistent", *args, env=_env(**env))
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode != 0
  last = out.strip().splitlines()[-1]
  assert last.startswith(message), out[-2000:]
  assert "Traceback" not in out and not workdir.exists()


@pytest.mark.timeout(120)
def test_two_processes_join_from_the_cli(tmp_path):
  """Process 0 from flags, process 1 from JAX_* variables: both see 2 processes and 8 devices, 4
  their own.

  The missing data set then stops both with the trainer's one-line error, after the join."""
  address = f"127.0.0.1:{free_port()}"
  args = (f"--workdir={tmp_path / 'run'}", "--config.data.path=/nonexistent")
  procs = [
    _main(
      *args, f"--coordinator_address={address}", "--num_processes=2", "--process_id=0", env=_env()
    ),
    _main(
      *args, env=_env(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1")
    ),
  ]
  outs = [p.communicate(timeout=100)[0] for p in procs]
  for i, out in enumerate(outs):
    assert f"JAX process {i}/2, 4 local / 8 global devices (cpu)." in out, out[-3000:]
    assert out.strip().splitlines()[-1].startswith("error: no code data set at /nonexistent"), out[
      -2000:
    ]
