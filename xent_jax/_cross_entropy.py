"""Softmax cross-entropy on logits: integer or probability labels, every option, one custom VJP.

Every loss here is the same per-example formula. With logits :math:`x` (after the optional soft
cap :math:`x \\leftarrow c\\tanh(x/c)`), :math:`\\mathrm{lse} = \\log\\sum_c e^{x_c}`, class weights
:math:`w` and a target distribution :math:`q`:

.. math::
   \\ell = \\sum_c w_c\\, q_c\\,(\\mathrm{lse} - x_c) \\;+\\; \\sum_c w_c\\, q_c \\log q_c\\,[\\text{t5x}]
   \\;+\\; z\\, \\omega\\, \\mathrm{lse}^2

For an integer label :math:`y` the target puts ``on`` on :math:`y` and ``off`` on every other
class, so the sum needs only :math:`\\mathrm{lse}`, :math:`x_y` and :math:`\\sum_c w_c x_c` per row:
no one-hot is ever built, and the backward pass recomputes the softmax from the logits and the
per-row maximum and log-sum-exp (two numbers per row), the only residuals it keeps.
"""

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from xent_jax import _checks
from xent_jax import _inputs
from xent_jax import _reduction
from xent_jax._inputs import compute_dtype

SMOOTHING_CONVENTIONS = ("uniform", "t5x")


class SmoothedTarget(NamedTuple):
  """A smoothed one-hot target: ``on`` on the label, ``off`` on every other class.

  ``xlogx_on`` and ``xlogx_off`` are :math:`q\\log q` of the two values when the convention
  subtracts the target's entropy (T5X), else 0.
  """

  on: float
  off: float
  xlogx_on: float
  xlogx_off: float


def smoothed_target(
    num_classes: int, label_smoothing: float, smoothing: str = "uniform"
) -> SmoothedTarget:
  """The on/off values of a smoothed one-hot target over ``num_classes`` classes.

  'uniform' (PyTorch, optax; Szegedy et al. 2016): :math:`q = (1-\\epsilon)\\,\\mathrm{onehot} +
  \\epsilon/K`. 't5x' (T5X's ``compute_weighted_cross_entropy``): :math:`q_y = 1-\\epsilon`,
  :math:`q_{c\\neq y} = \\epsilon/(K-1)`, and the target's entropy is subtracted so the minimum
  loss is 0.
  """
  eps = float(label_smoothing)
  if smoothing == "uniform":
    return SmoothedTarget(1.0 - eps + eps / num_classes, eps / num_classes, 0.0, 0.0)
  on = 1.0 - eps
  off = eps / (num_classes - 1) if num_classes > 1 else 0.0
  xlogx = lambda v: v * math.log(v) if v > 0 else 0.0
  return SmoothedTarget(on, off, xlogx(on), xlogx(off))


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
  """Gemma 2's logit soft cap :math:`c\\tanh(x/c)`; the identity when ``cap`` is None."""
  return x if cap is None else cap * jnp.tanh(x / cap)


def softcap_grad(capped: jax.Array, cap: float | None) -> jax.Array | float:
  """:math:`d(c\\tanh(x/c))/dx = 1 - (\\text{capped}/c)^2`, from the capped value."""
  return 1.0 if cap is None else 1.0 - jnp.square(capped / cap)


def along_classes(class_weight: jax.Array, ndim: int) -> jax.Array:
  """Reshapes a ``[V]`` vector to broadcast against ``[..., V]`` of rank ``ndim`` explicitly."""
  return class_weight.reshape((1,) * (ndim - 1) + (-1,))


