r"""Cross-entropy variants for class imbalance, noisy labels and calibration (public functions).

Each variant replaces cross-entropy's per-class term :math:`-\log p_c` by its own
:math:`f(p_c)`, with :math:`p = \mathrm{softmax}(x)` over the class axis, and shares
:func:`xent_jax.cross_entropy`'s conventions:

* integer labels :math:`y`: :math:`\ell_i = w_{y_i} f(p_{i,y_i})`; probability labels :math:`q`:
  :math:`\ell_i = \sum_c w_c q_{ic} f(p_{ic})` (the expected loss under the target);
* example weight :math:`\omega_i = w_{y_i}\,\mathrm{valid}_i` (integer labels) or
  :math:`\mathrm{valid}_i` (probability labels); rows with ``labels == ignore_index`` or
  ``where`` False give 0; 'mean' is :math:`\sum_i \ell_i / \sum_i \omega_i` (0 if that is 0);
* half-precision logits are computed in float32; :math:`1-p` is :math:`-\mathrm{expm1}(\log p)`,
  so losses and gradients stay finite at logits of :math:`\pm 100` and with :math:`-\infty` on
  classes the target does not use;
* ``label_smoothing`` :math:`\epsilon` replaces the target by :math:`(1-\epsilon)q + \epsilon/C`
  (PyTorch's convention), so an integer label becomes ``on`` on :math:`y` and ``off`` elsewhere.

Each variant is a head of the row-statistics engine (:mod:`xent_jax.core.heads`): its
``*_head(...)`` function gives the head, which the public function evaluates on logits and
:func:`xent_jax.get_loss` also evaluates on a fused linear head or vocabulary shards. With integer
labels and no smoothing a variant needs only the label's log-probability per row, so it costs what
cross-entropy costs and keeps only per-row residuals.

The conventions' arguments, in every function below:

  axis: the class axis of ``logits``.
  weight: ``[C]`` class weights :math:`w` (constants), or None.
  ignore_index: integer labels equal to it count for nothing; None: none is ignored. Other labels
    outside ``[0, C)`` give NaN for their example.
  reduction: 'none' (per-example, ``logits.shape`` without ``axis``), 'sum' or 'mean'.
  where: bool mask over examples, broadcastable to ``logits.shape`` without ``axis``.
  label_smoothing: :math:`\epsilon \in [0, 1]` (default 0).

Traced hyper-parameters: every numeric hyper-parameter of the heads (``label_smoothing``, focal's
``gamma`` and ``alpha``, poly-1's ``epsilon``, symmetric's ``alpha``, ``beta`` and ``log_clip``,
:math:`L_q`'s ``q`` and ``k``, the confidence penalty's ``beta``) may be a traced scalar under
``jit``, ``vmap``, ``grad`` and ``jvp``, with the values and gradients of the concrete call, and
so may the bi-tempered loss's ``t1``, ``t2`` and ``label_smoothing`` (its own kernel; no derivative
wrt ``t1`` or ``t2``, see there); Taylor's ``order`` and the bi-tempered ``num_iters`` are a
polynomial's degree and a loop's length and must be Python numbers (``TypeError``). A traced
value cannot be checked at trace time: out of range, it makes the loss NaN (every element, with
NaN gradients) instead of raising.
"""

import math
from collections.abc import Callable
from typing import Unpack

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from xent_jax.core import checks, engine, heads
from xent_jax.core.deprecation import renamed_function, renamed_keyword
from xent_jax.core.frontend import head_loss
from xent_jax.core.inputs import parse_inputs
from xent_jax.core.options import LossOptions, OptionKwargs, takes_options
from xent_jax.core.reduction import reduce_loss
from xent_jax.losses import bitempered


@jax.custom_jvp
def _above(x: jax.Array, low) -> jax.Array:
  """:math:`\\max(x, \\text{low})` whose derivative is 1 above ``low`` and 0 below (1/2 at it),
  written with ``sign`` instead of a ``select`` so that XLA's CPU backend fuses it into
  reductions; ``low`` (a traced one) gets the complementary derivative."""
  return jnp.maximum(x, low)


def _above_jvp(primals, tangents):
  x, low = primals
  t_x, t_low = tangents
  side = 0.5 * (1.0 + jnp.sign(x - low))
  tangent = jnp.zeros_like(x) if isinstance(t_x, SymbolicZero) else t_x * side
  if not isinstance(t_low, SymbolicZero):
    tangent = tangent + t_low * (1.0 - side)
  return _above(x, low), tangent


_above.defjvp(_above_jvp, symbolic_zeros=True)


