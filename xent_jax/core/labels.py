"""Opt-in validation of integer labels: find the first label outside ``[0, C)``.

Inside the losses an out-of-range label gives a NaN loss for its example (never a silently wrong
finite number). This helper names the culprit: eagerly it raises ``ValueError``; under
``jax.experimental.checkify.checkify`` (traced labels) it records a checkify error instead.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from xent_jax.core import checks, inputs


def check_labels(
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  axis: int = -1,
  ignore_index: int | None = -100,
) -> None:
  """Checks that every integer label is a class of ``logits`` or ``ignore_index``.

  Args:
    logits: ``[..., C, ...]`` logits (only the shape is read).
    labels: integer labels of ``logits.shape`` without ``axis``.
    axis: the class axis.
    ignore_index: a label value that is allowed besides ``[0, C)``; None allows none.

  Raises:
    ValueError: naming the first bad position (row-major) and its value, when ``labels`` are
      concrete. With traced labels the same message becomes a ``checkify`` error; wrap the
      function with ``checkify.checkify`` to receive it.

  Example:
    >>> import jax.numpy as jnp, xent_jax
    >>> xent_jax.check_labels(jnp.zeros((2, 3)), jnp.array([0, 3]))
    Traceback (most recent call last):
    ...
    ValueError: check_labels: `labels` must lie in [0, 3) or equal ignore_index=-100; ...
  """
  fn = "check_labels"
  shape = jnp.shape(logits)
  axis = checks.canonical_axis(fn, axis, len(shape))
  num_classes = shape[axis]
  checks.check_shape(fn, "labels", labels, shape[:axis] + shape[axis + 1 :])
  labels_dtype = jnp.result_type(labels)
  if not jnp.issubdtype(labels_dtype, jnp.integer):
    raise TypeError(f"{fn}: `labels` must be integer class ids, got dtype {labels_dtype}.")
  ignore_index = inputs.check_ignore_index(fn, ignore_index)
  allowed = f"[0, {num_classes}) or equal ignore_index={ignore_index}"
  if isinstance(labels, jax.core.Tracer):
    # Exact in the labels' own dtype (a uint8 label never equals -100).
    flat = jnp.ravel(labels)
    ok_flat = inputs.label_in_range(flat, num_classes)
    if ignore_index is not None:
      ok_flat = ok_flat | inputs.label_equals(flat, ignore_index)
    first = jnp.argmin(ok_flat)
    checkify.check(
      jnp.all(ok_flat),
      f"{fn}: `labels` must lie in {allowed}; flat position {{pos}} holds {{value}}.",
      pos=first,
      value=flat[first],
    )
    return
  # NumPy compares integers of any width with Python ints exactly (and int64 stays int64 here).
  labels = np.asarray(labels)
  ok = (labels >= 0) & (labels < num_classes)
  if ignore_index is not None:
    ok = ok | (labels == ignore_index)
  bad = np.argwhere(~ok)
  if bad.size:
    pos = tuple(int(i) for i in bad[0])
    raise ValueError(f"{fn}: `labels` must lie in {allowed}; labels[{pos}] = {labels[pos]}.")
