r"""Bi-tempered logistic loss (Amid et al. 2019): a bounded loss on a heavy-tailed softmax.

With the tempered logarithm and exponential

.. math::
   \log_t u = \frac{u^{1-t} - 1}{1 - t}, \qquad
   \exp_t u = [1 + (1-t)\,u]_+^{1/(1-t)} \qquad (\log_1 = \log,\ \exp_1 = \exp),

the tempered softmax is :math:`p_c = \exp_{t_2}(x_c - \lambda(x))` with the normalization
:math:`\lambda` chosen so that :math:`\sum_c p_c = 1`. It has no closed form for :math:`t_2 \ne 1`:
a fixed-point iteration finds it for :math:`t_2 > 1` and a bisection for :math:`t_2 < 1` (where
:math:`p` has finite support). Autodiff through those iterations is slow and, with a few
iterations, inexact; the gradient here is the paper's closed form instead (a ``custom_vjp``).
"""

import functools
import math

import jax
import jax.numpy as jnp

from xent_jax import _checks
from xent_jax import _cross_entropy as ce
from xent_jax import _variant_inputs as vi


def _log_t(u: jax.Array, t: float) -> jax.Array:
  return jnp.log(u) if t == 1.0 else (u ** (1.0 - t) - 1.0) / (1.0 - t)


def _exp_t(u: jax.Array, t: float) -> jax.Array:
  return jnp.exp(u) if t == 1.0 else jnp.maximum(1.0 + (1.0 - t) * u, 0.0) ** (1.0 / (1.0 - t))


def _normalization_fixed_point(x: jax.Array, t: float, num_iters: int) -> jax.Array:
  """:math:`\\lambda` for :math:`t > 1` by the paper's fixed-point iteration; ``[..., 1]``."""
  mu = jnp.max(x, axis=-1, keepdims=True)
  a0 = x - mu

  def step(_, a):
    partition = jnp.sum(_exp_t(a, t), axis=-1, keepdims=True)
    return a0 * partition ** (1.0 - t)

  a = jax.lax.fori_loop(0, num_iters, step, a0)
  partition = jnp.sum(_exp_t(a, t), axis=-1, keepdims=True)
  return -_log_t(1.0 / partition, t) + mu


def _normalization_bisection(x: jax.Array, t: float, num_iters: int) -> jax.Array:
  """:math:`\\lambda` for :math:`t < 1` by bisection on :math:`\\sum_c p_c = 1`; ``[..., 1]``."""
  mu = jnp.max(x, axis=-1, keepdims=True)
  a0 = x - mu
  support = jnp.sum(a0 > -1.0 / (1.0 - t), axis=-1, keepdims=True).astype(x.dtype)
  lower = jnp.zeros_like(mu)
  upper = -_log_t(1.0 / support, t)

  def step(_, bounds):
    lower, upper = bounds
    middle = (lower + upper) / 2.0
    too_small = jnp.sum(_exp_t(a0 - middle, t), axis=-1, keepdims=True) < 1.0
    return jnp.where(too_small, lower, middle), jnp.where(too_small, middle, upper)

  lower, upper = jax.lax.fori_loop(0, num_iters, step, (lower, upper))
  return (lower + upper) / 2.0 + mu


def _tempered_softmax_last_axis(x: jax.Array, t: float, num_iters: int) -> jax.Array:
  if t == 1.0:
    return jax.nn.softmax(x, axis=-1)
  if t > 1.0:
    normalization = _normalization_fixed_point(x, t, num_iters)
  else:
    normalization = _normalization_bisection(x, t, num_iters)
  return _exp_t(x - normalization, t)


