"""Calibration of the predicted probabilities: binned counts, ECE, MCE, adaptive and classwise ECE.

The counts (:class:`CalibrationCounts`) add up across batches; the ``*_from_counts`` functions
turn (summed) counts into the numbers that the one-shot functions give on all the examples.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from xent_jax.metrics._rows import (
  Rows,
  check_positive_int,
  correct,
  invalid,
  jit_metric,
  mean_or_nan,
  read_rows,
)


class CalibrationCounts(NamedTuple):
  """Per-bin sums over examples; each field has shape ``[num_bins]``.

  Attributes:
    count: number of included examples whose confidence falls in the bin.
    confidence_sum: sum of their confidences (max softmax probability).
    correct_sum: number of them whose arg-max prediction equals the label.
  """

  count: jax.Array  # type: ignore[assignment]  # a field, not tuple.count
  confidence_sum: jax.Array
  correct_sum: jax.Array


class ReliabilityBins(NamedTuple):
  """A reliability diagram; each field has shape ``[num_bins]``.

  Attributes:
    count: number of examples in the bin.
    confidence: mean confidence in the bin (``NaN`` for an empty bin).
    accuracy: fraction correct in the bin (``NaN`` for an empty bin).
  """

  count: jax.Array  # type: ignore[assignment]  # a field, not tuple.count
  confidence: jax.Array
  accuracy: jax.Array


def _confidence(rows: Rows) -> jax.Array:
  """``[N]``: the max softmax probability, ``1 / sum_c exp(x_c - max_c x_c)``.

  Exact for rows whose other logits are equal to the max or ``-inf`` (e.g. a uniform row gives
  exactly ``1/C`` rounded once), which lets tests place confidences on bin edges.
  """
  max_N1 = jnp.max(rows.logits, axis=-1, keepdims=True)
  return 1.0 / jnp.sum(jnp.exp(rows.logits - max_N1), axis=-1)


@jit_metric("num_bins", "axis")
def calibration_counts(
  logits, labels, *, num_bins: int = 15, axis: int = -1, where=None
) -> CalibrationCounts:
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
    where: optional ``[...]`` boolean mask; ``False`` leaves an example out of every bin.

  Returns:
    :class:`CalibrationCounts` of three float32 ``[num_bins]`` arrays. Invalid included examples
    make ``confidence_sum`` or ``correct_sum`` NaN in their bin.

  Example:
    >>> import jax.numpy as jnp
    >>> from xent_jax.metrics import calibration_counts
    >>> c = calibration_counts(jnp.zeros((3, 2)), jnp.array([0, 1, 0]), num_bins=2)
    >>> c.count.tolist(), c.confidence_sum.tolist(), c.correct_sum.tolist()
    ([3.0, 0.0], [1.5, 0.0], [2.0, 0.0])

  References:
    Guo et al., "On Calibration of Modern Neural Networks", ICML 2017.
  """
  return _calibration_counts("calibration_counts", logits, labels, num_bins, axis, where)


def _calibration_counts(
  fn: str, logits, labels, num_bins: int, axis: int, where
) -> CalibrationCounts:
  """:func:`calibration_counts` for the public function ``fn`` (named in its errors)."""
  num_bins = check_positive_int(fn, "num_bins", num_bins)
  return bin_sums(read_rows(fn, logits, labels, axis, where), num_bins)


def _uniform_bin_ids(values: jax.Array, num_bins: int) -> jax.Array:
  """Equal-width bin of each value in ``[0, 1]``: right-closed ``(lo, hi]``, the first
  ``[0, 1/num_bins]``."""
  inner_edges = jnp.arange(1, num_bins, dtype=values.dtype) / num_bins
  # side="left" counts the edges strictly below the value: right-closed bins (lo, hi].
  return jnp.searchsorted(inner_edges, values, side="left")


def _sums_by_bin(
  rows: Rows, confidence: jax.Array, bin_ids: jax.Array, num_bins: int
) -> CalibrationCounts:
  """Per-bin count, confidence sum and top-1 correct sum of the included rows."""

  def per_bin(values):
    return jax.ops.segment_sum(jnp.where(rows.mask, values, 0.0), bin_ids, num_segments=num_bins)

  return CalibrationCounts(
    count=per_bin(jnp.ones_like(confidence)),
    confidence_sum=per_bin(confidence),
    correct_sum=per_bin(correct(rows, 1)),
  )


