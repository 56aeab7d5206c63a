"""Losses by name: a config names a loss and its hyper-parameters, the trainer gets a callable.

Each registered name is a loss function plus, optionally, different defaults for some of its
hyper-parameters. A name may also be an import path ``"package.module:function"`` of a loss with
the same conventions, one taking them through ``**kwargs``, or a plain ``f(logits, labels,
<hyper-parameters>)`` returning per-example values (the registry then masks, weights and reduces
them), and :func:`register_loss` turns a per-class function
:math:`f(\\log p)` into a full loss (lean on logits, fused with a linear layer, registered by
name). A loss's hyper-parameters are read off its signature — every keyword-only
argument except the shared conventions (``axis``, ``class_weight``, ``ignore_index``, ``reduction``,
``where``) — so the registry never keeps a second copy of names or defaults.

Example:
  >>> import jax.numpy as jnp, xent_jax
  >>> loss_fn = xent_jax.get_loss("softmax_focal_loss", gamma=1.0)
  >>> logits, labels = jnp.array([[2.0, 0.5, -1.0]]), jnp.array([0])
  >>> want = xent_jax.softmax_focal_loss(logits, labels, gamma=1.0)
  >>> float(loss_fn(logits, labels)) == float(want)
  True
"""

import dataclasses
import functools
import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from xent_jax.core import checks, heads, inputs
from xent_jax.core import reduction as reduction_lib
from xent_jax.core.deprecation import current_keywords
from xent_jax.core.frontend import head_loss
from xent_jax.core.options import LossOptions
from xent_jax.fused import any_loss
from xent_jax.fused.rows import LinearArrays, LinearLayout
from xent_jax.losses import cross_entropy, variants
from xent_jax.parallel import bitempered as parallel_bitempered
from xent_jax.parallel import logits as parallel_logits

CONVENTIONS = ("axis", "class_weight", "ignore_index", "reduction", "where")
# The former name of ``class_weight``, still accepted (with a DeprecationWarning).
_FORMER_NAMES = {"weight": "class_weight"}
# Keyword-only arguments that are neither conventions nor hyper-parameters: they change what the
# loss returns, which a configured loss keeps fixed.
_OUTPUT_OPTIONS = ("return_lse",)


@dataclasses.dataclass(frozen=True)
class _Entry:
  fn: Callable[..., jax.Array]
  defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  summary: str | None = None


_LOSSES: dict[str, _Entry] = {
  "cross_entropy": _Entry(cross_entropy.cross_entropy),
  "label_smoothing": _Entry(
    cross_entropy.cross_entropy,
    {"label_smoothing": 0.1},
    "Cross-entropy with label smoothing (Szegedy et al. 2016), epsilon 0.1 by default.",
  ),
  "z_loss": _Entry(
    cross_entropy.cross_entropy,
    {"z_loss": 1e-4},
    "Cross-entropy plus z * logsumexp^2 (PaLM, Chowdhery et al. 2022), z 1e-4 by default.",
  ),
}
# Every other loss is registered under its function's name.
for _fn in (
  variants.softmax_focal_loss,
  variants.poly1_cross_entropy,
  variants.bi_tempered_logistic_loss,
  variants.symmetric_cross_entropy,
  variants.generalized_cross_entropy,
  variants.truncated_generalized_cross_entropy,
  variants.taylor_cross_entropy,
  variants.confidence_penalty_cross_entropy,
):
  _LOSSES[_fn.__name__] = _Entry(_fn)

# Short names (the configs' and earlier releases') of registered losses.
ALIASES = {
  "focal": "softmax_focal_loss",
  "focal_loss": "softmax_focal_loss",
  "poly1": "poly1_cross_entropy",
  "bi_tempered": "bi_tempered_logistic_loss",
  "symmetric_ce": "symmetric_cross_entropy",
  "generalized_ce": "generalized_cross_entropy",
  "truncated_gce": "truncated_generalized_cross_entropy",
  "taylor_ce": "taylor_cross_entropy",
  "confidence_penalty": "confidence_penalty_cross_entropy",
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
    and p.name not in CONVENTIONS + _OUTPUT_OPTIONS + tuple(_FORMER_NAMES)
  }
  return defaults | dict(entry.defaults)