def tempered_softmax(
    logits: jax.typing.ArrayLike, t: float, *, axis: int = -1, num_iters: int = 5
) -> jax.Array:
  r"""Tempered softmax :math:`p_c = \exp_t(x_c - \lambda(x))`, :math:`\sum_c p_c = 1`.

  ``t = 1`` is the softmax; ``t > 1`` has a heavier tail, ``t < 1`` a finite support.

  Args:
    logits: ``[..., C, ...]`` float logits, classes on ``axis``.
    t: temperature :math:`t > 0`, a Python float.
    axis: the class axis.
    num_iters: iterations of the normalization (fixed point for ``t > 1``, bisection for
      ``t < 1``), a Python int.

  Returns:
    Probabilities of ``logits.shape`` (float32, float64 for float64 logits).

  Example:
    >>> import jax.numpy as jnp, xent_jax
    >>> p = xent_jax.tempered_softmax(jnp.array([2.0, 0.5, -1.0]), 1.5, num_iters=30)
    >>> round(float(p.sum()), 4)
    1.0

  References:
    Amid, Warmuth, Anil, Koren, "Robust Bi-Tempered Logistic Loss Based on Bregman Divergences",
    NeurIPS 2019.
  """
  fn = "tempered_softmax"
  _checks.check_floating(fn, "logits", logits)
  vi.check_static_number(fn, "t", t)
  _checks.check_in_range(fn, "t", t, 0.0, math.inf, low_open=True, high_open=True)
  _check_num_iters(fn, num_iters)
  logits = jnp.asarray(logits)
  axis = _checks.canonical_axis(fn, axis, logits.ndim)
  x = jnp.moveaxis(logits, axis, -1).astype(ce.compute_dtype(logits.dtype))
  return jnp.moveaxis(_tempered_softmax_last_axis(x, float(t), num_iters), -1, axis)


def _check_num_iters(fn: str, num_iters) -> None:
  if not isinstance(num_iters, int) or isinstance(num_iters, bool):
    raise TypeError(f"{fn}: `num_iters` must be a Python int, got {num_iters!r}.")
  _checks.check_in_range(fn, "num_iters", num_iters, 1, math.inf)


def _log_t1_probs(x: jax.Array, t1: float, t2: float, num_iters: int):
  """Returns :math:`p` and :math:`\\log_{t_1} p`, the latter computed from :math:`x - \\lambda`
  (finite for :math:`t_1 < 1`; :math:`-\\infty` only where :math:`p = 0`)."""
  if t2 == 1.0:
    z = x - jax.nn.logsumexp(x, axis=-1, keepdims=True)
    p = jnp.exp(z)
    return p, (z if t1 == 1.0 else jnp.expm1((1.0 - t1) * z) / (1.0 - t1))
  p = _tempered_softmax_last_axis(x, t2, num_iters)
  if t1 == 1.0:
    return p, jnp.log(p)
  # p^(1-t1) taken from p itself: exact, as p = base^(1/(1-t2)) is what the forward pass uses.
  return p, (p ** (1.0 - t1) - 1.0) / (1.0 - t1)


