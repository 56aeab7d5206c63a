"""The argument conventions every loss shares, checked and parsed in one place.

``logits`` with classes on ``axis``; ``labels`` either integer class ids (``logits.shape`` without
``axis``) or float probabilities (``logits.shape``); ``class_weight`` ``[C]``; ``ignore_index``;
a per-example mask ``where``; a ``reduction``. :func:`parse_inputs` checks them at trace time
(naming the bad argument) and returns them with the classes on the last axis, together with the
derived per-example quantities of PyTorch's rules: the example weight
:math:`\\omega_i = w_{y_i}\\,\\mathrm{valid}_i` (``valid_i`` for probability labels) and the
rows whose valid integer label lies outside ``[0, C)``.

Integer labels are compared with ``ignore_index`` and with ``[0, C)`` exactly, whatever their
dtype (:func:`integer_labels`): a uint8 label never equals ``-100``, an int8 label 127 is in range
for ``C = 200``. Concrete int64 labels that JAX would wrap to int32 (``jax_enable_x64`` off) are
refused (:func:`as_label_array`).
"""

from collections.abc import Hashable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from xent_jax.core import checks


def compute_dtype(dtype) -> jnp.dtype:
  """float32 for half-precision inputs (and float32), float64 for float64."""
  return jnp.promote_types(dtype, jnp.float32)


def check_class_weight(fn: str, name: str, weight, num_classes: int) -> None:
  """Checks a ``[C]`` float class-weight vector named ``name``: dtype, shape and, when its values
  are concrete (not traced), that every weight is a non-negative number.

  Raises:
    TypeError: a non-float class weight.
    AssertionError: (chex) a shape other than ``[C]``.
    ValueError: a negative or NaN weight, naming the first one.
  """
  checks.check_floating(fn, name, weight)
  checks.check_shape(fn, name, weight, (num_classes,))
  if isinstance(weight, jax.core.Tracer):
    return
  host = np.asarray(weight, np.float32)
  bad = np.flatnonzero(~(host >= 0))
  if bad.size:
    raise ValueError(
      f"{fn}: `{name}` must hold non-negative class weights, got {name}[{bad[0]}] = {host[bad[0]]}."
    )


def as_label_array(fn: str, labels: jax.typing.ArrayLike) -> jax.Array:
  """``jnp.asarray(labels)``, refusing concrete integer labels that the conversion would wrap.

  With ``jax_enable_x64`` off JAX stores int64 as int32 (uint64 as uint32) and wraps what does not
  fit: label ``2**32 + 1`` would silently become class 1. Concrete labels (NumPy arrays, Python
  ints or lists) holding such a value raise instead. JAX arrays and traced labels already have a
  JAX dtype and pass through unchanged (what a ``jit`` boundary wrapped is out of reach here).

  Raises:
    ValueError: naming the first label outside the range of the dtype JAX would store.
  """
  if isinstance(labels, jax.Array):
    return labels
  host = np.asarray(labels)
  if host.dtype.kind in "iu":
    stored = jax.dtypes.canonicalize_dtype(host.dtype)
    info = np.iinfo(stored)
    outside = np.argwhere((host < info.min) | (host > info.max))
    if outside.size:
      pos = tuple(int(i) for i in outside[0])
      raise ValueError(
        f"{fn}: `labels` must fit in {stored} with jax_enable_x64 off (JAX would wrap them to "
        f"other classes), got labels[{pos}] = {host[pos]} of dtype {host.dtype}."
      )
  return jnp.asarray(host)


def label_equals(labels: jax.Array, value: int) -> jax.Array:
  """``labels == value`` exactly: a value the labels' dtype cannot hold matches no label.

  (``uint8`` labels compared with ``-100`` in their own dtype would match the class 156.)
  """
  info = jnp.iinfo(labels.dtype)
  if not info.min <= value <= info.max:
    return jnp.zeros(labels.shape, bool)
  return labels == jnp.asarray(value, labels.dtype)


def label_in_range(labels: jax.Array, num_classes: int) -> jax.Array:
  """``0 <= labels < num_classes`` exactly, in any integer dtype (``int8`` labels against 200
  classes, ``uint32`` labels beyond the int32 range)."""
  info = jnp.iinfo(labels.dtype)
  above_zero = labels >= 0 if info.min < 0 else jnp.ones(labels.shape, bool)
  if num_classes > info.max:
    return above_zero
  return above_zero & (labels < jnp.asarray(num_classes, labels.dtype))