def _summary(entry: _Entry) -> str:
  return entry.summary or _first_line(entry.fn, entry.fn.__name__)


def list_losses() -> dict[str, LossInfo]:
  """Every registered loss name with its hyper-parameters, their defaults and a summary.

  Returns:
    ``name -> LossInfo(hparams, summary, fn)``; ``hparams`` maps each hyper-parameter to its
    default.

  Example:
    >>> import xent_jax
    >>> xent_jax.list_losses()["softmax_focal_loss"].hparams
    {'gamma': 2.0, 'alpha': None, 'label_smoothing': 0.0}
  """
  return {
    name: LossInfo(_hparam_defaults(entry), _summary(entry), entry.fn)
    for name, entry in _LOSSES.items()
  }


def _validate(fn: Callable[..., jax.Array], hparams: Mapping[str, Any]) -> None:
  """Runs the loss's own option checks now, on abstract inputs (nothing is computed).

  A check that passed is remembered (the last ``_PASSED_LIMIT`` of them) for hyper-parameters
  that are Python scalars, strings, None or traced values: what the checks can see of a traced
  value is its abstract value (shape, dtype, weak type), which is all they look at, so a config
  grid of many runs, or a sweep that builds its loss inside a jitted or vmapped step, traces each
  distinct loss once. Concrete arrays are checked on every call (their entries may be read). A
  failure raises and is not remembered."""
  key = _check_key(fn, hparams)
  if key is not None and key in _PASSED:
    return
  _check_on_abstract_inputs(fn, hparams)
  if key is not None:
    _PASSED[key] = None
    if len(_PASSED) > _PASSED_LIMIT:
      del _PASSED[next(iter(_PASSED))]


_PASSED: dict[tuple, None] = {}  # insertion-ordered: the oldest entry goes first
_PASSED_LIMIT = 1024


def _check_key(fn: Callable[..., jax.Array], hparams: Mapping[str, Any]) -> tuple | None:
  """What the checks of ``fn`` can see of ``hparams``, or None where a value is a concrete array.

  Scalars enter with their type (``1 == True``), traced values with their abstract value, and the
  x64 mode with the function."""
  scalars = (bool, int, float, str, type(None))
  seen = []
  for name, value in sorted(hparams.items()):
    if type(value) in scalars:
      seen.append((name, type(value), value))
    elif checks.is_traced(value):
      seen.append((name, jax.core.Tracer, jax.typeof(value)))
    else:
      return None
  return (fn, jax.dtypes.canonicalize_dtype(jnp.float64) == jnp.float64, tuple(seen))


def _check_on_abstract_inputs(fn: Callable[..., jax.Array], hparams: Mapping[str, Any]) -> None:
  """Calls ``fn`` with ``hparams`` under ``jax.eval_shape`` on ``[1, C]`` logits, ``C`` the
  length of the longest 1-D hyper-parameter (at least 2)."""
  num_classes = 2
  for value in hparams.values():
    if value is not None and not isinstance(value, str) and np.ndim(value) == 1:
      num_classes = max(num_classes, np.shape(value)[0])
  jax.eval_shape(
    lambda logits, labels: fn(logits, labels, **hparams),
    jax.ShapeDtypeStruct((1, num_classes), jnp.float32),
    jax.ShapeDtypeStruct((1,), jnp.int32),
  )


def _is_cross_entropy(fn: Callable[..., jax.Array]) -> bool:
  return fn is cross_entropy.cross_entropy