def _static(*hparams) -> bool:
  """Whether hyper-parameters are Python numbers (a :class:`~xent_jax.core.engine.PowerSeries` is
  static)."""
  return all(isinstance(h, (int, float, np.number)) for h in hparams)


def _focal_modulator(log_p: jax.Array, gamma) -> jax.Array:
  """:math:`(1-p)^\\gamma` with a finite gradient at :math:`p = 1` for every :math:`\\gamma \\ge 0`.

  :math:`1-p` is floored at the smallest normal number, where :math:`(1-p)^\\gamma` is within
  rounding of its limit :math:`0^\\gamma` (1 for :math:`\\gamma = 0`, else 0), and the floor
  passes the gradient through unchanged: :math:`\\gamma (1-p)^{\\gamma-1}` stays finite, and the
  logit gradient it changes is of order :math:`(1-p)^{1+\\gamma}`.
  """
  u = _floor_tiny(one_minus_p(log_p))
  # A constant integral gamma (2 in the paper) is a few multiplications, exact, and so is its
  # derivative; the general power is exp(gamma log u), two transcendentals, its derivative two
  # more. A traced gamma (differentiated, say) takes the general power.
  integral = _static(gamma) and float(gamma).is_integer()
  return lax.integer_pow(u, int(gamma)) if integral else u**gamma


@jax.custom_jvp
def _floor_tiny(u: jax.Array) -> jax.Array:
  """:math:`\\max(u, \\text{tiny})` with the identity as its derivative."""
  return jnp.maximum(u, jnp.finfo(u.dtype).tiny)


_floor_tiny.defjvp(lambda primals, tangents: (_floor_tiny(primals[0]), tangents[0]))


def _dense(fn, head, logits, labels, axis, class_weight, where, options, in_range) -> jax.Array:
  """``head`` on the logits through the shared front end, uniform smoothing; NaN unless the
  flags ``in_range`` of the hyper-parameters' checks hold
  (:func:`xent_jax.core.checks.nan_unless`)."""
  checked = LossOptions.checked(fn, **options)
  loss, _ = head_loss(
    fn, head, logits, labels, checked, axis=axis, class_weight=class_weight, where=where
  )
  return checks.nan_unless(loss, *in_range)


def one_minus_p(log_p: jax.Array) -> jax.Array:
  """:math:`1 - p = -\\mathrm{expm1}(\\log p)`, accurate where :math:`p \\to 1`."""
  return -jnp.expm1(log_p)


def focal_head(gamma: float, alpha: jax.Array | None = None) -> heads.Head:
  """Focal loss's head: :math:`f = -(1-p)^\\gamma\\log p`, class factor :math:`\\alpha`."""
  return heads.Head(
    lambda log_p: -_focal_modulator(log_p, gamma) * log_p,
    class_factor=alpha,
    traced=checks.is_traced(gamma),
  )


def poly1_head(epsilon: float) -> heads.Head:
  """Poly-1's head: :math:`f = -\\log p + \\epsilon(1-p)`, the power series
  :math:`-\\log p + \\epsilon - \\epsilon p`."""
  series = None
  if _static(epsilon):
    series = engine.PowerSeries(-1.0, float(epsilon), ((1.0, -float(epsilon)),))
  return heads.Head(
    lambda log_p: epsilon * one_minus_p(log_p) - log_p,
    class_series=series,
    traced=checks.is_traced(epsilon),
  )


# Below this q the power sum's form of L_q, (sum_c 1 - sum_c p_c^q) / q, loses more than 30 ulp
# to cancellation (at V = 2; see generalized_head).
_MIN_SERIES_Q = 0.1


def generalized_head(q: float) -> heads.Head:
  """:math:`L_q`'s head: :math:`f = -\\mathrm{expm1}(q\\log p)/q = (1 - p^q)/q`.

  With unit weights the kernel sums it as :math:`(V - \\sum_c p_c^q)/q`, one pass where
  :math:`f` and :math:`f'` need two; its relative rounding error is at most
  :math:`\\epsilon_{\\text{mach}}(1 + V^{-q})/(1 - V^{-q})` (as :math:`\\sum_c p_c^q \\le
  V^{1-q}`), 30 ulp for :math:`q \\ge 0.1` at any :math:`V \\ge 2`; smaller :math:`q` is summed
  elementwise."""
  series = None
  if _static(q) and q >= _MIN_SERIES_Q:
    series = engine.PowerSeries(0.0, 1.0 / q, ((float(q), -1.0 / q),))
  return heads.Head(
    lambda log_p: -jnp.expm1(q * log_p) / q, class_series=series, traced=checks.is_traced(q)
  )


