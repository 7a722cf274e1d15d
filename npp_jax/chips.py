"""Accelerator chips: the one table of their memory, peak bf16 FLOP/s and bandwidth; TPU slices.

The figures are the vendors' published per-chip numbers (sources in docs/slices.md, "Chip facts").
They feed the roofline estimates of `--mode=compile` (jobs/compile.py): an ESTIMATED step time is
max(FLOPs / peak FLOP/s, bytes accessed / bandwidth), a lower bound that ignores communication.

A TPU slice is named as libtpu names its topologies: "v5e:2x2", "v5e:16x16", "v5p:4x4x4", "v6e:8x8"
(chips along each axis of the torus). JAX compiles for one on any machine once `libtpu` is installed
(`load_topology`); nothing here needs a TPU.
"""

import contextlib
import dataclasses
import math
import os
import re
import tempfile
from typing import Iterator

from absl import logging

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str  # "v5e", or a GPU's name.
  device_kind: str  # jax's Device.device_kind prefix ("TPU v5 lite").
  hbm_bytes: int  # Memory per chip (JAX device).
  peak_flops: float  # Dense bf16 FLOP/s per chip.
  hbm_bytes_per_s: float  # Memory bandwidth per chip.
  dims: int = 0  # TPUs: axes of the slice's torus (2 or 3); 0 for GPUs.
  max_chips: int = 0  # TPUs: the largest slice of one pod.

  @property
  def is_tpu(self) -> bool:
    return self.dims > 0


# Most specific device_kind prefixes first: the lookup takes the first that matches.
CHIPS = (
  Chip("v5e", "TPU v5 lite", 16 * GiB, 197e12, 819e9, dims=2, max_chips=256),
  Chip("v6e", "TPU v6 lite", 32 * GiB, 918e12, 1640e9, dims=2, max_chips=256),
  Chip("v5p", "TPU v5", 95 * GiB, 459e12, 2765e9, dims=3, max_chips=8960),
  Chip("v4", "TPU v4", 32 * GiB, 275e12, 1200e9),  # MFU only: libtpu gives 2 devices per v4 chip.
  Chip("H200", "NVIDIA H200", 141 * 10**9, 989e12, 4.8e12),
  Chip("H100", "NVIDIA H100", 80 * 10**9, 989e12, 3.35e12),
  Chip("A100", "NVIDIA A100", 80 * 10**9, 312e12, 2.039e12),
)
TPU_SLICES = {c.name: c for c in CHIPS if c.is_tpu}  # The generations --mode=compile accepts.


def chip_of_kind(device_kind: str) -> Chip | None:
  """The row for a jax device_kind ("TPU v5 lite", "NVIDIA H100 80GB HBM3"); None if absent."""
  for chip in CHIPS:
    if device_kind.startswith(chip.device_kind):
      return chip
  return None


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice named like libtpu's topologies: generation and chips along each torus axis."""

  chip: Chip
  shape: tuple[int, ...]

  @property
  def name(self) -> str:
    return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"

  @property
  def num_chips(self) -> int:
    return math.prod(self.shape)

  @property
  def num_hosts(self) -> int:
    """Processes of a run on this slice: one per TPU VM host of up to 4 chips (8 for v5e / v6e)."""
    per_host = 8 if self.chip.dims == 2 and self.num_chips >= 8 else 4
    return max(1, self.num_chips // per_host)


def parse_slice(topology: str, field: str = "compile.topology") -> Slice:
  """'v5e:2x2' -> Slice; a one-line ValueError naming `field` and what is accepted otherwise."""
  expected = (
    f"expected GENERATION:AxB (v5e, v6e) or GENERATION:AxBxC (v5p), e.g. 'v5e:2x2', 'v5e:16x16', "
    f"'v5p:4x4x4', 'v6e:8x8'; generations: {', '.join(TPU_SLICES)}"
  )
  m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", str(topology).strip())
  if not m:
    raise ValueError(f"{field}={topology!r}; {expected}")
  chip = TPU_SLICES.get(m.group(1))
  shape = tuple(int(s) for s in m.group(2).split("x"))
  if chip is None or len(shape) != chip.dims or min(shape) < 1:
    raise ValueError(f"{field}={topology!r}; {expected}")
  if math.prod(shape) > chip.max_chips:
    raise ValueError(
      f"{field}={topology!r} has {math.prod(shape)} chips; a {chip.name} slice has at most "
      f"{chip.max_chips}"
    )
  return Slice(chip, shape)


def libtpu_available() -> bool:
  """Whether JAX can compile for TPU topologies here (the `libtpu` package, Linux x86_64 wheels)."""
  try:
    import libtpu  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


@contextlib.contextmanager
def quiet_libtpu(what: str) -> Iterator[None]:
  """Everything written to the process's stderr (fd 2) meanwhile goes to absl logging instead.

  libtpu prints start-up warnings from C++ when it loads on a machine without TPUs
  (TPU_ACCELERATOR_TYPE and TPU_WORKER_HOSTNAMES unset): harmless here, not for the console. They
  are logged at verbosity 1 (`--verbosity=1` shows them).
  """
  import sys  # pylint: disable=import-outside-toplevel

  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as sink:
    os.dup2(sink.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      sink.seek(0)
      text = sink.read().decode(errors="replace").strip()
      if text:
        logging.vlog(1, "%s wrote to stderr:\n%s", what, text)


def load_topology(s: Slice):
  """The slice's TPU devices (compile-only: no TPU needed), libtpu's warnings logged."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

  # libtpu takes /tmp/libtpu_lockfile so that two processes do not drive one TPU; a compile-only
  # topology drives none, and without this a second compile run at the same time (two users, two
  # test workers) fails with "Internal error when accessing libtpu multi-process lockfile".
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  kwargs = {}
  if s.num_chips < 4:  # libtpu assumes 2x2 chips per host unless told (v5litepod-1, v6e-1).
    kwargs["chips_per_host_bounds"] = (*s.shape, 1)[:3] if s.chip.dims == 2 else s.shape
  with quiet_libtpu(f"libtpu (topology {s.name})"):
    return topologies.get_topology_desc(s.name, platform="tpu", **kwargs).devices
