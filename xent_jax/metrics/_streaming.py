"""Streaming evaluation: additive sums of every metric over batches, and the metrics of the sums."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from xent_jax.metrics._calibration import CalibrationCounts, bin_sums, ece_from_counts
from xent_jax.metrics._classification import brier_per_row, nll_per_row
from xent_jax.metrics._rows import (
  check_positive_int,
  correct,
  jit_metric,
  masked_sum,
  mean_or_nan,
  read_rows,
)


class EvalSums(NamedTuple):
  """Additive sums for accuracy, NLL, Brier score and ECE; scalars except ``calibration``.

  Counts are float32, like the sums (which carry NaN from invalid examples); they are
  exact up to 2**24 (about 16.7 million) examples.

  Attributes:
    count: number of included examples.
    correct_sum: number of top-1 correct examples.
    nll_sum: sum of per-example negative log-likelihoods.
    brier_sum: sum of per-example Brier scores.
    calibration: per-bin :class:`CalibrationCounts`.
  """

  count: jax.Array  # type: ignore[assignment]  # a field, not tuple.count
  correct_sum: jax.Array
  nll_sum: jax.Array
  brier_sum: jax.Array
  calibration: CalibrationCounts


@jit_metric("num_bins", "axis")
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
    >>> from xent_jax.metrics import eval_sums, metrics_from_sums
    >>> batches = [(jnp.zeros((2, 3)), jnp.array([0, 1])), (jnp.ones((1, 3)), jnp.array([2]))]
    >>> total = jax.tree.map(jnp.add, *[eval_sums(x, y) for x, y in batches])
    >>> round(float(metrics_from_sums(total)["accuracy"]), 4)
    0.3333
  """
  fn = "eval_sums"
  num_bins = check_positive_int(fn, "num_bins", num_bins)
  rows = read_rows(fn, logits, labels, axis, where)
  return EvalSums(
    count=jnp.sum(rows.mask, dtype=rows.logits.dtype),
    correct_sum=masked_sum(correct(rows, 1), rows.mask),
    nll_sum=masked_sum(nll_per_row(rows), rows.mask),
    brier_sum=masked_sum(brier_per_row(rows), rows.mask),
    calibration=bin_sums(rows, num_bins),
  )


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
    "accuracy": mean_or_nan(sums.correct_sum, sums.count),
    "nll": mean_or_nan(sums.nll_sum, sums.count),
    "brier": mean_or_nan(sums.brier_sum, sums.count),
    "ece": ece_from_counts(sums.calibration),
  }
