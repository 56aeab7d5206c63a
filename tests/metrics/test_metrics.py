"""Tests for xent_jax.metrics against float64 NumPy references, hand-computed cases and sklearn."""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn import calibration as sk_calibration
from sklearn import metrics as sk_metrics

import xent_jax
from xent_jax import metrics

# ----------------------------------------------------------------------------------------------
# Float64 NumPy references, written from the formulas (classes on the last axis, rows flattened).


def _ref_probs(logits):
  x = np.asarray(logits, dtype=np.float64)
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _ref_rank(logits, labels):
  """Position of each label in the classes sorted by decreasing logit, lower index first on ties."""
  x = np.asarray(logits, dtype=np.float64).reshape(-1, logits.shape[-1])
  y = np.asarray(labels).reshape(-1)
  ranks = []
  for row, label in zip(x, y):
    order = np.lexsort((np.arange(row.size), -row))  # primary key -logit, then class index
    ranks.append(int(np.nonzero(order == label)[0][0]))
  return np.array(ranks)


def _ref_accuracy(logits, labels, k, mask):
  hits = (_ref_rank(logits, labels) < k).astype(np.float64)
  mask = np.asarray(mask).reshape(-1)
  return hits[mask].mean() if mask.any() else np.nan


def _ref_nll(logits, labels, mask):
  with np.errstate(divide="ignore"):
    log_p = np.log(_ref_probs(logits)).reshape(-1, logits.shape[-1])
  y = np.asarray(labels).reshape(-1)
  nll = -log_p[np.arange(y.size), y]
  mask = np.asarray(mask).reshape(-1)
  return nll[mask].mean() if mask.any() else np.nan


def _ref_brier(logits, labels, mask):
  p = _ref_probs(logits).reshape(-1, logits.shape[-1])
  y = np.asarray(labels).reshape(-1)
  onehot = np.eye(p.shape[-1])[y]
  per_example = ((p - onehot) ** 2).sum(axis=-1)
  mask = np.asarray(mask).reshape(-1)
  return per_example[mask].mean() if mask.any() else np.nan


def _ref_bins(logits, labels, num_bins, mask):
  """Per-bin (count, mean confidence, accuracy) with bins [0, 1/M], (1/M, 2/M], ..., float64."""
  p = _ref_probs(logits).reshape(-1, logits.shape[-1])
  y = np.asarray(labels).reshape(-1)
  mask = np.asarray(mask).reshape(-1)
  conf = p.max(axis=-1)[mask]
  correct = (p.argmax(axis=-1) == y)[mask].astype(np.float64)  # np.argmax: first max on ties
  count, mean_conf, acc = [], [], []
  for b in range(num_bins):
    lo, hi = b / num_bins, (b + 1) / num_bins
    in_bin = (conf <= hi) & ((conf > lo) if b > 0 else (conf >= 0.0))
    count.append(in_bin.sum())
    mean_conf.append(conf[in_bin].mean() if in_bin.any() else np.nan)
    acc.append(correct[in_bin].mean() if in_bin.any() else np.nan)
  return np.array(count, dtype=np.float64), np.array(mean_conf), np.array(acc)


def _ref_ece(logits, labels, num_bins, mask):
  count, mean_conf, acc = _ref_bins(logits, labels, num_bins, mask)
  n = count.sum()
  if n == 0:
    return np.nan
  nonempty = count > 0
  return np.sum(count[nonempty] / n * np.abs(acc[nonempty] - mean_conf[nonempty]))


def _random_case(seed, shape=(64,), num_classes=5, scale=3.0):
  rng = np.random.default_rng(seed)
  logits = (scale * rng.standard_normal(shape + (num_classes,))).astype(np.float32)
  labels = rng.integers(0, num_classes, size=shape)
  mask = rng.random(shape) < 0.7
  return logits, labels, mask


