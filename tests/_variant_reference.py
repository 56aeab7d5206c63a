r"""Float64 NumPy references for the cross-entropy variants, written from the papers' formulas.

Row by row, with the plain softmax :math:`p` (or the tempered one, normalized by a bisection run
to float64 precision) and the target distribution :math:`q` (one-hot for integer labels):

* expected-loss variants: :math:`\ell = \sum_c w_c a_c q_c f(p_c)` with
  focal :math:`f = -(1-p)^\gamma \log p` (Lin et al. 2017), poly-1 :math:`-\log p +
  \epsilon(1-p)` (Leng et al. 2022), GCE :math:`(1-p^q)/q` and its truncation at :math:`k`
  (Zhang & Sabuncu 2018), Taylor :math:`\sum_{n\le t}(1-p)^n/n` (Feng et al. 2020);
* symmetric CE :math:`\alpha\,\mathrm{CE} + \beta\,m\,(-\sum_c p_c\max(\log q_c, A))`
  (Wang et al. 2019) and confidence penalty :math:`\mathrm{CE} - \beta\,m\,H(p)` (Pereyra et al.
  2017), with :math:`m = \sum_c w_c q_c` when class weights are given, else 1;
* bi-tempered :math:`m \sum_c [q_c(\log_{t_1} q_c - \log_{t_1} p_c) - (q_c^{2-t_1} -
  p_c^{2-t_1})/(2-t_1)]` with :math:`p = \exp_{t_2}(x - \lambda)`, :math:`\sum_c p_c = 1`
  (Amid et al. 2019).

Conventions as PyTorch's ``cross_entropy``: example weight :math:`w_y` (integer labels) or 1
(probability labels), times 0 for ignored/masked rows; 'mean' divides by the summed example weights
(0 when that sum is 0); a kept integer label outside ``[0, C)`` gives NaN.
"""

from __future__ import annotations

import numpy as np


def softmax(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  e = np.exp(x - np.max(x))
  return e / np.sum(e)


def _expected(f):
  def row(p, q, w, a=None):
    a = np.ones_like(p) if a is None else a
    used = q * w * a != 0
    return float(np.sum((q * w * a)[used] * f(p[used])))

  return row


def focal(p, q, w, *, gamma, alpha=None):
  a = None if alpha is None else np.broadcast_to(np.asarray(alpha, np.float64), p.shape)
  return _expected(lambda pc: -((1.0 - pc) ** gamma) * np.log(pc))(p, q, w, a)


def poly1(p, q, w, *, epsilon):
  return _expected(lambda pc: -np.log(pc) + epsilon * (1.0 - pc))(p, q, w)


def generalized(p, q, w, *, q_exp):
  return _expected(lambda pc: (1.0 - pc**q_exp) / q_exp)(p, q, w)


def truncated(p, q, w, *, q_exp, k):
  lq = lambda v: (1.0 - v**q_exp) / q_exp
  return _expected(lambda pc: np.where(pc > k, lq(pc), lq(k)))(p, q, w)


def taylor(p, q, w, *, order):
  return _expected(lambda pc: sum((1.0 - pc) ** n / n for n in range(1, order + 1)))(p, q, w)


def _mass(q, w, weighted):
  return float(np.sum(w * q)) if weighted else 1.0


def symmetric(p, q, w, *, alpha, beta, log_clip, weighted):
  ce = _expected(lambda pc: -np.log(pc))(p, q, w)
  log_q = np.full_like(q, log_clip)
  log_q[q > 0] = np.maximum(np.log(q[q > 0]), log_clip)
  rce = -float(np.sum(p * log_q))
  return alpha * ce + beta * _mass(q, w, weighted) * rce


def confidence(p, q, w, *, beta, weighted):
  ce = _expected(lambda pc: -np.log(pc))(p, q, w)
  entropy = -float(np.sum(p[p > 0] * np.log(p[p > 0])))
  return ce - beta * _mass(q, w, weighted) * entropy


def log_t(u, t):
  return np.log(u) if t == 1.0 else (u ** (1.0 - t) - 1.0) / (1.0 - t)


def exp_t(u, t):
  return np.exp(u) if t == 1.0 else np.maximum(1.0 + (1.0 - t) * u, 0.0) ** (1.0 / (1.0 - t))


def tempered_softmax(x: np.ndarray, t: float) -> np.ndarray:
  """:math:`\\exp_t(x - \\lambda)` with :math:`\\sum_c = 1`, :math:`\\lambda` by 200 bisection steps
  (the sum decreases in :math:`\\lambda`)."""
  x = np.asarray(x, np.float64)
  if t == 1.0:
    return softmax(x)

  def total(lam):
    with np.errstate(divide="ignore"):  # 0 ** negative = inf for t > 1: a too-small lambda
      return np.sum(exp_t(x - lam, t))

  lower = np.max(x) - 1.0
  while total(lower) < 1.0:
    lower -= 2.0 * (np.max(x) - lower)
  upper = np.max(x) + 1.0
  while total(upper) > 1.0:
    upper += 2.0 * (upper - np.max(x))
  for _ in range(200):
    middle = (lower + upper) / 2.0
    lower, upper = (middle, upper) if total(middle) > 1.0 else (lower, middle)
  return exp_t(x - (lower + upper) / 2.0, t)


def bi_tempered(x, q, w, *, t1, t2, label_smoothing, weighted):
  """Takes logits ``x`` (not probabilities): the softmax is tempered."""
  k = x.shape[-1]
  mass = _mass(q, w, weighted)
  if label_smoothing:
    q = (1.0 - k / (k - 1) * label_smoothing) * q + label_smoothing / (k - 1)
  p = tempered_softmax(x, t2)
  used = q > 0
  cross = np.sum(q[used] * (log_t(q[used], t1) - log_t(p[used], t1)))
  power = 2.0 - t1
  return mass * float(cross - np.sum(q**power - p**power) / power)


def variant_loss(
  row_loss,
  logits,
  labels,
  *,
  axis=-1,
  weight=None,
  ignore_index=-100,
  reduction="mean",
  where=None,
  on_logits=False,
  **hparams,
):
  """Applies ``row_loss(p, q, w, **hparams)`` (or ``row_loss(x, q, w, ...)`` with
  ``on_logits``) row by row with the shared conventions; returns float64."""
  x = np.moveaxis(np.asarray(logits, np.float64), axis, -1)
  labels = np.asarray(labels)
  integer = np.issubdtype(labels.dtype, np.integer)
  if not integer:
    labels = np.moveaxis(labels.astype(np.float64), axis, -1)
  batch_shape = x.shape[:-1]
  k = x.shape[-1]
  mask = np.ones(batch_shape, bool) if where is None else np.broadcast_to(where, batch_shape)
  w = np.ones(k) if weight is None else np.asarray(weight, np.float64)
  loss = np.zeros(batch_shape)
  omega = np.zeros(batch_shape)
  for idx in np.ndindex(*batch_shape):
    if not mask[idx] or (integer and ignore_index is not None and labels[idx] == ignore_index):
      continue
    if integer and not 0 <= labels[idx] < k:
      loss[idx] = np.nan
      continue
    q = np.eye(k)[labels[idx]] if integer else labels[idx]
    first = x[idx] if on_logits else softmax(x[idx])
    loss[idx] = row_loss(first, q, w, **hparams)
    omega[idx] = w[labels[idx]] if integer else 1.0
  if reduction == "none":
    return loss
  if reduction == "sum":
    return np.sum(loss)
  total = np.sum(omega)
  return np.sum(loss) / total if total else 0.0
