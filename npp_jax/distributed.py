"""Which processes make up this run: flags, JAX_* variables and cluster detection -> jax.distributed.

`resolve` is pure (flags and an environment in, a `Launch` or None out) so that every combination is tested
without starting processes; `initialize` hands its result to `jax.distributed.initialize`. JAX 0.10.2 reads
only JAX_COORDINATOR_ADDRESS from the environment, so JAX_NUM_PROCESSES and JAX_PROCESS_ID are read here.
"""

import dataclasses
from typing import Mapping

_ENV = {
  "coordinator_address": "JAX_COORDINATOR_ADDRESS",
  "num_processes": "JAX_NUM_PROCESSES",
  "process_id": "JAX_PROCESS_ID",
}


@dataclasses.dataclass(frozen=True)
class Launch:
  """Arguments for jax.distributed.initialize; None means "let JAX's cluster detection fill it in"."""

  coordinator_address: str | None
  num_processes: int | None
  process_id: int | None
  cluster: str | None  # The scheduler found in the environment ("slurm", "tpu", "mpi"), or None.


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

  Flags win over JAX_* variables. On a scheduler (SLURM, Open MPI, a TPU pod) what is not given is left to
  JAX's detection; elsewhere a run of several processes needs all three. None: run as one process.
  Raises ValueError (one line, naming what to set) for a combination that cannot start.
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


def initialize(launch: Launch) -> None:
  """jax.distributed.initialize for `launch`, before anything touches a JAX backend."""
  import jax

  # Collectives between CPU processes (tests on loopback, CPU-only hosts) need an implementation; gloo is
  # this JAX's default, but "none" (set by a user or an older default) would make every psum a hang.
  if jax.config.jax_cpu_collectives_implementation in (None, "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(
      coordinator_address=launch.coordinator_address,
      num_processes=launch.num_processes,
      process_id=launch.process_id,
    )
  except ValueError as e:
    if launch.cluster is None and launch.coordinator_address is None:
      # --distributed=true with nothing given and no scheduler that JAX recognised (its message names
      # only the first missing value).
      raise ValueError(
        f"--distributed=true found no cluster to join ({e}): set --coordinator_address, "
        "--num_processes and --process_id"
      ) from None
    raise