def logsumexp_parts(logits: jax.Array, cap: float | None = None) -> tuple[jax.Array, jax.Array]:
  """The row maximum :math:`m` and :math:`\\log\\sum_c e^{x_c - m}` of
  :math:`x = c\\tanh(\\text{logits}/c)` over the last axis.

  Keeping the two apart (rather than their sum, the logsumexp) keeps :math:`x_c - m` exact for
  logits of large magnitude (at 1e4 a float32 logsumexp is only good to ~1e-3). Accumulates in
  :func:`compute_dtype`; the maximum is taken on the raw logits (exact in any dtype, and the cap
  is monotonic), so half-precision logits are never copied to float32 whole. ``-inf`` entries are
  fine; a row of all ``-inf`` gives :math:`m = 0` and ``-inf``.
  """
  dtype = compute_dtype(logits.dtype)
  m = softcap(jnp.max(logits, axis=-1).astype(dtype), cap)
  m = jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m))
  x = softcap(logits.astype(dtype), cap)
  return m, jnp.log(jnp.sum(jnp.exp(x - m[..., None]), axis=-1))


def finite_logsumexp(logits: jax.Array, cap: float | None = None) -> jax.Array:
  """:math:`\\log\\sum_c e^{x_c}` over the last axis of :math:`x = c\\tanh(\\text{logits}/c)`,
  from :func:`logsumexp_parts`."""
  m, log_sum = logsumexp_parts(logits, cap)
  return m + log_sum


def integer_label_loss(
    lse: jax.Array,
    target_logit: jax.Array,
    sum_weighted_logits: jax.Array | None,
    target_weight: jax.Array,
    total_weight: jax.Array | float,
    target: SmoothedTarget,
    z_loss: float,
    *,
    z_lse: jax.Array | None = None,
) -> jax.Array:
  """Per-row loss from per-row statistics (the formula in the module docstring).

  .. math::
     \\ell = \\mathrm{lse}\\,[\\text{off}\\,W + (\\text{on}-\\text{off})\\,w_y]
     - \\text{off}\\sum_c w_c x_c - (\\text{on}-\\text{off})\\,w_y x_y
     + w_y\\,\\text{on}\\log\\text{on} + (W - w_y)\\,\\text{off}\\log\\text{off}
     + z\\,w_y\\,\\mathrm{lse}^2

  Args:
    lse: ``[...]`` logsumexp of the (capped) logits.
    target_logit: ``[...]`` the (capped) logit of the label, :math:`x_y`.
    sum_weighted_logits: ``[...]`` :math:`\\sum_c w_c x_c`; unused (may be None) when ``off == 0``.
    target_weight: ``[...]`` :math:`w_y`.
    total_weight: :math:`W = \\sum_c w_c`.
    target: the smoothed target.
    z_loss: coefficient :math:`z`.
    z_lse: the logsumexp for the z-loss term; defaults to ``lse``. Apart from that term the loss
      is unchanged when ``lse``, ``target_logit`` and every :math:`x_c` are shifted by the same
      :math:`s` (``sum_weighted_logits`` by :math:`W s`): pass statistics relative to the row
      maximum, and the unshifted logsumexp here, to avoid cancellation at large logits.

  Returns:
    ``[...]`` per-row loss (not masked).
  """
  on_minus_off = target.on - target.off
  loss = lse * (target.off * total_weight + on_minus_off * target_weight)
  loss = loss - on_minus_off * target_weight * target_logit
  if target.off:
    loss = loss - target.off * sum_weighted_logits
  if target.xlogx_on or target.xlogx_off:
    loss = loss + (target_weight * target.xlogx_on + (total_weight - target_weight) * target.xlogx_off)
  if z_loss:
    loss = loss + z_loss * target_weight * jnp.square(lse if z_lse is None else z_lse)
  return loss


def integer_label_grad_scale(
    lse: jax.Array,
    target_weight: jax.Array,
    total_weight: jax.Array | float,
    target: SmoothedTarget,
    z_loss: float,
) -> jax.Array:
  """:math:`\\partial\\ell/\\partial\\mathrm{lse}`: the softmax's coefficient in
  :math:`\\partial\\ell/\\partial x_c = s\\,p_c - \\text{off}\\,w_c - (\\text{on}-\\text{off})\\,w_y[c=y]`."""
  scale = target.off * total_weight + (target.on - target.off) * target_weight
  if z_loss:
    scale = scale + 2.0 * z_loss * target_weight * lse
  return scale