def _bregman_loss(q, p, log_t1_p, t1):
  """:math:`\\sum_c q_c(\\log_{t_1} q_c - \\log_{t_1} p_c) - (q_c^{2-t_1} - p_c^{2-t_1})/(2-t_1)`."""
  used = q > 0
  safe_q = jnp.where(used, q, 1)
  cross = jnp.where(used, safe_q * (_log_t(safe_q, t1) - jnp.where(used, log_t1_p, 0)), 0)
  power = 2.0 - t1
  return jnp.sum(cross - (q**power - p**power) / power, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _bi_tempered_last_axis(x, q, t1, t2, num_iters):
  p, log_t1_p = _log_t1_probs(x, t1, t2, num_iters)
  return _bregman_loss(q, p, log_t1_p, t1)


def _bi_tempered_fwd(x, q, t1, t2, num_iters):
  p, log_t1_p = _log_t1_probs(x, t1, t2, num_iters)
  return _bregman_loss(q, p, log_t1_p, t1), (p, q)


def _bi_tempered_bwd(t1, t2, num_iters, residuals, g):
  """:math:`\\partial\\ell/\\partial x = (p - q)\\,p^{t_2-t_1} - e\\,\\sum_c (p_c-q_c)\\,p_c^{t_2-t_1}`
  with the escort :math:`e = p^{t_2}/\\sum_c p_c^{t_2}` (Amid et al. 2019, and the reference
  implementation's backward pass). Where :math:`p_c = 0` the factor :math:`p_c^{t_2-t_1}` is its
  limit: 1 for :math:`t_1 = t_2 = 1` (softmax underflow), else 0 (outside the support)."""
  del num_iters
  p, q = residuals
  positive = p > 0
  at_zero = 1.0 if t1 == t2 == 1.0 else 0.0
  forget = jnp.where(positive, jnp.where(positive, p, 1) ** (t2 - t1), at_zero)
  delta = (p - q) * forget
  escort = p**t2
  escort = escort / jnp.sum(escort, axis=-1, keepdims=True)
  grad = delta - escort * jnp.sum(delta, axis=-1, keepdims=True)
  # The labels are constants (stop_gradient before the call), so their cotangent is zero.
  return g[..., None] * grad, jnp.zeros_like(q)


_bi_tempered_last_axis.defvjp(_bi_tempered_fwd, _bi_tempered_bwd)


def bi_tempered_logistic_loss(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    t1: float = 0.8,
    t2: float = 1.2,
    label_smoothing: float = 0.0,
    num_iters: int = 5,
    axis: int = -1,
    weight: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = -100,
    reduction: str = "mean",
    where: jax.typing.ArrayLike | None = None,
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
  \frac{\epsilon}{K-1}`. With ``weight`` the loss is scaled by the target's weight
  (:math:`w_y`, or :math:`\sum_c w_c q_c` for probability labels).

  The gradient is the closed form
  :math:`(p - q) \odot p^{t_2-t_1} - e \sum_c (p_c-q_c)\,p_c^{t_2-t_1}`,
  :math:`e = p^{t_2}/\sum_c p_c^{t_2}`; ``labels`` get no gradient.

  Args:
    logits: ``[..., C, ...]`` float logits.
    labels: integer class ids or probabilities, as in :func:`xent_jax.cross_entropy`.
    t1: temperature :math:`t_1 \in [0, 1]` of the logarithm (default 0.8), a Python float.
    t2: temperature :math:`t_2 > 0` of the softmax (default 1.2), a Python float; :math:`t_2 < 1`
      gives a finite-support softmax (found by bisection, so use ``num_iters`` of 20 or more).
    label_smoothing: :math:`\epsilon \in [0, 1)` (default 0).
    num_iters: iterations of the normalization (default 5, as the reference), a Python int.
    axis, weight, ignore_index, reduction, where: as in :func:`xent_jax.cross_entropy`.

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
  for name, value in (("t1", t1), ("t2", t2), ("label_smoothing", label_smoothing)):
    vi.check_static_number(fn, name, value)
  _check_num_iters(fn, num_iters)
  _checks.check_in_range(fn, "t1", t1, 0.0, 1.0)
  _checks.check_in_range(fn, "t2", t2, 0.0, math.inf, low_open=True, high_open=True)
  _checks.check_in_range(fn, "label_smoothing", label_smoothing, 0.0, 1.0, high_open=True)
  prep = vi.prepare(
      fn, logits, labels, axis=axis, weight=weight, ignore_index=ignore_index,
      reduction=reduction, where=where,
  )
  num_classes = prep.num_classes
  q = prep.one_hot()
  if label_smoothing:
    if num_classes < 2:
      raise ValueError(f"{fn}: `label_smoothing` needs at least 2 classes, got {num_classes}.")
    off = label_smoothing / (num_classes - 1)
    q = (1.0 - num_classes * off) * q + off
  t1, t2 = float(t1), float(t2)
  loss = _bi_tempered_last_axis(prep.x, jax.lax.stop_gradient(q), t1, t2, num_iters)
  return vi.finish(fn, prep, prep.target_mass * loss, reduction)