# ----------------------------------------------------------------------------------------------
# Hand-computed case: 4 examples, 3 classes, logits = log of these probabilities.
#   row 0: p = [0.5, 0.25, 0.25], y = 0 -> top-1 hit; conf 0.5
#   row 1: p = [0.25, 0.5, 0.25], y = 2 -> top-1 miss (pred 1); top-2 miss: class 0 ties with
#          class 2 at 0.25 and wins the tie (lower index), so label 2 has rank 2; conf 0.5
#   row 2: p = [0.8, 0.1, 0.1],   y = 0 -> top-1 hit; conf 0.8
#   row 3: p = [0.1, 0.1, 0.8],   y = 0 -> top-1 miss; top-2 hit (0 beats 1 in their tie); conf 0.8
# accuracy: top-1 = 2/4 = 0.5, top-2 = 3/4 = 0.75, top-3 = 1
# NLL = (-log .5 - log .25 - log .8 - log .1) / 4 = log(2 * 4 * 1.25 * 10) / 4 = log(100) / 4
# Brier: row 0: .25 + .0625 + .0625 = .375;  row 1: .0625 + .25 + .5625 = .875
#        row 2: .04 + .01 + .01 = .06;        row 3: .81 + .01 + .64 = 1.46   -> mean 2.77 / 4
# ECE, 3 bins (0, 1/3], (1/3, 2/3], (2/3, 1]: bin 1 = rows 0, 1 (conf .5, acc .5, gap 0);
#        bin 2 = rows 2, 3 (conf .8, acc .5, gap .3) -> ECE = 2/4 * 0 + 2/4 * .3 = 0.15
# With where = [T, T, F, T]: top-1 = 1/3; ECE = 2/3 * 0 + 1/3 * |0 - .8| = 0.8 / 3.

_HAND_P = np.array([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.8, 0.1, 0.1], [0.1, 0.1, 0.8]])
_HAND_LOGITS = np.log(_HAND_P).astype(np.float32)
_HAND_LABELS = np.array([0, 2, 0, 0])
_HAND_WHERE = np.array([True, True, False, True])