def truncated_generalized_head(q: float, k: float) -> heads.Head:
  """Truncated :math:`L_q`'s head: :math:`f = L_q(\\max(p, k))`."""
  if checks.is_traced(k):
    log_k = jnp.where(k > 0, jnp.log(jnp.where(k > 0, k, 1.0)), -jnp.inf)
  else:
    log_k = math.log(k) if k > 0 else -math.inf
  return heads.Head(
    lambda log_p: -jnp.expm1(q * _above(log_p, log_k)) / q, traced=checks.any_traced(q, k)
  )


# Taylor cross-entropy's power series takes order - 1 passes over the logits with unit weights
# (S_1 = 1 is known), against two for f and f': fewer at order 2 only.
_MAX_SERIES_ORDER = 2


def _taylor_series(order: int) -> engine.PowerSeries:
  """:math:`\\sum_{n=1}^{t}(1-p)^n/n = \\sum_n 1/n + \\sum_{j=1}^{t} b_j p^j` with
  :math:`b_j = (-1)^j \\sum_{n=j}^{t}\\binom{n}{j}/n` (binomial expansion)."""
  constant = sum(1.0 / n for n in range(1, order + 1))
  powers = tuple(
    (float(j), (-1.0) ** j * sum(math.comb(n, j) / n for n in range(j, order + 1)))
    for j in range(1, order + 1)
  )
  return engine.PowerSeries(0.0, constant, powers)


def taylor_head(order: int) -> heads.Head:
  """Taylor cross-entropy's head: :math:`f = \\sum_{n=1}^{t} (1-p)^n/n` (Horner's scheme; a
  power series of :math:`p` for the kernel's class sums at order 2)."""

  def per_class(log_p):
    u = one_minus_p(log_p)
    series = jnp.full_like(u, 1.0 / order)
    for n in range(order - 1, 0, -1):
      series = 1.0 / n + u * series
    return u * series

  return heads.Head(
    per_class, class_series=_taylor_series(order) if order <= _MAX_SERIES_ORDER else None
  )


def _clip_log(v, log_clip):
  """:math:`\\max(\\log v, A)`, :math:`A` at :math:`v = 0`; traced if either is."""
  if checks.any_traced(v, log_clip):
    safe = jnp.where(v > 0, v, 1.0)
    return jnp.where(v > 0, jnp.maximum(jnp.log(safe), log_clip), log_clip)
  return max(math.log(v), log_clip) if v > 0 else log_clip


def symmetric_head(alpha: float, beta: float, log_clip: float) -> heads.Head:
  """Symmetric cross-entropy's head: :math:`f = -\\alpha\\log p` plus the reverse term
  :math:`-\\beta\\,(\\textstyle\\sum_c w_c q_c)\\sum_c p_c\\max(\\log q_c, A)`, a function of
  :math:`p_y` for a (smoothed) one-hot target and a second class sum for probability labels."""

  def row_term(stats, target):
    if target.integer:
      on, off = _clip_log(target.on, log_clip), _clip_log(target.off, log_clip)
      p_y = jnp.exp(stats.log_p_target)
      reverse = -(off + p_y * (on - off))
    else:
      reverse = -stats.class_sums[1]
    return beta * target.mass * reverse

  clip_at = jnp.exp(log_clip) if checks.is_traced(log_clip) else math.exp(log_clip)

  def extra_sums(target):
    clipped = lambda q: jnp.where(q > clip_at, jnp.log(jnp.where(q > 0, q, 1)), log_clip)
    return (engine.ClassSum(jnp.exp, (target.labels,), lambda q: clipped(target.smooth(q))),)

  reverse = not checks.is_static_zero(beta)
  return heads.Head(
    lambda log_p: -alpha * log_p,
    row_term if reverse else None,
    extra_sums=extra_sums if reverse else None,
    class_series=(engine.PowerSeries(-float(alpha)) if _static(alpha) else None),
    traced=checks.any_traced(alpha, log_clip),
  )


def confidence_penalty_head(beta: float) -> heads.Head:
  """The confidence penalty's head: :math:`f = -\\log p`, minus
  :math:`\\beta\\,(\\textstyle\\sum_c w_c q_c)\\,H(p)` from the entropy statistic."""
  if checks.is_static_zero(beta):
    return heads.Head(heads.neg_log, class_series=engine.PowerSeries(-1.0))
  return heads.Head(
    heads.neg_log,
    lambda stats, target: -beta * target.mass * stats.entropy,
    entropy=True,
    class_series=engine.PowerSeries(-1.0),
  )


