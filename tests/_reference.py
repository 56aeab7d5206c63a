r"""Float64 NumPy references for the cross-entropy formulas, written from the papers and docs.

Every function here takes and returns NumPy arrays, computes in float64 and depends on nothing
but NumPy, so tests of any xent_jax loss (core, fused, sharded, variants) can compare against it
without trusting the code under test.

Formulas (classes on the last axis after :func:`move_class_axis_last`; ``K`` classes):

.. math::

    x = c \tanh(z / c) \ (\text{if a softcap } c \text{ is given}), \qquad
    \mathrm{lse} = \log \textstyle\sum_k e^{x_k}

    \ell_i = \sum_k w_k q_k (\mathrm{lse} - x_k) - [\text{t5x}] \sum_k w_k q_k (-\log q_k)
              + z \, w_{y} \, \mathrm{lse}^2

with ``q`` the (smoothed) target distribution:

* ``"uniform"`` (PyTorch, optax): :math:`q = (1-\varepsilon)\,\text{target} + \varepsilon / K`;
* ``"t5x"`` (T5X): :math:`q = (1-\varepsilon)\,\text{target} + \varepsilon (1-\text{target})/(K-1)`,
  i.e. on-value :math:`1-\varepsilon` and off-value :math:`\varepsilon/(K-1)` for one-hot targets,
  and the entropy of ``q`` is subtracted so the loss is 0 at the optimum ``softmax(x) = q``.

Reduction follows PyTorch: ``"mean"`` divides the sum by the summed example weights
(:math:`w_{y_i}` of non-ignored integer targets; 1 per valid example for probability targets),
and returns 0 (not NaN) when that sum is 0.

References:
    Szegedy et al., "Rethinking the Inception Architecture for Computer Vision", 2016 (smoothing).
    Raffel et al., "Exploring the Limits of Transfer Learning" (T5), 2020; T5X's
    ``cross_entropy_with_logits`` (normalizing constant).
    Chowdhery et al., "PaLM: Scaling Language Modeling with Pathways", 2022 (z-loss).
    Gemma Team, "Gemma 2: Improving Open Language Models at a Practical Size", 2024 (softcap).
    PyTorch ``torch.nn.functional.cross_entropy`` documentation (reduction rules).
"""

from __future__ import annotations

import numpy as np

SMOOTHING_CONVENTIONS = ("uniform", "t5x")
REDUCTIONS = ("none", "sum", "mean")


def move_class_axis_last(x: np.ndarray, axis: int) -> np.ndarray:
  """Returns ``x`` as float64 with its class axis moved to the end."""
  return np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)


def softcap(x: np.ndarray, cap: float | None) -> np.ndarray:
  r"""Gemma 2 logit softcap :math:`c \tanh(x / c)`; identity when ``cap`` is None."""
  x = np.asarray(x, dtype=np.float64)
  if cap is None:
    return x
  return cap * np.tanh(x / cap)


