"""The jobs of `python -m npp_jax.main --mode=MODE`: one module each, one contract, one registry.

A job module has
  SECTIONS                            the config sections it reads;
  check_settings(config, topology)    every rule of those sections (the settings classes that live
  next
                                      to the code using each section), files untouched;
  check(config, workdir, topology)    check_settings, then the workdir, the weights and data the
  config
                                      names (small files only): one-line ValueErrors before anything
                                      is loaded, compiled or written; returns the job's plan;
  run(config, workdir, ...)           check, then the work; returns a Result.
The command line and a library caller go through the same check. No job imports another: the demo
composes jobs through this registry.
"""

import dataclasses
import importlib
from types import ModuleType
from typing import Any, NamedTuple

# The one list of modes: main's --mode flag, its dispatch and the tests read it.
JOBS = {
  "train": "npp_jax.jobs.train",
  "sample": "npp_jax.jobs.sample",
  "extract": "npp_jax.jobs.extract",
  "train_vq": "npp_jax.jobs.train_vq",
  "demo": "npp_jax.jobs.demo",
  "evaluate": "npp_jax.jobs.evaluate",
  "compile": "npp_jax.jobs.compile",
}
MODES = tuple(JOBS)


class Topology(NamedTuple):
  """The devices a job's checks count against (a batch splits over them): all processes' devices."""

  num_devices: int
  process_count: int

  @classmethod
  def current(cls) -> "Topology":
    import jax  # Not at import: main parses its flags (some are JAX's) before JAX starts.

    return cls(jax.device_count(), jax.process_count())


@dataclasses.dataclass(frozen=True)
class Result:
  """What a job returns. stopped_early: a SIGTERM stopped it after saving, and the same command
  resumes (main exits with status 75). outputs: what it made (paths, metrics, scalars), by name."""

  stopped_early: bool = False
  outputs: dict[str, Any] = dataclasses.field(default_factory=dict)


def get(mode: str) -> ModuleType:
  """The job module of a mode."""
  if mode not in JOBS:
    raise ValueError(f"--mode={mode!r}; expected one of {list(JOBS)}")
  return importlib.import_module(JOBS[mode])