@dataclasses.dataclass(frozen=True, eq=False)
class ConfiguredLoss:
  """A registered loss with its hyper-parameters bound; call it like the loss itself.

  ``loss_fn(logits, labels, **conventions)`` accepts the shared conventions (``axis``,
  ``class_weight``, ``ignore_index``, ``reduction``, ``where``) and nothing else.
  :meth:`linear` is the same loss fused with a linear layer and :meth:`vocab_parallel` the same
  loss over vocabulary shards.
  """

  name: str
  hparams: Mapping[str, Any]
  fn: Callable[..., jax.Array]

  def __call__(
    self, logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike, **conventions: Any
  ) -> jax.Array:
    conventions = current_keywords(f"loss {self.name!r}", conventions, _FORMER_NAMES)
    unknown = sorted(set(conventions) - set(CONVENTIONS))
    if unknown:
      raise ValueError(
        f"loss {self.name!r}: unknown keyword argument(s) {unknown}; a configured loss takes "
        f"only the conventions {list(CONVENTIONS)} (hyper-parameters are bound by get_loss)."
      )
    return self.fn(logits, labels, **self.hparams, **conventions)

  def linear(
    self,
    hidden: jax.typing.ArrayLike,
    weight: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    bias: jax.typing.ArrayLike | None = None,
    weight_layout: str = "vd",
    class_weight: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = -100,
    reduction: str = "mean",
    where: jax.typing.ArrayLike | None = None,
    token_chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    return_stats: bool = False,
  ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    r"""This loss on ``hidden @ weight.T + bias`` without building the ``[N, V]`` logits.

    Cross-entropy entries run :func:`xent_jax.linear_cross_entropy`'s kernels. Every other loss
    computes each token chunk's gradients in the forward pass for 'sum' and 'mean' while a float32
    ``[V, D]`` accumulator is small (:mod:`xent_jax.fused.chunked`); otherwise the engine's heads
    with integer labels and a weight narrower than float32 take blocked statistics
    (:mod:`xent_jax.fused.heads`, float32 accumulation of the weight gradient), and the rest
    rematerialise each token chunk's logits in the backward
    pass (:func:`xent_jax.fused.any_loss.loss_on_linear`). Values and gradients equal the loss on
    the full logits.

    Args:
      hidden: ``[..., D]`` float features.
      weight: ``[V, D]`` (``weight_layout='vd'``) or ``[D, V]`` ('dv').
      labels: integer ids ``[...]`` or probabilities ``[..., V]``.
      bias: ``[V]`` or None.
      weight_layout: 'vd' or 'dv'.
      class_weight: ``[V]`` class weights (the loss's ``weight``).
      ignore_index, reduction, where: as in :func:`xent_jax.cross_entropy`.
      token_chunk_size: rows per chunk (default: a ``[chunk, V]`` block of about ``2**24``
        elements).
      vocab_chunk_size: classes per block, as in :func:`xent_jax.linear_cross_entropy`: giving
        it selects the blocked schedule (cross-entropy's two-pass kernels, or the blocked
        statistics of the engine's heads, whatever the dtype), which only integer labels of
        those losses have (``ValueError`` otherwise).
      return_stats: also return per-token ``{"log_prob": log p_y (integer labels), "entropy":
        H(p), "lse": logsumexp}`` of the (capped) logits, each ``[...]`` (0 on rows that do not
        count), computed in the same pass; they carry gradients like the loss.

    Returns:
      The reduced loss, and with ``return_stats`` the pair ``(loss, stats)``.
    """
    return any_loss.loss_on_linear(
      self.name,
      self.fn,
      self.hparams,
      self._engine_head,
      LinearArrays(hidden, weight, labels, bias, class_weight, where),
      LossOptions(reduction=reduction, ignore_index=ignore_index),
      LinearLayout(weight_layout, token_chunk_size, vocab_chunk_size),
      return_stats=return_stats,
    )

  def vocab_parallel(
    self, logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike, **options: Any
  ) -> jax.Array:
    """This loss with the classes split over a mesh axis: ``mesh``, ``vocab_axis``,
    ``data_axis``, ``axis``, ``class_weight``, ``ignore_index``, ``reduction``, ``where`` and
    ``return_lse`` as in :func:`xent_jax.vocab_parallel_cross_entropy`.

    Cross-entropy entries run that function; every other head of the engine (the variants, losses
    from :func:`register_loss`) completes its per-row statistics with ``pmax``/``psum`` over the
    vocabulary axis, integer or probability labels. The bi-tempered loss runs
    :func:`xent_jax.parallel.bitempered.vocab_parallel_bi_tempered_loss`, which completes its max
    and every class sum (those of its iterative normalization included) the same way; it has no
    ``return_lse``. Losses named by import path have no vocabulary-parallel form
    (``NotImplementedError``, naming the loss).
    """
    fn = f"get_loss({self.name!r}).vocab_parallel"
    options = current_keywords(fn, options, _FORMER_NAMES)
    if _is_cross_entropy(self.fn):
      return parallel_logits.vocab_parallel_cross_entropy(logits, labels, **self.hparams, **options)
    if self.fn is variants.bi_tempered_logistic_loss:
      return parallel_bitempered.vocab_parallel_bi_tempered_loss(
        fn, logits, labels, **self.hparams, **options
      )
    axis = options.get("axis", -1)
    engine_head = self._engine_head(np.shape(logits)[axis])
    if engine_head is None:
      raise NotImplementedError(
        f"{fn}: this loss is not a head of the row-statistics engine, so it has no "
        "vocabulary-parallel form; use .linear (fused) or the loss on gathered logits."
      )
    head, label_smoothing = engine_head
    return parallel_logits.vocab_parallel_head_loss(
      fn,
      head,
      logits,
      labels,
      label_smoothing=label_smoothing,
      **options,
    )

  def _engine_head(self, num_classes: int) -> tuple[heads.Head, float] | None:
    """``(head, label_smoothing)`` of a loss of the row-statistics engine (a variant, or a loss
    from :func:`define_loss`) over ``num_classes`` classes; None for any other loss."""
    factory = variants.HEAD_FACTORIES.get(self.fn) or _USER_HEADS.get(self.fn)
    if factory is None:
      return None
    hparams = dict(self.hparams)
    label_smoothing = hparams.pop("label_smoothing", 0.0)
    return factory(num_classes, **hparams), label_smoothing

  def __repr__(self) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
    return f"get_loss({self.name!r}, {args})" if args else f"get_loss({self.name!r})"


# Heads of losses built by define_loss, by loss function, for their vocabulary-parallel form.
_USER_HEADS: dict[Callable[..., jax.Array], Callable[..., heads.Head]] = {}


def _import_loss(path: str) -> _Entry:
  """The loss named by an import path ``"package.module:function"``, in one of three forms.

  - It takes every convention (``axis``, ``class_weight``, ``ignore_index``, ``reduction``,
    ``where``) as a keyword: it is called with them, as a registered loss is.
  - It takes ``(logits, labels, ..., **kwargs)``: the conventions go through ``**kwargs``.
  - It takes none of them: ``(logits, labels, <hyper-parameters>)`` returning per-example values
    (shape of ``logits`` without the class axis); the registry applies ``where``,
    ``ignore_index``, ``class_weight`` and ``reduction`` (:func:`_reducing`).

  In the last two forms every named argument after ``(logits, labels)`` is a hyper-parameter,
  with or without a default. Anything else (some conventions but not all, no two positional
  arguments first) is refused.
  """
  module_name, _, attr = path.partition(":")
  try:
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
      obj = getattr(obj, part)
  except (ImportError, AttributeError) as err:
    raise ValueError(
      f"get_loss: cannot import loss {path!r} ({type(err).__name__}: {err})."
    ) from None
  if not callable(obj):
    raise ValueError(f"get_loss: {path!r} is not callable, got {type(obj).__name__}.")
  params = inspect.signature(obj).parameters
  former = [old for old, new in _FORMER_NAMES.items() if old in params and new not in params]
  missing = [c for c in CONVENTIONS if c not in params and c not in _FORMER_NAMES.values()]
  missing += [c for c in _FORMER_NAMES.values() if c not in params and not former]
  if not missing:
    return _Entry(_taking_class_weight(obj) if former else obj)
  kinds = [p.kind for p in params.values()]
  positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
  takes_pair = len(kinds) >= 2 and kinds[0] in positional and kinds[1] in positional
  takes_kwargs = inspect.Parameter.VAR_KEYWORD in kinds
  takes_none = not set(params) & {*CONVENTIONS, *_FORMER_NAMES}
  named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
  rest = list(params.values())[2:]
  nameable = all(p.kind is not inspect.Parameter.POSITIONAL_ONLY for p in rest)
  if takes_pair and nameable and (takes_kwargs or takes_none):
    hparams = [p for p in rest if p.kind in named and p.name not in CONVENTIONS]
    loss = _passing_conventions(obj) if takes_kwargs else _reducing(obj, path)
    return _Entry(_with_signature(loss, obj, hparams))
  raise ValueError(
    f"get_loss: {path!r} must take the loss conventions as keyword arguments; it lacks "
    f"{missing} (or take (logits, labels, **kwargs), or (logits, labels, <hyper-parameters>) "
    "returning per-example values with none of them; see xent_jax.register_loss to build a loss "
    "from f(log p))."
  )


def _passing_conventions(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  """A loss taking ``(logits, labels, **kwargs)``, called with hyper-parameters and conventions
  as keywords (a wrapper, so that the registry's signature is not set on the user's function)."""

  def loss(logits, labels, **kwargs):
    return fn(logits, labels, **kwargs)

  return loss


def _reducing(fn: Callable[..., jax.Array], path: str) -> Callable[..., jax.Array]:
  r"""A loss from ``fn(logits, labels, **hparams) -> [...]`` per-example values: the conventions
  applied here.

  With example weight :math:`\omega_i` (``where`` and ``label != ignore_index``, times
  ``class_weight[label]`` for integer labels), :math:`\ell_i = \omega_i\,f_i` and the
  reduction of :func:`xent_jax.core.reduction.reduce_loss` ('mean' divides by
  :math:`\sum_i \omega_i`, as PyTorch's weighted mean). ``fn`` sees the class axis last and,
  for integer labels, ignored rows labelled 0 (their values are discarded); a label outside
  ``[0, C)`` gives NaN, as for the library's losses. ``class_weight`` with probability labels is
  refused (per-example values carry no per-class terms to weight).
  """

  def loss(
    logits,
    labels,
    *,
    axis=-1,
    class_weight=None,
    ignore_index=-100,
    reduction="mean",
    where=None,
    **hparams,
  ):
    checks.check_reduction(path, reduction)
    parsed = inputs.parse_inputs(
      path,
      logits,
      labels,
      axis=axis,
      class_weight=class_weight,
      where=where,
      ignore_index=ignore_index,
    )
    if parsed.weight is not None and not parsed.integer:
      raise ValueError(
        f"{path}: `class_weight` needs integer labels for a loss returning per-example values "
        "(it weights each example by its label's class), got probability labels."
      )
    labels_in = parsed.safe_labels if parsed.integer else parsed.labels
    values = jnp.asarray(fn(parsed.logits, labels_in, **hparams))
    if values.shape != parsed.valid.shape:
      raise ValueError(
        f"{path}: a loss without the conventions must return per-example values of shape "
        f"{parsed.valid.shape} (logits without the class axis), got shape {values.shape}."
      )
    values = values.astype(inputs.compute_dtype(values.dtype))
    weight = parsed.valid.astype(values.dtype)
    if parsed.weight is not None:
      weight = weight * parsed.weight[parsed.safe_labels].astype(values.dtype)
    values = jnp.where(parsed.bad, jnp.nan, jnp.where(parsed.valid, values, 0) * weight)
    return reduction_lib.reduce_loss(values, weight, reduction, fn=path)

  return loss


def _with_signature(
  loss: Callable[..., jax.Array], fn: Callable[..., jax.Array], hparams: list[inspect.Parameter]
) -> Callable[..., jax.Array]:
  """``loss`` named and documented as ``fn``, its signature ``(logits, labels, *,
  <hyper-parameters>, <conventions>)``, from which the registry reads the hyper-parameters."""
  kw = inspect.Parameter.KEYWORD_ONLY
  defaults = {"axis": -1, "class_weight": None, "ignore_index": -100, "reduction": "mean"}
  loss.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [
      inspect.Parameter("logits", inspect.Parameter.POSITIONAL_OR_KEYWORD),
      inspect.Parameter("labels", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    ]
    + [inspect.Parameter(p.name, kw, default=p.default) for p in hparams]
    + [inspect.Parameter(c, kw, default=defaults.get(c)) for c in CONVENTIONS]
  )
  loss.__name__ = getattr(fn, "__name__", "loss")
  loss.__doc__ = inspect.getdoc(fn)
  return loss


def _taking_class_weight(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  """An import-path loss written with the former ``weight`` keyword, called with
  ``class_weight``."""

  @functools.wraps(fn)
  def loss(logits, labels, *, class_weight=None, **kwargs):
    return fn(logits, labels, weight=class_weight, **kwargs)

  return loss


def _entry(name: str) -> _Entry:
  name = ALIASES.get(name, name)
  if name in _LOSSES:
    return _LOSSES[name]
  if ":" in name:
    return _import_loss(name)
  raise ValueError(
    f"get_loss: unknown loss {name!r}; registered losses: {sorted(_LOSSES)}, aliases: "
    f"{sorted(ALIASES)} (or an import path 'package.module:function')."
  )


def get_loss(name: str, **hparams: Any) -> ConfiguredLoss:
  """Returns the loss registered as ``name`` with ``hparams`` bound (the rest at their defaults).

  Every hyper-parameter is checked now, so a bad config fails before training starts, and again
  at call time.

  Numeric hyper-parameters may be traced scalars: build the loss inside the transformed
  function, e.g. ``jax.vmap(lambda t: get_loss("focal", gamma=t)(logits, labels))(gammas)`` (or
  ``jax.grad`` wrt ``t``); the loss, ``.linear`` and ``.vocab_parallel`` then give the concrete
  call's values and gradients. Such a value is checked only when concrete: a traced value out of
  range makes the loss NaN. Hyper-parameters that choose the program (``smoothing``, Taylor's
  ``order``, the bi-tempered loss's ``num_iters``) must be Python values; the bi-tempered loss's
  ``t1`` and ``t2`` may be traced but have no derivative (``NotImplementedError``).

  Args:
    name: a key of :func:`list_losses`, or an import path ``"package.module:function"`` of a loss
      taking ``(logits, labels, *, <hyper-parameters>, axis, class_weight, ignore_index,
      reduction, where)``, or ``(logits, labels, <hyper-parameters>, **kwargs)``, or
      ``(logits, labels, <hyper-parameters>)`` returning per-example values, which the registry
      masks (``where``, ``ignore_index``), weights (``class_weight[label]``) and reduces.
    **hparams: hyper-parameters of that loss; see ``list_losses()[name].hparams``.

  Returns:
    ``loss_fn(logits, labels, *, axis=-1, weight=None, ignore_index=-100, reduction="mean",
    where=None)``, with ``loss_fn.linear(hidden, weight, labels, ...)`` its fused form.

  Raises:
    ValueError: for an unknown ``name`` or hyper-parameter (listing the valid ones) or an
      out-of-range value (naming it). TypeError: for a value of the wrong kind (naming it).

  Example:
    >>> import xent_jax
    >>> xent_jax.get_loss("label_smoothing").hparams
    {'label_smoothing': 0.1, 'smoothing': 'uniform', 'z_loss': 0.0, 'logit_softcap': None}
  """
  entry = _entry(name)
  defaults = _hparam_defaults(entry)
  unknown = sorted(set(hparams) - set(defaults))
  if unknown:
    raise ValueError(
      f"get_loss: loss {name!r} has no hyper-parameter(s) {unknown}; valid ones: {list(defaults)}."
    )
  bound = defaults | hparams
  required = [k for k, v in bound.items() if v is inspect.Parameter.empty]
  if required:
    raise ValueError(f"get_loss: loss {name!r} needs a value for hyper-parameter(s) {required}.")
  _validate(entry.fn, bound)
  return ConfiguredLoss(name, bound, entry.fn)


def define_loss(class_fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  r"""A full loss from its per-class function :math:`f(\log p)` and hyper-parameters.

  The loss is :math:`\ell_i = \sum_c w_c q_{ic} f(\log p_{ic})` (for an integer label
  :math:`\ell_i = w_{y_i} f(\log p_{i y_i})`), with every convention of
  :func:`xent_jax.cross_entropy` (``label_smoothing``, ``axis``, ``class_weight``, ``ignore_index``,
  ``reduction``, ``where``, probability labels). It runs on the row-statistics engine: with
  integer labels it costs what cross-entropy costs, keeps only per-row residuals, and works in
  forward and reverse mode. ``f`` must be elementwise, differentiable, and finite at
  ``finfo.min / 4`` (where :math:`p = 0`).

  Args:
    class_fn: ``f(log_p, *, hparam=default, ...)``; its keyword-only arguments are the loss's
      hyper-parameters (Python numbers).

  Returns:
    ``loss(logits, labels, *, <hyper-parameters>, label_smoothing=0.0, axis=-1,
    class_weight=None, ignore_index=-100, reduction="mean", where=None)``.

  Example:
    >>> import jax.numpy as jnp, xent_jax
    >>> def mae(log_p, *, scale=1.0):
    ...   return scale * -jnp.expm1(log_p)
    >>> loss = xent_jax.define_loss(mae)
    >>> round(float(loss(jnp.array([[2.0, 0.5, -1.0]]), jnp.array([0]), scale=2.0)), 4)
    0.4288
  """
  params = inspect.signature(class_fn).parameters.values()
  hparams = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
  clash = sorted(set(hparams) & {*CONVENTIONS, *_FORMER_NAMES, "label_smoothing"})
  if clash:
    raise ValueError(
      f"define_loss: hyper-parameter names {clash} are reserved for the conventions."
    )
  name = getattr(class_fn, "__name__", "loss")

  def loss(
    logits,
    labels,
    *,
    label_smoothing=0.0,
    axis=-1,
    class_weight=None,
    ignore_index=-100,
    reduction="mean",
    where=None,
    **values,
  ):
    values = current_keywords(name, values, _FORMER_NAMES)
    class_weight = values.pop("class_weight", class_weight)
    unknown = sorted(set(values) - set(hparams))
    if unknown:
      raise TypeError(f"{name}: unknown hyper-parameter(s) {unknown}; valid ones: {list(hparams)}.")
    bound = hparams | values
    options = LossOptions.checked(
      name, reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing
    )
    head = heads.Head(lambda log_p: class_fn(log_p, **bound))
    reduced, _ = head_loss(
      name, head, logits, labels, options, axis=axis, class_weight=class_weight, where=where
    )
    return reduced

  # The signature the registry reads hyper-parameters from: f's keyword-only arguments.
  kw = inspect.Parameter.KEYWORD_ONLY
  loss.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [
      inspect.Parameter("logits", inspect.Parameter.POSITIONAL_OR_KEYWORD),
      inspect.Parameter("labels", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    ]
    + [inspect.Parameter(k, kw, default=v) for k, v in hparams.items()]
    + [
      inspect.Parameter("label_smoothing", kw, default=0.0),
      inspect.Parameter("axis", kw, default=-1),
      inspect.Parameter("class_weight", kw, default=None),
      inspect.Parameter("ignore_index", kw, default=-100),
      inspect.Parameter("reduction", kw, default="mean"),
      inspect.Parameter("where", kw, default=None),
    ]
  )
  loss.__name__ = name
  loss.__doc__ = inspect.getdoc(class_fn) or f"The loss with per-class term {name}(log p)."
  _USER_HEADS[loss] = lambda num_classes, **values: heads.Head(
    lambda log_p: class_fn(log_p, **(hparams | values))
  )
  return loss


def register_loss(
  name: str, *, summary: str | None = None
) -> Callable[[Callable[..., jax.Array]], Callable[..., jax.Array]]:
  """Decorator: :func:`define_loss` of a per-class function, registered as ``name``.

  Afterwards ``get_loss(name, **hparams)`` (and so a config's ``loss.name``) returns it, with its
  fused form ``.linear``; :func:`list_losses` lists it.

  Args:
    name: the registry name; must not be taken.
    summary: one line for :func:`list_losses` (default: the first line of the docstring).

  Returns:
    A decorator returning the full loss function.

  Example:
    >>> import jax.numpy as jnp, xent_jax
    >>> @xent_jax.register_loss("docs_mae")
    ... def mae(log_p, *, scale=1.0):
    ...   \"\"\"Mean absolute error between the one-hot target and p, times scale.\"\"\"
    ...   return scale * -jnp.expm1(log_p)
    >>> xent_jax.list_losses()["docs_mae"].hparams
    {'scale': 1.0, 'label_smoothing': 0.0}
  """
  if not isinstance(name, str) or not name or ":" in name:
    raise ValueError(f"register_loss: `name` must be a non-empty string without ':', got {name!r}.")
  if name in _LOSSES or name in ALIASES:
    raise ValueError(f"register_loss: a loss named {name!r} is registered already.")

  def decorate(class_fn):
    loss = define_loss(class_fn)
    _LOSSES[name] = _Entry(loss, summary=summary or _first_line(class_fn, name))
    return loss

  return decorate


def _first_line(fn, name: str) -> str:
  doc = inspect.getdoc(fn)
  return doc.splitlines()[0] if doc else f"User loss {name!r}."