@renamed_keyword("weight", "class_weight")
@takes_options(OptionKwargs)
def softmax_focal_loss(
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  gamma: float = 2.0,
  alpha: jax.typing.ArrayLike | None = None,
  axis: int = -1,
  class_weight: jax.typing.ArrayLike | None = None,
  where: jax.typing.ArrayLike | None = None,
  **options: Unpack[OptionKwargs],
) -> jax.Array:
  r"""Softmax focal loss: cross-entropy down-weighted on well-classified examples.

  .. math::
     f(p_y) = -\alpha_y\,(1 - p_y)^{\gamma}\,\log p_y

  :math:`\gamma = 0` with ``alpha=None`` is cross-entropy. :math:`\alpha` balances classes like
  ``class_weight`` but, as in the paper, is not part of the 'mean' denominator :math:`\omega`.

  Args:
    logits: ``[..., C, ...]`` float logits.
    labels: integer class ids (``logits.shape`` without ``axis``) or probabilities
      (``logits.shape``).
    gamma: focusing parameter :math:`\gamma \ge 0` (default 2, the paper's choice).
    alpha: per-class balance :math:`\alpha`, ``[C]`` or a scalar, :math:`\ge 0`; None: 1.
    label_smoothing, axis, class_weight, ignore_index, reduction, where: as in
      :func:`xent_jax.cross_entropy` (uniform smoothing).

  Returns:
    The reduced loss, float32 (float64 for float64 logits); per-example for 'none'.

  Example:
    >>> import jax.numpy as jnp, xent_jax
    >>> logits = jnp.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    >>> round(float(xent_jax.softmax_focal_loss(logits, jnp.array([0, 1]), gamma=2.0)), 4)
    1.3061

  References:
    Lin, Goyal, Girshick, He, Dollár, "Focal Loss for Dense Object Detection", ICCV 2017.
  """
  fn = "softmax_focal_loss"
  in_range = (
    checks.check_in_range(fn, "gamma", gamma, 0.0, math.inf),
    checks.check_nonnegative_array(fn, "alpha", alpha),
  )
  if alpha is not None:
    num_classes = np.shape(logits)[checks.canonical_axis(fn, axis, np.ndim(logits))]
    if np.shape(alpha) not in ((), (num_classes,)):
      raise ValueError(
        f"{fn}: `alpha` must be a scalar or of shape ({num_classes},), got shape {np.shape(alpha)}."
      )
    alpha = jnp.broadcast_to(jnp.asarray(alpha, jnp.result_type(float)), (num_classes,))
  return _dense(
    fn,
    focal_head(gamma, alpha),
    logits,
    labels,
    axis,
    class_weight,
    where,
    options,
    in_range,
  )


@renamed_keyword("weight", "class_weight")
@takes_options(OptionKwargs)
def poly1_cross_entropy(
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  epsilon: float = 2.0,
  axis: int = -1,
  class_weight: jax.typing.ArrayLike | None = None,
  where: jax.typing.ArrayLike | None = None,
  **options: Unpack[OptionKwargs],
) -> jax.Array:
  r"""Poly-1 loss: cross-entropy plus :math:`\epsilon` times the first polynomial term.

  .. math::
     f(p_y) = -\log p_y + \epsilon\,(1 - p_y)

  :math:`\epsilon = 0` is cross-entropy. For probability labels this is
  :math:`\mathrm{CE}(q, p) + \epsilon(1 - \sum_c q_c p_c)`, the same as
  :func:`xent_jax.poly_loss_cross_entropy` (optax's semantics) without ``class_weight``.

  Args:
    logits: ``[..., C, ...]`` float logits.
    labels: integer class ids or probabilities, as in :func:`xent_jax.cross_entropy`.
    epsilon: :math:`\epsilon \ge -1` (default 2, as optax; :math:`\epsilon \ge -1` keeps the loss
      decreasing in :math:`p_y`).
    label_smoothing, axis, class_weight, ignore_index, reduction, where: as in
      :func:`xent_jax.cross_entropy` (uniform smoothing).

  Returns:
    The reduced loss, float32 (float64 for float64 logits); per-example for 'none'.

  Example:
    >>> import jax.numpy as jnp, xent_jax
    >>> logits = jnp.array([[2.0, 0.5, -1.0]])
    >>> round(float(xent_jax.poly1_cross_entropy(logits, jnp.array([0]), epsilon=1.0)), 4)
    0.4557

  References:
    Leng et al., "PolyLoss: A Polynomial Expansion Perspective of Classification Loss
    Functions", ICLR 2022.
  """
  fn = "poly1_cross_entropy"
  in_range = (checks.check_in_range(fn, "epsilon", epsilon, -1.0, math.inf),)
  return _dense(
    fn, poly1_head(epsilon), logits, labels, axis, class_weight, where, options, in_range
  )