@dataclasses.dataclass(frozen=True)
class _IntegerConfig:
  target: SmoothedTarget
  z_loss: float
  logit_softcap: float | None
  unit_weight: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _integer_cross_entropy(logits, labels, class_weight, valid, cfg):
  loss, lse, _ = _integer_forward(logits, labels, class_weight, valid, cfg)
  return loss, lse


def _integer_forward(logits, labels, class_weight, valid, cfg):
  dtype = compute_dtype(logits.dtype)
  num_classes = logits.shape[-1]
  in_range = (labels >= 0) & (labels < num_classes)
  safe_labels = jnp.where(in_range, labels, 0)
  # Each pass over the logits reads them through its own optimization barrier: without it XLA's
  # CPU backend shares one float32 copy of half-precision logits between the passes, a
  # [..., V] float32 temporary.
  barrier = jax.lax.optimization_barrier
  m, log_sum = logsumexp_parts(logits, cfg.logit_softcap)
  raw_target = jnp.take_along_axis(barrier(logits), safe_labels[..., None], axis=-1)[..., 0]
  target_logit = softcap(raw_target.astype(dtype), cfg.logit_softcap) - m
  weighted_sum = None
  if cfg.target.off:
    x = softcap(barrier(logits).astype(dtype), cfg.logit_softcap) - barrier(m)[..., None]
    weighted_sum = jnp.sum(x if cfg.unit_weight else x * along_classes(class_weight, x.ndim), axis=-1)
  target_weight = class_weight[safe_labels]
  lse = m + log_sum
  loss = integer_label_loss(
      log_sum,
      target_logit,
      weighted_sum,
      target_weight,
      jnp.sum(class_weight),
      cfg.target,
      cfg.z_loss,
      z_lse=lse,
  )
  loss = jnp.where(valid, loss, jnp.zeros_like(loss))
  bad = valid & ~in_range
  loss = jnp.where(bad, jnp.full_like(loss, jnp.nan), loss)
  return loss, lse, (m, log_sum, bad)


def _integer_fwd(logits, labels, class_weight, valid, cfg):
  loss, lse, (m, log_sum, bad) = _integer_forward(logits, labels, class_weight, valid, cfg)
  return (loss, lse), (logits, labels, class_weight, valid, m, log_sum, bad)


def _integer_bwd(cfg, residuals, cotangents):
  logits, labels, class_weight, valid, m, log_sum, bad = residuals
  g_loss, g_lse = cotangents
  dtype = m.dtype
  g_loss = jnp.where(valid, g_loss, jnp.zeros_like(g_loss))
  safe_labels = jnp.where(bad | ~valid, 0, labels)
  target_weight = class_weight[safe_labels]
  scale = g_loss * integer_label_grad_scale(
      m + log_sum, target_weight, jnp.sum(class_weight), cfg.target, cfg.z_loss
  ) + g_lse
  # Barriers, as in the forward pass, so this pass shares no [..., V] float32 value with it.
  logits, m = jax.lax.optimization_barrier((logits, m))
  x = softcap(logits.astype(dtype), cfg.logit_softcap)
  probs = jnp.exp((x - m[..., None]) - log_sum[..., None])
  classes = jax.lax.broadcasted_iota(labels.dtype, logits.shape, logits.ndim - 1)
  on_minus_off = (cfg.target.on - cfg.target.off) * g_loss * target_weight
  grad = scale[..., None] * probs - jnp.where(
      classes == safe_labels[..., None], on_minus_off[..., None], jnp.zeros_like(probs)
  )
  if cfg.target.off:
    grad = grad - cfg.target.off * g_loss[..., None] * along_classes(class_weight, grad.ndim)
  grad = grad * softcap_grad(x, cfg.logit_softcap)
  grad = jnp.where(bad[..., None], jnp.full_like(grad, jnp.nan), grad)
  return grad.astype(logits.dtype), None, None, None


_integer_cross_entropy.defvjp(_integer_fwd, _integer_bwd)


