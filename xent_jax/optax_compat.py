"""Drop-ins for ``optax.losses``: same names, arguments and results, plus label smoothing.

Code written against ``optax.losses`` switches by changing the import. The differences are
additions: ``label_smoothing`` (keyword-only) without building a one-hot, float32 accumulation for
half-precision logits, finite results where a ``-inf`` logit meets a zero target, and NaN (not a
silently wrong number) for integer labels outside ``[0, C)``, with a per-logit ``where`` too
(where optax reads label -1 as the last class). Logits without classes raise ``ValueError``; an
empty batch gives an empty result, as in optax.
"""

import math

import jax
import jax.numpy as jnp

from xent_jax.core import checks, engine, heads, inputs
from xent_jax.core.frontend import head_loss
from xent_jax.core.options import LossOptions
from xent_jax.losses.cross_entropy import cross_entropy_head
from xent_jax.losses.variants import poly1_head

__all__ = [
  "poly_loss_cross_entropy",
  "smooth_labels",
  "softmax_cross_entropy",
  "softmax_cross_entropy_with_integer_labels",
]

Axis = int | tuple[int, ...]
_CROSS_ENTROPY = cross_entropy_head("uniform", 0.0)


def _classes_last(fn: str, logits, axis: Axis, where):
  """Moves the class axis (or axes, flattened in order) of ``logits`` (and a per-logit ``where``)
  to the end, as optax does for a tuple ``axis``. Returns ``(logits, class_mask)``, the mask
  None unless ``where`` is per-logit."""
  if isinstance(axis, tuple):
    axes = tuple(checks.canonical_axis(fn, a, logits.ndim) for a in axis)
  elif isinstance(axis, int):
    axes = (checks.canonical_axis(fn, axis, logits.ndim),)
  else:
    raise TypeError(f"{fn}: `axis` must be an int or a tuple of ints, got {axis!r}.")
  for a in axes:
    checks.check_has_classes(fn, "logits", logits.shape, a)
  batch = tuple(a for a in range(logits.ndim) if a not in axes)
  num_classes = math.prod(logits.shape[a] for a in axes)

  def flatten(x):
    x = jnp.transpose(x, batch + axes)
    return x.reshape(x.shape[: len(batch)] + (num_classes,))

  per_logit = where is not None and jnp.ndim(where) == logits.ndim
  return flatten(logits), (flatten(jnp.asarray(where, bool)) if per_logit else None)


def _masked_class_cross_entropy(logits, q, class_mask):
  """:math:`\\sum_{c\\in M} q_c(\\mathrm{lse}_M - x_c)` over the classes ``class_mask`` keeps
  (optax's per-logit ``where``); 0 for rows that keep no class."""
  dtype = inputs.compute_dtype(logits.dtype)
  x = jnp.where(class_mask, logits.astype(dtype), -jnp.inf)
  lse = engine.logsumexp(x)
  keep = class_mask & (q != 0)
  loss = jnp.sum(jnp.where(keep, q * (lse[..., None] - x), 0.0), axis=-1)
  return jnp.where(jnp.any(class_mask, axis=-1), loss, 0.0)


def _per_example(
  fn: str, logits_BxC, labels, where, label_smoothing, head: heads.Head = _CROSS_ENTROPY
) -> jax.Array:
  """Per-example ``head`` (cross-entropy by default), classes last, through the shared front
  end (no ignored label)."""
  options = LossOptions(reduction="none", ignore_index=None, label_smoothing=label_smoothing)
  loss, _ = head_loss(fn, head, logits_BxC, labels, options, where=where)
  return loss