@renamed_keyword("weight", "class_weight")
@takes_options(OptionKwargs)
def symmetric_cross_entropy(
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  alpha: float = 0.1,
  beta: float = 1.0,
  log_clip: float = -4.0,
  axis: int = -1,
  class_weight: jax.typing.ArrayLike | None = None,
  where: jax.typing.ArrayLike | None = None,
  **options: Unpack[OptionKwargs],
) -> jax.Array:
  r"""Symmetric cross-entropy: cross-entropy plus reverse cross-entropy with a clipped log.

  .. math::
     \ell = \alpha\,\mathrm{CE}(q, p) + \beta\,\mathrm{RCE}, \qquad
     \mathrm{RCE} = -\sum_c p_c \max(\log q_c, A)

  For a one-hot target :math:`\mathrm{RCE} = -A\,(1 - p_y)`. Probability labels use the formula
  as written, scaled by :math:`\sum_c w_c q_c` when ``class_weight`` is given. :math:`\alpha = 1,
  \beta = 0` is cross-entropy.

  Args:
    logits: ``[..., C, ...]`` float logits.
    labels: integer class ids or probabilities, as in :func:`xent_jax.cross_entropy`.
    alpha: weight :math:`\alpha \ge 0` of cross-entropy (default 0.1, the paper's CIFAR-10 value).
    beta: weight :math:`\beta \ge 0` of reverse cross-entropy (default 1.0).
    log_clip: :math:`A < 0`, the value of :math:`\log 0` (default -4, the paper's).
    label_smoothing, axis, class_weight, ignore_index, reduction, where: as in
      :func:`xent_jax.cross_entropy` (uniform smoothing).

  Returns:
    The reduced loss, float32 (float64 for float64 logits); per-example for 'none'.

  Example:
    >>> import jax.numpy as jnp, xent_jax
    >>> logits = jnp.array([[2.0, 0.5, -1.0]])
    >>> round(float(xent_jax.symmetric_cross_entropy(logits, jnp.array([0]))), 4)
    0.8817

  References:
    Wang, Ma, Chen, Luo, Yi, Bailey, "Symmetric Cross Entropy for Robust Learning with Noisy
    Labels", ICCV 2019.
  """
  fn = "symmetric_cross_entropy"
  in_range = (
    checks.check_in_range(fn, "alpha", alpha, 0.0, math.inf),
    checks.check_in_range(fn, "beta", beta, 0.0, math.inf),
    checks.check_in_range(fn, "log_clip", log_clip, -math.inf, 0.0, low_open=True, high_open=True),
  )
  head = symmetric_head(alpha, beta, log_clip)
  return _dense(fn, head, logits, labels, axis, class_weight, where, options, in_range)


@renamed_keyword("weight", "class_weight")
@takes_options(OptionKwargs)
def generalized_cross_entropy(
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  q: float = 0.7,
  axis: int = -1,
  class_weight: jax.typing.ArrayLike | None = None,
  where: jax.typing.ArrayLike | None = None,
  **options: Unpack[OptionKwargs],
) -> jax.Array:
  r"""Generalized cross-entropy :math:`L_q`: between cross-entropy and mean absolute error.

  .. math::
     f(p_y) = \frac{1 - p_y^{\,q}}{q} = -\frac{\mathrm{expm1}(q \log p_y)}{q}

  :math:`q \to 0` is cross-entropy; :math:`q = 1` is :math:`1 - p_y` (MAE up to a factor 2).

  Args:
    logits: ``[..., C, ...]`` float logits.
    labels: integer class ids or probabilities, as in :func:`xent_jax.cross_entropy`.
    q: :math:`q \in (0, 1]` (default 0.7, the paper's).
    label_smoothing, axis, class_weight, ignore_index, reduction, where: as in
      :func:`xent_jax.cross_entropy` (uniform smoothing).

  Returns:
    The reduced loss, float32 (float64 for float64 logits); per-example for 'none'.

  Example:
    >>> import jax.numpy as jnp, xent_jax
    >>> logits = jnp.array([[2.0, 0.5, -1.0]])
    >>> round(float(xent_jax.generalized_cross_entropy(logits, jnp.array([0]), q=0.7)), 4)
    0.222

  References:
    Zhang, Sabuncu, "Generalized Cross Entropy Loss for Training Deep Neural Networks with Noisy
    Labels", NeurIPS 2018.
  """
  fn = "generalized_cross_entropy"
  in_range = (checks.check_in_range(fn, "q", q, 0.0, 1.0, low_open=True),)
  return _dense(
    fn, generalized_head(q), logits, labels, axis, class_weight, where, options, in_range
  )


