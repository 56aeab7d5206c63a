"""Classification metrics as pure, jit-compatible functions of logits and integer labels.

Every function takes ``logits`` of shape ``[..., C]`` (the class axis is ``axis``, last by default)
and integer ``labels`` of the batch shape ``[...]`` (``logits.shape`` without ``axis``), plus an
optional boolean ``where`` mask over examples (broadcastable to ``labels.shape``; ``False``
excludes an example). Scalars come back as float32 (float64 when the logits are float64 under
``jax_enable_x64``); bf16/fp16 logits are upcast to float32 before any arithmetic.

Conventions shared by every metric (see each docstring for its formula):

* **Predicted class and ties.** The prediction is the arg-max of the logits; among equal logits
  the *lowest class index wins*, as in ``jnp.argmax`` and ``jax.lax.top_k``. Top-k counts an
  example correct when fewer than ``k`` classes rank above its label, where class ``c`` ranks
  above label ``y`` if ``logits[c] > logits[y]``, or ``logits[c] == logits[y]`` and ``c < y``.
  So a row of all-equal logits is top-k correct exactly when ``label < k``.
* **Empty selection.** When ``where`` excludes every example the mean metrics return ``NaN``
  (the mean over an empty set is undefined; ``0`` would read as a perfect ECE or a real
  accuracy). The streaming counters below have no such case: they return zero counts.
* **Invalid examples.** An included example whose label is outside ``[0, C)`` or whose logits
  contain ``NaN`` makes the metric ``NaN`` (never a silently wrong finite number). To skip
  padding, pass ``where=labels != pad_id``.
* **Calibration bins.** ``num_bins`` equal-width bins over ``[0, 1]`` with inner edges
  ``b / num_bins`` (computed in the working dtype); bins are right-closed, ``(lo, hi]``, so a
  confidence exactly on an edge goes to the bin on its left; the first bin is ``[0, 1/num_bins]``.
* **Streaming.** :func:`calibration_counts` and :func:`eval_sums` return sums (named tuples of
  arrays, i.e. pytrees) that add up across evaluation batches with ``jax.tree.map(jnp.add, a, b)``;
  :func:`ece_from_counts`, :func:`reliability_from_counts` and :func:`metrics_from_sums` turn the
  totals into the same numbers the one-shot functions give on the concatenated data.
* **Compilation.** The public functions are wrapped in ``jax.jit`` (``k``, ``num_bins`` and
  ``axis`` static), so an eager call compiles once per input shape; they also compose with an
  outer ``jit``, ``vmap`` or ``grad``.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from xent_jax import _checks
from xent_jax import _inputs

__all__ = [
    "CalibrationCounts",
    "EvalSums",
    "ReliabilityBins",
    "accuracy",
    "brier_score",
    "calibration_counts",
    "ece_from_counts",
    "eval_sums",
    "expected_calibration_error",
    "metrics_from_sums",
    "negative_log_likelihood",
    "reliability_diagram_bins",
    "reliability_from_counts",
]


class CalibrationCounts(NamedTuple):
  """Per-bin sums over examples; each field has shape ``[num_bins]``.

  Attributes:
    count: number of included examples whose confidence falls in the bin.
    confidence_sum: sum of their confidences (max softmax probability).
    correct_sum: number of them whose arg-max prediction equals the label.
  """
  count: jax.Array
  confidence_sum: jax.Array
  correct_sum: jax.Array


class ReliabilityBins(NamedTuple):
  """A reliability diagram; each field has shape ``[num_bins]``.

  Attributes:
    count: number of examples in the bin.
    confidence: mean confidence in the bin (``NaN`` for an empty bin).
    accuracy: fraction correct in the bin (``NaN`` for an empty bin).
  """
  count: jax.Array
  confidence: jax.Array
  accuracy: jax.Array


class EvalSums(NamedTuple):
  """Additive sums for every metric of this module; scalars except ``calibration``.

  Counts are float32, like the sums (which carry NaN from invalid examples); they are
  exact up to 2**24 (about 16.7 million) examples.

  Attributes:
    count: number of included examples.
    correct_sum: number of top-1 correct examples.
    nll_sum: sum of per-example negative log-likelihoods.
    brier_sum: sum of per-example Brier scores.
    calibration: per-bin :class:`CalibrationCounts`.
  """
  count: jax.Array
  correct_sum: jax.Array
  nll_sum: jax.Array
  brier_sum: jax.Array
  calibration: CalibrationCounts


class _Rows(NamedTuple):
  """Inputs flattened to rows: logits ``[N, C]`` in the working dtype, labels ``[N]``, mask ``[N]``."""
  logits: jax.Array
  labels: jax.Array
  mask: jax.Array


# ----------------------------------------------------------------------------------------------
# Validation and shared per-example quantities.


def _check_positive_int(fn: str, name: str, value) -> int:
  """Returns ``value`` as an int, or raises ValueError naming ``name`` unless it is an int >= 1."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{fn}: `{name}` must be an integer >= 1, got {value!r}.")
  return int(value)