def softmax_cross_entropy_with_integer_labels(
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  axis: Axis = -1,
  where: jax.typing.ArrayLike | None = None,
  *,
  label_smoothing: float = 0.0,
) -> jax.Array:
  r"""Per-example softmax cross-entropy with integer labels; a drop-in for optax's.

  .. math::
     \ell_i = \mathrm{lse}(x_i) - (1-\epsilon)\,x_{iy_i} - \frac{\epsilon}{C}\sum_c x_{ic}

  Args:
    logits: ``[..., C]`` float logits (classes on ``axis``; a tuple ``axis`` flattens those axes,
      and a label is then a flat index into them, as in optax).
    labels: integer ids of shape ``logits.shape`` without ``axis``.
    axis: class axis or axes.
    where: per-example mask (batch shape) or per-logit mask (``logits.shape``, restricting the
      softmax and the smoothing to the kept classes); rows with nothing kept give 0. A label
      outside ``[0, C)`` gives NaN with either mask (optax reads -1 as the last class).
    label_smoothing: :math:`\epsilon`, uniform over the (kept) classes, without a one-hot.

  Returns:
    ``[...]`` per-example losses, float32 (float64 for float64 logits).

  References:
    optax.losses.softmax_cross_entropy_with_integer_labels; Szegedy et al. 2016 (smoothing).
  """
  fn = "softmax_cross_entropy_with_integer_labels"
  checks.check_floating(fn, "logits", logits)
  labels = inputs.as_label_array(fn, labels)
  inputs.check_integer_labels(fn, labels)
  checks.check_in_range(fn, "label_smoothing", label_smoothing, 0.0, 1.0)
  x, class_mask = _classes_last(fn, jnp.asarray(logits), axis, where)
  checks.check_shape(fn, "labels", labels, x.shape[:-1])
  num_classes = x.shape[-1]
  read = inputs.integer_labels(fn, labels, num_classes=num_classes, ignore_index=None, where=None)
  if where is not None and jnp.ndim(where) == jnp.ndim(logits):
    # As optax: the normalizer runs over the kept classes, the label's logit is read unmasked.
    dtype = inputs.compute_dtype(x.dtype)
    lse = engine.logsumexp(jnp.where(class_mask, x, -jnp.inf))
    target_logit = jnp.take_along_axis(x, read.safe_labels[..., None], axis=-1)[..., 0]
    loss = (1.0 - label_smoothing) * (lse - target_logit.astype(dtype))
    if label_smoothing:
      kept = jnp.sum(class_mask, axis=-1, keepdims=True)
      uniform = jnp.full(x.shape, label_smoothing, dtype) / jnp.maximum(kept, 1)
      loss = loss + _masked_class_cross_entropy(x, uniform, class_mask)
    loss = jnp.where(read.in_range, loss, jnp.nan)
    return jnp.where(jnp.any(class_mask, axis=-1), loss, 0.0)
  return _per_example(fn, x, labels, where, label_smoothing)


def softmax_cross_entropy(
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  axis: Axis = -1,
  where: jax.typing.ArrayLike | None = None,
  *,
  label_smoothing: float = 0.0,
) -> jax.Array:
  r"""Per-example softmax cross-entropy with integer or probability labels; a drop-in for optax's.

  .. math::
     \ell_i = -\sum_c q_{ic}\log\mathrm{softmax}(x_i)_c,\qquad q = (1-\epsilon)\,\text{labels}
     + \epsilon/C

  Integer labels take :func:`softmax_cross_entropy_with_integer_labels`. Unlike optax, a ``-inf``
  logit where the target is 0 gives a finite loss (optax returns NaN there).

  Args:
    logits: ``[..., C]`` float logits.
    labels: float probabilities of ``logits.shape``, or integer ids (``logits.shape`` without
      ``axis``).
    axis: class axis or axes.
    where: per-example or per-logit mask, as in optax.
    label_smoothing: :math:`\epsilon`, as ``optax.smooth_labels`` applies it.

  Returns:
    ``[...]`` per-example losses, float32 (float64 for float64 logits).

  References:
    optax.losses.softmax_cross_entropy.
  """
  fn = "softmax_cross_entropy"
  checks.check_floating(fn, "logits", logits)
  labels = inputs.as_label_array(fn, labels)
  if jnp.issubdtype(labels.dtype, jnp.integer):
    return softmax_cross_entropy_with_integer_labels(
      logits, labels, axis, where, label_smoothing=label_smoothing
    )
  checks.check_floating(fn, "labels", labels)
  checks.check_in_range(fn, "label_smoothing", label_smoothing, 0.0, 1.0)
  logits = jnp.asarray(logits)
  checks.check_shape(fn, "labels", labels, logits.shape)
  per_logit = where is not None and jnp.ndim(where) == logits.ndim
  x, class_mask = _classes_last(fn, logits, axis, where)
  q, _ = _classes_last(fn, labels, axis, None)
  if per_logit:
    kept = jnp.sum(class_mask, axis=-1, keepdims=True)
    q = (1.0 - label_smoothing) * q.astype(inputs.compute_dtype(x.dtype))
    q = q + label_smoothing / jnp.maximum(kept, 1)
    return _masked_class_cross_entropy(x, q, class_mask)
  return _per_example(fn, x, q, where, label_smoothing)


