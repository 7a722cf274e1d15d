"""Stub gcloud / sbatch / srun / scontrol / python executables that record their argv, so the
launcher scripts run for real without a cloud or a cluster (test_launch, test_multiprocess)."""

import json
import os
import sys

from npp_jax.loop import EXIT_PREEMPTED

# The trainer's status after a SIGTERM-triggered save: gpu_slurm.sh requeues on it.
PREEMPTED = EXIT_PREEMPTED

# One stub for every program; it acts on its own name. Each call appends {"prog", "argv", "event"}
# to $CALLS.
STUB = r"""#!{python}
import json, os, shutil, signal, subprocess, sys, time
prog, argv = os.path.basename(sys.argv[0]), sys.argv[1:]
def record(event=None):
  with open(os.environ["CALLS"], "a") as f:
    f.write(json.dumps({{"prog": prog, "argv": argv, "event": event, "pid": os.getpid()}}) + "\n")
record()
if prog == "gcloud" and "scp" in argv:  # scp SRC TPU:DEST -> $HOME/DEST (the one simulated worker)
  src, dest = argv[4:6]
  shutil.copy(src, os.path.join(os.environ["HOME"], dest.split(":", 1)[1]))
elif prog == "gcloud" and "--command" in argv:  # What the worker's login shell would do.
  sys.exit(subprocess.call(["bash", "-c", argv[argv.index("--command") + 1]]))
elif prog == "sbatch":
  # Runs the batch script (its first argument that is not an option) as SLURM would.
  i = next(i for i, a in enumerate(argv) if not a.startswith("-"))
  sys.exit(subprocess.call(["bash", *argv[i:]], env={{**os.environ, "SLURM_JOB_ID": "4242"}}))
elif prog == "srun" and os.environ.get("STUB_SRUN_RUNS"):
  # Runs the step as STUB_SRUN_RUNS local tasks with SLURM's task variables, forwards SIGTERM
  # (to the tasks in STUB_SRUN_TERM_TASKS only, if set: SIGTERM reaching one host first) and
  # exits with the highest status.
  n = int(os.environ["STUB_SRUN_RUNS"])
  cmd = [a for a in argv if not a.startswith("--kill-on-bad-exit")]
  tasks = []
  for i in range(n):
    env = {{**os.environ, "SLURM_NTASKS": str(n), "SLURM_PROCID": str(i), "SLURM_LOCALID": "0",
           "SLURM_STEP_NUM_NODES": str(n), "SLURM_STEP_NODELIST": "127.0.0.1"}}
    log = os.environ.get("STUB_SRUN_LOG")
    out = open(log.format(i), "a") if log else None
    err = subprocess.STDOUT if out else None
    tasks.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=err))
  every = ",".join(map(str, range(n)))
  term = [int(t) for t in os.environ.get("STUB_SRUN_TERM_TASKS", every).split(",")]
  signal.signal(signal.SIGTERM, lambda *_: [tasks[t].send_signal(signal.SIGTERM) for t in term])
  sys.exit(max(t.wait() for t in tasks))
elif prog == "python3" and argv[:2] == ["-m", "venv"]:
  # The worker's system Python builds the venv.
  os.makedirs(os.path.join(argv[2], "bin"))
  for name in ("python", "pip"):
    shutil.copy(__file__, os.path.join(argv[2], "bin", name))
elif prog == "python":
  # The training step: runs STUB_SECONDS, or until SIGTERM (then "saves" and exits).
  def preempted(*_):
    record("sigterm")
    time.sleep(0.3)
    record("exit {{}}".format(os.environ.get("STUB_TERM_STATUS", "{preempted}")))
    sys.exit(int(os.environ.get("STUB_TERM_STATUS", "{preempted}")))
  signal.signal(signal.SIGTERM, preempted)
  record("started")
  print("run", os.getpid(), flush=True)
  time.sleep(float(os.environ.get("STUB_SECONDS", "0")))
  record("exit " + os.environ.get("STUB_STATUS", "0"))
  sys.exit(int(os.environ.get("STUB_STATUS", "0")))
"""


def install_stubs(tmp_path, progs=("gcloud", "sbatch", "srun", "scontrol", "python3", "python")):
  """(env, calls(prog=None)): the stubs for `progs` first on PATH, a fresh HOME (the simulated TPU
  worker's)."""
  bin_dir, home = tmp_path / "bin", tmp_path / "home"
  bin_dir.mkdir()
  home.mkdir()
  for prog in progs:
    (bin_dir / prog).write_text(STUB.format(python=sys.executable, preempted=PREEMPTED))
    (bin_dir / prog).chmod(0o755)
  calls = tmp_path / "calls.jsonl"
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(home), "CALLS": str(calls)}

  def read(prog=None):
    lines = [json.loads(x) for x in calls.read_text().splitlines()] if calls.exists() else []
    return [c for c in lines if prog in (None, c["prog"])]

  return env, read