def check_ignore_index(fn: str, ignore_index) -> int | None:
  """Returns ``ignore_index`` as a Python int (or None); ``TypeError`` for anything else."""
  if ignore_index is None:
    return None
  if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
    raise TypeError(f"{fn}: `ignore_index` must be an int or None, got {ignore_index!r}.")
  return int(ignore_index)


def row_mask(fn: str, where: jax.typing.ArrayLike | None, batch_shape) -> jax.Array:
  """The rows that count: ``where`` (a mask broadcastable to ``batch_shape``) as a ``[...]`` bool
  array of ``batch_shape``, all True without it.

  The one reading of ``where`` as a per-row mask; :func:`integer_labels` adds ``ignore_index``.

  Raises:
    ValueError: a ``where`` that does not broadcast to ``batch_shape``.
  """
  if where is None:
    return jnp.ones(batch_shape, bool)
  checks.check_broadcastable(fn, "where", where, batch_shape)
  return jnp.broadcast_to(jnp.asarray(where, bool), batch_shape)


class IntegerLabels(NamedTuple):
  """Integer labels read exactly, whatever their dtype.

  Attributes:
    labels: ``[...]`` int32: the label where it lies in ``[0, C)``, else -1. Any later
      comparison with ``0`` and ``C`` is then exact.
    valid: ``[...]`` bool, rows that count: ``where`` and label ``!= ignore_index``.
    in_range: ``[...]`` bool, labels inside ``[0, C)``.
  """

  labels: jax.Array
  valid: jax.Array
  in_range: jax.Array

  @property
  def bad(self) -> jax.Array:
    """``[...]`` valid rows whose label is outside ``[0, C)``: their loss is NaN."""
    return self.valid & ~self.in_range

  @property
  def safe_labels(self) -> jax.Array:
    """``[...]`` int32 labels, invalid and out-of-range ones replaced by 0 (safe to gather)."""
    return jnp.where(self.valid & self.in_range, self.labels, 0)


def integer_labels(
  fn: str,
  labels: jax.typing.ArrayLike,
  *,
  num_classes: int,
  ignore_index: int | None,
  where: jax.typing.ArrayLike | None,
) -> IntegerLabels:
  """Reads integer ``labels`` against ``num_classes``, ``ignore_index`` and a mask ``where``.

  The one place where labels meet ``ignore_index`` and ``[0, C)``: every comparison is exact in
  the labels' own dtype (:func:`label_equals`, :func:`label_in_range`), and concrete labels that
  JAX would wrap are refused (:func:`as_label_array`). Shapes are the caller's to check.

  Args:
    fn: the caller's name, for error messages.
    labels: ``[...]`` integer class ids, any integer dtype.
    num_classes: ``C``.
    ignore_index: label value that counts for nothing; None: none.
    where: mask broadcastable to ``labels.shape``; None keeps every row.

  Returns:
    :class:`IntegerLabels` of ``labels.shape``.

  Raises:
    TypeError: non-integer ``labels`` or a non-int ``ignore_index``.
    ValueError: concrete labels JAX would wrap, or a ``where`` that does not broadcast.
  """
  labels = as_label_array(fn, labels)
  check_integer_labels(fn, labels)
  ignore_index = check_ignore_index(fn, ignore_index)
  valid = row_mask(fn, where, labels.shape)
  if ignore_index is not None:
    valid = valid & ~label_equals(labels, ignore_index)
  in_range = label_in_range(labels, num_classes)
  wide = jnp.where(in_range, labels.astype(jnp.int32), jnp.asarray(-1, jnp.int32))
  return IntegerLabels(wide, valid, in_range)


