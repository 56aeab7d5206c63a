r"""Loss heads: a softmax loss written once as a function of the engine's per-row statistics.

A head is the expected per-class term of a loss under the target distribution :math:`q`, plus an
optional per-row term:

.. math::
   \ell_i = \sum_c w_c\, a_c\, q_{ic}\, f(\log p_{ic}) \;+\; g(\text{statistics}_i, \text{target}_i)

with class weights :math:`w`, an optional per-class factor :math:`a` (focal loss's
:math:`\alpha`, not part of the 'mean' denominator) and the head's elementwise :math:`f`.
Cross-entropy is :math:`f(\log p) = -\log p`; a variant that depends on the label's probability
only, :math:`\ell = \varphi(\log p_y)`, is :math:`f = \varphi`.

For an integer label :math:`y` smoothed to ``on`` on :math:`y` and ``off`` elsewhere, the sum
splits into :math:`(\text{on}-\text{off})\,w_y a_y f(\log p_y) + \text{off}\sum_c w_c a_c f(\log
p_c)`: one gathered logit, and a class sum only when smoothing. The gradient of every head is
:math:`\partial\ell/\partial(\text{statistics})` (autodiff of per-row arrays) pushed through
:func:`xent_jax.core.engine.row_stats`'s custom JVP: for :math:`\ell = \varphi(\log p_y)` that is
cross-entropy's gradient with a per-row scale, :math:`\varphi'(\log p_y)(e_y - p)`.

This module evaluates heads on a ``[..., V]`` logits array (the dense executor); the fused linear
and vocabulary-parallel executors evaluate the same heads on their own statistics.

Hyper-parameters may be traced scalars. The smoothed target's ``on``/``off`` are then traced too,
and a class sum skipped for a concrete ``off = 0`` is computed (it is multiplied by ``off``); a
head whose functions close over a traced value is marked :attr:`Head.traced`, and its statistics
are differentiated by autodiff (the engine's custom JVP takes its functions as static).
"""

import dataclasses
import math
from collections.abc import Callable, Hashable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from xent_jax.core import checks, engine
from xent_jax.core.engine import ClassFn, ClassSum, PowerSeries, RowStats


class SmoothedTarget(NamedTuple):
  """A smoothed one-hot target: ``on`` on the label, ``off`` on every other class.

  ``xlogx_on`` and ``xlogx_off`` are :math:`q\\log q` of the two values when the convention
  subtracts the target's entropy (T5X), else 0.
  """

  on: float | jax.Array
  off: float | jax.Array
  xlogx_on: float | jax.Array
  xlogx_off: float | jax.Array


def xlogx(v: float | jax.Array) -> float | jax.Array:
  """:math:`v\\log v` with :math:`0\\log 0 = 0`: a Python float for a Python float, else traced."""
  if checks.is_traced(v):
    return jax.scipy.special.xlogy(v, v)
  return v * math.log(v) if v > 0 else 0.0


def smoothed_target(
  num_classes: int, label_smoothing: float, smoothing: str = "uniform"
) -> SmoothedTarget:
  """The on/off values of a smoothed one-hot target over ``num_classes`` classes.

  'uniform' (PyTorch, optax; Szegedy et al. 2016): :math:`q = (1-\\epsilon)\\,\\mathrm{onehot} +
  \\epsilon/K`. 't5x' (T5X's ``compute_weighted_cross_entropy``): :math:`q_y = 1-\\epsilon`,
  :math:`q_{c\\neq y} = \\epsilon/(K-1)`, and the target's entropy is subtracted so the minimum
  loss is 0.

  A traced ``label_smoothing`` gives traced values (Python floats otherwise).
  """
  eps = label_smoothing if checks.is_traced(label_smoothing) else float(label_smoothing)
  if smoothing == "uniform":
    return SmoothedTarget(1.0 - eps + eps / num_classes, eps / num_classes, 0.0, 0.0)
  on = 1.0 - eps
  off = eps / (num_classes - 1) if num_classes > 1 else 0.0 * eps
  return SmoothedTarget(on, off, xlogx(on), xlogx(off))


