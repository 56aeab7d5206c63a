"""What a compiled loss keeps: temporary memory on XLA:CPU, and the residuals of its VJP.

The memory bounds in the tests are facts about XLA:CPU's fusion (the backend CI runs on); on a GPU
host the same functions would otherwise compile for the GPU, whose fusion choices differ
(experiments/results/gpu_h100/README.md).
"""

import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding


def cpu_temp_bytes(fn, *args: jax.ShapeDtypeStruct) -> int:
  """``memory_analysis().temp_size_in_bytes`` of ``jax.jit(fn)`` compiled for the first CPU
  device on arguments of ``args``' shapes and dtypes."""
  cpu = SingleDeviceSharding(jax.devices("cpu")[0])
  placed = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu) for a in args]
  return jax.jit(fn).lower(*placed).compile().memory_analysis().temp_size_in_bytes


def residual_leaves(fn, logits):
  """Float arrays the VJP of ``fn`` keeps alive between forward and backward passes."""
  _, vjp_fn = jax.vjp(fn, logits)
  return [
    leaf
    for leaf in jax.tree_util.tree_leaves(vjp_fn)
    if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)
  ]


def large_non_input_residuals(fn, logits, inputs):
  """Residuals with at least half as many elements as the logits that are not an input."""
  big = [leaf for leaf in residual_leaves(fn, logits) if 2 * leaf.size >= logits.size]
  return [
    leaf
    for leaf in big
    if not any(
      leaf.shape == inp.shape and leaf.dtype == inp.dtype and bool(jnp.array_equal(leaf, inp))
      for inp in inputs
    )
  ]