def _rows(fn: str, logits, labels, axis: int, where) -> _Rows:
  """Validates shapes and dtypes, moves the class axis last and flattens the batch dimensions."""
  _checks.check_floating(fn, "logits", logits)
  logits = jnp.asarray(logits)
  if logits.ndim == 0:
    raise ValueError(f"{fn}: `logits` must have a class axis (rank >= 1), got a scalar.")
  logits = jnp.moveaxis(logits, _checks.canonical_axis(fn, axis, logits.ndim), -1)
  batch_shape = logits.shape[:-1]
  _checks.check_shape(fn, "labels", labels, batch_shape)
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"{fn}: `labels` must be integer class ids, got dtype {labels.dtype}.")
  if where is None:
    mask = jnp.ones(batch_shape, dtype=bool)
  else:
    _checks.check_broadcastable(fn, "where", where, batch_shape)
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
      raise TypeError(f"{fn}: `where` must be a boolean mask, got dtype {where.dtype}.")
    mask = jnp.broadcast_to(where, batch_shape)
  dtype = _inputs.compute_dtype(logits.dtype)
  num_classes = logits.shape[-1]
  return _Rows(logits.astype(dtype).reshape(-1, num_classes), labels.reshape(-1), mask.reshape(-1))


def _invalid(rows: _Rows) -> jax.Array:
  """``[N]`` bool: the label is outside ``[0, C)`` or the row's logits contain NaN."""
  num_classes = rows.logits.shape[-1]
  bad_label = (rows.labels < 0) | (rows.labels >= num_classes)
  return bad_label | jnp.any(jnp.isnan(rows.logits), axis=-1)


def _label_rank(rows: _Rows) -> jax.Array:
  """``[N]`` int: how many classes rank above the label (ties broken towards the lower index)."""
  num_classes = rows.logits.shape[-1]
  labels_N1 = jnp.clip(rows.labels, 0, num_classes - 1)[:, None]
  target_N1 = jnp.take_along_axis(rows.logits, labels_N1, axis=-1)
  class_ids_1C = jnp.arange(num_classes)[None, :]
  above_NC = (rows.logits > target_N1) | ((rows.logits == target_N1) & (class_ids_1C < labels_N1))
  return jnp.sum(above_NC, axis=-1)


def _nan_if_invalid(values: jax.Array, rows: _Rows) -> jax.Array:
  return jnp.where(_invalid(rows), jnp.nan, values.astype(rows.logits.dtype))


def _correct(rows: _Rows, k: int) -> jax.Array:
  """``[N]`` float: 1 when the label is in the top-k, else 0; NaN for invalid examples."""
  return _nan_if_invalid(_label_rank(rows) < k, rows)


def _nll(rows: _Rows) -> jax.Array:
  """``[N]``: ``logsumexp(x) - x_y``; NaN for invalid examples."""
  num_classes = rows.logits.shape[-1]
  labels_N1 = jnp.clip(rows.labels, 0, num_classes - 1)[:, None]
  target_N = jnp.take_along_axis(rows.logits, labels_N1, axis=-1)[:, 0]
  return _nan_if_invalid(jax.nn.logsumexp(rows.logits, axis=-1) - target_N, rows)


