"""Argument checks shared by every loss: trace-time, with messages that name the argument.

Shape and dtype checks run on static shapes, so under ``jit`` they cost nothing at run time and
fail before anything executes. Option checks raise ``ValueError`` naming the option, what was
expected and what came.
"""

from collections.abc import Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

REDUCTIONS = ("none", "sum", "mean")


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
) -> None:
  """Raises ``ValueError`` unless the Python scalar ``value`` lies in the given interval.

  Traced values are skipped: a hyper-parameter under ``jit`` cannot be checked at trace time.
  """
  if isinstance(value, jax.core.Tracer):
    return
  check_real_scalar(fn, name, value)
  v = float(np.asarray(value))
  below = v <= low if low_open else v < low
  above = v >= high if high_open else v > high
  if below or above or np.isnan(v):
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    raise ValueError(f"{fn}: `{name}` must be in {lo}{low}, {high}{hi}, got {value!r}.")


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


def check_nonnegative_array(fn: str, name: str, value) -> None:
  """Raises ``ValueError`` naming ``name`` if a concrete array has a negative or NaN entry."""
  if value is None or isinstance(value, jax.core.Tracer):
    return
  array = np.asarray(value, dtype=np.float64)
  if np.any(~(array >= 0)):
    raise ValueError(f"{fn}: `{name}` must be >= 0 everywhere, got {value!r}.")


def check_static_number(fn: str, name: str, value) -> None:
  """Raises ``TypeError`` unless ``value`` is a concrete (Python or NumPy) real number."""
  if isinstance(value, (jax.core.Tracer, bool)) or np.ndim(value) != 0:
    raise TypeError(f"{fn}: `{name}` must be a Python number (static), got {value!r}.")
  try:
    float(value)
  except (TypeError, ValueError):
    raise TypeError(f"{fn}: `{name}` must be a Python number (static), got {value!r}.") from None
