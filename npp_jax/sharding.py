"""Meshes, logical-axis rules and placing arrays: the only module that names mesh axes.

The mesh has three axes from the config: data (pure data parallel), fsdp (data parallel whose
parameters and optimizer state are also split), tensor (model parallel inside a layer). A laptop CPU
is a 1x1x1 mesh.
"""

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from npp_jax import rules

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class MeshSettings:
  """config.mesh: the (data, fsdp, tensor) shape, -1 taking the devices left, and the logical-axis
  rules that map the model's axis names onto the mesh (maxtext style)."""

  shape: tuple
  axes: tuple = AXES
  rules: tuple = ()

  def __post_init__(self):
    rules.check("mesh.shape", self.shape, _SHAPE)
    rules.check("mesh.axes", tuple(self.axes), rules.one_of(AXES))
    rules.check("mesh.rules", self.rules, _RULES)

  @classmethod
  def from_config(cls, config) -> "MeshSettings":
    m = rules.section(config, "mesh", cls)
    return cls(shape=_tuple(m["shape"]), axes=_tuple(m["axes"]), rules=_hashable(m["rules"]))

  def resolve(self, num_devices: int) -> tuple[int, ...]:
    """The shape with -1 resolved; one-line error when it cannot cover num_devices."""
    return mesh_shape(self.shape, num_devices)


def _tuple(v):
  return tuple(v) if isinstance(v, (tuple, list)) else v


def _hashable(axis_rules) -> tuple[tuple[str, Any], ...]:
  """Logical-axis rules as hashable tuples (ConfigDict turns them into lists)."""
  if not isinstance(axis_rules, (tuple, list)):
    return axis_rules
  return tuple((r[0], _tuple(r[1])) if isinstance(r, (tuple, list)) else r for r in axis_rules)


_SHAPE = (
  "three integers (data, fsdp, tensor), one of them may be -1 for the devices left, "
  "e.g. (-1, 1, 1)",
  lambda v: (
    isinstance(v, tuple)
    and len(v) == 3
    and all(rules.is_int(s) and (s >= 1 or s == -1) for s in v)
    and list(v).count(-1) <= 1
  ),
)
_RULES = (
  f"pairs (logical axis name, mesh axis, several mesh axes or None) over {list(AXES)}",
  lambda v: (
    isinstance(v, tuple)
    and all(
      isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], str) and _targets_known(r[1])
      for r in v
    )
  ),
)


def _targets_known(target) -> bool:
  targets = target if isinstance(target, tuple) else (target,)
  return all(t is None or t in AXES for t in targets)


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Resolve a -1 entry to the devices left; one-line error when the shape cannot cover the
  devices."""
  shape = [int(s) for s in shape]
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh.shape={tuple(shape)}; expected positive sizes and at most one -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if num_devices % known:
      raise ValueError(
        f"mesh.shape={tuple(shape)} cannot be filled from {num_devices} devices: "
        f"{num_devices} is not a multiple of {known}"
      )
    shape[shape.index(-1)] = num_devices // known
  if int(np.prod(shape)) != num_devices:
    raise ValueError(
      f"mesh.shape={tuple(shape)} needs {int(np.prod(shape))} devices; "
      f"found {num_devices} ({jax.devices()[0].platform})"
    )
  return tuple(shape)


def _settings(mesh_config) -> MeshSettings:
  if isinstance(mesh_config, MeshSettings):
    return mesh_config
  return MeshSettings.from_config({"mesh": mesh_config})


def make_mesh(mesh_config, devices: Sequence[Any] | None = None) -> Mesh:
  """The mesh of config.mesh (or MeshSettings) over `devices` (default: all)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = _settings(mesh_config).resolve(len(devices))
  # Auto axes: XLA propagates shardings from the annotated parameters and inputs.
  return jax.make_mesh(shape, AXES, (AxisType.Auto,) * len(AXES), devices=devices)


def axis_rules(mesh_config) -> tuple[tuple[str, Any], ...]:
  """Logical-axis rules of config.mesh (or MeshSettings) as hashable tuples."""
  return _settings(mesh_config).rules


def data_parallel_size(mesh: Mesh | Any, num_devices: int | None = None) -> int:
  """Devices a batch is split over (data x fsdp), of a Mesh or of a mesh config (resolved against
  num_devices, default all devices), so that a check can run before any mesh is built."""
  if isinstance(mesh, Mesh):
    return mesh.shape["data"] * mesh.shape["fsdp"]
  shape = mesh_shape(mesh.shape, jax.device_count() if num_devices is None else num_devices)
  return shape[0] * shape[1]


def check_batch(
  batch_size: int,
  mesh_config,
  field: str,
  *,
  num_devices: int | None = None,
  process_count: int | None = None,
  micro_batches: int = 1,
) -> int:
  """One-line ValueError unless `batch_size` (cut into `micro_batches` equal parts) splits evenly
  over the data-parallel devices and over the processes; returns the data-parallel size."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  process_count = jax.process_count() if process_count is None else process_count
  shape = mesh_shape(mesh_config.shape, num_devices)
  dp = shape[0] * shape[1]
  if batch_size % micro_batches or (batch_size // micro_batches) % dp:
    accum = f" with {micro_batches} micro-batches" if micro_batches > 1 else ""
    raise ValueError(
      f"{field}={batch_size}{accum} does not split over the data-parallel size {dp} (mesh "
      f"{shape}); expected a multiple of {dp * micro_batches}"
    )
  if batch_size % process_count:
    raise ValueError(f"{field}={batch_size}; expected a multiple of the {process_count} processes")
  return dp


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over data and fsdp; everything else replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  """Whole on every device of the mesh (small parameters, keys, scalars)."""
  return NamedSharding(mesh, P())


def logical_shardings(boxed_tree, mesh: Mesh, axis_rules) -> Any:
  """NamedShardings for a tree of nn.LogicallyPartitioned boxes (or abstract values of them)."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, axis_rules)


def global_batch(local: dict, mesh: Mesh) -> dict:
  """Per-process batch (leading axis = this process's share) -> global arrays split over the batch
  axes."""
  sharding = data_sharding(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local
  )


def gather(x: jax.Array) -> np.ndarray:
  """A (batch-)sharded global array -> all of it as a NumPy array on every process.

  Collective when there are several processes: every process must call it with the same array.
  """
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def put(tree: Any, sharding: NamedSharding) -> Any:
  """Host values that every process holds whole -> global arrays laid out as `sharding`.

  jax.device_put cannot reach another process's devices; here each process fills only its own shards
  (from the same whole value), so it works on one process or many. PRNG key arrays stay keys.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:  # Global already: reshard in place.
      return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(one(jax.random.key_data(x)))
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(one, tree)
