"""The launchers run for real against stub gcloud / sbatch / srun / scontrol / python executables
that record their argv: the exact commands, README's own examples verbatim, quoting, what is copied,
the worker venv built once, stale runs stopped, and SLURM's requeue after a preempted (and only a
preempted) job step."""

import os
import re
import signal
import subprocess
import tarfile
import time

import pytest
from support.launch_stubs import PREEMPTED
from support.launch_stubs import install_stubs
from support.paths import ROOT


@pytest.fixture
def stubs(tmp_path):
  return install_stubs(tmp_path)


def readme_commands(tool):
  """The shell commands of README's pod/cluster section that start with `tool`'s invocation."""
  text = open(os.path.join(ROOT, "README.md")).read()
  section = text[text.index("## Pods and clusters") :]
  section = section[: section.index("\n## ", 1)]
  blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
  commands = [c.strip() for b in blocks for c in b.replace("\\\n", " ").splitlines() if tool in c]
  assert commands, f"README's 'Pods and clusters' section has no {tool} command"
  return commands


EXAMPLE_ARGS = [
  "--config.model.dtype=bfloat16",
  "--distributed=true",
  "--config.npp.stages=((4,10),(1,20))",
]


@pytest.mark.parametrize("script", ["launch/tpu_pod.sh", "launch/gpu_slurm.sh"])
def test_launch_scripts_parse_and_need_their_arguments(script):
  assert subprocess.run(["bash", "-n", script], cwd=ROOT).returncode == 0
  # Without arguments they stop with a usage line instead of launching anything.
  out = subprocess.run(
    ["bash", script], cwd=ROOT, capture_output=True, text=True, env={"PATH": os.environ["PATH"]}
  )
  assert out.returncode != 0 and "usage" in out.stderr


def _worker_runs(calls, wait_for=0):
  """The training steps the stubs started; waits up to 30 s for `wait_for` of them (they start
  detached)."""
  deadline = time.time() + 30
  while True:
    runs = [c for c in calls("python") if c["event"] == "started"]
    if len(runs) >= wait_for or time.time() > deadline:
      return runs
    time.sleep(0.05)


