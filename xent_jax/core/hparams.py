"""Checks of the variants' own hyper-parameters (the shared arguments are parsed by
:func:`xent_jax.core.inputs.parse_inputs`, and every variant is a head of the row-statistics engine,
:mod:`xent_jax.core.heads`)."""

import jax
import numpy as np


def check_nonnegative_array(fn: str, name: str, value) -> None:
  """Raises ``ValueError`` naming ``name`` if a concrete array has a negative or NaN entry."""
  if value is None or isinstance(value, jax.core.Tracer):
    return
  array = np.asarray(value, dtype=np.float64)
  if np.any(~(array >= 0)):
    raise ValueError(f"{fn}: `{name}` must be >= 0 everywhere, got {value!r}.")


def check_static_number(fn: str, name: str, value) -> None:
  """Raises ``TypeError`` unless ``value`` is a concrete (Python or NumPy) real number."""
  if isinstance(value, jax.core.Tracer) or isinstance(value, bool) or np.ndim(value) != 0:
    raise TypeError(f"{fn}: `{name}` must be a Python number (static), got {value!r}.")
  try:
    float(value)
  except (TypeError, ValueError):
    raise TypeError(f"{fn}: `{name}` must be a Python number (static), got {value!r}.") from None