def integer_cross_entropy_last_axis(
    logits: jax.Array,
    labels: jax.Array,
    *,
    class_weight: jax.Array | None,
    valid: jax.Array,
    target: SmoothedTarget,
    z_loss: float,
    logit_softcap: float | None,
) -> tuple[jax.Array, jax.Array]:
  """Per-example loss and logsumexp for integer labels, classes on the last axis (no checks).

  Args:
    logits: ``[..., V]``.
    labels: ``[...]`` integer class ids.
    class_weight: ``[V]`` or None (all ones).
    valid: ``[...]`` bool, rows that count.
    target: smoothed target values, see :func:`smoothed_target`.
    z_loss: z-loss coefficient.
    logit_softcap: soft cap or None.

  Returns:
    ``(loss, lse)``, each ``[...]`` in float32 (float64 for float64 logits). ``loss`` already
    carries the class weight of its label; it is 0 on invalid rows and NaN where a valid label is
    out of range.
  """
  dtype = compute_dtype(logits.dtype)
  cfg = _IntegerConfig(target, float(z_loss), logit_softcap, class_weight is None)
  if class_weight is None:
    class_weight = jnp.ones(logits.shape[-1], dtype)
  valid = jnp.broadcast_to(valid, labels.shape)
  return _integer_cross_entropy(logits, labels, class_weight.astype(dtype), valid, cfg)


@dataclasses.dataclass(frozen=True)
class _DenseConfig:
  label_smoothing: float
  smoothing: str
  z_loss: float
  logit_softcap: float | None


def _smooth_probabilities(q: jax.Array, cfg: _DenseConfig) -> tuple[jax.Array, float]:
  """The smoothed target :math:`q' = \\alpha q + \\beta` and :math:`\\alpha = dq'/dq`."""
  eps, num_classes = cfg.label_smoothing, q.shape[-1]
  if not eps:
    return q, 1.0
  if cfg.smoothing == "uniform":
    return (1.0 - eps) * q + eps / num_classes, 1.0 - eps
  off = eps / max(num_classes - 1, 1)
  return (1.0 - eps - off) * q + off, 1.0 - eps - off


def _dense_forward(logits, labels, class_weight, valid, cfg):
  dtype = compute_dtype(logits.dtype)
  q, _ = _smooth_probabilities(labels.astype(dtype), cfg)
  w = along_classes(class_weight, q.ndim)
  b = q * w
  m, log_sum = logsumexp_parts(logits, cfg.logit_softcap)
  lse = m + log_sum
  # Centred on the row maximum: lse - x_c = log_sum - (x_c - m), without cancellation.
  x = softcap(jax.lax.optimization_barrier(logits).astype(dtype), cfg.logit_softcap) - m[..., None]
  b_x = jnp.where(b == 0, jnp.zeros_like(x), b * x)
  loss = log_sum * jnp.sum(b, axis=-1) - jnp.sum(b_x, axis=-1)
  if cfg.label_smoothing and cfg.smoothing == "t5x":
    loss = loss + jnp.sum(jax.scipy.special.xlogy(q, q) * w, axis=-1)
  if cfg.z_loss:
    loss = loss + cfg.z_loss * jnp.square(lse)
  return jnp.where(valid, loss, jnp.zeros_like(loss)), lse, (m, log_sum)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _dense_cross_entropy(logits, labels, class_weight, valid, cfg):
  loss, lse, _ = _dense_forward(logits, labels, class_weight, valid, cfg)
  return loss, lse


def _dense_fwd(logits, labels, class_weight, valid, cfg):
  loss, lse, (m, log_sum) = _dense_forward(logits, labels, class_weight, valid, cfg)
  return (loss, lse), (logits, labels, class_weight, valid, m, log_sum)


