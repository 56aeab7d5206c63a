"""Renamed public names: the old name keeps working, with a warning that names the new one."""

import functools
import warnings
from collections.abc import Callable, Mapping
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


def current_keywords(fn: str, kwargs: Mapping[str, Any], renames: Mapping[str, str]) -> dict:
  """``kwargs`` with each former name (a key of ``renames``) replaced by its new name, with a
  ``DeprecationWarning`` naming both; ``TypeError`` when a call gives both names."""
  current = dict(kwargs)
  for old, new in renames.items():
    if old in current:
      if new in current:
        raise TypeError(f"{fn}: give `{new}` only (`{old}` is its former name).")
      warnings.warn(
        f"{fn}: `{old}` is renamed `{new}`; the old name will be removed.",
        DeprecationWarning,
        stacklevel=3,
      )
      current[new] = current.pop(old)
  return current


def renamed_keyword(old: str, new: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
  """Decorator: the keyword argument ``old`` of the decorated function is now called ``new``
  (:func:`current_keywords` at each call)."""

  def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      return fn(*args, **current_keywords(fn.__name__, kwargs, {old: new}))

    return wrapper

  return decorate
