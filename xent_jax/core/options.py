r"""The options every loss shares, checked once and carried as one frozen object.

A loss, its fused form and its sharded form take the same keyword options. They are declared
once, here: :class:`LossOptions` holds their defaults and checks, and a public function takes them
as ``**options`` (typed by :class:`OptionKwargs` or :class:`CrossEntropyOptionKwargs`), with
:func:`takes_options` listing them in its signature. The function checks them with
:meth:`LossOptions.checked` (naming the bad one) and passes the object down, so no layer repeats
the keyword list or the checks.

``label_smoothing``, ``z_loss`` and ``logit_softcap`` may be traced scalars (arguments under
``jit``, ``vmap`` members, values differentiated by ``grad`` or ``jvp``); ``reduction``,
``ignore_index`` and ``smoothing`` choose the program and stay static. A concrete value keeps the
cheap program it always had (no smoothing pass at 0, no z-loss term at 0); a traced one takes the
general program, which equals it numerically. A traced value cannot be checked at trace time: out
of range, it makes the loss NaN (:data:`xent_jax.core.checks.TRACED_OUT_OF_RANGE`).
"""

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, TypedDict

import jax

from xent_jax.core import checks, heads, inputs

SMOOTHING_CONVENTIONS = ("uniform", "t5x")


@dataclasses.dataclass(frozen=True)
class LossOptions:
  r"""Checked options of a softmax loss.

  Attributes:
    reduction: 'none', 'sum' or 'mean' (PyTorch's rule,
      :func:`xent_jax.core.reduction.reduce_loss`).
    ignore_index: integer label that counts for nothing, or None.
    label_smoothing: :math:`\epsilon \in [0, 1]`.
    smoothing: 'uniform' (:math:`q = (1-\epsilon)\,\mathrm{onehot} + \epsilon/K`) or 't5x'
      (:math:`q_y = 1-\epsilon`, others :math:`\epsilon/(K-1)`).
    z_loss: :math:`z \ge 0`, the coefficient of :math:`\mathrm{lse}^2` (cross-entropy's head).
    logit_softcap: :math:`c > 0` for :math:`c\tanh(x/c)`, or None.

  The three numbers may be traced scalars (see the module docstring).
  """

  reduction: str = "mean"
  ignore_index: int | None = -100
  label_smoothing: float = 0.0
  smoothing: str = "uniform"
  z_loss: float = 0.0
  logit_softcap: float | None = None

  @classmethod
  def checked(cls, fn: str, **options) -> "LossOptions":
    """The options of ``fn``, each checked; the error names ``fn`` and the option.

    Raises:
      TypeError: a non-number where a number is expected, a non-int ``ignore_index``.
      ValueError: a value out of range, an unknown ``reduction`` or ``smoothing``.
    """
    opts = cls(**options)
    checks.check_reduction(fn, opts.reduction)
    checks.check_choice(fn, "smoothing", opts.smoothing, SMOOTHING_CONVENTIONS)
    opts.in_range(fn)
    return dataclasses.replace(opts, ignore_index=inputs.check_ignore_index(fn, opts.ignore_index))

  def in_range(self, fn: str) -> list[Any]:
    """Checks the numeric options (raising for a concrete value out of range) and returns their
    flags for :func:`xent_jax.core.checks.nan_unless` (``True`` each unless traced)."""
    flags = [
      checks.check_in_range(fn, "label_smoothing", self.label_smoothing, 0.0, 1.0),
      checks.check_in_range(fn, "z_loss", self.z_loss, 0.0, math.inf),
    ]
    if self.logit_softcap is not None:
      cap = self.logit_softcap
      flags.append(checks.check_in_range(fn, "logit_softcap", cap, 0.0, math.inf, low_open=True))
    return flags

  def traced(self) -> bool:
    """Whether a numeric option is a traced scalar (see the module docstring)."""
    return checks.any_traced(self.label_smoothing, self.z_loss, self.logit_softcap)

  def smoothed_target(self, num_classes: int) -> heads.SmoothedTarget:
    """The on/off values of a smoothed one-hot target over ``num_classes`` classes."""
    return heads.smoothed_target(num_classes, self.label_smoothing, self.smoothing)

  def smooth(self, q: jax.Array, num_classes: int) -> jax.Array:
    """The smoothed target of probability labels ``q`` (``[..., V]``, ``num_classes`` in all)."""
    return heads.smooth_probabilities(q, self.label_smoothing, self.smoothing, num_classes)


class OptionKwargs(TypedDict, total=False):
  """The option keywords of every loss (defaults and meaning: :class:`LossOptions`)."""

  reduction: str
  ignore_index: int | None
  label_smoothing: float


class CrossEntropyOptionKwargs(OptionKwargs, total=False):
  """The option keywords of cross-entropy's functions: :class:`OptionKwargs` and the smoothing
  convention, the z-loss and the soft cap."""

  smoothing: str
  z_loss: float
  logit_softcap: float | None


def takes_options(kwargs_type: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
  """Decorator for a function with ``**options: Unpack[kwargs_type]``: its signature (``help``,
  ``inspect``, the registry, the docs) lists those keywords with :class:`LossOptions`' defaults,
  and any other keyword raises ``TypeError`` as for an ordinary signature."""
  defaults = {f.name: f.default for f in dataclasses.fields(LossOptions)}

  def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(fn)
    own = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    listed = [
      inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=defaults[n], annotation=t)
      for n, t in kwargs_type.__annotations__.items()
    ]
    accepted = {p.name for p in own} | set(kwargs_type.__annotations__)

    @functools.wraps(fn)
    def with_options(*args, **kwargs):
      unknown = sorted(set(kwargs) - accepted)
      if unknown:
        raise TypeError(f"{fn.__name__}() got an unexpected keyword argument {unknown[0]!r}")
      return fn(*args, **kwargs)

    with_options.__signature__ = signature.replace(  # type: ignore[attr-defined]
      parameters=own + listed
    )
    return with_options

  return decorate
