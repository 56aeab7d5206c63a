"""Argument checks shared by every loss: trace-time, with messages that name the argument.

Shape and dtype checks run on static shapes, so under ``jit`` they cost nothing at run time and
fail before anything executes. Option checks raise ``ValueError`` naming the option, what was
expected and what came.

A numeric hyper-parameter may also be a traced scalar (an argument under ``jit``, a ``vmap``
member, a value differentiated by ``grad`` or ``jvp``). It cannot be read at trace time, so its
range check returns a traced flag instead of raising, and the loss applies :func:`nan_unless`:
:data:`TRACED_OUT_OF_RANGE` states the rule every loss's docstring refers to.
"""

import functools
from collections.abc import Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

REDUCTIONS = ("none", "sum", "mean")

TRACED_OUT_OF_RANGE = (
  "A traced hyper-parameter (under jit, vmap, grad or jvp) cannot be checked at trace time: a "
  "traced value out of range makes the loss NaN (every element, with NaN gradients) instead of "
  "raising; concrete values are checked as usual."
)


def is_traced(value: Any) -> bool:
  """Whether ``value`` is a JAX tracer (its value unknown at trace time)."""
  return isinstance(value, jax.core.Tracer)


def any_traced(*values: Any) -> bool:
  """Whether any leaf of ``values`` is a tracer."""
  return any(is_traced(leaf) for leaf in jax.tree.leaves(values))


def is_static_zero(value: Any) -> bool:
  """Whether ``value`` is known at trace time to be 0: a concrete zero, not a tracer.

  Code that skips work for a zero hyper-parameter asks this, so a traced value takes the
  general program (which equals the skipped one where the value is 0)."""
  return not is_traced(value) and not np.any(np.asarray(value) != 0)


def nan_unless(loss: jax.Array, *in_range: Any) -> jax.Array:
  """``loss``, times NaN unless every flag of ``in_range`` holds (:data:`TRACED_OUT_OF_RANGE`).

  Flags are the returns of :func:`check_in_range` and :func:`check_nonnegative_array`: ``True``
  (concrete, checked) adds nothing to the program; a traced bool multiplies ``loss`` by 1 or NaN,
  so the gradients of an out-of-range member are NaN too.
  """
  flags = [f for f in in_range if f is not True]
  if not flags:
    return loss
  ok = functools.reduce(jnp.logical_and, flags)
  return loss * jnp.where(ok, 1.0, jnp.nan).astype(loss.dtype)


def check_floating(fn: str, name: str, x: jax.typing.ArrayLike) -> None:
  """Raises ``TypeError`` unless ``x`` has a floating dtype."""
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"{fn}: `{name}` must be a floating array, got dtype {dtype}.")


def check_in_range(
  fn: str,
  name: str,
  value: Any,
  low: float,
  high: float,
  *,
  low_open: bool = False,
  high_open: bool = False,
) -> Any:
  """Raises ``ValueError`` unless the real scalar ``value`` lies in the given interval.

  Returns:
    ``True`` for a concrete value (checked now); for a traced one, which cannot be read at trace
    time, a traced bool that is False outside the interval (or NaN): pass it to
    :func:`nan_unless` (:data:`TRACED_OUT_OF_RANGE`).
  """
  if is_traced(value):
    if np.ndim(value) != 0 or not jnp.issubdtype(value.dtype, jnp.number):
      raise TypeError(f"{fn}: `{name}` must be a real scalar, got a traced {value.aval}.")
    above_low = value > low if low_open else value >= low
    below_high = value < high if high_open else value <= high
    return above_low & below_high
  check_real_scalar(fn, name, value)
  v = float(np.asarray(value))
  below = v <= low if low_open else v < low
  above = v >= high if high_open else v > high
  if below or above or np.isnan(v):
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    raise ValueError(f"{fn}: `{name}` must be in {lo}{low}, {high}{hi}, got {value!r}.")
  return True