@renamed_keyword("weight", "class_weight")
@takes_options(OptionKwargs)
def truncated_generalized_cross_entropy(
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  q: float = 0.7,
  k: float = 0.5,
  axis: int = -1,
  class_weight: jax.typing.ArrayLike | None = None,
  where: jax.typing.ArrayLike | None = None,
  **options: Unpack[OptionKwargs],
) -> jax.Array:
  r"""Truncated :math:`L_q` loss: constant (no gradient) once :math:`p_y \le k`.

  .. math::
     f(p_y) = \begin{cases} L_q(p_y) & p_y > k \\ L_q(k) & p_y \le k \end{cases}
     = L_q(\max(p_y, k)), \qquad L_q(p) = \frac{1 - p^{\,q}}{q}

  :math:`k = 0` is :func:`generalized_cross_entropy`. (The paper prunes examples below
  :math:`k` during training; this is the per-example loss it prunes with.)

  Args:
    logits: ``[..., C, ...]`` float logits.
    labels: integer class ids or probabilities, as in :func:`xent_jax.cross_entropy`.
    q: :math:`q \in (0, 1]` (default 0.7, the paper's).
    k: truncation threshold :math:`k \in [0, 1)` (default 0.5, the paper's).
    label_smoothing, axis, class_weight, ignore_index, reduction, where: as in
      :func:`xent_jax.cross_entropy` (uniform smoothing).

  Returns:
    The reduced loss, float32 (float64 for float64 logits); per-example for 'none'.

  Example:
    >>> import jax.numpy as jnp, xent_jax
    >>> logits = jnp.array([[-1.0, 0.5, 2.0]])
    >>> round(float(xent_jax.truncated_generalized_cross_entropy(logits, jnp.array([0]))), 4)
    0.5492

  References:
    Zhang, Sabuncu, "Generalized Cross Entropy Loss for Training Deep Neural Networks with Noisy
    Labels", NeurIPS 2018.
  """
  fn = "truncated_generalized_cross_entropy"
  in_range = (
    checks.check_in_range(fn, "q", q, 0.0, 1.0, low_open=True),
    checks.check_in_range(fn, "k", k, 0.0, 1.0, high_open=True),
  )
  head = truncated_generalized_head(q, k)
  return _dense(fn, head, logits, labels, axis, class_weight, where, options, in_range)


@renamed_keyword("weight", "class_weight")
@takes_options(OptionKwargs)
def taylor_cross_entropy(
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  order: int = 2,
  axis: int = -1,
  class_weight: jax.typing.ArrayLike | None = None,
  where: jax.typing.ArrayLike | None = None,
  **options: Unpack[OptionKwargs],
) -> jax.Array:
  r"""Taylor cross-entropy: the order-:math:`t` Taylor series of :math:`-\log p_y` around 1.

  .. math::
     f(p_y) = \sum_{n=1}^{t} \frac{(1 - p_y)^n}{n}

  :math:`t = 1` is :math:`1 - p_y` (MAE up to a factor 2); :math:`t \to \infty` is cross-entropy.
  Bounded by :math:`\sum_{n \le t} 1/n`, also where :math:`p_y = 0`.

  Args:
    logits: ``[..., C, ...]`` float logits.
    labels: integer class ids or probabilities, as in :func:`xent_jax.cross_entropy`.
    order: :math:`t \ge 1`, a Python int (default 2, the paper's choice for CIFAR-10).
    label_smoothing, axis, class_weight, ignore_index, reduction, where: as in
      :func:`xent_jax.cross_entropy` (uniform smoothing).

  Returns:
    The reduced loss, float32 (float64 for float64 logits); per-example for 'none'.

  Example:
    >>> import jax.numpy as jnp, xent_jax
    >>> logits = jnp.array([[2.0, 0.5, -1.0]])
    >>> round(float(xent_jax.taylor_cross_entropy(logits, jnp.array([0]), order=2)), 4)
    0.2374

  References:
    Feng, Shu, Lin, Lv, Li, An, "Can Cross Entropy Loss Be Robust to Label Noise?", IJCAI 2020.
  """
  fn = "taylor_cross_entropy"
  if not isinstance(order, (int, np.integer)) or isinstance(order, bool):
    raise TypeError(f"{fn}: `order` must be a Python int, got {order!r}.")
  checks.check_in_range(fn, "order", order, 1, math.inf)
  return _dense(
    fn,
    taylor_head(int(order)),
    logits,
    labels,
    axis,
    class_weight,
    where,
    options,
    (),
  )


