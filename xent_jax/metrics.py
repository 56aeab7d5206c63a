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
* **Compilation.** The public functions are wrapped in ``jax.jit`` (``k``, ``num_bins``,
  ``axis`` and the other options static), so an eager call compiles once per input shape; they
  also compose with an outer ``jit``, ``vmap`` or ``grad``. ``logits``, ``labels`` and ``where``
  may be Python lists, as for ``jnp`` functions. Concrete int64 labels that JAX would wrap to
  int32 (``jax_enable_x64`` off) raise ``ValueError``.
* **Calibration beyond ECE.** :func:`maximum_calibration_error` (worst bin),
  :func:`adaptive_calibration_error` (equal-mass bins), :func:`classwise_calibration_error`
  (every class's probability), and temperature scaling: :func:`fit_temperature` on held-out
  logits, :func:`apply_temperature` before any metric.

The public names are exactly ``__all__``; the imports are private aliases (``_jnp``, ``_jax``).
"""

import functools as _functools
from typing import NamedTuple as _NamedTuple

import jax as _jax
import jax.numpy as _jnp
import numpy as _np

from xent_jax.core import checks
from xent_jax.core import inputs

__all__ = [
  "CalibrationCounts",
  "EvalSums",
  "ReliabilityBins",
  "accuracy",
  "adaptive_calibration_error",
  "apply_temperature",
  "brier_score",
  "calibration_counts",
  "classwise_calibration_error",
  "ece_from_counts",
  "eval_sums",
  "expected_calibration_error",
  "fit_temperature",
  "maximum_calibration_error",
  "mce_from_counts",
  "metrics_from_sums",
  "negative_log_likelihood",
  "reliability_diagram_bins",
  "reliability_from_counts",
]


class CalibrationCounts(_NamedTuple):
  """Per-bin sums over examples; each field has shape ``[num_bins]``.

  Attributes:
    count: number of included examples whose confidence falls in the bin.
    confidence_sum: sum of their confidences (max softmax probability).
    correct_sum: number of them whose arg-max prediction equals the label.
  """

  count: _jax.Array
  confidence_sum: _jax.Array
  correct_sum: _jax.Array


class ReliabilityBins(_NamedTuple):
  """A reliability diagram; each field has shape ``[num_bins]``.

  Attributes:
    count: number of examples in the bin.
    confidence: mean confidence in the bin (``NaN`` for an empty bin).
    accuracy: fraction correct in the bin (``NaN`` for an empty bin).
  """

  count: _jax.Array
  confidence: _jax.Array
  accuracy: _jax.Array


class EvalSums(_NamedTuple):
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

  count: _jax.Array
  correct_sum: _jax.Array
  nll_sum: _jax.Array
  brier_sum: _jax.Array
  calibration: CalibrationCounts


class _Rows(_NamedTuple):
  """Inputs flattened to rows: logits ``[N, C]`` in the working dtype, int32 labels ``[N]`` (-1
  outside ``[0, C)``), mask ``[N]``."""

  logits: _jax.Array
  labels: _jax.Array
  mask: _jax.Array


# ----------------------------------------------------------------------------------------------
# Validation and shared per-example quantities.


def _as_array(x):
  """A list or tuple as a NumPy array (``jnp`` functions accept them; ``jit`` alone would trace
  each element as a separate argument); anything else unchanged."""
  return _np.asarray(x) if isinstance(x, (list, tuple)) else x


def _public(*static_argnames: str):
  """``jax.jit`` with ``static_argnames`` behind a front that takes ``logits``, ``labels`` and
  ``where`` as lists too and refuses concrete labels that JAX would wrap to int32
  (:func:`xent_jax.core.inputs.as_label_array`): past the ``jit`` boundary both are out of reach."""

  def decorate(fn):
    jitted = _jax.jit(fn, static_argnames=static_argnames)

    @_functools.wraps(fn)
    def front(logits, labels, **options):
      if "where" in options:
        options["where"] = _as_array(options["where"])
      labels = inputs.as_label_array(fn.__name__, _as_array(labels))
      return jitted(_as_array(logits), labels, **options)

    return front

  return decorate


def _check_positive_int(fn: str, name: str, value) -> int:
  """Returns ``value`` as an int, or raises ValueError naming ``name`` unless it is an int >= 1."""
  if isinstance(value, bool) or not isinstance(value, (int, _np.integer)) or value < 1:
    raise ValueError(f"{fn}: `{name}` must be an integer >= 1, got {value!r}.")
  return int(value)


def _rows(fn: str, logits, labels, axis: int, where) -> _Rows:
  """Validates shapes and dtypes, moves the class axis last and flattens the batch dimensions.

  Labels come back as int32, with -1 for a label outside ``[0, C)`` in any integer dtype (see
  :func:`xent_jax.core.inputs.integer_labels`), so the range tests below are exact.
  """
  checks.check_floating(fn, "logits", logits)
  logits = _jnp.asarray(logits)
  if logits.ndim == 0:
    raise ValueError(f"{fn}: `logits` must have a class axis (rank >= 1), got a scalar.")
  axis = checks.canonical_axis(fn, axis, logits.ndim)
  checks.check_has_classes(fn, "logits", logits.shape, axis)
  logits = _jnp.moveaxis(logits, axis, -1)
  batch_shape = logits.shape[:-1]
  num_classes = logits.shape[-1]
  checks.check_shape(fn, "labels", labels, batch_shape)
  labels = inputs.integer_labels(
    fn, labels, num_classes=num_classes, ignore_index=None, where=None
  ).labels
  if where is None:
    mask = _jnp.ones(batch_shape, dtype=bool)
  else:
    checks.check_broadcastable(fn, "where", where, batch_shape)
    where = _jnp.asarray(where)
    if where.dtype != _jnp.bool_:
      raise TypeError(f"{fn}: `where` must be a boolean mask, got dtype {where.dtype}.")
    mask = _jnp.broadcast_to(where, batch_shape)
  dtype = inputs.compute_dtype(logits.dtype)
  return _Rows(logits.astype(dtype).reshape(-1, num_classes), labels.reshape(-1), mask.reshape(-1))


def _invalid(rows: _Rows) -> _jax.Array:
  """``[N]`` bool: the label is outside ``[0, C)`` or the row's logits contain NaN."""
  num_classes = rows.logits.shape[-1]
  bad_label = (rows.labels < 0) | (rows.labels >= num_classes)
  return bad_label | _jnp.any(_jnp.isnan(rows.logits), axis=-1)


def _label_rank(rows: _Rows) -> _jax.Array:
  """``[N]`` int: how many classes rank above the label (ties broken towards the lower index)."""
  num_classes = rows.logits.shape[-1]
  labels_N1 = _jnp.clip(rows.labels, 0, num_classes - 1)[:, None]
  target_N1 = _jnp.take_along_axis(rows.logits, labels_N1, axis=-1)
  class_ids_1C = _jnp.arange(num_classes)[None, :]
  above_NC = (rows.logits > target_N1) | ((rows.logits == target_N1) & (class_ids_1C < labels_N1))
  return _jnp.sum(above_NC, axis=-1)


def _nan_if_invalid(values: _jax.Array, rows: _Rows) -> _jax.Array:
  return _jnp.where(_invalid(rows), _jnp.nan, values.astype(rows.logits.dtype))


def _correct(rows: _Rows, k: int) -> _jax.Array:
  """``[N]`` float: 1 when the label is in the top-k, else 0; NaN for invalid examples."""
  return _nan_if_invalid(_label_rank(rows) < k, rows)


def _nll(rows: _Rows) -> _jax.Array:
  """``[N]``: ``logsumexp(x) - x_y``; NaN for invalid examples."""
  num_classes = rows.logits.shape[-1]
  labels_N1 = _jnp.clip(rows.labels, 0, num_classes - 1)[:, None]
  target_N = _jnp.take_along_axis(rows.logits, labels_N1, axis=-1)[:, 0]
  return _nan_if_invalid(_jax.nn.logsumexp(rows.logits, axis=-1) - target_N, rows)


def _brier(rows: _Rows) -> _jax.Array:
  """``[N]``: ``sum_{c != y} p_c^2 + (sum_{c != y} p_c)^2``; NaN for invalid examples.

  Writing ``1 - p_y`` as ``sum_{c != y} p_c`` avoids cancellation, so near-perfect predictions keep
  their tiny score instead of rounding to zero.
  """
  num_classes = rows.logits.shape[-1]
  labels_N1 = _jnp.clip(rows.labels, 0, num_classes - 1)[:, None]
  probs_NC = _jax.nn.softmax(rows.logits, axis=-1)
  others_NC = _jnp.where(_jnp.arange(num_classes)[None, :] == labels_N1, 0.0, probs_NC)
  per_example = _jnp.sum(_jnp.square(others_NC), axis=-1) + _jnp.square(
    _jnp.sum(others_NC, axis=-1)
  )
  return _nan_if_invalid(per_example, rows)


def _confidence(rows: _Rows) -> _jax.Array:
  """``[N]``: the max softmax probability, ``1 / sum_c exp(x_c - max_c x_c)``.

  Exact for rows whose other logits are equal to the max or ``-inf`` (e.g. a uniform row gives
  exactly ``1/C`` rounded once), which lets tests place confidences on bin edges.
  """
  max_N1 = _jnp.max(rows.logits, axis=-1, keepdims=True)
  return 1.0 / _jnp.sum(_jnp.exp(rows.logits - max_N1), axis=-1)


def _masked_sum(values: _jax.Array, mask: _jax.Array) -> _jax.Array:
  return _jnp.sum(_jnp.where(mask, values, 0.0))


def _mean_or_nan(total: _jax.Array, count: _jax.Array) -> _jax.Array:
  """``total / count``, or NaN where ``count == 0`` (with a finite gradient for ``total``)."""
  return _jnp.where(count > 0, total / _jnp.maximum(count, 1), _jnp.nan)


def _masked_mean(values: _jax.Array, mask: _jax.Array) -> _jax.Array:
  count = _jnp.sum(mask, dtype=values.dtype)
  return _mean_or_nan(_masked_sum(values, mask), count)


# ----------------------------------------------------------------------------------------------
# One-shot metrics.


@_public("k", "axis")
def accuracy(logits, labels, *, k: int = 1, axis: int = -1, where=None) -> _jax.Array:
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
    >>> import jax, jax.numpy as jnp
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


@_public("axis")
def negative_log_likelihood(logits, labels, *, axis: int = -1, where=None) -> _jax.Array:
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
    >>> import jax, jax.numpy as jnp
    >>> round(float(negative_log_likelihood(jnp.zeros((2, 4)), jnp.array([0, 3]))), 4)  # log 4
    1.3863

  References:
    Guo et al., "On Calibration of Modern Neural Networks", ICML 2017 (NLL as a calibration
    measure).
  """
  rows = _rows("negative_log_likelihood", logits, labels, axis, where)
  return _masked_mean(_nll(rows), rows.mask)


@_public("axis")
def brier_score(logits, labels, *, axis: int = -1, where=None) -> _jax.Array:
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
    >>> import jax, jax.numpy as jnp
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


@_public("num_bins", "axis")
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
    where: optional ``[...]`` boolean mask; ``False`` excludes an example.

  Returns:
    :class:`CalibrationCounts` of three float32 ``[num_bins]`` arrays. Invalid included examples
    make ``confidence_sum`` or ``correct_sum`` NaN in their bin.

  Example:
    >>> import jax, jax.numpy as jnp
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
  num_bins = _check_positive_int(fn, "num_bins", num_bins)
  return _bin_sums(_rows(fn, logits, labels, axis, where), num_bins)


def _uniform_bin_ids(values: _jax.Array, num_bins: int) -> _jax.Array:
  """Equal-width bin of each value in ``[0, 1]``: right-closed ``(lo, hi]``, the first
  ``[0, 1/num_bins]``."""
  inner_edges = _jnp.arange(1, num_bins, dtype=values.dtype) / num_bins
  # side="left" counts the edges strictly below the value: right-closed bins (lo, hi].
  return _jnp.searchsorted(inner_edges, values, side="left")


def _sums_by_bin(
  rows: _Rows, confidence: _jax.Array, bin_ids: _jax.Array, num_bins: int
) -> CalibrationCounts:
  """Per-bin count, confidence sum and top-1 correct sum of the included rows."""

  def per_bin(values):
    return _jax.ops.segment_sum(_jnp.where(rows.mask, values, 0.0), bin_ids, num_segments=num_bins)

  return CalibrationCounts(
    count=per_bin(_jnp.ones_like(confidence)),
    confidence_sum=per_bin(confidence),
    correct_sum=per_bin(_correct(rows, 1)),
  )


def _bin_sums(rows: _Rows, num_bins: int) -> CalibrationCounts:
  """:class:`CalibrationCounts` of the included rows over equal-width confidence bins."""
  confidence = _confidence(rows)
  return _sums_by_bin(rows, confidence, _uniform_bin_ids(confidence, num_bins), num_bins)


@_jax.jit
def ece_from_counts(counts: CalibrationCounts) -> _jax.Array:
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
  gaps = _jnp.abs(counts.correct_sum - counts.confidence_sum)
  return _mean_or_nan(_jnp.sum(gaps), _jnp.sum(counts.count))


@_jax.jit
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
    accuracy=_mean_or_nan(counts.correct_sum, counts.count),
  )


@_public("num_bins", "axis")
def expected_calibration_error(
  logits, labels, *, num_bins: int = 15, axis: int = -1, where=None
) -> _jax.Array:
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
    >>> import jax, jax.numpy as jnp
    >>> # Two uniform 2-class rows (confidence 0.5), one right: |0.5 - 0.5| = 0.
    >>> float(expected_calibration_error(jnp.zeros((2, 2)), jnp.array([0, 1])))
    0.0

  References:
    Guo et al., "On Calibration of Modern Neural Networks", ICML 2017.
  """
  return ece_from_counts(
    _calibration_counts("expected_calibration_error", logits, labels, num_bins, axis, where)
  )


@_public("num_bins", "axis")
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
    >>> import jax, jax.numpy as jnp
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


@_jax.jit
def mce_from_counts(counts: CalibrationCounts) -> _jax.Array:
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
  gaps = _jnp.abs(counts.correct_sum - counts.confidence_sum) / _jnp.maximum(counts.count, 1)
  worst = _jnp.max(_jnp.where(counts.count > 0, gaps, 0.0))
  return _jnp.where(_jnp.sum(counts.count) > 0, worst, _jnp.nan)


@_public("num_bins", "axis")
def maximum_calibration_error(
  logits, labels, *, num_bins: int = 15, axis: int = -1, where=None
) -> _jax.Array:
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
    A float32 scalar in ``[0, 1]``; ``NaN`` if ``where`` excludes every example or an included
    example is invalid.

  Example:
    >>> import jax, jax.numpy as jnp
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


def _equal_mass_bins(confidence: _jax.Array, mask: _jax.Array, num_bins: int) -> _jax.Array:
  """``[N]`` bin ids: the included rows in increasing confidence (stable: ties keep their input
  order) split into ``num_bins`` consecutive groups as ``numpy.array_split`` splits ``n`` items:
  the first ``n mod M`` groups hold ``floor(n/M) + 1`` rows, the others ``floor(n/M)``."""
  num_rows = confidence.shape[0]
  order = _jnp.argsort(_jnp.where(mask, confidence, _jnp.inf), stable=True)
  rank = _jnp.zeros(num_rows, _jnp.int32).at[order].set(_jnp.arange(num_rows, dtype=_jnp.int32))
  n = _jnp.sum(mask, dtype=_jnp.int32)
  small = n // num_bins  # size of the later groups
  big = small + 1  # size of the first n mod M groups
  num_big = n % num_bins
  in_big = rank < num_big * big
  bin_ids = _jnp.where(
    in_big, rank // big, num_big + (rank - num_big * big) // _jnp.maximum(small, 1)
  )
  return _jnp.clip(bin_ids, 0, num_bins - 1)  # excluded rows rank last; their sums are masked


@_public("num_bins", "axis")
def adaptive_calibration_error(
  logits, labels, *, num_bins: int = 15, axis: int = -1, where=None
) -> _jax.Array:
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
    where: optional ``[...]`` boolean mask; ``False`` excludes an example.

  Returns:
    A float32 scalar in ``[0, 1]``; ``NaN`` if ``where`` excludes every example or an included
    example is invalid.

  Example:
    >>> import jax, jax.numpy as jnp
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
  num_bins = _check_positive_int(fn, "num_bins", num_bins)
  rows = _rows(fn, logits, labels, axis, where)
  confidence = _confidence(rows)
  bin_ids = _equal_mass_bins(confidence, rows.mask, num_bins)
  return ece_from_counts(_sums_by_bin(rows, confidence, bin_ids, num_bins))


@_public("num_bins", "axis")
def classwise_calibration_error(
  logits, labels, *, num_bins: int = 15, axis: int = -1, where=None
) -> _jax.Array:
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
    A float32 scalar in ``[0, 1]``; ``NaN`` if ``where`` excludes every example or an included
    example is invalid. Memory: ``[N, C]`` temporaries.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> # Uniform 2-class rows, labels 0 and 1: each class has p = 0.5 and frequency 0.5.
    >>> float(classwise_calibration_error(jnp.zeros((2, 2)), jnp.array([0, 1])))
    0.0

  References:
    Kull et al., "Beyond temperature scaling: Obtaining well-calibrated multi-class probabilities
    with Dirichlet calibration", NeurIPS 2019 (classwise-ECE); Nixon et al., "Measuring
    Calibration in Deep Learning", CVPR Workshops 2019 (SCE).
  """
  fn = "classwise_calibration_error"
  num_bins = _check_positive_int(fn, "num_bins", num_bins)
  rows = _rows(fn, logits, labels, axis, where)
  num_rows, num_classes = rows.logits.shape
  probs_NC = _jax.nn.softmax(rows.logits, axis=-1)
  class_ids_1C = _jnp.arange(num_classes)[None, :]
  segment_NC = class_ids_1C * num_bins + _uniform_bin_ids(probs_NC, num_bins)
  # 1 where j is the label; NaN on the whole row of an invalid example.
  is_label_NC = _jnp.where(_invalid(rows)[:, None], _jnp.nan, class_ids_1C == rows.labels[:, None])
  keep_NC = _jnp.broadcast_to(rows.mask[:, None], (num_rows, num_classes))

  def per_class_bin(values_NC):
    return _jax.ops.segment_sum(
      _jnp.where(keep_NC, values_NC, 0.0).reshape(-1),
      segment_NC.reshape(-1),
      num_segments=num_classes * num_bins,
    )

  gaps = _jnp.abs(per_class_bin(is_label_NC.astype(probs_NC.dtype)) - per_class_bin(probs_NC))
  count = _jnp.sum(rows.mask, dtype=probs_NC.dtype)
  return _mean_or_nan(_jnp.sum(gaps), count) / num_classes


# ----------------------------------------------------------------------------------------------
# Temperature scaling.


def _nll_slope_and_curvature(rows: _Rows, target_N: _jax.Array, beta: _jax.Array):
  r"""Mean over the included rows of :math:`\partial_\beta \mathrm{NLL}` and
  :math:`\partial^2_\beta \mathrm{NLL}` at inverse temperature :math:`\beta`:
  :math:`\mathrm{E}_{p}[x] - x_y` and :math:`\mathrm{Var}_{p}[x]` with
  :math:`p = \mathrm{softmax}(\beta x)`. Classes with :math:`p = 0` (``-inf`` logits) add 0."""
  probs_NC = _jax.nn.softmax(beta * rows.logits, axis=-1)
  live_NC = probs_NC > 0
  x_NC = _jnp.where(live_NC, rows.logits, 0.0)
  mean_N = _jnp.sum(probs_NC * x_NC, axis=-1)
  var_N = _jnp.sum(
    probs_NC * _jnp.where(live_NC, _jnp.square(x_NC - mean_N[:, None]), 0.0), axis=-1
  )
  count = _jnp.maximum(_jnp.sum(rows.mask, dtype=mean_N.dtype), 1)
  slope = _masked_sum(mean_N - target_N, rows.mask) / count
  return slope, _masked_sum(var_N, rows.mask) / count


@_public("axis", "num_iters", "min_temperature", "max_temperature")
def fit_temperature(
  logits,
  labels,
  *,
  axis: int = -1,
  where=None,
  num_iters: int = 50,
  min_temperature: float = 0.01,
  max_temperature: float = 100.0,
) -> _jax.Array:
  r"""Fits the temperature :math:`T > 0` that minimises the mean NLL of ``softmax(logits / T)``.

  .. math::
    T^\star = \arg\min_{T \in [T_{\min}, T_{\max}]} \frac{1}{n} \sum_{i:\ \mathrm{where}_i}
      \Big(\log \sum_c e^{x_{ic}/T} - x_{iy_i}/T\Big)

  The NLL is convex in :math:`\beta = 1/T`, so its slope
  :math:`g(\beta) = \frac{1}{n}\sum_i (\mathrm{E}_{\mathrm{softmax}(\beta x_i)}[x_i] - x_{iy_i})`
  increases with :math:`\beta` and vanishes at the optimum. The fit runs ``num_iters`` steps of
  safeguarded Newton on :math:`g` in :math:`u = \log\beta` (Numerical Recipes' ``rtsafe``:
  Newton while its step stays inside the bracket that the signs of :math:`g` have narrowed and
  shrinks fast enough, bisection otherwise): deterministic, jittable, quadratic near the
  optimum, and at worst halving the bracket :math:`[\log(1/T_{\max}), \log(1/T_{\min})]`
  every second step. When :math:`g` has one sign on the whole bracket the optimum lies outside
  :math:`[T_{\min}, T_{\max}]` and the nearer bound comes back exactly (a model no better than
  uniform wants :math:`T \to \infty`; one right by a margin on every example wants
  :math:`T \to 0`).

  Fit it on held-out data (a validation split), never on the test split; apply it with
  :func:`apply_temperature`. Dividing by ``T`` keeps every arg-max, so accuracy is unchanged.

  Args:
    logits: ``[..., C]`` float scores of held-out examples.
    labels: ``[...]`` integer class ids.
    axis: the class axis of ``logits``.
    where: optional ``[...]`` boolean mask; ``False`` excludes an example.
    num_iters: at most this many Newton/bisection steps, each one pass over the logits; the
      loop stops earlier once a step falls below float precision (about 10 steps typically).
    min_temperature: :math:`T_{\min} > 0`.
    max_temperature: :math:`T_{\max} > T_{\min}`.

  Returns:
    A float32 scalar :math:`T`; ``NaN`` if ``where`` excludes every example or an included
    example is invalid.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> # Logits ten times too sharp for labels drawn from softmax(logits / 10):
    >>> key_x, key_y = jax.random.split(jax.random.key(0))
    >>> x = 10.0 * jax.random.normal(key_x, (4000, 5))
    >>> y = jax.random.categorical(key_y, x / 10.0)
    >>> 8.0 < float(fit_temperature(x, y)) < 12.0
    True

  References:
    Guo et al., "On Calibration of Modern Neural Networks", ICML 2017 (temperature scaling);
    Press et al., "Numerical Recipes", 3rd ed., 2007, section 9.4 (``rtsafe``).
  """
  fn = "fit_temperature"
  num_iters = _check_positive_int(fn, "num_iters", num_iters)
  checks.check_in_range(
    fn, "min_temperature", min_temperature, 0.0, _np.inf, low_open=True, high_open=True
  )
  checks.check_in_range(
    fn, "max_temperature", max_temperature, min_temperature, _np.inf, low_open=True, high_open=True
  )
  rows = _rows(fn, logits, labels, axis, where)
  num_classes = rows.logits.shape[-1]
  # Excluded rows are zeroed, so that their NaN or inf logits cannot reach the sums.
  rows = rows._replace(logits=_jnp.where(rows.mask[:, None], rows.logits, 0.0))
  labels_N1 = _jnp.clip(rows.labels, 0, num_classes - 1)[:, None]
  target_N = _jnp.take_along_axis(rows.logits, labels_N1, axis=-1)[:, 0]
  dtype = rows.logits.dtype
  low = _jnp.asarray(-_np.log(max_temperature), dtype)
  high = _jnp.asarray(-_np.log(min_temperature), dtype)

  def slope_and_derivative(u):
    """The NLL slope in beta and its derivative in u = log beta."""
    beta = _jnp.exp(u)
    slope, curvature = _nll_slope_and_curvature(rows, target_N, beta)
    return slope, curvature * beta

  def step(state):
    # Numerical Recipes' rtsafe: Newton unless it leaves the bracket or the step fails to halve
    # the one before last; then bisection. The iterate with the smallest |slope| is kept: near
    # the optimum rounding noise in the slope could otherwise send a last bisection across a
    # bracket that Newton never had to narrow.
    i, u, low, high, step_before_last, last_step, best_u, best_slope = state
    slope, derivative = slope_and_derivative(u)
    better = _jnp.abs(slope) < best_slope
    best_u = _jnp.where(better, u, best_u)
    best_slope = _jnp.where(better, _jnp.abs(slope), best_slope)
    # The optimum lies above u where the slope is negative, below where it is positive.
    low = _jnp.where(slope <= 0, u, low)
    high = _jnp.where(slope >= 0, u, high)
    newton_step = slope / derivative
    newton = u - newton_step
    use_newton = (
      _jnp.isfinite(newton)
      & (newton >= low)
      & (newton <= high)
      & (2 * _jnp.abs(newton_step) <= _jnp.abs(step_before_last))
    )
    new_u = _jnp.where(use_newton, newton, 0.5 * (low + high))
    return i + 1, new_u, low, high, last_step, new_u - u, best_u, best_slope

  def running(state):
    i, last_step = state[0], state[5]
    return (i < num_iters) & ~(_jnp.abs(last_step) <= tolerance)  # NaN steps stop too

  width = high - low
  tolerance = 4 * _jnp.finfo(dtype).eps * _jnp.maximum(1.0, _jnp.maximum(-low, high))
  start = _jnp.clip(_jnp.zeros((), dtype), low, high)  # T = 1 when it is allowed
  state = (0, start, low, high, width, width, start, _jnp.asarray(_jnp.inf, dtype))
  *_, u, _ = _jax.lax.while_loop(running, step, state)
  # An optimum outside the bounds: the slope keeps its sign on the whole bracket.
  u = _jnp.where(slope_and_derivative(low)[0] >= 0, low, u)
  u = _jnp.where(slope_and_derivative(high)[0] <= 0, high, u)
  broken = _jnp.any(rows.mask & _invalid(rows)) | ~_jnp.any(rows.mask)
  return _jnp.where(broken, _jnp.nan, _jnp.exp(-u))


def apply_temperature(logits, temperature) -> _jax.Array:
  r"""Temperature-scaled logits :math:`x / T`, whose softmax is the calibrated prediction.

  .. math::
    \tilde p_i = \mathrm{softmax}(x_i / T)

  Args:
    logits: ``[..., C]`` float scores (any layout: every entry is divided).
    temperature: scalar :math:`T > 0`, e.g. from :func:`fit_temperature`. A NaN temperature
      (what :func:`fit_temperature` returns for an empty or invalid split) passes through, so
      every metric of the scaled logits is NaN as well.

  Returns:
    ``logits / temperature`` in the dtype of ``logits`` (float32 for lists), same shape.

  Raises:
    TypeError: a ``temperature`` that is not a number.
    ValueError: a concrete ``temperature`` that is zero, negative or infinite, or not a scalar.

  References:
    Guo et al., "On Calibration of Modern Neural Networks", ICML 2017.
  """
  fn = "apply_temperature"
  logits = _as_array(logits)
  checks.check_floating(fn, "logits", logits)
  logits = _jnp.asarray(logits)
  if _jnp.ndim(temperature) != 0:
    raise ValueError(f"{fn}: `temperature` must be a scalar, got shape {_jnp.shape(temperature)}.")
  checks.check_real_scalar(fn, "temperature", temperature)
  if isinstance(temperature, _jax.core.Tracer) or not _np.isnan(_np.asarray(temperature)):
    checks.check_in_range(
      fn, "temperature", temperature, 0.0, _np.inf, low_open=True, high_open=True
    )
  return logits / _jnp.asarray(temperature, logits.dtype)


# ----------------------------------------------------------------------------------------------
# Streaming evaluation of all metrics at once.


@_public("num_bins", "axis")
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
    >>> import jax, jax.numpy as jnp
    >>> batches = [(jnp.zeros((2, 3)), jnp.array([0, 1])), (jnp.ones((1, 3)), jnp.array([2]))]
    >>> total = jax.tree.map(jnp.add, *[eval_sums(x, y) for x, y in batches])
    >>> round(float(metrics_from_sums(total)["accuracy"]), 4)
    0.3333
  """
  fn = "eval_sums"
  num_bins = _check_positive_int(fn, "num_bins", num_bins)
  rows = _rows(fn, logits, labels, axis, where)
  return EvalSums(
    count=_jnp.sum(rows.mask, dtype=rows.logits.dtype),
    correct_sum=_masked_sum(_correct(rows, 1), rows.mask),
    nll_sum=_masked_sum(_nll(rows), rows.mask),
    brier_sum=_masked_sum(_brier(rows), rows.mask),
    calibration=_bin_sums(rows, num_bins),
  )


@_jax.jit
def metrics_from_sums(sums: EvalSums) -> dict[str, _jax.Array]:
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
