"""Meshes, logical-axis rules and placing arrays: the only module that names mesh axes.

The mesh has three axes from the config: data (pure data parallel), fsdp (data parallel whose parameters and
optimizer state are also split), tensor (model parallel inside a layer). A laptop CPU is a 1x1x1 mesh.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

BATCH_AXES = ("data", "fsdp")


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Resolve a -1 entry to the devices left; one-line error when the shape cannot cover the devices."""
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


def make_mesh(mesh_config, devices: Sequence[Any] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  axes = tuple(mesh_config.axes)
  if axes != ("data", "fsdp", "tensor"):
    raise ValueError(f"mesh.axes={axes}; expected ('data', 'fsdp', 'tensor')")
  shape = mesh_shape(mesh_config.shape, len(devices))
  # Auto axes: XLA propagates shardings from the annotated parameters and inputs.
  return jax.make_mesh(shape, axes, (AxisType.Auto,) * len(axes), devices=devices)


def rules(mesh_config) -> tuple[tuple[str, Any], ...]:
  """Logical-axis rules from the config as hashable tuples (ConfigDict turns them into lists)."""
  out = []
  for name, target in mesh_config.rules:
    out.append((name, tuple(target) if isinstance(target, (list, tuple)) else target))
  return tuple(out)


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
  """One-line ValueError unless `batch_size` (cut into `micro_batches` equal parts) splits evenly over
  the data-parallel devices and over the processes; returns the data-parallel size."""
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
  """Per-process batch (leading axis = this process's share) -> global arrays split over the batch axes."""
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