def _brier(rows: _Rows) -> jax.Array:
  """``[N]``: ``sum_{c != y} p_c^2 + (sum_{c != y} p_c)^2``; NaN for invalid examples.

  Writing ``1 - p_y`` as ``sum_{c != y} p_c`` avoids cancellation, so near-perfect predictions keep
  their tiny score instead of rounding to zero.
  """
  num_classes = rows.logits.shape[-1]
  labels_N1 = jnp.clip(rows.labels, 0, num_classes - 1)[:, None]
  probs_NC = jax.nn.softmax(rows.logits, axis=-1)
  others_NC = jnp.where(jnp.arange(num_classes)[None, :] == labels_N1, 0.0, probs_NC)
  per_example = jnp.sum(jnp.square(others_NC), axis=-1) + jnp.square(jnp.sum(others_NC, axis=-1))
  return _nan_if_invalid(per_example, rows)


def _confidence(rows: _Rows) -> jax.Array:
  """``[N]``: the max softmax probability, ``1 / sum_c exp(x_c - max_c x_c)``.

  Exact for rows whose other logits are equal to the max or ``-inf`` (e.g. a uniform row gives
  exactly ``1/C`` rounded once), which lets tests place confidences on bin edges.
  """
  max_N1 = jnp.max(rows.logits, axis=-1, keepdims=True)
  return 1.0 / jnp.sum(jnp.exp(rows.logits - max_N1), axis=-1)


def _masked_sum(values: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.sum(jnp.where(mask, values, 0.0))


def _mean_or_nan(total: jax.Array, count: jax.Array) -> jax.Array:
  """``total / count``, or NaN where ``count == 0`` (with a finite gradient for ``total``)."""
  return jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  count = jnp.sum(mask, dtype=values.dtype)
  return _mean_or_nan(_masked_sum(values, mask), count)


# ----------------------------------------------------------------------------------------------
# One-shot metrics.


@functools.partial(jax.jit, static_argnames=("k", "axis"))
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
    where: optional ``[...]`` boolean mask; ``False`` excludes an example.

  Returns:
    A float32 scalar in ``[0, 1]``; ``NaN`` if ``where`` excludes every example or an included
    example is invalid (label outside ``[0, C)``, NaN logits).

  Raises:
    ValueError: ``k`` is not an integer in ``[1, C]``, or a shape does not match.

  Example:
    >>> logits = jnp.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]])
    >>> float(accuracy(logits, jnp.array([1, 2])))
    0.5
    >>> float(accuracy(logits, jnp.array([1, 2]), k=3))
    1.0

  References:
    Russakovsky et al., "ImageNet Large Scale Visual Recognition Challenge", IJCV 2015 (top-k).
  """
  fn = "accuracy"
  k = _check_positive_int(fn, "k", k)
  rows = _rows(fn, logits, labels, axis, where)
  num_classes = rows.logits.shape[-1]
  if k > num_classes:
    raise ValueError(f"{fn}: `k` must be <= the number of classes {num_classes}, got k={k}.")
  return _masked_mean(_correct(rows, k), rows.mask)


@functools.partial(jax.jit, static_argnames=("axis",))
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
    where: optional ``[...]`` boolean mask; ``False`` excludes an example.

  Returns:
    A float32 scalar in nats; ``NaN`` if ``where`` excludes every example or an included example
    is invalid.

  Example:
    >>> round(float(negative_log_likelihood(jnp.zeros((2, 4)), jnp.array([0, 3]))), 4)  # log 4
    1.3863

  References:
    Guo et al., "On Calibration of Modern Neural Networks", ICML 2017 (NLL as a calibration
    measure).
  """
  rows = _rows("negative_log_likelihood", logits, labels, axis, where)
  return _masked_mean(_nll(rows), rows.mask)


