"""Per-example classification metrics and their means: top-k accuracy, NLL, Brier score."""

import jax
import jax.numpy as jnp

from xent_jax.metrics._rows import (
  Rows,
  check_positive_int,
  correct,
  jit_metric,
  label_logit,
  masked_mean,
  nan_if_invalid,
  read_rows,
  safe_labels,
)


def nll_per_row(rows: Rows) -> jax.Array:
  """``[N]``: ``logsumexp(x) - x_y``; NaN for invalid examples."""
  return nan_if_invalid(jax.nn.logsumexp(rows.logits, axis=-1) - label_logit(rows), rows)


def brier_per_row(rows: Rows) -> jax.Array:
  """``[N]``: ``sum_{c != y} p_c^2 + (sum_{c != y} p_c)^2``; NaN for invalid examples.

  Writing ``1 - p_y`` as ``sum_{c != y} p_c`` avoids cancellation, so near-perfect predictions keep
  their tiny score instead of rounding to zero.
  """
  probs_NC = jax.nn.softmax(rows.logits, axis=-1)
  is_label_NC = jnp.arange(rows.logits.shape[-1])[None, :] == safe_labels(rows)[:, None]
  others_NC = jnp.where(is_label_NC, 0.0, probs_NC)
  per_example = jnp.sum(jnp.square(others_NC), axis=-1) + jnp.square(jnp.sum(others_NC, axis=-1))
  return nan_if_invalid(per_example, rows)


@jit_metric("k", "axis")
def accuracy(logits, labels, *, k: int = 1, axis: int = -1, where=None) -> jax.Array:
  r"""Top-k accuracy: the fraction of examples whose label is among the k highest logits.

  .. math::
    \mathrm{acc}_k = \frac{1}{n} \sum_{i:\ \mathrm{where}_i}
      \mathbb{1}\big[\#\{c : x_{ic} > x_{iy_i} \ \lor\ (x_{ic} = x_{iy_i} \land c < y_i)\} < k\big]

  Ties are broken towards the lower class index (as ``jnp.argmax``/``jax.lax.top_k``), so the
  result is a plain fraction of hits and top-1 equals ``mean(argmax(logits) == labels)``.

  Args:
    logits: ``[..., C]`` float scores (any float dtype; bf16 is compared after upcasting).
    labels: ``[...]`` integer class ids.
    k: how many top classes count as a hit, ``1 <= k <= C``.
    axis: the class axis of ``logits``.
    where: optional ``[...]`` boolean mask; ``False`` leaves an example out of the fraction.

  Returns:
    The fraction of hits, a float32 scalar in ``[0, 1]``; ``NaN`` if ``where`` excludes every
    example or an included example is invalid (label outside ``[0, C)``, NaN logits).

  Raises:
    ValueError: ``k`` is not an integer in ``[1, C]``, or a shape does not match.

  Example:
    >>> import jax.numpy as jnp
    >>> from xent_jax.metrics import accuracy
    >>> logits = jnp.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]])
    >>> float(accuracy(logits, jnp.array([1, 2])))
    0.5
    >>> float(accuracy(logits, jnp.array([1, 2]), k=3))
    1.0

  References:
    Russakovsky et al., "ImageNet Large Scale Visual Recognition Challenge", IJCV 2015 (top-k).
  """
  fn = "accuracy"
  k = check_positive_int(fn, "k", k)
  rows = read_rows(fn, logits, labels, axis, where)
  num_classes = rows.logits.shape[-1]
  if k > num_classes:
    raise ValueError(f"{fn}: `k` must be <= the number of classes {num_classes}, got k={k}.")
  return masked_mean(correct(rows, k), rows.mask)


@jit_metric("axis")
def negative_log_likelihood(logits, labels, *, axis: int = -1, where=None) -> jax.Array:
  r"""Mean negative log-likelihood of the labels under the softmax of the logits.

  .. math::
    \mathrm{NLL} = \frac{1}{n} \sum_{i:\ \mathrm{where}_i}
      \Big(\log \sum_c e^{x_{ic}} - x_{iy_i}\Big)

  Computed stably with ``logsumexp`` in float32 (bf16/fp16 logits are upcast first). Equals the
  mean unsmoothed cross-entropy; a label whose logit is ``-inf`` gives ``+inf``.

  Args:
    logits: ``[..., C]`` float scores.
    labels: ``[...]`` integer class ids.
    axis: the class axis of ``logits``.
    where: optional ``[...]`` boolean mask; ``False`` leaves an example out of the mean.

  Returns:
    A float32 scalar in nats; ``NaN`` if ``where`` excludes every example or an included example
    is invalid.

  Example:
    >>> import jax.numpy as jnp
    >>> from xent_jax.metrics import negative_log_likelihood
    >>> round(float(negative_log_likelihood(jnp.zeros((2, 4)), jnp.array([0, 3]))), 4)  # log 4
    1.3863

  References:
    Guo et al., "On Calibration of Modern Neural Networks", ICML 2017 (NLL as a calibration
    measure).
  """
  rows = read_rows("negative_log_likelihood", logits, labels, axis, where)
  return masked_mean(nll_per_row(rows), rows.mask)


@jit_metric("axis")
def brier_score(logits, labels, *, axis: int = -1, where=None) -> jax.Array:
  r"""Multi-class Brier score: mean squared distance between the softmax and the one-hot label.

  .. math::
    \mathrm{BS} = \frac{1}{n} \sum_{i:\ \mathrm{where}_i} \sum_{c=1}^{C}
      \big(p_{ic} - \mathbb{1}[c = y_i]\big)^2, \qquad p_i = \mathrm{softmax}(x_i)

  Not divided by ``C`` (Brier's original multi-class form), so it lies in ``[0, 2]``. With two
  classes it is twice the usual binary Brier score ``mean((p_1 - y)^2)``
  (``sklearn.metrics.brier_score_loss`` halves the multi-class sum for binary problems).

  Args:
    logits: ``[..., C]`` float scores.
    labels: ``[...]`` integer class ids.
    axis: the class axis of ``logits``.
    where: optional ``[...]`` boolean mask; ``False`` excludes an example.

  Returns:
    The mean score, a float32 scalar in ``[0, 2]`` (0 for one-hot predictions of the labels);
    ``NaN`` if ``where`` excludes every example or an included example is invalid.

  Example:
    >>> import jax.numpy as jnp
    >>> from xent_jax.metrics import brier_score
    >>> float(brier_score(jnp.zeros((1, 2)), jnp.array([0])))  # (0.5-1)^2 + 0.5^2
    0.5

  References:
    Brier, "Verification of Forecasts Expressed in Terms of Probability", Monthly Weather Review
    1950.
  """
  rows = read_rows("brier_score", logits, labels, axis, where)
  return masked_mean(brier_per_row(rows), rows.mask)