def mask_rows(loss: jax.Array, valid: jax.Array, bad: jax.Array) -> jax.Array:
  """0 (with a zero gradient) on invalid rows; NaN, with a NaN gradient, on ``bad`` rows."""
  loss = jnp.where(valid, loss, jnp.zeros_like(loss))
  return loss * jnp.where(bad, jnp.nan, 1.0).astype(loss.dtype)


def smooth_probabilities(
  q: jax.Array, label_smoothing: float, smoothing: str, num_classes: int | None = None
) -> jax.Array:
  """The smoothed target: 'uniform' :math:`(1-\\epsilon)q + \\epsilon/K`; 't5x'
  :math:`(1-\\epsilon)q + \\epsilon(1-q)/(K-1)`."""
  eps = label_smoothing
  num_classes = q.shape[-1] if num_classes is None else num_classes
  if checks.is_static_zero(eps):
    return q
  if smoothing == "uniform":
    return (1.0 - eps) * q + eps / num_classes
  off = eps / max(num_classes - 1, 1)
  return (1.0 - eps - off) * q + off


class Target(NamedTuple):
  """What a head's per-row term may use about the target of each row.

  Attributes:
    integer: whether the labels are class ids (a static Python bool).
    on: target probability of the label (integer labels; 1 without smoothing).
    off: target probability of every other class (integer labels; 0 without smoothing).
    target_weight: ``[...]`` :math:`w_y` (integer labels) or 1.
    total_weight: :math:`W = \\sum_c w_c` (a scalar).
    mass: ``[...]`` :math:`\\sum_c w_c q_c`, the weight of the whole target.
    probs: ``[..., V]`` the (smoothed) target distribution for probability labels, else None.
    class_weight: ``[V]`` class weights, or None.
    labels: ``[..., V]`` the probability labels as given, else None.
    smooth: the static map from ``labels`` to ``probs``, else None. A :class:`ClassSum` whose
      weights depend on the target should take ``labels`` as its operand and apply ``smooth`` in
      its ``beta_fn``, so that no ``[..., V]`` array is kept for the backward pass.
    vocab_axis: inside ``shard_map``, the mesh axis the classes are split over (``probs``,
      ``labels`` and ``class_weight`` are then this shard's slices), else None. A row term that
      sums over the classes itself does so with :meth:`sum_classes`.
  """

  integer: bool
  on: float | jax.Array
  off: float | jax.Array
  target_weight: jax.Array
  total_weight: jax.Array
  mass: jax.Array
  probs: jax.Array | None
  class_weight: jax.Array | None
  labels: jax.Array | None = None
  smooth: Callable[[jax.Array], jax.Array] | None = None
  vocab_axis: Hashable | None = None

  def sum_classes(self, values: jax.Array) -> jax.Array:
    """``[...]`` sum of ``[..., V]`` ``values`` over all classes (a ``psum`` over the shards of
    :attr:`vocab_axis` when the classes are split)."""
    return engine.class_sum(values, self.vocab_axis)


RowTerm = Callable[[RowStats, Target], jax.Array]
ExtraSums = Callable[[Target], tuple[ClassSum, ...]]


@dataclasses.dataclass(frozen=True, eq=False)
class Head:
  """A loss as the engine sees it (see the module docstring).

  Attributes:
    class_fn: elementwise :math:`f(\\log p)`; a static Python callable.
    row_term: per-row :math:`g(\\text{stats}, \\text{target})` added to the loss, or None. It
      reads ``stats.class_sums[1:]`` for the sums ``extra_sums`` asked for.
    entropy: whether ``row_term`` uses :attr:`RowStats.entropy`.
    class_factor: ``[V]`` per-class factor :math:`a` of the class term, or None.
    extra_sums: with probability labels, further :class:`ClassSum` statistics for ``row_term``
      (given the :class:`Target`), or None.
    class_series: ``class_fn`` as a :class:`~xent_jax.core.engine.PowerSeries` (cross-entropy's
      ``PowerSeries(-1.0)``), or None: saves the kernel passes over the logits. Used with unit
      class weights, or where it is a single term (exact under any weights).
    traced: whether ``class_fn``, ``row_term`` or ``extra_sums`` close over a traced value (a
      hyper-parameter under ``jit``, ``vmap``, ``grad``): the statistics are then differentiated
      by autodiff of the engine's passes instead of its custom JVP, whose functions are static.
  """

  class_fn: ClassFn
  row_term: RowTerm | None = None
  entropy: bool = False
  class_factor: jax.Array | None = None
  extra_sums: ExtraSums | None = None
  class_series: PowerSeries | None = None
  traced: bool = False

  def __post_init__(self):
    if self.traced:  # a float64 hyper-parameter must not widen the engine's float32 sums
      class_fn = self.class_fn
      object.__setattr__(self, "class_fn", lambda log_p: class_fn(log_p).astype(log_p.dtype))