@renamed_keyword("weight", "class_weight")
@takes_options(OptionKwargs)
def confidence_penalty_cross_entropy(
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  beta: float = 0.1,
  axis: int = -1,
  class_weight: jax.typing.ArrayLike | None = None,
  where: jax.typing.ArrayLike | None = None,
  **options: Unpack[OptionKwargs],
) -> jax.Array:
  r"""Cross-entropy with a confidence penalty: rewards high-entropy predictions.

  .. math::
     \ell = \mathrm{CE}(q, p) - \beta\,H(p), \qquad H(p) = -\sum_c p_c \log p_c

  The entropy term is scaled by the target's weight (:math:`w_y`, or :math:`\sum_c w_c q_c` when
  probability labels come with ``class_weight``). :math:`\beta = 0` is cross-entropy. Classes with
  :math:`x_c = -\infty` add nothing to :math:`H` (:math:`0 \log 0 = 0`).

  Args:
    logits: ``[..., C, ...]`` float logits.
    labels: integer class ids or probabilities, as in :func:`xent_jax.cross_entropy`.
    beta: penalty strength :math:`\beta \ge 0` (default 0.1).
    label_smoothing, axis, class_weight, ignore_index, reduction, where: as in
      :func:`xent_jax.cross_entropy` (uniform smoothing).

  Returns:
    The reduced loss, float32 (float64 for float64 logits); per-example for 'none'.

  Example:
    >>> import jax.numpy as jnp, xent_jax
    >>> logits = jnp.array([[2.0, 0.5, -1.0]])
    >>> round(float(xent_jax.confidence_penalty_cross_entropy(logits, jnp.array([0]))), 4)
    0.1792

  References:
    Pereyra, Tucker, Chorowski, Kaiser, Hinton, "Regularizing Neural Networks by Penalizing
    Confident Output Distributions", ICLR workshop 2017.
  """
  fn = "confidence_penalty_cross_entropy"
  in_range = (checks.check_in_range(fn, "beta", beta, 0.0, math.inf),)
  head = confidence_penalty_head(beta)
  return _dense(fn, head, logits, labels, axis, class_weight, where, options, in_range)


