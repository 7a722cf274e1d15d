"""Which processes make up this run: flags, JAX_* variables and cluster detection ->
jax.distributed.

`resolve` is pure (flags and an environment in, a `Launch` or None out) so that every combination is
tested without starting processes; `initialize` hands its result to `jax.distributed.initialize`.
JAX
0.10.2 reads only JAX_COORDINATOR_ADDRESS from the environment, so JAX_NUM_PROCESSES and
JAX_PROCESS_ID are read here.
"""

import atexit
import dataclasses
import os
import sys
import threading
import time
from typing import Callable, Mapping

# How long a process may go without a heartbeat before the others declare it lost and end
# (--heartbeat_timeout_seconds; JAX's own default). Shorter finds a dead host sooner; a process
# must still beat through its longest stall (the GIL held, swapping), or a slow one counts as lost.
HEARTBEAT_TIMEOUT_SECONDS = 100
# Exit status of a process whose run lost another process: the same command resumes it (as a
# preemption's EXIT_PREEMPTED, a launcher may requeue on it).
EXIT_PROCESS_LOST = 76

_ENV = {
  "coordinator_address": "JAX_COORDINATOR_ADDRESS",
  "num_processes": "JAX_NUM_PROCESSES",
  "process_id": "JAX_PROCESS_ID",
}


@dataclasses.dataclass(frozen=True)
class Launch:
  """Arguments for jax.distributed.initialize; None means "let JAX's cluster detection fill it
  in"."""

  coordinator_address: str | None
  num_processes: int | None
  process_id: int | None
  cluster: str | None  # The scheduler found in the environment ("slurm", "tpu", "mpi"), or None.
  heartbeat_timeout_seconds: int = HEARTBEAT_TIMEOUT_SECONDS


def detect_cluster(env: Mapping[str, str]) -> tuple[str | None, bool]:
  """(name, several processes?) of a scheduler whose variables JAX's own auto-detection reads."""
  if all(
    v in env
    for v in (
      "SLURM_JOB_ID",
      "SLURM_STEP_NODELIST",
      "SLURM_NTASKS",
      "SLURM_PROCID",
      "SLURM_LOCALID",
    )
  ):
    return "slurm", int(env["SLURM_NTASKS"]) > 1
  if "OMPI_MCA_orte_hnp_uri" in env or "OMPI_COMM_WORLD_SIZE" in env:
    return "mpi", int(env.get("OMPI_COMM_WORLD_SIZE", "2")) > 1
  hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES")
  if hosts or "MEGASCALE_COORDINATOR_ADDRESS" in env:
    return "tpu", "," in (hosts or ",")
  return None, False


def resolve(
  distributed: str,
  coordinator_address: str | None,
  num_processes: int | None,
  process_id: int | None,
  env: Mapping[str, str],
) -> Launch | None:
  """The processes of this run from --distributed=auto|true|false, the three flags and `env`.

  Flags win over JAX_* variables. On a scheduler (SLURM, Open MPI, a TPU pod) what is not given is
  left to JAX's detection; elsewhere a run of several processes needs all three. None: run as one
  process. Raises ValueError (one line, naming what to set) for a combination that cannot start.
  """
  given = {
    "coordinator_address": coordinator_address or None,
    "num_processes": num_processes,
    "process_id": process_id,
  }
  where = {k: f"--{k}" for k, v in given.items() if v is not None}
  for key, var in _ENV.items():
    if given[key] is None and env.get(var, "") != "":
      given[key], where[key] = env[var], var
      if key != "coordinator_address":
        try:
          given[key] = int(env[var])
        except ValueError:
          raise ValueError(f"{var}={env[var]!r} is not an integer") from None
  address, count, pid = given["coordinator_address"], given["num_processes"], given["process_id"]
  named = ", ".join(f"{where[k]}={given[k]}" for k in _ENV if k in where)
  if distributed == "false":
    if named:
      raise ValueError(
        f"--distributed=false but {named} asks for several processes: drop one of them"
      )
    return None
  if address is not None and (":" not in address or not address.rsplit(":", 1)[1].isdigit()):
    raise ValueError(
      f"{where['coordinator_address']}={address!r} is not HOST:PORT (e.g. 10.0.0.1:1234)"
    )
  if count is not None and count < 1:
    raise ValueError(f"{where['num_processes']}={count} must be at least 1")
  if pid is not None and pid < 0:
    raise ValueError(f"{where['process_id']}={pid} must be 0 or more")
  if pid is not None and count is not None and pid >= count:
    raise ValueError(
      f"{where['process_id']}={pid} must be less than {where['num_processes']}={count} "
      f"(ids run 0 .. {count - 1})"
    )
  cluster, several = detect_cluster(env)
  if named and cluster is None:
    missing = [f"--{k} (or {_ENV[k]})" for k in _ENV if given[k] is None]
    if missing:
      raise ValueError(
        f"{named} also needs {' and '.join(missing)}: no SLURM, Open MPI or TPU pod "
        "environment was found to supply it"
      )
  if distributed == "auto" and not named and not several:
    return None
  return Launch(address, count, pid, cluster)