def bin_sums(rows: Rows, num_bins: int) -> CalibrationCounts:
  """:class:`CalibrationCounts` of the included rows over equal-width confidence bins."""
  confidence = _confidence(rows)
  return _sums_by_bin(rows, confidence, _uniform_bin_ids(confidence, num_bins), num_bins)


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
  return mean_or_nan(jnp.sum(gaps), jnp.sum(counts.count))


@jax.jit
def reliability_from_counts(counts: CalibrationCounts) -> ReliabilityBins:
  r"""Reliability diagram (count, mean confidence, accuracy per bin) of :class:`CalibrationCounts`.

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
    confidence=mean_or_nan(counts.confidence_sum, counts.count),
    accuracy=mean_or_nan(counts.correct_sum, counts.count),
  )


@jit_metric("num_bins", "axis")
def expected_calibration_error(
  logits, labels, *, num_bins: int = 15, axis: int = -1, where=None
) -> jax.Array:
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
    The ECE, a float32 scalar in ``[0, 1]`` (0 when every bin's accuracy equals its mean
    confidence); ``NaN`` if ``where`` excludes every example or an included example is invalid.

  Example:
    >>> import jax.numpy as jnp
    >>> from xent_jax.metrics import expected_calibration_error
    >>> # Two uniform 2-class rows (confidence 0.5), one right: |0.5 - 0.5| = 0.
    >>> float(expected_calibration_error(jnp.zeros((2, 2)), jnp.array([0, 1])))
    0.0

  References:
    Guo et al., "On Calibration of Modern Neural Networks", ICML 2017.
  """
  return ece_from_counts(
    _calibration_counts("expected_calibration_error", logits, labels, num_bins, axis, where)
  )


