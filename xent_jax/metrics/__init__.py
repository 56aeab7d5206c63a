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

The public names are exactly ``__all__``; the modules behind them are private: ``_rows`` (the
reading every metric shares), ``_classification``, ``_calibration``, ``_temperature`` and
``_streaming``.
"""

from xent_jax.metrics._calibration import (
  CalibrationCounts,
  ReliabilityBins,
  adaptive_calibration_error,
  calibration_counts,
  classwise_calibration_error,
  ece_from_counts,
  expected_calibration_error,
  maximum_calibration_error,
  mce_from_counts,
  reliability_diagram_bins,
  reliability_from_counts,
)
from xent_jax.metrics._classification import (
  accuracy,
  brier_score,
  negative_log_likelihood,
)
from xent_jax.metrics._streaming import (
  EvalSums,
  eval_sums,
  metrics_from_sums,
)
from xent_jax.metrics._temperature import (
  apply_temperature,
  fit_temperature,
)

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