def logsumexp(x: np.ndarray, axis: int = -1, where: np.ndarray | None = None) -> np.ndarray:
  r"""Stable :math:`\log\sum e^{x}` along ``axis`` (over ``where`` only if given; -inf if empty)."""
  x = np.asarray(x, dtype=np.float64)
  if where is not None:
    x = np.where(where, x, -np.inf)
  m = np.max(x, axis=axis, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  with np.errstate(divide="ignore"):
    out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
  return np.squeeze(out, axis=axis)


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
  r""":math:`x - \mathrm{lse}(x)` along ``axis``."""
  x = np.asarray(x, dtype=np.float64)
  return x - np.expand_dims(logsumexp(x, axis), axis)


def xlogx(q: np.ndarray) -> np.ndarray:
  r""":math:`q \log q` with :math:`0 \log 0 = 0`."""
  q = np.asarray(q, dtype=np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0)


def smoothed_targets(
  targets_NxK: np.ndarray, label_smoothing: float, smoothing: str = "uniform"
) -> np.ndarray:
  """Smooths dense targets (classes last) with the uniform or the T5X convention."""
  if smoothing not in SMOOTHING_CONVENTIONS:
    raise ValueError(f"unknown smoothing {smoothing!r}")
  q = np.asarray(targets_NxK, dtype=np.float64)
  num_classes = q.shape[-1]
  eps = float(label_smoothing)
  if smoothing == "uniform":
    return (1.0 - eps) * q + eps / num_classes
  return (1.0 - eps) * q + eps * (1.0 - q) / (num_classes - 1)


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """Float64 one-hot of integer ``labels`` (out-of-range ids give an all-zero row)."""
  labels = np.asarray(labels)
  return (labels[..., None] == np.arange(num_classes)).astype(np.float64)


def _weighted_ce_terms(x, lse, q, w, smoothing):
  r""":math:`\sum_k w_k q_k (\mathrm{lse} - x_k)` minus the T5X constant, with 0 * inf = 0."""
  with np.errstate(invalid="ignore"):
    nll = np.where(q > 0, q * (lse[..., None] - x), 0.0)
  loss = np.sum(w * nll, axis=-1)
  if smoothing == "t5x":
    loss = loss + np.sum(w * xlogx(q), axis=-1)
  return loss


def cross_entropy_parts(
  logits: np.ndarray,
  labels: np.ndarray,
  *,
  axis: int = -1,
  weight: np.ndarray | None = None,
  ignore_index: int = -100,
  label_smoothing: float = 0.0,
  smoothing: str = "uniform",
  z_loss: float = 0.0,
  logit_softcap: float | None = None,
  where: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-example loss, example weight and logsumexp (each of the batch shape), float64.

  Integer ``labels`` have the logits' shape without ``axis``; float labels have the logits'
  shape. Invalid examples (ignored or masked by ``where``) get loss 0 and weight 0;
  out-of-range integer labels (not ``ignore_index``) get a NaN loss.
  """
  x = softcap(move_class_axis_last(logits, axis), logit_softcap)
  num_classes = x.shape[-1]
  w = np.ones(num_classes) if weight is None else np.asarray(weight, dtype=np.float64)
  lse = logsumexp(x, axis=-1)
  labels = np.asarray(labels)
  valid = np.ones(x.shape[:-1], dtype=bool) if where is None else np.asarray(where, dtype=bool)

  if np.issubdtype(labels.dtype, np.integer):
    valid = valid & (labels != ignore_index)
    out_of_range = valid & ((labels < 0) | (labels >= num_classes))
    safe_labels = np.where(valid & ~out_of_range, labels, 0)
    q = smoothed_targets(one_hot(safe_labels, num_classes), label_smoothing, smoothing)
    w_y = w[safe_labels]
    loss = _weighted_ce_terms(x, lse, q, w, smoothing) + z_loss * w_y * lse**2
    example_weight = np.where(valid, w_y, 0.0)
    loss = np.where(valid, loss, 0.0)
    loss = np.where(out_of_range, np.nan, loss)
  else:
    q = smoothed_targets(move_class_axis_last(labels, axis), label_smoothing, smoothing)
    loss = _weighted_ce_terms(x, lse, q, w, smoothing) + z_loss * lse**2
    example_weight = valid.astype(np.float64)
    loss = np.where(valid, loss, 0.0)
  return loss, example_weight, lse


def cross_entropy_grad(
  logits: np.ndarray,
  labels: np.ndarray,
  *,
  reduction: str = "mean",
  axis: int = -1,
  weight: np.ndarray | None = None,
  ignore_index: int = -100,
  label_smoothing: float = 0.0,
  smoothing: str = "uniform",
  z_loss: float = 0.0,
  logit_softcap: float | None = None,
  where: np.ndarray | None = None,
) -> np.ndarray:
  r"""Analytic gradient of the reduced loss w.r.t. ``logits`` (``"none"`` sums the losses).

  With :math:`p = \mathrm{softmax}(x)` and :math:`S = \sum_k w_k q_k`:

  .. math::
      \partial \ell / \partial x_k = S p_k - w_k q_k + 2 z \omega_z \mathrm{lse}\, p_k,
      \qquad \partial x_k / \partial z_k = 1 - (x_k / c)^2 \ \text{(softcap)},

  where :math:`\omega_z = w_y` for integer labels and 1 for probability targets. The T5X
  constant does not depend on the logits.
  """
  x = softcap(move_class_axis_last(logits, axis), logit_softcap)
  num_classes = x.shape[-1]
  w = np.ones(num_classes) if weight is None else np.asarray(weight, dtype=np.float64)
  lse = logsumexp(x, axis=-1)
  p = np.exp(x - lse[..., None])
  labels = np.asarray(labels)
  valid = np.ones(x.shape[:-1], dtype=bool) if where is None else np.asarray(where, dtype=bool)
  if np.issubdtype(labels.dtype, np.integer):
    valid = valid & (labels != ignore_index)
    safe_labels = np.where(valid, labels, 0)
    q = smoothed_targets(one_hot(safe_labels, num_classes), label_smoothing, smoothing)
    z_weight = w[safe_labels]
    example_weight = np.where(valid, z_weight, 0.0)
  else:
    q = smoothed_targets(move_class_axis_last(labels, axis), label_smoothing, smoothing)
    z_weight = np.ones(x.shape[:-1])
    example_weight = valid.astype(np.float64)
  total_weight = np.sum(w * q, axis=-1)
  grad = total_weight[..., None] * p - w * q + (2.0 * z_loss * z_weight * lse)[..., None] * p
  scale = valid.astype(np.float64)
  if reduction == "mean":
    total = np.sum(example_weight)
    scale = scale / total if total != 0 else np.zeros_like(scale)
  grad = grad * scale[..., None]
  if logit_softcap is not None:
    grad = grad * (1.0 - (x / logit_softcap) ** 2)
  return np.moveaxis(grad, -1, axis)


def reduce_loss(loss: np.ndarray, example_weight: np.ndarray, reduction: str) -> np.ndarray:
  """PyTorch's reduction; ``"mean"`` with zero total weight returns 0 instead of NaN."""
  if reduction == "none":
    return loss
  if reduction == "sum":
    return np.sum(loss)
  if reduction == "mean":
    total = np.sum(example_weight)
    return np.sum(loss) / total if total != 0 else np.float64(0.0)
  raise ValueError(f"unknown reduction {reduction!r}")


def cross_entropy(logits, labels, *, reduction: str = "mean", return_lse: bool = False, **options):
  """Reference for ``xent_jax.cross_entropy`` (same keyword options); float64."""
  loss, example_weight, lse = cross_entropy_parts(logits, labels, **options)
  out = reduce_loss(loss, example_weight, reduction)
  return (out, lse) if return_lse else out


def optax_integer_cross_entropy(logits, labels, *, axis=-1, where=None, label_smoothing=0.0):
  """optax's ``softmax_cross_entropy_with_integer_labels`` semantics, plus uniform smoothing.

  ``axis`` may be a tuple (the class axes are flattened in the given order); ``where`` is
  per-example (batch shape) or per-logit (logits' shape). The normalizer runs over the
  included logits only, the smoothing mass is spread over the included classes, and an
  example with nothing included gets 0.
  """
  x = np.asarray(logits, dtype=np.float64)
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  axes = tuple(a % x.ndim for a in axes)
  batch_axes = tuple(a for a in range(x.ndim) if a not in axes)
  batch_shape = tuple(x.shape[a] for a in batch_axes)
  x = x.transpose(batch_axes + axes).reshape(batch_shape + (-1,))
  if where is None:
    mask = np.ones_like(x, dtype=bool)
  else:
    where = np.asarray(where, dtype=bool)
    if where.ndim == len(batch_shape):
      mask = np.broadcast_to(where[..., None], x.shape)
    else:
      mask = where.transpose(batch_axes + axes).reshape(x.shape)
  lse = logsumexp(x, axis=-1, where=mask)
  labels = np.asarray(labels)
  x_y = np.take_along_axis(x, labels[..., None], axis=-1)[..., 0]
  loss = (1.0 - label_smoothing) * (lse - x_y)
  if label_smoothing:
    count = np.sum(mask, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
      uniform = np.sum(np.where(mask, lse[..., None] - x, 0.0), axis=-1) / count
    loss = loss + label_smoothing * uniform
  return np.where(np.any(mask, axis=-1), loss, 0.0)


def _class_mask(x_last, where, axis):
  """Boolean mask shaped like ``x_last`` from a per-example or per-logit ``where``."""
  if where is None:
    return np.ones_like(x_last, dtype=bool)
  where = np.asarray(where, dtype=bool)
  if where.ndim == x_last.ndim - 1:
    return np.broadcast_to(where[..., None], x_last.shape)
  return np.moveaxis(where, axis, -1)


def dense_softmax_cross_entropy(logits, targets, *, axis=-1, where=None):
  r""":math:`-\sum_k q_k \log \mathrm{softmax}(x)_k` with 0 * log 0 = 0; per-logit ``where``."""
  x = move_class_axis_last(logits, axis)
  q = move_class_axis_last(targets, axis)
  mask = _class_mask(x, where, axis)
  lse = logsumexp(x, axis=-1, where=mask)
  with np.errstate(invalid="ignore"):
    terms = np.where(mask & (q != 0), q * (lse[..., None] - x), 0.0)
  return np.sum(terms, axis=-1)


def smooth_labels(labels, alpha, *, axis=-1, where=None):
  r"""optax's ``smooth_labels``: :math:`(1-\alpha) y + \alpha / K` (K = included classes)."""
  y = np.asarray(labels, dtype=np.float64)
  if where is None:
    num_classes = y.shape[axis]
  else:
    num_classes = np.sum(np.asarray(where, dtype=np.float64), axis=axis, keepdims=True)
  return (1.0 - alpha) * y + alpha / num_classes


def poly_loss_cross_entropy(logits, labels, *, epsilon=2.0, axis=-1, where=None):
  r"""Poly-1 (Leng et al., 2022): :math:`\mathrm{CE}(x, q) + \epsilon (1 - \sum_k q_k p_k)`.

  With ``where``, softmax and the sum run over included classes: ``sum_k q_k (1 - p_k)``.
  """
  x = move_class_axis_last(logits, axis)
  q = move_class_axis_last(labels, axis)
  mask = _class_mask(x, where, axis)
  lse = logsumexp(x, axis=-1, where=mask)
  p = np.where(mask, np.exp(np.where(mask, x, 0.0) - lse[..., None]), 0.0)
  one_minus_pt = np.sum(np.where(mask, q * (1.0 - p), 0.0), axis=-1)
  ce = dense_softmax_cross_entropy(logits, labels, axis=axis, where=where)
  return ce + epsilon * one_minus_pt