def smooth_labels(
  labels: jax.typing.ArrayLike,
  alpha: jax.typing.ArrayLike,
  *,
  axis: Axis | None = -1,
  where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""Label smoothing of one-hot (or probability) labels, as ``optax.smooth_labels``.

  .. math::
     q = (1-\alpha)\,\text{labels} + \alpha / K

  with :math:`K` the size of ``axis`` (or the number of entries ``where`` keeps along it).

  Args:
    labels: ``[..., K]`` float labels.
    alpha: smoothing factor in ``[0, 1]``.
    axis: class axis or axes.
    where: mask of the entries that count towards :math:`K`.

  Returns:
    The smoothed labels, ``labels.shape``.

  References:
    Müller et al., "When does label smoothing help?", 2019.
  """
  fn = "smooth_labels"
  checks.check_floating(fn, "labels", labels)
  checks.check_in_range(fn, "alpha", alpha, 0.0, 1.0)
  labels = jnp.asarray(labels)
  if where is None:
    axes = range(labels.ndim) if axis is None else (axis if isinstance(axis, tuple) else (axis,))
    # An empty class axis leaves nothing to smooth (and no division by its size).
    num_categories = max(math.prod(labels.shape[a] for a in axes), 1)
  else:
    num_categories = jnp.sum(where, axis, keepdims=True)
  return labels * (1.0 - alpha) + alpha / num_categories


def poly_loss_cross_entropy(
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  epsilon: float = 2.0,
  axis: Axis = -1,
  where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""Poly-1 loss on probability labels, as ``optax.poly_loss_cross_entropy``.

  .. math::
     \ell = -\sum_c q_c \log p_c + \epsilon \sum_c q_c (1 - p_c)

  Args:
    logits: ``[..., C]`` float logits.
    labels: ``[..., C]`` float (one-hot or probability) labels.
    epsilon: coefficient of the first polynomial term; 0 gives cross-entropy.
    axis: class axis or axes.
    where: per-example or per-logit mask, as in optax.

  Returns:
    ``[...]`` per-example losses.

  References:
    Leng et al., "PolyLoss: A Polynomial Expansion Perspective of Classification Loss
    Functions", 2022.
  """
  fn = "poly_loss_cross_entropy"
  checks.check_floating(fn, "logits", logits)
  checks.check_real_scalar(fn, "epsilon", epsilon)
  checks.check_floating(fn, "labels", labels)
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  checks.check_shape(fn, "labels", labels, logits.shape)
  x, class_mask = _classes_last(fn, logits, axis, where)
  q, _ = _classes_last(fn, labels, axis, None)
  if class_mask is not None:
    # optax's per-logit mask: the softmax and the target over the kept classes only.
    x = jnp.where(class_mask, x, -jnp.inf)
    q = jnp.where(class_mask, q, jnp.zeros_like(q))
    where = jnp.any(class_mask, axis=-1)
  return _per_example(fn, x, q, where, 0.0, head=poly1_head(epsilon))