def neg_log(log_p: jax.Array) -> jax.Array:
  """Cross-entropy's per-class term :math:`f(\\log p) = -\\log p`."""
  return -log_p


def along_classes(vector: jax.Array, ndim: int) -> jax.Array:
  """Reshapes a ``[V]`` vector to broadcast against ``[..., V]`` of rank ``ndim`` explicitly."""
  return vector.reshape((1,) * (ndim - 1) + (-1,))


def _gather(vector: jax.Array | None, labels: jax.Array, dtype) -> jax.Array | float:
  return 1.0 if vector is None else vector.astype(dtype)[labels]


def _series_for(head: Head, weighted: bool) -> PowerSeries | None:
  """The head's power series where the kernel may use it (see :class:`PowerSeries`): with unit
  weights, or as a single term."""
  series = head.class_series
  return series if series is not None and (not weighted or series.single_term) else None


def _local_class_factor(head: Head, num_local: int, vocab_axis: Hashable | None):
  """The head's class factor on this shard's classes (the whole ``[V]`` without ``vocab_axis``)."""
  factor = head.class_factor
  if factor is None or vocab_axis is None:
    return factor
  return lax.dynamic_slice_in_dim(factor, engine.shard_start(num_local, vocab_axis), num_local)


def _class_beta(class_weight, class_factor, num_classes: int, dtype) -> jax.Array:
  beta = jnp.ones((num_classes,), dtype) if class_weight is None else class_weight.astype(dtype)
  return beta if class_factor is None else beta * class_factor.astype(dtype)


def target_weights(
  class_weight: jax.Array | None,
  labels: jax.Array,
  num_local: int,
  dtype,
  vocab_axis: Hashable | None = None,
) -> tuple[jax.Array, jax.Array]:
  """``(w_y [...], W)``: each row's target weight and the total class weight.

  With ``vocab_axis`` (inside ``shard_map``) ``class_weight`` is this shard's ``[V_s]`` slice and
  ``labels`` are global: the shard owning each label contributes its weight (a ``psum``).
  """
  total_weight = _total_weight(class_weight, num_local, dtype, vocab_axis)
  if class_weight is None:
    return jnp.ones(labels.shape, dtype), total_weight
  class_weight = class_weight.astype(dtype)
  if vocab_axis is None:
    return class_weight[labels], total_weight
  local = engine.local_labels(labels, num_local, vocab_axis)
  owned = (local >= 0) & (local < num_local)
  picked = class_weight[jnp.clip(local, 0, num_local - 1)]
  target_weight = lax.psum(jnp.where(owned, picked, jnp.zeros_like(picked)), vocab_axis)
  return target_weight, total_weight


def _total_weight(
  class_weight: jax.Array | None, num_local: int, dtype, vocab_axis: Hashable | None
) -> jax.Array:
  """:math:`W = \\sum_c w_c` over all classes (the class count without weights); with
  ``vocab_axis``, ``class_weight`` is this shard's slice and the sum a ``psum``."""
  if class_weight is None:
    shards = 1 if vocab_axis is None else lax.axis_size(vocab_axis)
    return jnp.asarray(num_local * shards, dtype)
  return engine.class_sum(class_weight.astype(dtype), vocab_axis)


