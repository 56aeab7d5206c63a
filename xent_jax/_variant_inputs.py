"""Shared preparation for the cross-entropy variants: labels, class axis, masks and reduction.

Every variant in :mod:`xent_jax._variants` and :mod:`xent_jax._bitempered` is a per-class
function :math:`f(\\log p_c)` (or a function of the whole predicted distribution) applied to the
target. This module turns the user's ``logits``/``labels``/``axis``/``weight``/``ignore_index``/
``where`` into one :class:`Prepared` record with the classes on the last axis, and applies the
shared rules, so a variant only writes its formula:

* integer labels: :math:`\\ell_i = w_{y_i} f(\\log p_{i,y_i})` and
  :math:`\\omega_i = w_{y_i}\\,\\mathrm{valid}_i`;
* probability labels: :math:`\\ell_i = \\sum_c w_c q_{ic} f(\\log p_{ic})` (the expected loss under
  the target, which is PyTorch's rule for weighted probability targets) and
  :math:`\\omega_i = \\mathrm{valid}_i`;
* invalid rows (``ignore_index`` or ``where`` False) give 0 with a zero gradient, a valid integer
  label outside ``[0, C)`` gives NaN, and the reduction is :func:`xent_jax._reduction.reduce_loss`.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from xent_jax import _cross_entropy as ce
from xent_jax import _inputs
from xent_jax import _reduction


class Prepared(NamedTuple):
  """A variant's inputs with the classes on the last axis, in the compute dtype.

  Attributes:
    x: ``[..., C]`` logits (float32, float64 for float64 input); zeros on invalid rows.
    lse: ``[...]`` :math:`\\log\\sum_c e^{x_c}`.
    labels: ``[...]`` integer labels made safe to gather (0 where invalid or out of range), or
      ``[..., C]`` probabilities (zeros on invalid rows).
    integer: whether ``labels`` are integer class ids.
    class_weight: ``[C]`` class weights, or None.
    target_mass: ``[...]`` weight of the target: :math:`w_y` (integer labels) or
      :math:`\\sum_c w_c q_c` (probability labels with ``weight``; 1 without it).
    example_weight: ``[...]`` :math:`\\omega_i`, the 'mean' denominator.
    valid: ``[...]`` rows that count.
    bad: ``[...]`` valid rows whose integer label is outside ``[0, C)``.
  """

  x: jax.Array
  lse: jax.Array
  labels: jax.Array
  integer: bool
  class_weight: jax.Array | None
  target_mass: jax.Array
  example_weight: jax.Array
  valid: jax.Array
  bad: jax.Array

  @property
  def num_classes(self) -> int:
    return self.x.shape[-1]

  def log_probs(self) -> jax.Array:
    """``[..., C]`` :math:`\\log p_c = x_c - \\mathrm{lse}` (``-inf`` where :math:`x_c = -\\infty`)."""
    return self.x - self.lse[..., None]

  def one_hot(self) -> jax.Array:
    """``[..., C]`` the target distribution: one-hot of integer labels, or the probabilities."""
    if not self.integer:
      return self.labels
    return jax.nn.one_hot(self.labels, self.num_classes, dtype=self.x.dtype)


def prepare(
  fn: str,
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  axis: int,
  weight: jax.typing.ArrayLike | None,
  ignore_index: int | None,
  reduction: str,
  where: jax.typing.ArrayLike | None,
) -> Prepared:
  """Checks the shared arguments (naming the bad one) and returns the :class:`Prepared` inputs.

  Args:
    fn: the public function's name, for error messages.
    logits: ``[..., C, ...]`` float logits, classes on ``axis``.
    labels: integer class ids of ``logits.shape`` without ``axis``, or float probabilities of
      ``logits.shape``.
    axis: the class axis.
    weight: ``[C]`` class weights or None.
    ignore_index: integer label value that counts for nothing; None: none.
    reduction: 'none', 'sum' or 'mean' (only checked here).
    where: bool mask broadcastable to the batch shape, or None.
  """
  inputs = _inputs.parse_inputs(
    fn,
    logits,
    labels,
    axis=axis,
    weight=weight,
    ignore_index=ignore_index,
    where=where,
    reduction=reduction,
  )
  dtype, valid = inputs.dtype, inputs.valid
  if inputs.integer:
    labels = inputs.safe_labels
    target_mass = inputs.target_weight
  else:
    labels = jnp.where(valid[..., None], inputs.labels.astype(dtype), 0)
    target_mass = jnp.ones(valid.shape, dtype)
    if inputs.weight is not None:
      target_mass = jnp.sum(labels * ce.along_classes(inputs.weight, labels.ndim), axis=-1)
  # Invalid rows become zeros so that nothing in them (say, a row of -inf) reaches the gradient.
  x = jnp.where(valid[..., None], inputs.logits.astype(dtype), 0)
  lse = ce.finite_logsumexp(x)
  return Prepared(
    x,
    lse,
    labels,
    inputs.integer,
    inputs.weight,
    target_mass,
    inputs.example_weight,
    valid,
    inputs.bad,
  )


def expected_target_loss(
  prep: Prepared,
  per_class: Callable[[jax.Array], jax.Array],
  *,
  class_factor: jax.Array | None = None,
) -> jax.Array:
  """:math:`w_y a_y f(\\log p_y)` for integer labels, :math:`\\sum_c w_c a_c q_c f(\\log p_c)` else.

  Args:
    prep: prepared inputs.
    per_class: elementwise :math:`f`, applied to log-probabilities (``<= 0``).
    class_factor: ``[C]`` extra per-class factor :math:`a` that is not part of
      :math:`\\omega_i` (focal loss's :math:`\\alpha`), or None.

  Returns:
    ``[...]`` per-example loss before masking. Classes with zero target weight contribute exactly
    0 (also where :math:`\\log p_c = -\\infty`), with a zero gradient.
  """
  if prep.integer:
    target_logit = jnp.take_along_axis(prep.x, prep.labels[..., None], axis=-1)[..., 0]
    loss = prep.target_mass * per_class(target_logit - prep.lse)
    return loss if class_factor is None else loss * class_factor[prep.labels]
  b = prep.labels
  if prep.class_weight is not None:
    b = b * jnp.broadcast_to(prep.class_weight, b.shape)
  if class_factor is not None:
    b = b * jnp.broadcast_to(class_factor, b.shape)
  used = b != 0
  log_p = jnp.where(used, prep.log_probs(), 0)
  return jnp.sum(jnp.where(used, b * per_class(log_p), 0), axis=-1)


def one_minus_p(log_p: jax.Array) -> jax.Array:
  """:math:`1 - p = -\\mathrm{expm1}(\\log p)`, accurate where :math:`p \\to 1`."""
  return -jnp.expm1(log_p)


def finish(fn: str, prep: Prepared, loss: jax.Array, reduction: str) -> jax.Array:
  """Zeroes invalid rows, marks out-of-range labels NaN and applies the shared reduction."""
  loss = jnp.where(prep.valid, loss, 0)
  loss = jnp.where(prep.bad, jnp.nan, loss)
  return _reduction.reduce_loss(loss, prep.example_weight, reduction, fn=fn)


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
