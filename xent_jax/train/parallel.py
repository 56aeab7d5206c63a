"""Data parallelism over every visible device through one ``("data",)`` mesh.

The same code serves one CPU, eight fake CPU devices and a multi-host TPU slice: parameters and
optimizer state are replicated, each batch is sharded along its first axis, and XLA inserts the
gradient all-reduce. Each process supplies only its own rows of the global batch
(`jax.make_array_from_process_local_data`); on one process that is the whole batch.

Decisions that every process must take alike (is a checkpoint corrupt?) go through `gather_text`
and `barrier`: collectives, so every process calls them at the same points, in the same order.
"""

import math

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


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


def gather_text(text: str, max_bytes: int = 1024) -> list[str]:
  """Every process's ``text`` (UTF-8, cut to ``max_bytes`` bytes), in process order.

  A collective: every process must call it, at the same point of the program.
  """
  if jax.process_count() == 1:
    return [text]
  data = text.encode()[:max_bytes]
  padded = np.zeros(max_bytes, np.uint8)
  padded[: len(data)] = np.frombuffer(data, np.uint8)
  rows = multihost_utils.process_allgather(padded)
  return [bytes(row).rstrip(b"\0").decode(errors="replace") for row in np.asarray(rows)]


def barrier(name: str) -> None:
  """Waits until every process has reached the barrier ``name`` (a collective)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def member_mesh(devices, num_members: int, mode: str) -> Mesh:
  """A ``("members", "data")`` mesh for a group of ``num_members`` members.

  ``vmap``: the members are split over ``gcd(num_members, devices)`` rows of devices, and each
  member's batch is sharded over the devices of its row (the ``data`` axis), so its gradient
  all-reduce stays inside that row. ``map``: members run one after another, each over every
  device (one row).
  """
  devices = jax.devices() if devices is None else list(devices)
  rows = math.gcd(num_members, len(devices)) if mode == "vmap" else 1
  grid = np.array(devices).reshape(rows, len(devices) // rows)
  return Mesh(grid, ("members", "data"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
