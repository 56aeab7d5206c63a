"""Losses by name: a config names a loss and its hyper-parameters, the trainer gets a callable.

Each registered name is a loss function plus, optionally, different defaults for some of its
hyper-parameters. A loss's hyper-parameters are read off its signature — every keyword-only
argument except the shared conventions (``axis``, ``weight``, ``ignore_index``, ``reduction``,
``where``) — so the registry never keeps a second copy of names or defaults.

Example:
  >>> import jax.numpy as jnp, xent_jax
  >>> loss_fn = xent_jax.get_loss("focal", gamma=1.0)
  >>> logits, labels = jnp.array([[2.0, 0.5, -1.0]]), jnp.array([0])
  >>> float(loss_fn(logits, labels)) == float(xent_jax.focal_loss(logits, labels, gamma=1.0))
  True
"""

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from xent_jax import _bitempered
from xent_jax import _cross_entropy
from xent_jax import _variants

CONVENTIONS = ("axis", "weight", "ignore_index", "reduction", "where")
# Keyword-only arguments that are neither conventions nor hyper-parameters: they change what the
# loss returns, which a configured loss keeps fixed.
_OUTPUT_OPTIONS = ("return_lse",)


@dataclasses.dataclass(frozen=True)
class _Entry:
  fn: Callable[..., jax.Array]
  defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  summary: str | None = None


_LOSSES: dict[str, _Entry] = {
    "cross_entropy": _Entry(_cross_entropy.cross_entropy),
    "label_smoothing": _Entry(
        _cross_entropy.cross_entropy,
        {"label_smoothing": 0.1},
        "Cross-entropy with label smoothing (Szegedy et al. 2016), epsilon 0.1 by default.",
    ),
    "z_loss": _Entry(
        _cross_entropy.cross_entropy,
        {"z_loss": 1e-4},
        "Cross-entropy plus z * logsumexp^2 (PaLM, Chowdhery et al. 2022), z 1e-4 by default.",
    ),
    "focal": _Entry(_variants.focal_loss),
    "poly1": _Entry(_variants.poly1_cross_entropy),
    "bi_tempered": _Entry(_bitempered.bi_tempered_logistic_loss),
    "symmetric_ce": _Entry(_variants.symmetric_cross_entropy),
    "generalized_ce": _Entry(_variants.generalized_cross_entropy),
    "truncated_gce": _Entry(_variants.truncated_generalized_cross_entropy),
    "taylor_ce": _Entry(_variants.taylor_cross_entropy),
    "confidence_penalty": _Entry(_variants.confidence_penalty_cross_entropy),
}


class LossInfo(NamedTuple):
  """What :func:`list_losses` tells about one registered loss.

  Attributes:
    hparams: hyper-parameter name -> default, in signature order.
    summary: one line: what the loss is.
    fn: the loss function the name configures.
  """

  hparams: dict[str, Any]
  summary: str
  fn: Callable[..., jax.Array]


def _hparam_defaults(entry: _Entry) -> dict[str, Any]:
  params = inspect.signature(entry.fn).parameters.values()
  defaults = {
      p.name: p.default
      for p in params
      if p.kind is inspect.Parameter.KEYWORD_ONLY
      and p.name not in CONVENTIONS + _OUTPUT_OPTIONS
  }
  return defaults | dict(entry.defaults)


def _summary(entry: _Entry) -> str:
  return entry.summary or inspect.getdoc(entry.fn).splitlines()[0]


def list_losses() -> dict[str, LossInfo]:
  """Every registered loss name with its hyper-parameters, their defaults and a summary.

  Returns:
    ``name -> LossInfo(hparams, summary, fn)``; ``hparams`` maps each hyper-parameter to its
    default.

  Example:
    >>> import xent_jax
    >>> xent_jax.list_losses()["focal"].hparams
    {'gamma': 2.0, 'alpha': None}
  """
  return {
      name: LossInfo(_hparam_defaults(entry), _summary(entry), entry.fn)
      for name, entry in _LOSSES.items()
  }


def _validate(fn: Callable[..., jax.Array], hparams: Mapping[str, Any]) -> None:
  """Runs the loss's own option checks now, on abstract inputs (nothing is computed)."""
  num_classes = 2
  for value in hparams.values():
    if value is not None and not isinstance(value, str) and np.ndim(value) == 1:
      num_classes = max(num_classes, np.shape(value)[0])
  jax.eval_shape(
      lambda logits, labels: fn(logits, labels, **hparams),
      jax.ShapeDtypeStruct((1, num_classes), jnp.float32),
      jax.ShapeDtypeStruct((1,), jnp.int32),
  )


@dataclasses.dataclass(frozen=True, eq=False)
class ConfiguredLoss:
  """A registered loss with its hyper-parameters bound; call it like the loss itself.

  ``loss_fn(logits, labels, **conventions)`` accepts the shared conventions (``axis``,
  ``weight``, ``ignore_index``, ``reduction``, ``where``) and nothing else.
  """

  name: str
  hparams: Mapping[str, Any]
  fn: Callable[..., jax.Array]

  def __call__(
      self, logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike, **conventions: Any
  ) -> jax.Array:
    unknown = sorted(set(conventions) - set(CONVENTIONS))
    if unknown:
      raise ValueError(
          f"loss {self.name!r}: unknown keyword argument(s) {unknown}; a configured loss takes "
          f"only the conventions {list(CONVENTIONS)} (hyper-parameters are bound by get_loss)."
      )
    return self.fn(logits, labels, **self.hparams, **conventions)

  def __repr__(self) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
    return f"get_loss({self.name!r}, {args})" if args else f"get_loss({self.name!r})"


def get_loss(name: str, **hparams: Any) -> ConfiguredLoss:
  """Returns the loss registered as ``name`` with ``hparams`` bound (the rest at their defaults).

  Every hyper-parameter is checked now, so a bad config fails before training starts, and again
  at call time.

  Args:
    name: a key of :func:`list_losses`.
    **hparams: hyper-parameters of that loss; see ``list_losses()[name].hparams``.

  Returns:
    ``loss_fn(logits, labels, *, axis=-1, weight=None, ignore_index=-100, reduction="mean",
    where=None)``.

  Raises:
    ValueError: for an unknown ``name`` or hyper-parameter (listing the valid ones) or an
      out-of-range value (naming it). TypeError: for a value of the wrong kind (naming it).

  Example:
    >>> import xent_jax
    >>> xent_jax.get_loss("label_smoothing")
    get_loss('label_smoothing', label_smoothing=0.1, smoothing='uniform', z_loss=0.0, logit_softcap=None)
  """
  if name not in _LOSSES:
    raise ValueError(f"get_loss: unknown loss {name!r}; registered losses: {sorted(_LOSSES)}.")
  entry = _LOSSES[name]
  defaults = _hparam_defaults(entry)
  unknown = sorted(set(hparams) - set(defaults))
  if unknown:
    raise ValueError(
        f"get_loss: loss {name!r} has no hyper-parameter(s) {unknown}; "
        f"valid ones: {list(defaults)}."
    )
  bound = defaults | hparams
  _validate(entry.fn, bound)
  return ConfiguredLoss(name, bound, entry.fn)