class LossInputs(NamedTuple):
  """Checked loss arguments with the classes on the last axis.

  Attributes:
    logits: ``[..., C]`` in the caller's dtype (``[..., C_s]``, one shard's classes, when the
      classes are split over a mesh axis).
    labels: ``[...]`` int32 class ids, -1 where the given label lies outside ``[0, K)`` (see
      :class:`IntegerLabels`), or ``[..., C]`` probabilities as given.
    integer: whether ``labels`` are class ids.
    weight: ``[C]`` class weights in :func:`compute_dtype`, or None.
    valid: ``[...]`` bool, rows that count (``where`` and not ``ignore_index``).
    num_classes: :math:`K`, the number of classes over all shards.
  """

  logits: jax.Array
  labels: jax.Array
  integer: bool
  weight: jax.Array | None
  valid: jax.Array
  num_classes: int

  @property
  def bad(self) -> jax.Array:
    """``[...]`` valid rows whose integer label is outside ``[0, K)``: their loss is NaN."""
    if not self.integer:
      return jnp.zeros(self.valid.shape, bool)
    return self.valid & (self.labels < 0)

  @property
  def safe_labels(self) -> jax.Array:
    """``[...]`` integer labels with invalid and out-of-range ones replaced by 0 (to gather)."""
    return jnp.where(self.valid & (self.labels >= 0), self.labels, 0)


def parse_inputs(
  fn: str,
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  axis: int,
  class_weight: jax.typing.ArrayLike | None,
  where: jax.typing.ArrayLike | None,
  ignore_index: int | None,
  vocab_axis: Hashable | None = None,
) -> LossInputs:
  """Checks the shared arguments of ``fn`` (naming the bad one) and moves classes last.

  With ``vocab_axis`` (inside ``shard_map``) ``logits`` and ``class_weight`` hold one shard's
  classes and integer labels are read against the global class count.

  Raises:
    TypeError: non-float ``logits``; ``labels`` neither integer nor float; non-float
      ``class_weight``;
      a non-int ``ignore_index``.
    ValueError: a bad ``axis``, no classes, a ``where`` that does not broadcast,
      negative class weights, concrete labels JAX would wrap.
    AssertionError: (chex, at trace time) ``labels`` or ``class_weight`` of the wrong shape.
  """
  checks.check_floating(fn, "logits", logits)
  ignore_index = check_ignore_index(fn, ignore_index)
  logits = jnp.asarray(logits)
  labels = as_label_array(fn, labels)
  axis = checks.canonical_axis(fn, axis, logits.ndim)
  checks.check_has_classes(fn, "logits", logits.shape, axis)
  num_local = logits.shape[axis]
  num_classes = num_local if vocab_axis is None else num_local * jax.lax.axis_size(vocab_axis)
  batch_shape = logits.shape[:axis] + logits.shape[axis + 1 :]
  weight = None
  if class_weight is not None:
    check_class_weight(fn, "class_weight", class_weight, num_local)
    weight = jnp.asarray(class_weight).astype(compute_dtype(logits.dtype))
  valid = row_mask(fn, where, batch_shape)
  integer = is_integer_labels(fn, labels, logits.shape, axis)
  if integer:
    read = integer_labels(
      fn, labels, num_classes=num_classes, ignore_index=ignore_index, where=None
    )
    labels, valid = read.labels, valid & read.valid
  else:
    labels = jnp.moveaxis(labels, axis, -1)
  logits = jnp.moveaxis(logits, axis, -1)
  return LossInputs(logits, labels, integer, weight, valid, num_classes)


def check_integer_labels(
  fn: str, labels: jax.Array, batch_shape: tuple[int, ...] | None = None
) -> None:
  """Raises ``TypeError`` unless ``labels`` are integer class ids, and (chex) unless their shape is
  ``batch_shape`` (when given): for the functions that take no probabilities."""
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"{fn}: `labels` must be integer class ids, got dtype {labels.dtype}.")
  if batch_shape is not None:
    checks.check_shape(fn, "labels", labels, batch_shape)


def is_integer_labels(fn: str, labels: jax.Array, logits_shape: tuple[int, ...], axis: int) -> bool:
  """Whether ``labels`` are integer class ids (shape: ``logits_shape`` without ``axis``) rather
  than float probabilities (shape: ``logits_shape``); checks the dtype and the shape either way.

  Raises:
    TypeError: ``labels`` neither integer nor float.
    AssertionError: (chex) the wrong shape for their kind.
  """
  if jnp.issubdtype(labels.dtype, jnp.integer):
    axis = axis % len(logits_shape)
    checks.check_shape(fn, "labels", labels, logits_shape[:axis] + logits_shape[axis + 1 :])
    return True
  if jnp.issubdtype(labels.dtype, jnp.floating):
    checks.check_shape(fn, "labels", labels, logits_shape)
    return False
  raise TypeError(
    f"{fn}: `labels` must be integer class ids or float probabilities, got dtype {labels.dtype}."
  )