class TestHandComputed:
  def test_accuracy(self):
    assert float(metrics.accuracy(_HAND_LOGITS, _HAND_LABELS)) == 0.5
    assert float(metrics.accuracy(_HAND_LOGITS, _HAND_LABELS, k=2)) == 0.75
    assert float(metrics.accuracy(_HAND_LOGITS, _HAND_LABELS, k=3)) == 1.0
    np.testing.assert_allclose(
      metrics.accuracy(_HAND_LOGITS, _HAND_LABELS, where=_HAND_WHERE), 1 / 3, rtol=1e-6
    )
    # Row by row (a one-row mask): top-2 hits are [1, 0, 1, 1]; rows 1 and 3 are decided by ties.
    for row, hit in enumerate([1.0, 0.0, 1.0, 1.0]):
      only_row = np.arange(4) == row
      assert float(metrics.accuracy(_HAND_LOGITS, _HAND_LABELS, k=2, where=only_row)) == hit

  def test_nll(self):
    np.testing.assert_allclose(
      metrics.negative_log_likelihood(_HAND_LOGITS, _HAND_LABELS), np.log(100) / 4, rtol=1e-6
    )

  def test_brier(self):
    np.testing.assert_allclose(metrics.brier_score(_HAND_LOGITS, _HAND_LABELS), 2.77 / 4, rtol=1e-6)

  def test_ece_and_reliability(self):
    np.testing.assert_allclose(
      metrics.expected_calibration_error(_HAND_LOGITS, _HAND_LABELS, num_bins=3), 0.15, rtol=1e-5
    )
    np.testing.assert_allclose(
      metrics.expected_calibration_error(_HAND_LOGITS, _HAND_LABELS, num_bins=3, where=_HAND_WHERE),
      0.8 / 3,
      rtol=1e-5,
    )
    bins = metrics.reliability_diagram_bins(_HAND_LOGITS, _HAND_LABELS, num_bins=3)
    np.testing.assert_array_equal(bins.count, [0, 2, 2])
    np.testing.assert_allclose(bins.confidence, [np.nan, 0.5, 0.8], rtol=1e-6)
    np.testing.assert_allclose(bins.accuracy, [np.nan, 0.5, 0.5], rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Random inputs against the float64 references.


class TestAgainstReference:
  @pytest.mark.parametrize("k", [1, 2, 5])
  def test_accuracy(self, k):
    logits, labels, mask = _random_case(0)
    np.testing.assert_allclose(
      metrics.accuracy(logits, labels, k=k, where=mask),
      _ref_accuracy(logits, labels, k, mask),
      rtol=1e-6,
    )

  def test_nll(self):
    logits, labels, mask = _random_case(1)
    np.testing.assert_allclose(
      metrics.negative_log_likelihood(logits, labels, where=mask),
      _ref_nll(logits, labels, mask),
      rtol=1e-6,
    )

  def test_brier(self):
    logits, labels, mask = _random_case(2)
    np.testing.assert_allclose(
      metrics.brier_score(logits, labels, where=mask), _ref_brier(logits, labels, mask), rtol=1e-6
    )

  @pytest.mark.parametrize("num_bins", [1, 10, 15])
  def test_ece_and_bins(self, num_bins):
    logits, labels, mask = _random_case(3, shape=(200,))
    np.testing.assert_allclose(
      metrics.expected_calibration_error(logits, labels, num_bins=num_bins, where=mask),
      _ref_ece(logits, labels, num_bins, mask),
      rtol=1e-5,
      atol=1e-7,
    )
    got = metrics.reliability_diagram_bins(logits, labels, num_bins=num_bins, where=mask)
    want = _ref_bins(logits, labels, num_bins, mask)
    assert got.count.shape == got.confidence.shape == got.accuracy.shape == (num_bins,)
    np.testing.assert_array_equal(got.count, want[0])
    np.testing.assert_allclose(got.confidence, want[1], rtol=1e-6)
    np.testing.assert_allclose(got.accuracy, want[2], rtol=1e-6)

  def test_nll_equals_optax_cross_entropy(self):
    logits, labels, _ = _random_case(4)
    want = optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    np.testing.assert_allclose(metrics.negative_log_likelihood(logits, labels), want, rtol=1e-6)

  def test_nll_equals_core_cross_entropy_mean(self):
    logits, labels, mask = _random_case(7, shape=(8, 5))
    want = xent_jax.cross_entropy(logits, labels, reduction="mean", where=mask)
    np.testing.assert_allclose(
      metrics.negative_log_likelihood(logits, labels, where=mask), want, rtol=1e-6
    )

  def test_batch_dims_and_axis(self):
    logits, labels, mask = _random_case(5, shape=(4, 6), num_classes=7)
    logits_BxCxT = np.moveaxis(logits, -1, 1)
    for fn, ref in [(metrics.negative_log_likelihood, _ref_nll), (metrics.brier_score, _ref_brier)]:
      np.testing.assert_allclose(
        fn(logits_BxCxT, labels, axis=1, where=mask), ref(logits, labels, mask), rtol=1e-6
      )
    np.testing.assert_allclose(
      metrics.accuracy(logits_BxCxT, labels, k=3, axis=1, where=mask),
      _ref_accuracy(logits, labels, 3, mask),
      rtol=1e-6,
    )
    np.testing.assert_allclose(
      metrics.expected_calibration_error(logits_BxCxT, labels, axis=1, where=mask),
      _ref_ece(logits, labels, 15, mask),
      rtol=1e-5,
    )

  def test_single_example_and_broadcast_mask(self):
    logits, labels, _ = _random_case(6, shape=(3, 5))
    row_mask = np.array([True, False, True, True, False])  # broadcasts over the first dim
    full_mask = np.broadcast_to(row_mask, (3, 5))
    np.testing.assert_allclose(
      metrics.brier_score(logits, labels, where=row_mask),
      _ref_brier(logits, labels, full_mask),
      rtol=1e-6,
    )
    np.testing.assert_allclose(
      metrics.negative_log_likelihood(logits[0, 0], labels[0, 0]),
      _ref_nll(logits[0, :1], labels[0, :1], [True]),
      rtol=1e-6,
    )

  @hypothesis.settings(max_examples=10, deadline=None)
  @hypothesis.given(
    seed=st.integers(0, 2**31),
    batch=st.integers(1, 40),
    num_classes=st.integers(1, 9),
    num_bins=st.integers(1, 20),
    scale=st.sampled_from([0.1, 3.0, 30.0]),
    round_logits=st.booleans(),
  )
  def test_property_all_metrics(self, seed, batch, num_classes, num_bins, scale, round_logits):
    logits, labels, mask = _random_case(seed, (batch,), num_classes, scale)
    if round_logits:  # many exact ties
      logits = np.round(logits / scale).astype(np.float32)
    k = 1 + seed % num_classes
    np.testing.assert_allclose(
      metrics.accuracy(logits, labels, k=k, where=mask),
      _ref_accuracy(logits, labels, k, mask),
      rtol=1e-6,
    )
    np.testing.assert_allclose(
      metrics.negative_log_likelihood(logits, labels, where=mask),
      _ref_nll(logits, labels, mask),
      rtol=1e-5,
      atol=1e-6,
    )
    np.testing.assert_allclose(
      metrics.brier_score(logits, labels, where=mask),
      _ref_brier(logits, labels, mask),
      rtol=1e-5,
      atol=1e-6,
    )
    np.testing.assert_allclose(
      metrics.expected_calibration_error(logits, labels, num_bins=num_bins, where=mask),
      _ref_ece(logits, labels, num_bins, mask),
      rtol=1e-5,
      atol=1e-6,
    )


# ----------------------------------------------------------------------------------------------
# scikit-learn defines some of the same quantities.


class TestAgainstSklearn:
  @pytest.mark.parametrize("k", [1, 2, 4])
  def test_top_k_accuracy(self, k):
    logits, labels, _ = _random_case(10, shape=(100,), num_classes=6)  # continuous: no ties
    want = sk_metrics.top_k_accuracy_score(labels, logits, k=k, labels=np.arange(6))
    np.testing.assert_allclose(metrics.accuracy(logits, labels, k=k), want, rtol=1e-6)

  @pytest.mark.parametrize("k", [1, 2, 3])
  def test_top_k_ties_follow_lower_index(self, k):
    # sklearn sorts with a stable argsort and reverses it, so on ties the *higher* class index
    # wins. Reversing the class order turns that into our lower-index-wins rule.
    rng = np.random.default_rng(11)
    logits = rng.integers(0, 3, size=(200, 5)).astype(np.float32)  # many ties
    labels = rng.integers(0, 5, size=200)
    want = sk_metrics.top_k_accuracy_score(4 - labels, logits[:, ::-1], k=k, labels=np.arange(5))
    np.testing.assert_allclose(metrics.accuracy(logits, labels, k=k), want, rtol=1e-6)

  def test_brier_multiclass(self):
    logits, labels, _ = _random_case(12, shape=(100,), num_classes=4)
    want = sk_metrics.brier_score_loss(labels, _ref_probs(logits), labels=np.arange(4))
    np.testing.assert_allclose(metrics.brier_score(logits, labels), want, rtol=1e-5)

  def test_brier_binary_is_twice_sklearn(self):
    logits, labels, _ = _random_case(13, shape=(100,), num_classes=2)
    p1 = _ref_probs(logits)[:, 1]
    want = sk_metrics.brier_score_loss(labels, p1)  # binary: mean (p1 - y)^2, range [0, 1]
    np.testing.assert_allclose(metrics.brier_score(logits, labels), 2 * want, rtol=1e-5)

  @pytest.mark.parametrize("num_bins", [5, 15])
  def test_reliability_matches_calibration_curve(self, num_bins):
    # calibration_curve bins a binary probability with the same right-closed uniform bins;
    # feeding it (confidence, correct) gives the per-bin accuracy and mean confidence.
    logits, labels, _ = _random_case(14, shape=(300,), num_classes=4)
    p = _ref_probs(logits)
    correct = (p.argmax(-1) == labels).astype(int)
    prob_true, prob_pred = sk_calibration.calibration_curve(
      correct, p.max(-1), n_bins=num_bins, strategy="uniform"
    )
    got = metrics.reliability_diagram_bins(logits, labels, num_bins=num_bins)
    nonempty = np.asarray(got.count) > 0
    np.testing.assert_allclose(np.asarray(got.accuracy)[nonempty], prob_true, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got.confidence)[nonempty], prob_pred, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Conventions: ties, bin edges, masks, invalid examples.


class TestConventions:
  @pytest.mark.parametrize("num_classes", [1, 3, 6])
  def test_all_equal_logits_correct_iff_label_below_k(self, num_classes):
    labels = np.arange(num_classes)
    logits = np.zeros((num_classes, num_classes), np.float32)
    for k in range(1, num_classes + 1):
      np.testing.assert_allclose(metrics.accuracy(logits, labels, k=k), k / num_classes, rtol=1e-6)

  def test_top1_equals_argmax(self):
    logits, labels, _ = _random_case(20, shape=(100,))
    logits = np.round(logits / 3.0)  # many ties at the max
    want = np.mean(np.argmax(logits, axis=-1) == labels)
    np.testing.assert_allclose(metrics.accuracy(logits, labels), want, rtol=1e-6)

  @pytest.mark.parametrize("num_bins", list(range(1, 21)))
  def test_confidence_on_bin_edge_goes_left(self, num_bins):
    # A row with j logits at 0 and the rest at -inf has confidence exactly 1/j (j = 1..8). The
    # bin (b/M, (b+1)/M] holding 1/j is the smallest b with (b+1)/M >= 1/j: b = ceil(M/j) - 1.
    num_classes = 8
    logits = np.full((num_classes, num_classes), -np.inf, np.float32)
    for j in range(1, num_classes + 1):
      logits[j - 1, :j] = 0.0
    labels = np.zeros(num_classes, int)
    counts = metrics.calibration_counts(logits, labels, num_bins=num_bins)
    want = np.zeros(num_bins)
    for j in range(1, num_classes + 1):
      want[-(-num_bins // j) - 1] += 1
    np.testing.assert_array_equal(counts.count, want)

  def test_all_masked_is_nan(self):
    none = np.zeros(4, bool)
    for value in [
      metrics.accuracy(_HAND_LOGITS, _HAND_LABELS, where=none),
      metrics.negative_log_likelihood(_HAND_LOGITS, _HAND_LABELS, where=none),
      metrics.brier_score(_HAND_LOGITS, _HAND_LABELS, where=none),
      metrics.expected_calibration_error(_HAND_LOGITS, _HAND_LABELS, where=none),
    ]:
      assert np.isnan(value)
    counts = metrics.calibration_counts(_HAND_LOGITS, _HAND_LABELS, num_bins=4, where=none)
    for field in counts:
      np.testing.assert_array_equal(field, np.zeros(4))

  def test_all_masked_nll_has_zero_gradient(self):
    grad = jax.grad(metrics.negative_log_likelihood)(
      jnp.asarray(_HAND_LOGITS), _HAND_LABELS, where=np.zeros(4, bool)
    )
    np.testing.assert_array_equal(grad, np.zeros_like(_HAND_LOGITS))

  @pytest.mark.parametrize("bad", [-1, 3])
  def test_out_of_range_label_is_nan_unless_masked(self, bad):
    labels = _HAND_LABELS.copy()
    labels[2] = bad
    fns = [
      metrics.accuracy,
      metrics.negative_log_likelihood,
      metrics.brier_score,
      metrics.expected_calibration_error,
    ]
    for fn in fns:
      assert np.isnan(fn(_HAND_LOGITS, labels)), fn.__name__
      np.testing.assert_allclose(
        fn(_HAND_LOGITS, labels, where=_HAND_WHERE),
        fn(_HAND_LOGITS, _HAND_LABELS, where=_HAND_WHERE),
        rtol=1e-6,
      )

  def test_nan_logits_are_nan_unless_masked(self):
    logits = _HAND_LOGITS.copy()
    logits[2, 1] = np.nan
    for fn in [
      metrics.accuracy,
      metrics.negative_log_likelihood,
      metrics.brier_score,
      metrics.expected_calibration_error,
    ]:
      assert np.isnan(fn(logits, _HAND_LABELS)), fn.__name__
      assert np.isfinite(fn(logits, _HAND_LABELS, where=_HAND_WHERE)), fn.__name__

  def test_minus_inf_logits(self):
    logits = np.array([[0.0, -np.inf, 1.0], [2.0, -np.inf, 0.0]], np.float32)
    labels = np.array([2, 0])
    mask = np.ones(2, bool)
    np.testing.assert_allclose(
      metrics.negative_log_likelihood(logits, labels), _ref_nll(logits, labels, mask), rtol=1e-6
    )
    np.testing.assert_allclose(
      metrics.brier_score(logits, labels), _ref_brier(logits, labels, mask), rtol=1e-6
    )
    assert np.isposinf(metrics.negative_log_likelihood(logits, np.array([1, 0])))

  def test_brier_near_perfect_keeps_small_value(self):
    # p_y = 1 - e with e ~ 2e-9: (1 - p_y)^2 + sum_{c != y} p_c^2 ~ 2 e^2, far below float32 eps.
    logits = np.array([[20.0, 0.0, 0.0]], np.float32)
    want = _ref_brier(logits, np.array([0]), [True])
    np.testing.assert_allclose(metrics.brier_score(logits, np.array([0])), want, rtol=1e-5)

  def test_metric_ranges(self):
    logits, labels, mask = _random_case(21, shape=(50,), scale=10.0)
    assert 0.0 <= float(metrics.expected_calibration_error(logits, labels, where=mask)) <= 1.0
    assert 0.0 <= float(metrics.brier_score(logits, labels, where=mask)) <= 2.0
    assert float(metrics.accuracy(logits, labels, k=5)) == 1.0


# ----------------------------------------------------------------------------------------------
# Streaming sums.


class TestStreaming:
  def test_summed_batches_equal_one_shot(self):
    logits, labels, mask = _random_case(30, shape=(90,))
    pieces = [slice(0, 7), slice(7, 50), slice(50, 90)]
    parts = [metrics.eval_sums(logits[s], labels[s], num_bins=10, where=mask[s]) for s in pieces]
    total = jax.tree.map(lambda *xs: functools.reduce(jnp.add, xs), *parts)
    got = metrics.metrics_from_sums(total)
    np.testing.assert_allclose(got["accuracy"], _ref_accuracy(logits, labels, 1, mask), rtol=1e-6)
    np.testing.assert_allclose(got["nll"], _ref_nll(logits, labels, mask), rtol=1e-5)
    np.testing.assert_allclose(got["brier"], _ref_brier(logits, labels, mask), rtol=1e-5)
    np.testing.assert_allclose(got["ece"], _ref_ece(logits, labels, 10, mask), rtol=1e-5)
    counts = jax.tree.map(
      jnp.add,
      *[
        metrics.calibration_counts(logits[s], labels[s], num_bins=10, where=mask[s])
        for s in pieces[:2]
      ],
    )
    counts = jax.tree.map(
      jnp.add,
      counts,
      metrics.calibration_counts(
        logits[pieces[2]], labels[pieces[2]], num_bins=10, where=mask[pieces[2]]
      ),
    )
    np.testing.assert_allclose(metrics.ece_from_counts(counts), got["ece"], rtol=1e-6)
    diagram = metrics.reliability_from_counts(counts)
    want = _ref_bins(logits, labels, 10, mask)
    np.testing.assert_array_equal(diagram.count, want[0])
    np.testing.assert_allclose(diagram.accuracy, want[2], rtol=1e-6)

  def test_empty_sums_are_nan(self):
    sums = metrics.eval_sums(_HAND_LOGITS, _HAND_LABELS, where=np.zeros(4, bool))
    assert all(np.isnan(v) for v in metrics.metrics_from_sums(sums).values())


# ----------------------------------------------------------------------------------------------
# jit, bf16, gradients.


class TestTransforms:
  def test_jit(self):
    logits, labels, mask = _random_case(40)
    for name, fn, ref in [
      (
        "accuracy",
        functools.partial(metrics.accuracy, k=2),
        lambda: _ref_accuracy(logits, labels, 2, mask),
      ),
      ("nll", metrics.negative_log_likelihood, lambda: _ref_nll(logits, labels, mask)),
      ("brier", metrics.brier_score, lambda: _ref_brier(logits, labels, mask)),
      ("ece", metrics.expected_calibration_error, lambda: _ref_ece(logits, labels, 15, mask)),
    ]:
      got = jax.jit(lambda x, y, m, fn=fn: fn(x, y, where=m))(logits, labels, mask)
      np.testing.assert_allclose(got, ref(), rtol=1e-5, err_msg=name)
    sums = jax.jit(metrics.eval_sums)(logits, labels, where=mask)
    np.testing.assert_allclose(
      metrics.metrics_from_sums(sums)["ece"], _ref_ece(logits, labels, 15, mask), rtol=1e-5
    )

  def test_bf16_accumulates_in_float32(self):
    logits, labels, mask = _random_case(41, shape=(500,), num_classes=11, scale=5.0)
    logits_bf16 = jnp.asarray(logits, jnp.bfloat16)
    exact = np.asarray(logits_bf16.astype(jnp.float32))  # the same values, for the reference
    for fn, ref in [(metrics.negative_log_likelihood, _ref_nll), (metrics.brier_score, _ref_brier)]:
      got = fn(logits_bf16, labels, where=mask)
      assert got.dtype == jnp.float32
      # bf16 arithmetic would be off by ~1e-2 relative; float32 accumulation by ~1e-6.
      np.testing.assert_allclose(got, ref(exact, labels, mask), rtol=2e-6)
    got = metrics.expected_calibration_error(logits_bf16, labels, where=mask)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, _ref_ece(exact, labels, 15, mask), rtol=1e-5)
    np.testing.assert_allclose(
      metrics.accuracy(logits_bf16, labels, k=3, where=mask),
      _ref_accuracy(exact, labels, 3, mask),
      rtol=1e-6,
    )

  def test_vmap_over_batches(self):
    logits, labels, mask = _random_case(43, shape=(3, 10))
    got = jax.vmap(lambda x, y, m: metrics.expected_calibration_error(x, y, num_bins=4, where=m))(
      logits, labels, mask
    )
    want = [_ref_ece(logits[i], labels[i], 4, mask[i]) for i in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)

  def test_float64_under_x64(self):
    logits, labels, mask = _random_case(44)
    with jax.enable_x64(True):
      got = metrics.negative_log_likelihood(logits.astype(np.float64), labels, where=mask)
      assert got.dtype == jnp.float64
      np.testing.assert_allclose(got, _ref_nll(logits, labels, mask), rtol=1e-12)

  @pytest.mark.parametrize("fn", [metrics.negative_log_likelihood, metrics.brier_score])
  def test_gradients(self, fn):
    logits, labels, mask = _random_case(42, shape=(6,), num_classes=4, scale=1.0)
    f = jax.jit(lambda x: fn(x, labels, where=mask))
    jax.test_util.check_grads(
      f, (jnp.asarray(logits),), order=1, modes=["rev"], atol=1e-2, rtol=1e-2, eps=1e-2
    )
    grad = jax.grad(f)(jnp.asarray(logits))
    np.testing.assert_array_equal(np.asarray(grad)[~mask], 0.0)  # masked rows get no gradient


# ----------------------------------------------------------------------------------------------
# Bad input: errors name the argument.


class TestBadInput:
  @pytest.mark.parametrize("k", [0, -1, 1.5, True, "2"])
  def test_bad_k(self, k):
    with pytest.raises(ValueError, match="`k`"):
      metrics.accuracy(_HAND_LOGITS, _HAND_LABELS, k=k)

  def test_k_above_num_classes(self):
    with pytest.raises(ValueError, match=r"`k` must be <= the number of classes 3, got k=4"):
      metrics.accuracy(_HAND_LOGITS, _HAND_LABELS, k=4)

  @pytest.mark.parametrize(
    "fn",
    [
      metrics.expected_calibration_error,
      metrics.reliability_diagram_bins,
      metrics.calibration_counts,
      metrics.eval_sums,
    ],
  )
  @pytest.mark.parametrize("num_bins", [0, 2.0, None])
  def test_bad_num_bins(self, fn, num_bins):
    with pytest.raises(ValueError, match="`num_bins`"):
      fn(_HAND_LOGITS, _HAND_LABELS, num_bins=num_bins)

  @pytest.mark.parametrize(
    "fn",
    [
      metrics.accuracy,
      metrics.negative_log_likelihood,
      metrics.brier_score,
      metrics.expected_calibration_error,
      metrics.reliability_diagram_bins,
      metrics.eval_sums,
    ],
  )
  def test_shape_and_dtype_errors_name_the_argument(self, fn):
    with pytest.raises(AssertionError, match=r"`labels` must have shape \(4,\), got \(3,\)"):
      fn(_HAND_LOGITS, _HAND_LABELS[:3])
    with pytest.raises(TypeError, match="`labels` must be integer"):
      fn(_HAND_LOGITS, _HAND_LABELS.astype(np.float32))
    with pytest.raises(TypeError, match="`logits` must be a floating"):
      fn(_HAND_LOGITS.astype(np.int32), _HAND_LABELS)
    with pytest.raises(ValueError, match="`where` must be broadcastable"):
      fn(_HAND_LOGITS, _HAND_LABELS, where=np.ones(3, bool))
    with pytest.raises(TypeError, match="`where` must be a boolean"):
      fn(_HAND_LOGITS, _HAND_LABELS, where=np.ones(4))
    with pytest.raises(ValueError, match="`axis`"):
      fn(_HAND_LOGITS, _HAND_LABELS, axis=2)
    with pytest.raises(ValueError, match="`logits` must have a class axis"):
      fn(np.float32(1.0), _HAND_LABELS)

  def test_shape_errors_under_jit(self):
    with pytest.raises(AssertionError, match="`labels`"):
      jax.jit(metrics.brier_score)(_HAND_LOGITS, _HAND_LABELS[:3])