@functools.partial(jax.jit, static_argnames=("axis",))
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
    A float32 scalar in ``[0, 2]``; ``NaN`` if ``where`` excludes every example or an included
    example is invalid.

  Example:
    >>> float(brier_score(jnp.zeros((1, 2)), jnp.array([0])))  # (0.5-1)^2 + 0.5^2
    0.5

  References:
    Brier, "Verification of Forecasts Expressed in Terms of Probability", Monthly Weather Review
    1950.
  """
  rows = _rows("brier_score", logits, labels, axis, where)
  return _masked_mean(_brier(rows), rows.mask)


# ----------------------------------------------------------------------------------------------
# Calibration.


@functools.partial(jax.jit, static_argnames=("num_bins", "axis"))
def calibration_counts(logits, labels, *, num_bins: int = 15, axis: int = -1,
                       where=None) -> CalibrationCounts:
  r"""Per-bin counts, confidence sums and correct counts, additive across batches.

  With confidence :math:`\hat p_i = \max_c \mathrm{softmax}(x_i)_c`, prediction
  :math:`\hat y_i = \arg\max_c x_{ic}` (lowest index on ties) and bins
  :math:`B_1 = [0, 1/M],\ B_b = ((b-1)/M,\ b/M]`:

  .. math::
    \mathrm{count}_b = |B_b|, \quad
    \mathrm{confidence\_sum}_b = \sum_{i \in B_b} \hat p_i, \quad
    \mathrm{correct\_sum}_b = \sum_{i \in B_b} \mathbb{1}[\hat y_i = y_i]

  Sum the results of several batches (``jax.tree.map(jnp.add, a, b)``) and pass the total to
  :func:`ece_from_counts` or :func:`reliability_from_counts`.

  Args:
    logits: ``[..., C]`` float scores.
    labels: ``[...]`` integer class ids.
    num_bins: number ``M`` of equal-width confidence bins over ``[0, 1]``.
    axis: the class axis of ``logits``.
    where: optional ``[...]`` boolean mask; ``False`` excludes an example.

  Returns:
    :class:`CalibrationCounts` of three float32 ``[num_bins]`` arrays. Invalid included examples
    make ``confidence_sum`` or ``correct_sum`` NaN in their bin.

  Example:
    >>> c = calibration_counts(jnp.zeros((3, 2)), jnp.array([0, 1, 0]), num_bins=2)
    >>> c.count.tolist(), c.confidence_sum.tolist(), c.correct_sum.tolist()
    ([3.0, 0.0], [1.5, 0.0], [2.0, 0.0])

  References:
    Guo et al., "On Calibration of Modern Neural Networks", ICML 2017.
  """
  return _calibration_counts("calibration_counts", logits, labels, num_bins, axis, where)


def _calibration_counts(fn: str, logits, labels, num_bins: int, axis: int,
                        where) -> CalibrationCounts:
  num_bins = _check_positive_int(fn, "num_bins", num_bins)
  return _bin_sums(_rows(fn, logits, labels, axis, where), num_bins)


def _bin_sums(rows: _Rows, num_bins: int) -> CalibrationCounts:
  """Per-bin count, confidence sum and top-1 correct sum of the included rows."""
  confidence = _confidence(rows)
  inner_edges = jnp.arange(1, num_bins, dtype=confidence.dtype) / num_bins
  # side="left" counts the edges strictly below the confidence: right-closed bins (lo, hi].
  bin_ids = jnp.searchsorted(inner_edges, confidence, side="left")

  def per_bin(values):
    return jax.ops.segment_sum(jnp.where(rows.mask, values, 0.0), bin_ids, num_segments=num_bins)

  return CalibrationCounts(
      count=per_bin(jnp.ones_like(confidence)),
      confidence_sum=per_bin(confidence),
      correct_sum=per_bin(_correct(rows, 1)))


@jax.jit
def ece_from_counts(counts: CalibrationCounts) -> jax.Array:
  r"""Expected calibration error from (summed) :class:`CalibrationCounts`.

  .. math::
    \mathrm{ECE} = \sum_b \frac{|B_b|}{n}\,\big|\mathrm{acc}(B_b) - \mathrm{conf}(B_b)\big|
                 = \frac{1}{n} \sum_b \big|\mathrm{correct\_sum}_b - \mathrm{confidence\_sum}_b\big|

  Args:
    counts: per-bin sums, each ``[num_bins]``.

  Returns:
    A scalar in ``[0, 1]``; ``NaN`` when the counts are all zero.

  References:
    Naeini et al., "Obtaining Well Calibrated Probabilities Using Bayesian Binning", AAAI 2015;
    Guo et al., ICML 2017.
  """
  gaps = jnp.abs(counts.correct_sum - counts.confidence_sum)
  return _mean_or_nan(jnp.sum(gaps), jnp.sum(counts.count))


@jax.jit
def reliability_from_counts(counts: CalibrationCounts) -> ReliabilityBins:
  r"""Reliability diagram (per-bin count, mean confidence, accuracy) from :class:`CalibrationCounts`.

  .. math::
    \mathrm{confidence}_b = \frac{\mathrm{confidence\_sum}_b}{|B_b|}, \quad
    \mathrm{accuracy}_b = \frac{\mathrm{correct\_sum}_b}{|B_b|}

  Args:
    counts: per-bin sums, each ``[num_bins]``.

  Returns:
    :class:`ReliabilityBins` of ``[num_bins]`` arrays; empty bins have ``NaN`` confidence and
    accuracy (matplotlib leaves them out of a plot).
  """
  return ReliabilityBins(
      count=counts.count,
      confidence=_mean_or_nan(counts.confidence_sum, counts.count),
      accuracy=_mean_or_nan(counts.correct_sum, counts.count))


@functools.partial(jax.jit, static_argnames=("num_bins", "axis"))
def expected_calibration_error(logits, labels, *, num_bins: int = 15, axis: int = -1,
                               where=None) -> jax.Array:
  r"""Expected calibration error of the max-probability prediction over equal-width bins.

  .. math::
    \mathrm{ECE} = \sum_{b=1}^{M} \frac{|B_b|}{n}\,\big|\mathrm{acc}(B_b) - \mathrm{conf}(B_b)\big|

  where :math:`B_b` holds the included examples whose confidence
  :math:`\hat p_i = \max_c \mathrm{softmax}(x_i)_c` lies in :math:`((b-1)/M,\ b/M]` (the first
  bin also holds 0), :math:`\mathrm{acc}(B_b)` is the fraction of them whose arg-max (lowest index
  on ties) equals the label and :math:`\mathrm{conf}(B_b)` their mean confidence. A confidence
  exactly on an edge goes to the bin on its left.

  Args:
    logits: ``[..., C]`` float scores.
    labels: ``[...]`` integer class ids.
    num_bins: number ``M`` of bins (15 as in Guo et al.).
    axis: the class axis of ``logits``.
    where: optional ``[...]`` boolean mask; ``False`` excludes an example.

  Returns:
    A float32 scalar in ``[0, 1]``; ``NaN`` if ``where`` excludes every example or an included
    example is invalid.

  Example:
    >>> # Two uniform 2-class rows (confidence 0.5), one right: |0.5 - 0.5| = 0.
    >>> float(expected_calibration_error(jnp.zeros((2, 2)), jnp.array([0, 1])))
    0.0

  References:
    Guo et al., "On Calibration of Modern Neural Networks", ICML 2017.
  """
  return ece_from_counts(
      _calibration_counts("expected_calibration_error", logits, labels, num_bins, axis, where))


@functools.partial(jax.jit, static_argnames=("num_bins", "axis"))
def reliability_diagram_bins(logits, labels, *, num_bins: int = 15, axis: int = -1,
                             where=None) -> ReliabilityBins:
  r"""Per-bin count, mean confidence and accuracy for a reliability diagram.

  Same bins as :func:`expected_calibration_error`:

  .. math::
    \mathrm{confidence}_b = \frac{1}{|B_b|} \sum_{i \in B_b} \hat p_i, \quad
    \mathrm{accuracy}_b = \frac{1}{|B_b|} \sum_{i \in B_b} \mathbb{1}[\hat y_i = y_i]

  Args:
    logits: ``[..., C]`` float scores.
    labels: ``[...]`` integer class ids.
    num_bins: number ``M`` of equal-width bins over ``[0, 1]``; bin ``b`` (0-based) spans
      ``(b/M, (b+1)/M]``.
    axis: the class axis of ``logits``.
    where: optional ``[...]`` boolean mask; ``False`` excludes an example.

  Returns:
    :class:`ReliabilityBins` of three float32 ``[num_bins]`` arrays (``count``, ``confidence``,
    ``accuracy``); empty bins have ``NaN`` confidence and accuracy.

  Example:
    >>> r = reliability_diagram_bins(jnp.zeros((2, 2)), jnp.array([0, 1]), num_bins=2)
    >>> r.count.tolist(), r.accuracy.tolist()
    ([2.0, 0.0], [0.5, nan])

  References:
    DeGroot & Fienberg, "The Comparison and Evaluation of Forecasters", 1983; Guo et al., 2017.
  """
  return reliability_from_counts(
      _calibration_counts("reliability_diagram_bins", logits, labels, num_bins, axis, where))


# ----------------------------------------------------------------------------------------------
# Streaming evaluation of all metrics at once.


@functools.partial(jax.jit, static_argnames=("num_bins", "axis"))
def eval_sums(logits, labels, *, num_bins: int = 15, axis: int = -1, where=None) -> EvalSums:
  r"""Additive sums from which top-1 accuracy, NLL, Brier score and ECE follow.

  .. math::
    n = \sum_i \mathrm{where}_i,\quad
    \mathrm{correct\_sum} = \sum_i \mathbb{1}[\hat y_i = y_i],\quad
    \mathrm{nll\_sum} = \sum_i \mathrm{NLL}_i,\quad
    \mathrm{brier\_sum} = \sum_i \mathrm{BS}_i

  plus :func:`calibration_counts`. Sum the results of several evaluation batches with
  ``jax.tree.map(jnp.add, a, b)`` and call :func:`metrics_from_sums` once at the end.

  Args:
    logits: ``[..., C]`` float scores.
    labels: ``[...]`` integer class ids.
    num_bins: number of calibration bins.
    axis: the class axis of ``logits``.
    where: optional ``[...]`` boolean mask; ``False`` excludes an example (e.g. batch padding).

  Returns:
    :class:`EvalSums` (float32 scalars and ``[num_bins]`` arrays).

  Example:
    >>> batches = [(jnp.zeros((2, 3)), jnp.array([0, 1])), (jnp.ones((1, 3)), jnp.array([2]))]
    >>> total = jax.tree.map(jnp.add, *[eval_sums(x, y) for x, y in batches])
    >>> round(float(metrics_from_sums(total)["accuracy"]), 4)
    0.3333
  """
  fn = "eval_sums"
  num_bins = _check_positive_int(fn, "num_bins", num_bins)
  rows = _rows(fn, logits, labels, axis, where)
  return EvalSums(
      count=jnp.sum(rows.mask, dtype=rows.logits.dtype),
      correct_sum=_masked_sum(_correct(rows, 1), rows.mask),
      nll_sum=_masked_sum(_nll(rows), rows.mask),
      brier_sum=_masked_sum(_brier(rows), rows.mask),
      calibration=_bin_sums(rows, num_bins))


@jax.jit
def metrics_from_sums(sums: EvalSums) -> dict[str, jax.Array]:
  """Turns (summed) :class:`EvalSums` into ``{"accuracy", "nll", "brier", "ece"}`` scalars.

  Each value equals the one-shot function (:func:`accuracy` with ``k=1``,
  :func:`negative_log_likelihood`, :func:`brier_score`, :func:`expected_calibration_error`) on
  all the examples that went into the sums; ``NaN`` when the sums hold no example.

  Args:
    sums: the summed :class:`EvalSums`.

  Returns:
    A dict of four scalars (apply ``float`` to each for JSON logging).
  """
  return {
      "accuracy": _mean_or_nan(sums.correct_sum, sums.count),
      "nll": _mean_or_nan(sums.nll_sum, sums.count),
      "brier": _mean_or_nan(sums.brier_sum, sums.count),
      "ece": ece_from_counts(sums.calibration),
  }