@jit_metric("num_bins", "axis")
def reliability_diagram_bins(
  logits, labels, *, num_bins: int = 15, axis: int = -1, where=None
) -> ReliabilityBins:
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
    >>> import jax.numpy as jnp
    >>> from xent_jax.metrics import reliability_diagram_bins
    >>> r = reliability_diagram_bins(jnp.zeros((2, 2)), jnp.array([0, 1]), num_bins=2)
    >>> r.count.tolist(), r.accuracy.tolist()
    ([2.0, 0.0], [0.5, nan])

  References:
    DeGroot & Fienberg, "The Comparison and Evaluation of Forecasters", 1983; Guo et al., 2017.
  """
  return reliability_from_counts(
    _calibration_counts("reliability_diagram_bins", logits, labels, num_bins, axis, where)
  )


# ----------------------------------------------------------------------------------------------
# Calibration beyond equal-width top-label ECE: maximum, adaptive (equal-mass), classwise.


@jax.jit
def mce_from_counts(counts: CalibrationCounts) -> jax.Array:
  r"""Maximum calibration error from (summed) :class:`CalibrationCounts`.

  .. math::
    \mathrm{MCE} = \max_{b:\ |B_b| > 0} \big|\mathrm{acc}(B_b) - \mathrm{conf}(B_b)\big|

  Args:
    counts: per-bin sums, each ``[num_bins]``.

  Returns:
    A scalar in ``[0, 1]``; ``NaN`` when the counts are all zero (or carry a NaN).

  References:
    Naeini et al., AAAI 2015; Guo et al., "On Calibration of Modern Neural Networks", ICML 2017.
  """
  gaps = jnp.abs(counts.correct_sum - counts.confidence_sum) / jnp.maximum(counts.count, 1)
  worst = jnp.max(jnp.where(counts.count > 0, gaps, 0.0))
  return jnp.where(jnp.sum(counts.count) > 0, worst, jnp.nan)


@jit_metric("num_bins", "axis")
def maximum_calibration_error(
  logits, labels, *, num_bins: int = 15, axis: int = -1, where=None
) -> jax.Array:
  r"""Maximum calibration error: the largest accuracy-confidence gap over the non-empty bins.

  .. math::
    \mathrm{MCE} = \max_{b:\ |B_b| > 0} \big|\mathrm{acc}(B_b) - \mathrm{conf}(B_b)\big|

  with the equal-width, right-closed bins of :func:`expected_calibration_error`. Unlike ECE it
  does not weight a bin by its size, so one sparsely filled bin can decide it.

  Args:
    logits: ``[..., C]`` float scores.
    labels: ``[...]`` integer class ids.
    num_bins: number ``M`` of equal-width bins (15 as in Guo et al.).
    axis: the class axis of ``logits``.
    where: optional ``[...]`` boolean mask; ``False`` excludes an example.

  Returns:
    The largest gap, a float32 scalar in ``[0, 1]``; ``NaN`` if ``where`` excludes every
    example or an included example is invalid.

  Example:
    >>> import jax.numpy as jnp
    >>> from xent_jax.metrics import maximum_calibration_error
    >>> # 2 rows at confidence 0.5 (1 right), 1 row at 0.8 (wrong): gaps 0 and 0.8.
    >>> x = jnp.log(jnp.array([[0.5, 0.5], [0.5, 0.5], [0.8, 0.2]]))
    >>> round(float(maximum_calibration_error(x, jnp.array([0, 1, 1]), num_bins=2)), 4)
    0.8

  References:
    Naeini et al., "Obtaining Well Calibrated Probabilities Using Bayesian Binning", AAAI 2015;
    Guo et al., "On Calibration of Modern Neural Networks", ICML 2017.
  """
  return mce_from_counts(
    _calibration_counts("maximum_calibration_error", logits, labels, num_bins, axis, where)
  )


def _equal_mass_bins(confidence: jax.Array, mask: jax.Array, num_bins: int) -> jax.Array:
  """``[N]`` bin ids: the included rows in increasing confidence (stable: ties keep their input
  order) split into ``num_bins`` consecutive groups as ``numpy.array_split`` splits ``n`` items:
  the first ``n mod M`` groups hold ``floor(n/M) + 1`` rows, the others ``floor(n/M)``."""
  num_rows = confidence.shape[0]
  order = jnp.argsort(jnp.where(mask, confidence, jnp.inf), stable=True)
  rank = jnp.zeros(num_rows, jnp.int32).at[order].set(jnp.arange(num_rows, dtype=jnp.int32))
  n = jnp.sum(mask, dtype=jnp.int32)
  small = n // num_bins  # size of the later groups
  big = small + 1  # size of the first n mod M groups
  num_big = n % num_bins
  in_big = rank < num_big * big
  bin_ids = jnp.where(
    in_big, rank // big, num_big + (rank - num_big * big) // jnp.maximum(small, 1)
  )
  return jnp.clip(bin_ids, 0, num_bins - 1)  # excluded rows rank last; their sums are masked


@jit_metric("num_bins", "axis")
def adaptive_calibration_error(
  logits, labels, *, num_bins: int = 15, axis: int = -1, where=None
) -> jax.Array:
  r"""Top-label expected calibration error over equal-mass (adaptive) bins.

  .. math::
    \mathrm{ECE}_{\mathrm{adaptive}} = \sum_{b=1}^{M} \frac{|B_b|}{n}
      \big|\mathrm{acc}(B_b) - \mathrm{conf}(B_b)\big|

  as :func:`expected_calibration_error`, but the bins are chosen so that each holds the same
  number of examples: sort the ``n`` included examples by confidence
  :math:`\hat p_i = \max_c \mathrm{softmax}(x_i)_c` (ties keep their input order) and cut the
  sorted list as ``numpy.array_split(sorted, M)`` does, the first ``n mod M`` bins holding one
  example more. Equal-width bins leave most bins nearly empty for a confident model; equal-mass
  bins spend the resolution where the confidences are.

  Args:
    logits: ``[..., C]`` float scores.
    labels: ``[...]`` integer class ids.
    num_bins: number ``M`` of bins; with ``n < M`` examples, ``M - n`` bins stay empty.
    axis: the class axis of ``logits``.
    where: optional ``[...]`` boolean mask; ``False`` excludes an example before the sort.

  Returns:
    A float32 scalar in ``[0, 1]``; ``NaN`` if ``where`` excludes every example or an included
    example is invalid.

  Example:
    >>> import jax.numpy as jnp
    >>> from xent_jax.metrics import adaptive_calibration_error
    >>> # Confidences 0.5, 0.5, 0.8, 0.8 (right, wrong, right, right), 2 bins of 2:
    >>> # |0.5 - 0.5| * 2/4 + |1 - 0.8| * 2/4 = 0.1
    >>> x = jnp.log(jnp.array([[0.5, 0.5], [0.5, 0.5], [0.8, 0.2], [0.2, 0.8]]))
    >>> round(float(adaptive_calibration_error(x, jnp.array([0, 1, 0, 1]), num_bins=2)), 4)
    0.1

  References:
    Nixon et al., "Measuring Calibration in Deep Learning", CVPR Workshops 2019 (adaptive
    binning); Mukhoti et al., "Calibrating Deep Neural Networks using Focal Loss", NeurIPS 2020
    (its top-label form, AdaECE).
  """
  fn = "adaptive_calibration_error"
  num_bins = check_positive_int(fn, "num_bins", num_bins)
  rows = read_rows(fn, logits, labels, axis, where)
  confidence = _confidence(rows)
  bin_ids = _equal_mass_bins(confidence, rows.mask, num_bins)
  return ece_from_counts(_sums_by_bin(rows, confidence, bin_ids, num_bins))


@jit_metric("num_bins", "axis")
def classwise_calibration_error(
  logits, labels, *, num_bins: int = 15, axis: int = -1, where=None
) -> jax.Array:
  r"""Classwise expected calibration error: the ECE of every class's probability, averaged.

  .. math::
    \mathrm{cwECE} = \frac{1}{C} \sum_{j=1}^{C} \sum_{b=1}^{M} \frac{|B_{jb}|}{n}
      \big|\mathrm{freq}_j(B_{jb}) - \mathrm{conf}_j(B_{jb})\big|

  where :math:`B_{jb}` holds the included examples whose probability of class ``j``,
  :math:`p_{ij} = \mathrm{softmax}(x_i)_j`, lies in bin ``b`` (the equal-width, right-closed bins
  of :func:`expected_calibration_error`), :math:`\mathrm{freq}_j(B_{jb})` is the fraction of them
  labelled ``j`` and :math:`\mathrm{conf}_j(B_{jb})` their mean :math:`p_{ij}`. Every class's
  probability is judged, not only the top one (Nixon et al. call it static calibration error).

  Args:
    logits: ``[..., C]`` float scores.
    labels: ``[...]`` integer class ids.
    num_bins: number ``M`` of equal-width bins per class.
    axis: the class axis of ``logits``.
    where: optional ``[...]`` boolean mask; ``False`` excludes an example.

  Returns:
    The mean over classes of their ECE, a float32 scalar in ``[0, 1]``; ``NaN`` if ``where``
    excludes every example or an included example is invalid. Memory: ``[N, C]`` temporaries.

  Example:
    >>> import jax.numpy as jnp
    >>> from xent_jax.metrics import classwise_calibration_error
    >>> # Uniform 2-class rows, labels 0 and 1: each class has p = 0.5 and frequency 0.5.
    >>> float(classwise_calibration_error(jnp.zeros((2, 2)), jnp.array([0, 1])))
    0.0

  References:
    Kull et al., "Beyond temperature scaling: Obtaining well-calibrated multi-class probabilities
    with Dirichlet calibration", NeurIPS 2019 (classwise-ECE); Nixon et al., "Measuring
    Calibration in Deep Learning", CVPR Workshops 2019 (SCE).
  """
  fn = "classwise_calibration_error"
  num_bins = check_positive_int(fn, "num_bins", num_bins)
  rows = read_rows(fn, logits, labels, axis, where)
  num_rows, num_classes = rows.logits.shape
  probs_NC = jax.nn.softmax(rows.logits, axis=-1)
  class_ids_1C = jnp.arange(num_classes)[None, :]
  segment_NC = class_ids_1C * num_bins + _uniform_bin_ids(probs_NC, num_bins)
  # 1 where j is the label; NaN on the whole row of an invalid example.
  is_label_NC = jnp.where(invalid(rows)[:, None], jnp.nan, class_ids_1C == rows.labels[:, None])
  keep_NC = jnp.broadcast_to(rows.mask[:, None], (num_rows, num_classes))

  def per_class_bin(values_NC):
    return jax.ops.segment_sum(
      jnp.where(keep_NC, values_NC, 0.0).reshape(-1),
      segment_NC.reshape(-1),
      num_segments=num_classes * num_bins,
    )

  gaps = jnp.abs(per_class_bin(is_label_NC.astype(probs_NC.dtype)) - per_class_bin(probs_NC))
  count = jnp.sum(rows.mask, dtype=probs_NC.dtype)
  return mean_or_nan(jnp.sum(gaps), count) / num_classes
