"""Data parallelism over every visible device through one ``("data",)`` mesh.

The same code serves one CPU, eight fake CPU devices and a multi-host TPU slice: parameters and
optimizer state are replicated, each batch is sharded along its first axis, and XLA inserts the
gradient all-reduce. Each process supplies only its own rows of the global batch
(`jax.make_array_from_process_local_data`); on one process that is the whole batch.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh named ``data`` over ``devices`` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.array(devices), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def check_batch_size(batch_size: int, key: str, mesh: Mesh) -> None:
  """Raises ValueError naming ``key`` when the batch does not split evenly over the devices."""
  if batch_size % mesh.size:
    raise ValueError(f"{key}={batch_size} must be divisible by the number of devices ({mesh.size})")


def replicate(tree, mesh: Mesh):
  """Places every leaf of ``tree`` fully replicated on the mesh."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(arrays, mesh: Mesh):
  """Turns this process's rows of a batch into global arrays sharded along axis 0."""
  sharding = NamedSharding(mesh, P("data"))
  return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, a), arrays)