def integer_loss(
  head: Head,
  logits: jax.Array,
  labels: jax.Array,
  *,
  class_weight: jax.Array | None,
  on: float | jax.Array,
  off: float | jax.Array,
  logit_softcap: float | None,
  vocab_axis: Hashable | None = None,
  autodiff: bool = False,
) -> tuple[jax.Array, RowStats]:
  """Per-row loss of ``head`` for integer labels, classes on the last axis (no checks, no mask).

  Args:
    head: the loss.
    logits: ``[..., V]`` float logits.
    labels: ``[...]`` class ids inside ``[0, V)`` (make invalid ones safe before calling).
    class_weight: ``[V]`` or None.
    on, off: the smoothed one-hot target's values.
    logit_softcap: soft cap or None.
    vocab_axis: inside ``shard_map``, the mesh axis the classes of ``logits`` are split over
      (see :func:`xent_jax.core.engine.row_stats`): ``class_weight`` is then this shard's ``[V_s]``
      slice, while ``labels`` and the head's class factor stay global.
    autodiff: differentiate the statistics by autodiff (see
      :func:`xent_jax.core.engine.row_stats`); also taken for a :attr:`Head.traced` head or a
      traced ``logit_softcap``.

  Returns:
    ``(loss [...], stats)`` in float32 (float64 for float64 logits).
  """
  dtype = engine.compute_dtype(logits.dtype)
  num_local = logits.shape[-1]
  local_factor = _local_class_factor(head, num_local, vocab_axis)
  stats = engine.row_stats(
    logits,
    labels,
    integer_class_sums(head, class_weight, local_factor, off, num_local, dtype),
    logit_softcap=logit_softcap,
    entropy=head.entropy,
    vocab_axis=vocab_axis,
    autodiff=autodiff or head.traced or checks.is_traced(logit_softcap),
  )
  loss = integer_head_loss(
    head,
    stats,
    labels,
    class_weight=class_weight,
    on=on,
    off=off,
    num_local=num_local,
    vocab_axis=vocab_axis,
  )
  return loss, stats


def integer_class_sums(
  head: Head, class_weight, class_factor, off: float | jax.Array, num_local: int, dtype
) -> tuple[ClassSum, ...]:
  """The class sum a head needs for integer labels: :math:`\\sum_c w_c a_c f(\\log p_c)` with
  class weights :math:`w` and the head's class factor :math:`a` (``[V]`` or None each) when the
  target is smoothed (``off`` not a concrete 0), else none."""
  if checks.is_static_zero(off):
    return ()
  weighted = class_weight is not None or class_factor is not None
  betas = (_class_beta(class_weight, class_factor, num_local, dtype),) if weighted else ()
  return (ClassSum(head.class_fn, betas, series=_series_for(head, weighted)),)


def integer_head_loss(
  head: Head,
  stats: RowStats,
  labels: jax.Array,
  *,
  class_weight: jax.Array | None,
  on: float | jax.Array,
  off: float | jax.Array,
  num_local: int,
  vocab_axis: Hashable | None = None,
) -> jax.Array:
  """Per-row loss of ``head`` for integer ``labels`` (valid ids) from its statistics (those of
  :func:`integer_class_sums`): :func:`integer_stats_loss` with each row's target weight and
  class factor. Arguments as :func:`integer_loss`."""
  dtype = stats.log_p_target.dtype
  target_weight, total_weight = target_weights(class_weight, labels, num_local, dtype, vocab_axis)
  return integer_stats_loss(
    head,
    stats,
    target_weight=target_weight,
    total_weight=total_weight,
    on=on,
    off=off,
    class_weight=class_weight,
    target_factor=_gather(head.class_factor, labels, dtype),
  )


