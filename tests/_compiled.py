"""Compiled temporary memory on XLA:CPU, whatever the default backend.

The memory bounds in the tests are facts about XLA:CPU's fusion (the backend CI runs on); on a GPU
host the same functions would otherwise compile for the GPU, whose fusion choices differ
(experiments/results/gpu_h100/README.md).
"""

import jax
from jax.sharding import SingleDeviceSharding


def cpu_temp_bytes(fn, *args: jax.ShapeDtypeStruct) -> int:
  """``memory_analysis().temp_size_in_bytes`` of ``jax.jit(fn)`` compiled for the first CPU
  device on arguments of ``args``' shapes and dtypes."""
  cpu = SingleDeviceSharding(jax.devices("cpu")[0])
  placed = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu) for a in args]
  return jax.jit(fn).lower(*placed).compile().memory_analysis().temp_size_in_bytes