@renamed_keyword("weight", "class_weight")
@takes_options(OptionKwargs)
def bi_tempered_logistic_loss(
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  t1: float = 0.8,
  t2: float = 1.2,
  num_iters: int = 5,
  axis: int = -1,
  class_weight: jax.typing.ArrayLike | None = None,
  where: jax.typing.ArrayLike | None = None,
  **options: Unpack[OptionKwargs],
) -> jax.Array:
  r"""Bi-tempered logistic loss: a Bregman divergence with a tempered log and softmax.

  .. math::
     \ell = \sum_c \Big[ q_c \big(\log_{t_1} q_c - \log_{t_1} p_c\big)
        - \frac{q_c^{2-t_1} - p_c^{2-t_1}}{2-t_1} \Big], \qquad
     p = \exp_{t_2}(x - \lambda(x))

  with :math:`\log_t`, :math:`\exp_t` and the normalization :math:`\lambda` as in this module's
  docstring. :math:`t_1 < 1` bounds the loss (robust to label noise far from the boundary),
  :math:`t_2 > 1` gives the softmax a heavy tail (robust near it). :math:`t_1 = t_2 = 1` is
  cross-entropy (minus the target's entropy, 0 for one-hot targets). Label smoothing follows
  the reference implementation: :math:`q \leftarrow (1 - \frac{K}{K-1}\epsilon)\,q +
  \frac{\epsilon}{K-1}`. With ``class_weight`` the loss is scaled by the target's weight
  (:math:`w_y`, or :math:`\sum_c w_c q_c` for probability labels).

  The gradient is the closed form
  :math:`(p - q) \odot p^{t_2-t_1} - e \sum_c (p_c-q_c)\,p_c^{t_2-t_1}`,
  :math:`e = p^{t_2}/\sum_c p_c^{t_2}`, in reverse and forward mode; ``labels`` get no gradient.
  Between the passes only per-row values are kept (see the module docstring).

  ``t1``, ``t2`` and ``label_smoothing`` may be traced scalars (under ``jit``, ``vmap``, ``grad``
  or ``jvp``, e.g. a ``vmap`` over a grid of temperatures): the kernel then takes formulas valid
  for any value instead of the ones a Python number selects, with the concrete call's values and
  gradients. A traced :math:`t_2` computes all three normalizations (exact softmax, fixed point
  and bisection: ``2 num_iters + 3`` passes over the logits instead of ``num_iters + 1``, or 1)
  and selects one; a traced :math:`t_1` or smoothing takes the row sums that a static value may
  leave out (a few more passes at most). A traced value out of range (:math:`t_1 \notin [0, 1]`,
  :math:`t_2 \le 0`, :math:`\epsilon \notin [0, 1)`, or :math:`\epsilon \ne 0` over one class)
  cannot be checked at trace time: it makes the loss NaN (every element, with NaN gradients)
  instead of raising; concrete values are checked as usual. The derivative wrt the smoothing is
  exact (:math:`\partial\ell/\partial q_c = \log_{t_1} q_c - \log_{t_1} p_c`, whatever
  ``num_iters``; :math:`-\infty` at :math:`\epsilon = 0` for :math:`t_1 = 1`); one wrt
  :math:`t_1` or :math:`t_2` raises ``NotImplementedError`` naming it (pass the value through
  ``jax.lax.stop_gradient``). ``num_iters`` stays a Python int.

  Args:
    logits: ``[..., C, ...]`` float logits.
    labels: integer class ids or probabilities, as in :func:`xent_jax.cross_entropy`.
    t1: temperature :math:`t_1 \in [0, 1]` of the logarithm (default 0.8), a Python float or a
      traced scalar.
    t2: temperature :math:`t_2 > 0` of the softmax (default 1.2), a Python float or a traced
      scalar; :math:`t_2 < 1` gives a finite-support softmax (found by bisection, so use
      ``num_iters`` of 20 or more).
    label_smoothing: :math:`\epsilon \in [0, 1)` (default 0), a Python float or a traced scalar.
    num_iters: iterations of the normalization (default 5, as the reference), a Python int;
      each is one pass over the logits.
    axis, class_weight, ignore_index, reduction, where: as in :func:`xent_jax.cross_entropy`.

  Returns:
    The reduced loss, float32 (float64 for float64 logits); per-example for 'none'.

  Example:
    >>> import jax.numpy as jnp, xent_jax
    >>> logits = jnp.array([[2.0, 0.5, -1.0]])
    >>> round(float(xent_jax.bi_tempered_logistic_loss(logits, jnp.array([0]))), 4)
    0.2131

  References:
    Amid, Warmuth, Anil, Koren, "Robust Bi-Tempered Logistic Loss Based on Bregman Divergences",
    NeurIPS 2019; reference code github.com/google/bi-tempered-loss.
  """
  fn = "bi_tempered_logistic_loss"
  checked = LossOptions.checked(fn, **options)
  in_range = bitempered.check_hparams(fn, t1, t2, checked.label_smoothing, num_iters)
  ignore = checked.ignore_index
  inputs = parse_inputs(
    fn, logits, labels, axis=axis, class_weight=class_weight, where=where, ignore_index=ignore
  )
  smoothable = bitempered.check_smoothable(fn, checked.label_smoothing, inputs.num_classes)
  cfg = bitempered.loss_config(t1, t2, checked.label_smoothing, num_iters, inputs.num_classes)
  loss, example_weight = bitempered.weighted_rows(
    inputs.logits, inputs.labels, inputs.valid, inputs.weight, cfg
  )
  loss = reduce_loss(loss, example_weight, checked.reduction, fn=fn)
  return checks.nan_unless(loss, *in_range, smoothable)


def _alpha_vector(alpha, num_classes: int):
  return (
    None
    if alpha is None
    else jnp.broadcast_to(jnp.asarray(alpha, jnp.result_type(float)), (num_classes,))
  )


# Each variant's head from its hyper-parameters (label smoothing aside) and the class count, for
# the executors that take a head rather than logits (vocabulary shards).
HEAD_FACTORIES: dict[Callable[..., jax.Array], Callable[..., heads.Head]] = {
  softmax_focal_loss: lambda num_classes, gamma, alpha: focal_head(
    gamma, _alpha_vector(alpha, num_classes)
  ),
  poly1_cross_entropy: lambda num_classes, epsilon: poly1_head(epsilon),
  symmetric_cross_entropy: lambda num_classes, alpha, beta, log_clip: symmetric_head(
    alpha, beta, log_clip
  ),
  generalized_cross_entropy: lambda num_classes, q: generalized_head(q),
  truncated_generalized_cross_entropy: lambda num_classes, q, k: truncated_generalized_head(q, k),
  taylor_cross_entropy: lambda num_classes, order: taylor_head(int(order)),
  confidence_penalty_cross_entropy: lambda num_classes, beta: confidence_penalty_head(beta),
}


# Former name (optax's focal loss is the sigmoid one, `optax.sigmoid_focal_loss`).
focal_loss = renamed_function(softmax_focal_loss, "focal_loss")