def _dense_bwd(cfg, residuals, cotangents):
  logits, labels, class_weight, valid, m, log_sum = residuals
  g_loss, g_lse = cotangents
  dtype = m.dtype
  g = jnp.where(valid, g_loss, jnp.zeros_like(g_loss))[..., None]
  q, alpha = _smooth_probabilities(labels.astype(dtype), cfg)
  w = along_classes(class_weight, q.ndim)
  b = q * w
  x = softcap(jax.lax.optimization_barrier(logits).astype(dtype), cfg.logit_softcap)
  centred = x - m[..., None]
  probs = jnp.exp(centred - log_sum[..., None])
  scale = jnp.sum(b, axis=-1)
  if cfg.z_loss:
    scale = scale + 2.0 * cfg.z_loss * (m + log_sum)
  grad = ((g * scale[..., None] + g_lse[..., None]) * probs - g * b) * softcap_grad(x, cfg.logit_softcap)
  # d loss / d q'_c = w_c (lse - x_c) [+ w_c (log q'_c + 1) for t5x]; chain rule through q'.
  dq = g * w * (log_sum[..., None] - centred)
  if cfg.label_smoothing and cfg.smoothing == "t5x":
    dq = dq + g * w * (jnp.log(q) + 1.0)
  return grad.astype(logits.dtype), (alpha * dq).astype(labels.dtype), None, None


_dense_cross_entropy.defvjp(_dense_fwd, _dense_bwd)


def dense_cross_entropy_last_axis(
    logits: jax.Array,
    labels: jax.Array,
    *,
    class_weight: jax.Array | None,
    valid: jax.Array,
    label_smoothing: float,
    smoothing: str,
    z_loss: float,
    logit_softcap: float | None,
) -> tuple[jax.Array, jax.Array]:
  """Per-example loss and logsumexp for probability labels, classes on the last axis (no checks).

  Smoothing: 'uniform' :math:`q' = (1-\\epsilon)q + \\epsilon/K`; 't5x'
  :math:`q' = (1-\\epsilon)q + \\epsilon(1-q)/(K-1)` plus :math:`\\sum_c w_c q'_c\\log q'_c` (a
  KL divergence), which reduce to :func:`smoothed_target` for one-hot :math:`q`. Terms with
  :math:`q'_c = 0` contribute nothing, even where :math:`x_c = -\\infty`. Differentiable in
  ``labels`` too; like the integer path, the backward pass keeps two numbers per row.
  """
  dtype = compute_dtype(logits.dtype)
  if class_weight is None:
    class_weight = jnp.ones(logits.shape[-1], dtype)
  cfg = _DenseConfig(float(label_smoothing), smoothing, float(z_loss), logit_softcap)
  valid = jnp.broadcast_to(valid, labels.shape[:-1])
  return _dense_cross_entropy(logits, labels, class_weight.astype(dtype), valid, cfg)


def check_common_options(
    fn: str,
    *,
    label_smoothing: float,
    smoothing: str,
    z_loss: float,
    logit_softcap: float | None,
    reduction: str | None = None,
) -> None:
  """Validates the options every cross-entropy entry point shares, naming the bad one."""
  _checks.check_in_range(fn, "label_smoothing", label_smoothing, 0.0, 1.0)
  _checks.check_choice(fn, "smoothing", smoothing, SMOOTHING_CONVENTIONS)
  _checks.check_in_range(fn, "z_loss", z_loss, 0.0, math.inf)
  if logit_softcap is not None:
    _checks.check_in_range(fn, "logit_softcap", logit_softcap, 0.0, math.inf, low_open=True)
  if reduction is not None:
    _checks.check_reduction(fn, reduction)


def cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    axis: int = -1,
    weight: jax.typing.ArrayLike | None = None,
    ignore_index: int | None = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    smoothing: str = "uniform",
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    where: jax.typing.ArrayLike | None = None,
    return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  r"""Softmax cross-entropy with every option, following PyTorch's rules.

  .. math::
     \ell_i = \sum_c w_c\, q_{ic}\,\big(\mathrm{lse}_i - x_{ic}\big)
       \;[-\; \textstyle\sum_c w_c q_{ic}\log q_{ic}]_{\text{t5x}}
       \;+\; z\,\omega_i\,\mathrm{lse}_i^2,
     \qquad \mathrm{lse}_i = \log\sum_c e^{x_{ic}},\quad
     x = c\tanh(\text{logits}/c)\ \text{if capped}

  with the (smoothed) target :math:`q` and the example weight :math:`\omega_i = w_{y_i}` for integer
  labels (1 for probability labels), times 0 where ``where`` is False or the label is
  ``ignore_index``. 'mean' is :math:`\sum_i \ell_i / \sum_i \omega_i`, exactly PyTorch's
  ``F.cross_entropy`` (which for probability targets divides by the number of positions).

  Args:
    logits: ``[..., C, ...]`` float logits; classes on ``axis`` (``axis=1`` takes PyTorch's
      ``(N, C, d1, ...)``). Half precision is accumulated in float32.
    labels: integer class ids of shape ``logits.shape`` without ``axis``, or float probabilities
      of ``logits.shape``.
    axis: the class axis.
    weight: ``[C]`` class weights (PyTorch's ``weight``), treated as constants.
    ignore_index: integer labels equal to it count for nothing (loss 0, weight 0); None: no
      label is ignored. Other labels outside ``[0, C)`` give a NaN loss for their example (see
      :func:`xent_jax.check_labels` to find them).
    reduction: 'none' (per-example, ``logits.shape`` without ``axis``), 'sum' or 'mean'. A mean
      over zero weight is 0 with a zero gradient (PyTorch returns NaN).
    label_smoothing: :math:`\epsilon \in [0, 1]`.
    smoothing: 'uniform' (PyTorch/optax: :math:`q = (1-\epsilon)\,\mathrm{onehot} + \epsilon/C`)
      or 't5x' (:math:`q_y = 1-\epsilon`, others :math:`\epsilon/(C-1)`, minus the target's
      entropy: a KL divergence whose minimum is 0).
    z_loss: :math:`z \ge 0`, adds :math:`z\,\omega_i\,\mathrm{lse}_i^2` (PaLM).
    logit_softcap: :math:`c > 0` applies :math:`c\tanh(x/c)` first (Gemma 2); None: off.
    where: bool mask over examples (broadcastable to ``logits.shape`` without ``axis``).
    return_lse: also return the per-example ``lse`` (of the capped logits), unmasked.

  Returns:
    The reduced loss (float32, or float64 for float64 logits), and with ``return_lse`` the pair
    ``(loss, lse)``.

  Example:
    >>> import jax.numpy as jnp, xent_jax
    >>> logits = jnp.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    >>> float(xent_jax.cross_entropy(logits, jnp.array([0, 2]), label_smoothing=0.1))  # doctest: +ELLIPSIS
    0.29...

  References:
    Szegedy et al., "Rethinking the Inception Architecture", 2016 (label smoothing);
    Chowdhery et al., "PaLM", 2022 (z-loss); Gemma Team, "Gemma 2", 2024 (soft-capping).
  """
  fn = "cross_entropy"
  check_common_options(
      fn,
      label_smoothing=label_smoothing,
      smoothing=smoothing,
      z_loss=z_loss,
      logit_softcap=logit_softcap,
      reduction=reduction,
  )
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
  if inputs.integer:
    loss, lse = integer_cross_entropy_last_axis(
        inputs.logits,
        inputs.labels,
        class_weight=inputs.weight,
        valid=inputs.valid,
        target=smoothed_target(inputs.num_classes, label_smoothing, smoothing),
        z_loss=z_loss,
        logit_softcap=logit_softcap,
    )
  else:
    loss, lse = dense_cross_entropy_last_axis(
        inputs.logits,
        inputs.labels,
        class_weight=inputs.weight,
        valid=inputs.valid,
        label_smoothing=label_smoothing,
        smoothing=smoothing,
        z_loss=z_loss,
        logit_softcap=logit_softcap,
    )
  reduced = _reduction.reduce_loss(loss, inputs.example_weight, reduction, fn=fn)
  return (reduced, lse) if return_lse else reduced
