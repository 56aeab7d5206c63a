"""The reading every metric shares: inputs to rows, the label's logit and rank, masked means.

Every public metric goes through :func:`jit_metric` (lists accepted, labels checked, ``jax.jit``)
and :func:`read_rows` (checks, class axis last, batch flattened); the per-row quantities here are
``NaN`` on an invalid row (label outside ``[0, C)``, NaN logits) so that no metric can hide one.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from xent_jax.core import checks, inputs


class Rows(NamedTuple):
  """Inputs flattened to rows: logits ``[N, C]`` in the working dtype, int32 labels ``[N]`` (-1
  outside ``[0, C)``), mask ``[N]``."""

  logits: jax.Array
  labels: jax.Array
  mask: jax.Array


def as_array(x):
  """A list or tuple as a NumPy array (``jnp`` functions accept them; ``jit`` alone would trace
  each element as a separate argument); anything else unchanged."""
  return np.asarray(x) if isinstance(x, (list, tuple)) else x


def jit_metric(*static_argnames: str):
  """``jax.jit`` with ``static_argnames`` behind a front that takes ``logits``, ``labels`` and
  ``where`` as lists too and refuses concrete labels that JAX would wrap to int32
  (:func:`xent_jax.core.inputs.as_label_array`): past the ``jit`` boundary both are out of reach."""

  def decorate(fn):
    jitted = jax.jit(fn, static_argnames=static_argnames)

    @functools.wraps(fn)
    def front(logits, labels, **options):
      if "where" in options:
        options["where"] = as_array(options["where"])
      labels = inputs.as_label_array(fn.__name__, as_array(labels))
      return jitted(as_array(logits), labels, **options)

    return front

  return decorate


def check_positive_int(fn: str, name: str, value) -> int:
  """Returns ``value`` as an int, or raises ValueError naming ``name`` unless it is an int >= 1."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{fn}: `{name}` must be an integer >= 1, got {value!r}.")
  return int(value)


def read_rows(fn: str, logits, labels, axis: int, where) -> Rows:
  """Validates shapes and dtypes, moves the class axis last and flattens the batch dimensions.

  Labels come back as int32, with -1 for a label outside ``[0, C)`` in any integer dtype (see
  :func:`xent_jax.core.inputs.integer_labels`), so the range tests below are exact.

  Raises:
    TypeError: non-float ``logits``, non-integer ``labels`` or a non-boolean ``where``.
    ValueError: scalar ``logits``, an empty class axis, a bad ``axis`` or ``where`` shape.
    AssertionError: (chex) ``labels`` not of the batch shape.
  """
  checks.check_floating(fn, "logits", logits)
  logits = jnp.asarray(logits)
  if logits.ndim == 0:
    raise ValueError(f"{fn}: `logits` must have a class axis (rank >= 1), got a scalar.")
  axis = checks.canonical_axis(fn, axis, logits.ndim)
  checks.check_has_classes(fn, "logits", logits.shape, axis)
  logits = jnp.moveaxis(logits, axis, -1)
  batch_shape = logits.shape[:-1]
  num_classes = logits.shape[-1]
  checks.check_shape(fn, "labels", labels, batch_shape)
  labels = inputs.integer_labels(
    fn, labels, num_classes=num_classes, ignore_index=None, where=None
  ).labels
  if where is not None and jnp.result_type(where) != jnp.bool_:
    raise TypeError(f"{fn}: `where` must be a boolean mask, got dtype {jnp.result_type(where)}.")
  mask = inputs.row_mask(fn, where, batch_shape)
  dtype = inputs.compute_dtype(logits.dtype)
  return Rows(logits.astype(dtype).reshape(-1, num_classes), labels.reshape(-1), mask.reshape(-1))


def invalid(rows: Rows) -> jax.Array:
  """``[N]`` bool: the label is outside ``[0, C)`` or the row's logits contain NaN."""
  num_classes = rows.logits.shape[-1]
  bad_label = (rows.labels < 0) | (rows.labels >= num_classes)
  return bad_label | jnp.any(jnp.isnan(rows.logits), axis=-1)


def nan_if_invalid(values: jax.Array, rows: Rows) -> jax.Array:
  """``values`` in the working dtype, NaN on the :func:`invalid` rows."""
  return jnp.where(invalid(rows), jnp.nan, values.astype(rows.logits.dtype))


def safe_labels(rows: Rows) -> jax.Array:
  """``[N]`` int32 labels clipped into ``[0, C)``: safe to gather with. What an invalid row
  gathers is replaced by NaN (:func:`nan_if_invalid`) or masked out."""
  return jnp.clip(rows.labels, 0, rows.logits.shape[-1] - 1)


def label_logit(rows: Rows) -> jax.Array:
  """``[N]``: the logit of each row's (safe) label, :math:`x_{iy_i}`."""
  return jnp.take_along_axis(rows.logits, safe_labels(rows)[:, None], axis=-1)[:, 0]


def label_rank(rows: Rows) -> jax.Array:
  """``[N]`` int: how many classes rank above the label (ties broken towards the lower index)."""
  labels_N1 = safe_labels(rows)[:, None]
  target_N1 = label_logit(rows)[:, None]
  class_ids_1C = jnp.arange(rows.logits.shape[-1])[None, :]
  above_NC = (rows.logits > target_N1) | ((rows.logits == target_N1) & (class_ids_1C < labels_N1))
  return jnp.sum(above_NC, axis=-1)


def correct(rows: Rows, k: int) -> jax.Array:
  """``[N]`` float: 1 when the label is in the top-k, else 0; NaN for invalid examples."""
  return nan_if_invalid(label_rank(rows) < k, rows)


def masked_sum(values: jax.Array, mask: jax.Array) -> jax.Array:
  """The sum of ``values`` over the rows where ``mask`` holds (excluded NaN or inf add 0)."""
  return jnp.sum(jnp.where(mask, values, 0.0))


def mean_or_nan(total: jax.Array, count: jax.Array) -> jax.Array:
  """``total / count``, or NaN where ``count == 0`` (with a finite gradient for ``total``)."""
  return jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """The mean of ``values`` over the rows where ``mask`` holds; NaN when it holds nowhere."""
  count = jnp.sum(mask, dtype=values.dtype)
  return mean_or_nan(masked_sum(values, mask), count)