def integer_stats_loss(
  head: Head,
  stats: RowStats,
  *,
  target_weight: jax.Array,
  total_weight: jax.Array,
  on: float | jax.Array,
  off: float | jax.Array,
  class_weight: jax.Array | None = None,
  target_factor: jax.Array | float = 1.0,
) -> jax.Array:
  """Per-row loss of ``head`` for smoothed integer labels, from statistics already computed.

  :math:`(\\text{on}-\\text{off})\\,w_y a_y f(\\log p_y) + \\text{off}\\cdot
  \\texttt{class\\_sums[0]} + g`, with ``stats.class_sums[0]`` the class sum
  :math:`\\sum_c w_c a_c f(\\log p_c)` (read only when ``off``). :func:`integer_loss` takes the
  statistics from the engine; the fused linear kernels (:func:`xent_jax.fused.ops.row_loss`) from
  their blocks of ``hidden @ weight.T``.

  Args:
    head: the loss.
    stats: ``[...]`` per-row statistics.
    target_weight: ``[...]`` :math:`w_y`.
    total_weight: :math:`W = \\sum_c w_c`.
    on, off: the smoothed one-hot target's values.
    class_weight: ``[V]`` or None, for the head's row term.
    target_factor: ``[...]`` the head's class factor of the label, :math:`a_y`, or 1.

  Returns:
    ``[...]`` per-row loss (not masked).
  """
  loss = (on - off) * target_weight * target_factor * head.class_fn(stats.log_p_target)
  if not checks.is_static_zero(off):
    loss = loss + off * stats.class_sums[0]
  if head.row_term is not None:
    mass = (on - off) * target_weight + off * total_weight
    target = Target(True, on, off, target_weight, total_weight, mass, None, class_weight)
    loss = loss + head.row_term(stats, target)
  return loss


def probability_loss(
  head: Head,
  logits: jax.Array,
  labels: jax.Array,
  *,
  smooth: Callable[[jax.Array], jax.Array],
  class_weight: jax.Array | None,
  logit_softcap: float | None,
  vocab_axis: Hashable | None = None,
  autodiff: bool = False,
) -> tuple[jax.Array, RowStats]:
  """Per-row loss of ``head`` for a target distribution (no checks, no mask); the arguments
  :func:`integer_loss` shares mean what they mean there, and:

  Args:
    labels: ``[..., V]`` the target probabilities as given; differentiable. Under ``vocab_axis``,
      this shard's ``[..., V_s]`` slice.
    smooth: static elementwise map from ``labels`` to the target :math:`q` (label smoothing, or
      the identity), over the global class count. The kernel recomputes :math:`q` in the
      backward pass instead of keeping it.
    autodiff: as in :func:`integer_loss`; pass True when ``smooth`` closes over a traced value.

  Returns:
    ``(loss [...], stats)``.
  """
  dtype = engine.compute_dtype(logits.dtype)
  num_local = logits.shape[-1]
  class_factor = _local_class_factor(head, num_local, vocab_axis)
  # The labels stay in their own dtype and every pass converts them where it reads them: a
  # converted copy, read by the forward and the backward pass, is what XLA:TPU would keep as a
  # float32 [..., V] temporary.
  given = smooth
  smooth = lambda q: given(q.astype(dtype))
  probs = smooth(labels)
  class_beta = None
  if class_weight is not None or class_factor is not None:
    class_beta = _class_beta(class_weight, class_factor, num_local, dtype)
  target = Target(
    False,
    1.0,
    0.0,
    jnp.ones(probs.shape[:-1], dtype),
    _total_weight(class_weight, num_local, dtype, vocab_axis),
    jnp.ones(probs.shape[:-1], dtype),
    probs,
    class_weight,
    labels,
    smooth,
    vocab_axis,
  )
  if class_weight is not None:
    w = along_classes(class_weight.astype(dtype), probs.ndim)
    target = target._replace(mass=target.sum_classes(probs * w))
  if class_beta is None:
    main = ClassSum(head.class_fn, (labels,), smooth, _series_for(head, True))
  else:
    weighted = lambda q, w: smooth(q) * along_classes(w, q.ndim)
    main = ClassSum(head.class_fn, (labels, class_beta), weighted, _series_for(head, True))
  extra = head.extra_sums(target) if head.extra_sums is not None else ()
  stats = engine.row_stats(
    logits,
    None,
    (main, *extra),
    logit_softcap=logit_softcap,
    entropy=head.entropy,
    vocab_axis=vocab_axis,
    autodiff=autodiff or head.traced or checks.is_traced(logit_softcap),
  )
  loss = stats.class_sums[0]
  if head.row_term is not None:
    loss = loss + head.row_term(stats, target)
  return loss, stats
