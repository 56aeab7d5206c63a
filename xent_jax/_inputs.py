"""The argument conventions every loss shares, checked and parsed in one place.

``logits`` with classes on ``axis``; ``labels`` either integer class ids (``logits.shape`` without
``axis``) or float probabilities (``logits.shape``); class ``weight`` ``[C]``; ``ignore_index``;
a per-example mask ``where``; a ``reduction``. :func:`parse_inputs` checks them at trace time
(naming the bad argument) and returns them with the classes on the last axis, together with the
derived per-example quantities of PyTorch's rules: the example weight
:math:`\\omega_i = w_{y_i}\\,\\mathrm{valid}_i` (``valid_i`` for probability labels) and the
rows whose valid integer label lies outside ``[0, C)``.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from xent_jax import _checks


def compute_dtype(dtype) -> jnp.dtype:
  """float32 for half-precision inputs (and float32), float64 for float64."""
  return jnp.promote_types(dtype, jnp.float32)


def check_class_weight(fn: str, name: str, weight, num_classes: int) -> None:
  """Checks a ``[C]`` float class-weight vector named ``name``."""
  _checks.check_floating(fn, name, weight)
  _checks.check_shape(fn, name, weight, (num_classes,))


class LossInputs(NamedTuple):
  """Checked loss arguments with the classes on the last axis.

  Attributes:
    logits: ``[..., C]`` in the caller's dtype.
    labels: ``[...]`` integer ids as given, or ``[..., C]`` probabilities as given.
    integer: whether ``labels`` are class ids.
    weight: ``[C]`` class weights in :func:`compute_dtype`, or None.
    valid: ``[...]`` bool, rows that count (``where`` and not ``ignore_index``).
  """

  logits: jax.Array
  labels: jax.Array
  integer: bool
  weight: jax.Array | None
  valid: jax.Array

  @property
  def num_classes(self) -> int:
    return self.logits.shape[-1]

  @property
  def dtype(self) -> jnp.dtype:
    return compute_dtype(self.logits.dtype)

  @property
  def in_range(self) -> jax.Array:
    """``[...]`` integer labels inside ``[0, C)`` (all True for probability labels)."""
    if not self.integer:
      return jnp.ones(self.valid.shape, bool)
    return (self.labels >= 0) & (self.labels < self.num_classes)

  @property
  def bad(self) -> jax.Array:
    """``[...]`` valid rows whose integer label is outside ``[0, C)``: their loss is NaN."""
    return self.valid & ~self.in_range

  @property
  def safe_labels(self) -> jax.Array:
    """``[...]`` integer labels with invalid and out-of-range ones replaced by 0 (to gather)."""
    return jnp.where(self.valid & self.in_range, self.labels, 0)

  @property
  def target_weight(self) -> jax.Array:
    """``[...]`` :math:`w_{y_i}` for integer labels, else 1 (compute dtype)."""
    if not self.integer or self.weight is None:
      return jnp.ones(self.valid.shape, self.dtype)
    return self.weight[self.safe_labels]

  @property
  def example_weight(self) -> jax.Array:
    """``[...]`` :math:`\\omega_i`, the denominator of a 'mean'."""
    return jnp.where(self.valid, self.target_weight, jnp.zeros((), self.dtype))


def parse_inputs(
    fn: str,
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    axis: int,
    weight: jax.typing.ArrayLike | None,
    ignore_index: int | None,
    where: jax.typing.ArrayLike | None,
    reduction: str,
) -> LossInputs:
  """Checks the shared arguments of ``fn`` (naming the bad one) and moves classes last.

  Raises:
    TypeError: non-float ``logits``; ``labels`` neither integer nor float; non-float ``weight``.
    ValueError: bad ``axis``, ``reduction`` or a ``where`` that does not broadcast.
    AssertionError: (chex, at trace time) ``labels`` or ``weight`` of the wrong shape.
  """
  _checks.check_floating(fn, "logits", logits)
  _checks.check_reduction(fn, reduction)
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  axis = _checks.canonical_axis(fn, axis, logits.ndim)
  num_classes = logits.shape[axis]
  batch_shape = logits.shape[:axis] + logits.shape[axis + 1 :]
  if weight is not None:
    check_class_weight(fn, "weight", weight, num_classes)
    weight = jnp.asarray(weight).astype(compute_dtype(logits.dtype))
  if where is None:
    valid = jnp.ones(batch_shape, bool)
  else:
    _checks.check_broadcastable(fn, "where", where, batch_shape)
    valid = jnp.broadcast_to(jnp.asarray(where, bool), batch_shape)
  if jnp.issubdtype(labels.dtype, jnp.integer):
    _checks.check_shape(fn, "labels", labels, batch_shape)
    if ignore_index is not None:
      valid = valid & (labels != ignore_index)
    integer = True
  elif jnp.issubdtype(labels.dtype, jnp.floating):
    _checks.check_shape(fn, "labels", labels, logits.shape)
    labels = jnp.moveaxis(labels, axis, -1)
    integer = False
  else:
    raise TypeError(
        f"{fn}: `labels` must be integer class ids or float probabilities, got dtype {labels.dtype}."
    )
  return LossInputs(jnp.moveaxis(logits, axis, -1), labels, integer, weight, valid)
