"""One reduction rule for every per-example loss in xent_jax.

.. math::
   \\text{none}: \\ell_i \\qquad \\text{sum}: \\sum_i \\ell_i \\qquad
   \\text{mean}: \\frac{\\sum_i \\ell_i}{\\sum_i \\omega_i}

where :math:`\\ell_i` already carries its example weight :math:`\\omega_i` (class weight of the
target times the mask). This is PyTorch's rule for ``nll_loss``/``cross_entropy`` ('mean' divides
by the summed weights of the non-ignored targets). Where PyTorch returns NaN (every target ignored,
:math:`\\sum_i \\omega_i = 0`) the mean here is 0 and its gradient is finite (zero).
"""

from collections.abc import Hashable

import jax
import jax.numpy as jnp

from xent_jax.core import checks


def data_axes(data_axis: Hashable | tuple[Hashable, ...] | None) -> tuple[Hashable, ...]:
  """``data_axis`` as a tuple of mesh axis names: None gives ``()``, a tuple stays as it is (the
  rows split over several axes, major first, as in a ``PartitionSpec`` entry), a name
  ``(name,)``."""
  if data_axis is None:
    return ()
  return tuple(data_axis) if isinstance(data_axis, tuple) else (data_axis,)


def reduce_loss(
  loss: jax.Array,
  example_weight: jax.Array,
  reduction: str,
  *,
  fn: str = "reduce_loss",
  data_axis: Hashable | tuple[Hashable, ...] | None = None,
) -> jax.Array:
  """Reduces a per-example loss.

  Args:
    loss: per-example loss, any shape, already multiplied by ``example_weight`` (zero where masked).
    example_weight: weights :math:`\\omega_i` broadcastable to ``loss``; the 'mean' denominator.
    reduction: 'none' (return ``loss``), 'sum' or 'mean'.
    fn: caller's name, used in error messages.
    data_axis: inside ``shard_map``, the mesh axis (or axes) the rows are split over: 'sum' and
      'mean' are then over the global batch (``psum`` of the total and of the weights). None: the
      rows are all here.

  Returns:
    ``loss`` for 'none', else a scalar in ``loss.dtype``.
  """
  checks.check_reduction(fn, reduction)
  if reduction == "none":
    return loss
  total = jnp.sum(loss)
  denominator = jnp.sum(jnp.broadcast_to(example_weight, loss.shape).astype(loss.dtype))
  axes = data_axes(data_axis)
  if axes:
    total, denominator = jax.lax.psum((total, denominator), axes)
  if reduction == "sum":
    return total
  safe = jnp.where(denominator == 0, jnp.ones_like(denominator), denominator)
  return jnp.where(denominator == 0, jnp.zeros_like(total), total / safe)