def test_tpu_pod_readme_example_reaches_the_worker_verbatim(stubs):
  env, calls = stubs
  (command,) = readme_commands("launch/tpu_pod.sh")
  out = subprocess.run(
    ["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
  )
  assert out.returncode == 0, out.stderr
  scp, ssh = calls("gcloud")
  assert scp["argv"][:4] == ["compute", "tpus", "tpu-vm", "scp"]
  assert scp["argv"][5:] == ["my-v5p-64:npp_jax.tar.gz", "--zone", "us-east5-a", "--worker=all"]
  assert ssh["argv"][:9] == [
    "compute",
    "tpus",
    "tpu-vm",
    "ssh",
    "my-v5p-64",
    "--zone",
    "us-east5-a",
    "--worker=all",
    "--command",
  ]
  # Only what the run needs travels: no venv, workdir, .git, tests or caches.
  home = env["HOME"]
  with tarfile.open(os.path.join(home, "npp_jax.tar.gz")) as tar:
    names = tar.getnames()
  assert {n.split("/")[0] for n in names} == {"npp_jax", "configs", "setup.py"}
  assert "npp_jax/main.py" in names and not any("__pycache__" in n for n in names)
  # The worker built its venv once, installed into it (not the system Python), and ran the exact
  # argv.
  assert [c["argv"][:2] for c in calls("python3")] == [["-m", "venv"]]
  assert [c["argv"][:3] for c in calls("pip")] == [
    ["install", "-q", "jax[tpu]"],
    ["install", "-q", "-e"],
  ]
  (run,) = _worker_runs(calls, wait_for=1)
  assert run["argv"] == [
    "-m",
    "npp_jax.main",
    "--config=configs/l.py",
    "--workdir=gs://my-bucket/npp-l",
    "--config.data.path=/mnt/gcs/imagenet256_codes",
    *EXAMPLE_ARGS,
  ]
  logs = os.listdir(os.path.join(home, "npp_jax", "logs"))
  assert logs == [f"{os.uname().nodename}.log"]


def test_tpu_pod_relaunch_stops_the_stale_run_and_reuses_the_venv(stubs):
  env, calls = stubs
  launch = ["bash", "launch/tpu_pod.sh", "configs/tiny.py", "--config.train.max_steps=2"]
  env = {**env, "TPU": "t", "ZONE": "z", "WORKDIR": "/w", "DATA": "/d", "STOP_TIMEOUT": "20"}
  first = subprocess.run(
    launch, cwd=ROOT, env={**env, "STUB_SECONDS": "120"}, capture_output=True, text=True, timeout=60
  )
  assert first.returncode == 0, first.stderr
  pid_file = os.path.join(env["HOME"], "npp_jax", "run.pid")
  (stale,) = _worker_runs(calls, wait_for=1)
  try:
    second = subprocess.run(launch, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0, second.stderr
    assert f"stopping the previous run (pid {stale['pid']})" in second.stdout
    _, new = _worker_runs(calls, wait_for=2)
    assert new["pid"] != stale["pid"] and new["argv"][-1] == "--config.train.max_steps=2"
    # The stale run got SIGTERM (so that it could save) and had exited before the new one started.
    events = [(c["pid"], c["event"]) for c in calls("python") if c["event"]]
    assert (
      events.index((stale["pid"], "sigterm"))
      < events.index((stale["pid"], f"exit {PREEMPTED}"))
      < events.index((new["pid"], "started"))
    )
    # Venv built and packages installed on the first launch only.
    assert len(calls("python3")) == 1 and len(calls("pip")) == 2
    with open(os.path.join(env["HOME"], "npp_jax", "logs", f"{os.uname().nodename}.log")) as f:
      assert f.read() == f"run {stale['pid']}\nrun {new['pid']}\n"  # Both runs, one log per worker.
  finally:
    pid = int(open(pid_file).read())  # The launcher's newest run, a stub we started through it.
    try:
      os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass


def test_gpu_slurm_readme_example_runs_the_exact_step_and_no_requeue(stubs):
  env, calls = stubs
  (command,) = readme_commands("launch/gpu_slurm.sh")
  out = subprocess.run(
    ["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
  )
  assert out.returncode == 0, out.stderr
  (sbatch,) = calls("sbatch")
  assert sbatch["argv"] == [
    "--nodes=2",
    "--gpus-per-node=8",
    "launch/gpu_slurm.sh",
    "configs/b.py",
    "work/b",
    "work/extract/codes",
    "--config.npp.stages=((4,10),(1,20))",
  ]
  (srun,) = calls("srun")
  assert srun["argv"] == [
    "--kill-on-bad-exit=0",
    "python",
    "-m",
    "npp_jax.main",
    "--config=configs/b.py",
    "--workdir=work/b",
    "--config.data.path=work/extract/codes",
    *EXAMPLE_ARGS,
  ]
  assert calls("scontrol") == []


def test_gpu_slurm_script_asks_slurm_for_the_signal_and_requeue():
  head = open(os.path.join(ROOT, "launch/gpu_slurm.sh")).read()
  assert re.search(r"^#SBATCH --signal=B:TERM@\d+$", head, re.M)
  assert re.search(r"^#SBATCH --requeue$", head, re.M)
  assert re.search(rf"^PREEMPTED={PREEMPTED}\b", head, re.M)


@pytest.mark.parametrize(
  "term, step_status, requeue",
  [
    (True, PREEMPTED, True),  # The time limit's SIGTERM: the step saved and stopped -> requeue.
    (False, 0, False),  # Finished.
    (False, 1, False),  # Failed: a requeue would only fail again.
    (True, 0, False),  # SIGTERM, but the step finished its last step anyway.
  ],
)
def test_gpu_slurm_requeues_only_a_preempted_step(stubs, term, step_status, requeue):
  env, calls = stubs
  env = {
    **env,
    "SLURM_JOB_ID": "4242",
    "STUB_SRUN_RUNS": "1",
    "STUB_SECONDS": "60" if term else "0",
    "STUB_STATUS": str(step_status),
    "STUB_TERM_STATUS": str(step_status),
  }
  script = subprocess.Popen(
    ["bash", "launch/gpu_slurm.sh", "configs/tiny.py", "/w", "/d"],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  if term:
    assert _worker_runs(calls, wait_for=1), "the job step never started"
    script.send_signal(signal.SIGTERM)  # SLURM's B:TERM reaches the batch shell only.
  out, _ = script.communicate(timeout=60)
  assert script.returncode == step_status, out
  order = [(c["prog"], c["event"]) for c in calls() if c["prog"] in ("python", "scontrol")]
  if term:
    assert ("python", "sigterm") in order  # Forwarded through srun to the step.
  if requeue:
    assert order[-2:] == [("python", f"exit {PREEMPTED}"), ("scontrol", None)]
    assert calls("scontrol")[0]["argv"] == ["requeue", "4242"]
  else:
    assert calls("scontrol") == []


def test_tpu_pod_rebuilds_a_half_made_venv(stubs):
  env, calls = stubs
  venv_bin = os.path.join(env["HOME"], "npp_jax", ".venv", "bin")
  os.makedirs(venv_bin)
  with open(
    os.path.join(venv_bin, "python"), "w"
  ) as f:  # `python3 -m venv` stopped before pip (no ensurepip).
    f.write("#!/bin/sh\nexit 1\n")
  os.chmod(os.path.join(venv_bin, "python"), 0o755)
  env = {**env, "TPU": "t", "ZONE": "z", "WORKDIR": "/w", "DATA": "/d"}
  out = subprocess.run(
    ["bash", "launch/tpu_pod.sh", "configs/tiny.py"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert out.returncode == 0, out.stderr
  assert len(calls("python3")) == 1 and len(calls("pip")) == 2
  assert len(_worker_runs(calls, wait_for=1)) == 1
