"""Renamed public names: the old name keeps working, with a ``DeprecationWarning`` naming the new."""

import functools
import warnings
from collections.abc import Callable
from typing import Any


def renamed_function(fn: Callable[..., Any], old_name: str) -> Callable[..., Any]:
  """``fn`` under its former name ``old_name``: the same function, warning at each call."""

  @functools.wraps(fn)
  def alias(*args, **kwargs):
    warnings.warn(
      f"xent_jax.{old_name} is renamed {fn.__name__}; the old name will be removed.",
      DeprecationWarning,
      stacklevel=2,
    )
    return fn(*args, **kwargs)

  alias.__name__ = alias.__qualname__ = old_name
  alias.__doc__ = f"Deprecated name of :func:`xent_jax.{fn.__name__}` (same arguments)."
  return alias


def renamed_keyword(old: str, new: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
  """Decorator: the keyword argument ``old`` of the decorated function is now called ``new``.

  A call that passes ``old=`` gets a ``DeprecationWarning`` and its value as ``new``; passing
  both raises ``TypeError`` naming them.
  """

  def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      if old in kwargs:
        if new in kwargs:
          raise TypeError(f"{fn.__name__}: give `{new}` only (`{old}` is its former name).")
        warnings.warn(
          f"{fn.__name__}: `{old}` is renamed `{new}`; the old name will be removed.",
          DeprecationWarning,
          stacklevel=2,
        )
        kwargs[new] = kwargs.pop(old)
      return fn(*args, **kwargs)

    return wrapper

  return decorate