def initialize(launch: Launch, resume_hint: Callable[[], str] | None = None) -> None:
  """jax.distributed.initialize for `launch`, before anything touches a JAX backend.

  When a process goes silent (no heartbeat through the coordination service for
  launch.heartbeat_timeout_seconds: a SIGKILL, a host that died), every other process ends at once
  with one line on stderr, last: the lost process and how the run resumes (`resume_hint()`, e.g.
  "from step 16"), exit status EXIT_PROCESS_LOST. Without this, JAX aborts the survivors after its
  heartbeat timeout with the cause above a thread dump of hundreds of lines.
  """
  import jax

  # Collectives between CPU processes (tests on loopback, CPU-only hosts) need an implementation;
  # gloo is this JAX's default, but "none" (set by a user or an older default) would make every psum
  # a hang.
  if jax.config.jax_cpu_collectives_implementation in (None, "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if launch.heartbeat_timeout_seconds < 1:
    raise ValueError(
      f"--heartbeat_timeout_seconds={launch.heartbeat_timeout_seconds}; expected an integer >= 1"
    )
  try:
    jax.distributed.initialize(
      coordinator_address=launch.coordinator_address,
      num_processes=launch.num_processes,
      process_id=launch.process_id,
      heartbeat_timeout_seconds=2 * launch.heartbeat_timeout_seconds,  # The backstop (`_watch`).
    )
  except ValueError as e:
    if launch.cluster is None and launch.coordinator_address is None:
      # --distributed=true with nothing given and no scheduler that JAX recognised (its message
      # names only the first missing value).
      raise ValueError(
        f"--distributed=true found no cluster to join ({e}): set --coordinator_address, "
        "--num_processes and --process_id"
      ) from None
    raise
  _watch(launch, resume_hint)


def _watch(launch: Launch, resume_hint: Callable[[], str] | None) -> None:
  """A daemon thread: this process's heartbeat in the coordination service's key-value store, and
  every other process's read back; one silent for launch.heartbeat_timeout_seconds (or the
  coordination service gone with process 0) ends this process with `_lost`'s line.

  Why not JAX's own heartbeat: its client ends a process through a missed-heartbeat callback that
  aborts (the cause above a thread dump), and a Python callback cannot replace it in jaxlib 0.10.2
  (the status argument has no Python type: std::bad_cast). JAX's heartbeat stays on as a backstop
  at twice the timeout."""
  from jax._src import distributed as jax_distributed  # pylint: disable=import-outside-toplevel

  client = jax_distributed.global_state.client
  me, n = jax_distributed.global_state.process_id, jax_distributed.global_state.num_processes
  timeout = float(launch.heartbeat_timeout_seconds)
  # A process that ends normally stops watching and says so first: atexit runs this before JAX's
  # own shutdown (registered earlier, run later), after which the service may be gone, and while
  # the others may still work for longer than the timeout.
  done = threading.Event()

  def stop() -> None:
    done.set()
    try:
      client.key_value_set(f"{_ALIVE}{me}", _EXITED, allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except  # The service is gone: nobody is watching.
      pass

  atexit.register(stop)

  def beat() -> None:
    seen = {p: (None, time.monotonic()) for p in range(n)}
    count = 0
    while True:
      count += 1
      try:
        client.key_value_set(f"{_ALIVE}{me}", str(count), allow_overwrite=True)
        # Keys come back whole or relative to the directory, by jaxlib version: the last part is the
        # id.
        values = {k.rsplit("/", 1)[-1]: v for k, v in client.key_value_dir_get(_ALIVE)}
      except Exception as e:  # pylint: disable=broad-except  # The service went with process 0.
        if done.is_set():
          return
        from absl import logging  # pylint: disable=import-outside-toplevel

        logging.warning("The coordination service did not answer: %s", " ".join(str(e).split()))
        _lost("process 0 (the coordinator)", resume_hint)
      now = time.monotonic()
      for p in range(n):
        value = values.get(str(p))
        if value != seen[p][0]:
          seen[p] = (value, now)
      silent = [
        p
        for p in range(n)
        if p != me and now - seen[p][1] > timeout and values.get(str(p)) != _EXITED
      ]
      if silent and not done.is_set():
        _lost(f"process {', '.join(map(str, silent))}", resume_hint)
      if done.wait(min(1.0, timeout / 5)):
        return

  threading.Thread(target=beat, name="npp_jax_heartbeat", daemon=True).start()


_ALIVE = "npp_jax/alive/"
_EXITED = "exited"


def _lost(who: str, resume_hint: Callable[[], str] | None) -> None:
  """One line, last on stderr, then this process ends (other threads may be stuck in a
  collective with the lost process: nothing else would end them)."""
  try:
    resume = resume_hint() if resume_hint else "from its last saved work"
  except Exception:  # pylint: disable=broad-except  # The line must be printed whatever happens.
    resume = "from its last saved work"
  try:
    from absl import logging  # pylint: disable=import-outside-toplevel

    logging.flush()
    sys.stdout.flush()
  finally:
    sys.stderr.write(
      f"error: lost JAX {who} (its host died or it was killed: no heartbeat within "
      f"--heartbeat_timeout_seconds); the same command resumes the run {resume}\n"
    )
    sys.stderr.flush()
    os._exit(EXIT_PROCESS_LOST)  # pylint: disable=protected-access


def resume_hint(mode: str, workdir: str) -> Callable[[], str]:
  """Where the same command picks up, read when a process is lost: a training run's last finished
  checkpoint in WORKDIR/checkpoints; other jobs keep the shards they finished."""

  def hint() -> str:
    if mode != "train":
      return "from the work it has saved"
    from etils import epath  # pylint: disable=import-outside-toplevel

    from npp_jax import checkpoints  # pylint: disable=import-outside-toplevel

    steps = checkpoints.finished_steps(epath.Path(workdir) / "checkpoints")
    return f"from step {steps[-1]}" if steps else "from step 0 (no checkpoint was saved yet)"

  return hint