def check_real_scalar(fn: str, name: str, value: Any) -> None:
  """Raises ``TypeError`` unless ``value`` is one real number (int or float, not a str or bool).

  ``float("0.1")`` would otherwise turn a string option into a number without a word.
  """
  if isinstance(value, bool):
    real = False
  elif isinstance(value, (int, float)):
    real = True
  else:
    dtype = getattr(value, "dtype", None)
    real = (
      dtype is not None
      and np.ndim(value) == 0
      and (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating))
    )
  if not real:
    raise TypeError(
      f"{fn}: `{name}` must be a real number (int or float), got {type(value).__name__} {value!r}."
    )


def check_has_classes(fn: str, name: str, shape: Sequence[int], axis: int) -> None:
  """Raises ``ValueError`` when the class axis ``axis`` of ``name`` (of shape ``shape``) is empty.

  A softmax over zero classes has no value; without this check the size shows up later as a
  division or modulo by zero.
  """
  if shape[axis] == 0:
    raise ValueError(
      f"{fn}: `{name}` must have at least one class along axis {axis}, got shape {tuple(shape)}."
    )


def check_choice(fn: str, name: str, value: Any, choices: Sequence[Any]) -> None:
  """Raises ``ValueError`` unless ``value`` is one of ``choices``."""
  if value not in choices:
    raise ValueError(f"{fn}: `{name}` must be one of {tuple(choices)}, got {value!r}.")


def check_reduction(fn: str, reduction: str) -> None:
  check_choice(fn, "reduction", reduction, REDUCTIONS)


def canonical_axis(fn: str, axis: Any, ndim: int) -> int:
  """Returns ``axis`` as a non-negative int, naming ``axis`` when it is out of range."""
  if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
    raise TypeError(f"{fn}: `axis` must be an int, got {axis!r}.")
  if not -ndim <= axis < ndim:
    raise ValueError(f"{fn}: `axis`={axis} is out of range for logits of rank {ndim}.")
  return int(axis) % ndim


def check_shape(fn: str, name: str, x: jax.typing.ArrayLike, expected: Sequence[int]) -> None:
  """Asserts (chex, trace time) that ``x`` has shape ``expected``; the message names ``name``."""
  chex.assert_shape(
    x,
    tuple(expected),
    custom_message=f"{fn}: `{name}` must have shape {tuple(expected)}, got {jnp.shape(x)}.",
  )


def check_broadcastable(fn: str, name: str, x: jax.typing.ArrayLike, target: Sequence[int]) -> None:
  """Raises ``ValueError`` unless ``x`` broadcasts to ``target`` (used for masks)."""
  try:
    np.broadcast_shapes(np.shape(x), tuple(target))
  except ValueError:
    raise ValueError(
      f"{fn}: `{name}` must be broadcastable to shape {tuple(target)}, got {np.shape(x)}."
    ) from None
  if len(np.shape(x)) > len(target):
    raise ValueError(
      f"{fn}: `{name}` must be broadcastable to shape {tuple(target)}, got {np.shape(x)}."
    )


def check_nonnegative_array(fn: str, name: str, value) -> Any:
  """Raises ``ValueError`` naming ``name`` if a concrete array has a negative or NaN entry.

  Returns ``True`` (None or a concrete array, checked now) or, for a traced array, a traced bool
  that is False where an entry is negative or NaN, for :func:`nan_unless`.
  """
  if value is None:
    return True
  if is_traced(value):
    return jnp.all(value >= 0)
  array = np.asarray(value, dtype=np.float64)
  if np.any(~(array >= 0)):
    raise ValueError(f"{fn}: `{name}` must be >= 0 everywhere, got {value!r}.")
  return True


def check_static_number(fn: str, name: str, value) -> None:
  """Raises ``TypeError`` unless ``value`` is a concrete (Python or NumPy) real number."""
  if isinstance(value, (jax.core.Tracer, bool)) or np.ndim(value) != 0:
    raise TypeError(f"{fn}: `{name}` must be a Python number (static), got {value!r}.")
  try:
    float(value)
  except (TypeError, ValueError):
    raise TypeError(f"{fn}: `{name}` must be a Python number (static), got {value!r}.") from None
