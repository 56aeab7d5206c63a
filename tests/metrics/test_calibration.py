"""Calibration metrics beyond ECE and temperature scaling, against float64 NumPy references,
hand-computed cases, SciPy's bounded minimiser and torchmetrics.

torchmetrics' ``multiclass_calibration_error`` uses the same top-label bins up to the side of an
edge that an exact edge value falls on ([lo, hi) there, (lo, hi] here), so it is compared on
continuous random confidences, where no value lies on an edge.
"""

import doctest
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import optimize
from torchmetrics.functional.classification import multiclass_calibration_error

from xent_jax import metrics

# ----------------------------------------------------------------------------------------------
# Float64 NumPy references, written from the formulas (rows with mask False dropped first).


def _probs(logits):
  x = np.asarray(logits, np.float64)
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _kept(logits, labels, mask):
  mask = np.ones(len(labels), bool) if mask is None else np.asarray(mask)
  return _probs(logits)[mask], np.asarray(labels)[mask]


def _uniform_bin(values, num_bins):
  """Right-closed equal-width bins: [0, 1/M] is bin 0, ((b-1)/M, b/M] is bin b-1."""
  return np.clip(np.ceil(values * num_bins).astype(int) - 1, 0, num_bins - 1)


def _gaps(conf, correct, bin_ids, num_bins):
  """Per-bin (count, |accuracy - confidence|) over non-empty bins."""
  out = []
  for b in range(num_bins):
    in_bin = bin_ids == b
    if in_bin.any():
      out.append((in_bin.sum(), abs(correct[in_bin].mean() - conf[in_bin].mean())))
  return out


def _ref_mce(logits, labels, num_bins, mask=None):
  p, y = _kept(logits, labels, mask)
  if not len(y):
    return np.nan
  conf = p.max(-1)
  correct = (p.argmax(-1) == y).astype(np.float64)
  return max(g for _, g in _gaps(conf, correct, _uniform_bin(conf, num_bins), num_bins))


def _ref_adaptive_ece(logits, labels, num_bins, mask=None):
  p, y = _kept(logits, labels, mask)
  if not len(y):
    return np.nan
  conf = p.max(-1)
  correct = (p.argmax(-1) == y).astype(np.float64)
  order = np.argsort(conf, kind="stable")
  bin_ids = np.empty(len(y), int)
  for b, members in enumerate(np.array_split(order, num_bins)):
    bin_ids[members] = b
  return sum(n * g for n, g in _gaps(conf, correct, bin_ids, num_bins)) / len(y)


def _ref_classwise_ece(logits, labels, num_bins, mask=None):
  p, y = _kept(logits, labels, mask)
  if not len(y):
    return np.nan
  num_classes = p.shape[-1]
  total = 0.0
  for j in range(num_classes):
    is_j = (y == j).astype(np.float64)
    total += sum(
      n * g for n, g in _gaps(p[:, j], is_j, _uniform_bin(p[:, j], num_bins), num_bins)
    ) / len(y)
  return total / num_classes


def _ref_nll(logits, labels, temperature, mask=None):
  x = np.asarray(logits, np.float64) / temperature
  m = x.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[:, 0]
  keep = np.ones(len(labels), bool) if mask is None else np.asarray(mask)
  return np.mean((lse - x[np.arange(len(labels)), labels])[keep])


def _ref_temperature(logits, labels, mask=None, bounds=(0.01, 100.0)):
  """SciPy's bounded scalar minimiser of the float64 NLL over log T."""
  result = optimize.minimize_scalar(
    lambda log_t: _ref_nll(logits, labels, np.exp(log_t), mask),
    bounds=np.log(bounds),
    method="bounded",
    options={"xatol": 1e-10},
  )
  return float(np.exp(result.x))


def _case(seed, num_rows=300, num_classes=5, scale=3.0, true_temperature=None):
  """Random logits; labels drawn from softmax(logits / true_temperature) (else uniformly)."""
  rng = np.random.default_rng(seed)
  logits = (scale * rng.standard_normal((num_rows, num_classes))).astype(np.float32)
  if true_temperature is None:
    labels = rng.integers(0, num_classes, num_rows)
  else:
    p = _probs(logits / true_temperature)
    labels = (rng.random((num_rows, 1)) > np.cumsum(p, -1)).sum(-1)
  mask = rng.random(num_rows) < 0.8
  return logits, labels, mask


# Hand case, 4 rows of 2 classes: confidences 0.5, 0.5, 0.8, 0.8 (rows 0, 2, 3 right, row 1
# wrong). 2 equal-width bins [0, .5], (.5, 1]: bin 0 gap |.5 - .5| = 0, bin 1 gap |1 - .8| = .2.
# MCE = 0.2. Adaptive, 2 bins of 2 (sorted by confidence, stable): the same bins -> 0.1.
# Classwise, class 0: p_0 = .5, .5, .8, .2 with is_0 = 1, 0, 1, 0: bin 0 = rows 0, 1, 3
# (mean p .4, freq 1/3, gap 1/15), bin 1 = row 2 (p .8, freq 1, gap .2) -> (3/15 + .2) / 4 = .1.
# Class 1 mirrors class 0 (p_1 = 1 - p_0, is_1 = 1 - is_0) except that p_1 = .5 sits in bin 0
# too: bin 0 = rows 0, 1, 2 (mean .4, freq 1/3), bin 1 = row 3 (p .8, freq 1) -> .1. cwECE = .1.
_HAND_P = np.array([[0.5, 0.5], [0.5, 0.5], [0.8, 0.2], [0.2, 0.8]])
_HAND_LOGITS = np.log(_HAND_P).astype(np.float32)
_HAND_LABELS = np.array([0, 1, 0, 1])


class TestHandComputed:
  def test_mce(self):
    np.testing.assert_allclose(
      metrics.maximum_calibration_error(_HAND_LOGITS, _HAND_LABELS, num_bins=2), 0.2, rtol=1e-5
    )

  def test_adaptive(self):
    np.testing.assert_allclose(
      metrics.adaptive_calibration_error(_HAND_LOGITS, _HAND_LABELS, num_bins=2), 0.1, rtol=1e-5
    )

  def test_classwise(self):
    np.testing.assert_allclose(
      metrics.classwise_calibration_error(_HAND_LOGITS, _HAND_LABELS, num_bins=2), 0.1, rtol=1e-5
    )

  def test_adaptive_splits_like_array_split(self):
    # 5 rows, 2 bins: the first bin takes 3 rows (array_split), the lowest confidences.
    p = np.array([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1], [0.95, 0.05], [0.99, 0.01]])
    labels = np.array([1, 0, 0, 0, 0])  # row 0 wrong
    # bin 0: conf mean (.6 + .7 + .9) / 3, acc 2/3; bin 1: conf (.95 + .99) / 2, acc 1.
    want = (abs(2 / 3 - 2.2 / 3) * 3 + abs(1 - 0.97) * 2) / 5
    got = metrics.adaptive_calibration_error(np.log(p).astype(np.float32), labels, num_bins=2)
    np.testing.assert_allclose(got, want, rtol=1e-5)


class TestAgainstReference:
  @pytest.mark.parametrize("num_bins", [1, 4, 15])
  def test_mce(self, num_bins):
    logits, labels, mask = _case(0)
    np.testing.assert_allclose(
      metrics.maximum_calibration_error(logits, labels, num_bins=num_bins, where=mask),
      _ref_mce(logits, labels, num_bins, mask),
      rtol=1e-5,
      atol=1e-6,
    )

  @pytest.mark.parametrize("num_bins,num_rows", [(1, 50), (7, 300), (15, 301), (20, 9)])
  def test_adaptive(self, num_bins, num_rows):
    logits, labels, mask = _case(1, num_rows=num_rows)
    np.testing.assert_allclose(
      metrics.adaptive_calibration_error(logits, labels, num_bins=num_bins, where=mask),
      _ref_adaptive_ece(logits, labels, num_bins, mask),
      rtol=1e-5,
      atol=1e-6,
    )

  def test_adaptive_with_tied_confidences(self):
    logits, labels, mask = _case(2, num_rows=200)
    logits = np.round(logits / 3.0).astype(np.float32)  # many rows share a confidence
    np.testing.assert_allclose(
      metrics.adaptive_calibration_error(logits, labels, num_bins=6, where=mask),
      _ref_adaptive_ece(logits, labels, 6, mask),
      rtol=1e-5,
      atol=1e-6,
    )

  @pytest.mark.parametrize("num_bins,num_classes", [(1, 3), (10, 4), (15, 7)])
  def test_classwise(self, num_bins, num_classes):
    logits, labels, mask = _case(3, num_classes=num_classes)
    np.testing.assert_allclose(
      metrics.classwise_calibration_error(logits, labels, num_bins=num_bins, where=mask),
      _ref_classwise_ece(logits, labels, num_bins, mask),
      rtol=1e-5,
      atol=1e-6,
    )

  def test_batch_dims_and_axis(self):
    logits, labels, mask = _case(4, num_rows=24)
    logits_BxCxT = np.moveaxis(logits.reshape(4, 6, 5), -1, 1)
    labels_BxT, mask_BxT = labels.reshape(4, 6), mask.reshape(4, 6)
    for fn, ref in [
      (metrics.maximum_calibration_error, _ref_mce),
      (metrics.adaptive_calibration_error, _ref_adaptive_ece),
      (metrics.classwise_calibration_error, _ref_classwise_ece),
    ]:
      np.testing.assert_allclose(
        fn(logits_BxCxT, labels_BxT, num_bins=5, axis=1, where=mask_BxT),
        ref(logits, labels, 5, mask),
        rtol=1e-5,
        err_msg=fn.__name__,
      )

  def test_mce_streams_from_summed_counts(self):
    logits, labels, mask = _case(5)
    parts = [
      metrics.calibration_counts(logits[s], labels[s], num_bins=10, where=mask[s])
      for s in (slice(0, 120), slice(120, 300))
    ]
    total = jax.tree.map(jnp.add, *parts)
    np.testing.assert_allclose(
      metrics.mce_from_counts(total), _ref_mce(logits, labels, 10, mask), rtol=1e-5
    )


class TestAgainstTorchmetrics:
  @pytest.mark.parametrize("num_bins", [5, 15])
  @pytest.mark.parametrize(
    "norm,fn",
    [("max", metrics.maximum_calibration_error), ("l1", metrics.expected_calibration_error)],
  )
  def test_top_label_calibration_error(self, num_bins, norm, fn):
    logits, labels, _ = _case(6, num_rows=500, num_classes=6)
    want = multiclass_calibration_error(
      torch.tensor(_probs(logits)), torch.tensor(labels), num_classes=6, n_bins=num_bins, norm=norm
    )
    np.testing.assert_allclose(fn(logits, labels, num_bins=num_bins), want.item(), rtol=1e-5)


class TestConventions:
  @pytest.mark.parametrize(
    "fn",
    [
      metrics.maximum_calibration_error,
      metrics.adaptive_calibration_error,
      metrics.classwise_calibration_error,
      metrics.fit_temperature,
    ],
  )
  def test_nan_when_empty_or_invalid_included(self, fn):
    logits, labels, mask = _case(7, num_rows=20)
    assert np.isnan(fn(logits, labels, where=np.zeros(20, bool)))
    bad = labels.copy()
    bad[~mask] = 99  # out of range, but excluded
    np.testing.assert_allclose(
      fn(logits, bad, where=mask), fn(logits, labels, where=mask), rtol=1e-6
    )
    assert np.isnan(fn(logits, bad))
    nan_logits = logits.copy()
    nan_logits[np.argmax(mask), 0] = np.nan
    assert np.isnan(fn(nan_logits, labels, where=mask))

  def test_ranges(self):
    logits, labels, mask = _case(8, scale=8.0)
    for fn in (
      metrics.maximum_calibration_error,
      metrics.adaptive_calibration_error,
      metrics.classwise_calibration_error,
    ):
      assert 0.0 <= float(fn(logits, labels, where=mask)) <= 1.0
    # MCE bounds ECE from above: a weighted mean of gaps is at most their max.
    assert (
      float(metrics.expected_calibration_error(logits, labels, where=mask))
      <= float(metrics.maximum_calibration_error(logits, labels, where=mask)) + 1e-7
    )

  def test_adaptive_with_one_bin_equals_ece_with_one_bin(self):
    logits, labels, mask = _case(9)
    np.testing.assert_allclose(
      metrics.adaptive_calibration_error(logits, labels, num_bins=1, where=mask),
      metrics.expected_calibration_error(logits, labels, num_bins=1, where=mask),
      rtol=1e-6,
    )

  def test_jit_and_vmap(self):
    logits, labels, mask = _case(10, num_rows=60)
    logits, labels, mask = logits.reshape(3, 20, 5), labels.reshape(3, 20), mask.reshape(3, 20)
    for fn, ref in [
      (metrics.adaptive_calibration_error, _ref_adaptive_ece),
      (metrics.classwise_calibration_error, _ref_classwise_ece),
    ]:
      got = jax.vmap(jax.jit(functools.partial(fn, num_bins=4)))(logits, labels, where=mask)
      want = [ref(logits[i], labels[i], 4, mask[i]) for i in range(3)]
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=fn.__name__)

  def test_bf16_logits_accumulate_in_float32(self):
    logits, labels, mask = _case(11, num_rows=400)
    logits_bf16 = jnp.asarray(logits, jnp.bfloat16)
    exact = np.asarray(logits_bf16.astype(jnp.float32))
    got = metrics.classwise_calibration_error(logits_bf16, labels, num_bins=10, where=mask)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, _ref_classwise_ece(exact, labels, 10, mask), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Temperature scaling.


class TestTemperature:
  @pytest.mark.parametrize("true_temperature,scale", [(0.5, 1.0), (1.0, 3.0), (4.0, 6.0)])
  def test_matches_scipy_minimiser(self, true_temperature, scale):
    logits, labels, mask = _case(20, num_rows=1000, scale=scale, true_temperature=true_temperature)
    want = _ref_temperature(logits, labels, mask)
    got = float(metrics.fit_temperature(logits, labels, where=mask))
    np.testing.assert_allclose(got, want, rtol=1e-4)
    # The fit is a minimum of the float64 NLL: no nearby temperature does better.
    for nearby in (got * 0.99, got * 1.01):
      assert _ref_nll(logits, labels, got, mask) <= _ref_nll(logits, labels, nearby, mask)

  def test_recovers_the_temperature_labels_were_drawn_with(self):
    logits, labels, _ = _case(21, num_rows=20000, scale=5.0, true_temperature=2.5)
    np.testing.assert_allclose(metrics.fit_temperature(logits, labels), 2.5, rtol=0.05)

  def test_bounds_when_the_optimum_lies_outside(self):
    # Every label has the largest logit by a margin: the NLL keeps falling as T -> 0.
    logits = np.array([[4.0, 0.0, 1.0], [0.0, 3.0, -1.0]], np.float32)
    labels = np.array([0, 1])
    np.testing.assert_allclose(metrics.fit_temperature(logits, labels), 0.01, rtol=1e-5)
    np.testing.assert_allclose(
      metrics.fit_temperature(logits, labels, min_temperature=0.5), 0.5, rtol=1e-5
    )
    # Every label has the smallest logit: uniform (T -> inf) is best.
    np.testing.assert_allclose(metrics.fit_temperature(logits, np.array([1, 2])), 100.0, rtol=1e-5)
    np.testing.assert_allclose(
      metrics.fit_temperature(logits, np.array([1, 2]), max_temperature=7.0), 7.0, rtol=1e-5
    )

  def test_minus_inf_logits_and_masked_garbage(self):
    logits, labels, mask = _case(22, num_rows=200, true_temperature=2.0)
    logits[:, 4] = -np.inf  # a class nobody predicts (no label is 4 then)
    labels = np.where(labels == 4, 0, labels)
    logits[~mask] = np.nan  # excluded rows may hold anything
    got = float(metrics.fit_temperature(logits, labels, where=mask))
    want = _ref_temperature(logits[mask][:, :4], labels[mask])
    np.testing.assert_allclose(got, want, rtol=1e-4)

  def test_deterministic_jittable_and_scaled_logits_are_better_calibrated(self):
    logits, labels, _ = _case(23, num_rows=2000, scale=6.0, true_temperature=3.0)
    first = metrics.fit_temperature(logits, labels)
    again = jax.jit(metrics.fit_temperature)(logits, labels)
    assert float(first) == float(again)
    scaled = metrics.apply_temperature(logits, first)
    np.testing.assert_allclose(scaled, logits / float(first), rtol=1e-6)
    assert float(metrics.accuracy(scaled, labels)) == float(metrics.accuracy(logits, labels))
    assert _ref_nll(logits, labels, float(first)) < _ref_nll(logits, labels, 1.0)
    assert float(metrics.expected_calibration_error(scaled, labels)) < float(
      metrics.expected_calibration_error(logits, labels)
    )

  def test_vmap_over_splits(self):
    logits, labels, _ = _case(24, num_rows=600, true_temperature=2.0)
    got = jax.vmap(metrics.fit_temperature)(logits.reshape(3, 200, 5), labels.reshape(3, 200))
    want = [
      _ref_temperature(logits[i * 200 : (i + 1) * 200], labels[i * 200 : (i + 1) * 200])
      for i in range(3)
    ]
    np.testing.assert_allclose(got, want, rtol=1e-4)

  def test_float64_under_x64(self):
    logits, labels, mask = _case(25, num_rows=500, true_temperature=1.7)
    with jax.enable_x64(True):
      got = metrics.fit_temperature(logits.astype(np.float64), labels, where=mask)
      assert got.dtype == jnp.float64
      np.testing.assert_allclose(got, _ref_temperature(logits, labels, mask), rtol=1e-7)


class TestBadInput:
  @pytest.mark.parametrize(
    "kwargs,name",
    [
      ({"num_iters": 0}, "num_iters"),
      ({"num_iters": 2.5}, "num_iters"),
      ({"min_temperature": 0.0}, "min_temperature"),
      ({"min_temperature": -1.0}, "min_temperature"),
      ({"min_temperature": 2.0, "max_temperature": 1.0}, "max_temperature"),
      ({"max_temperature": np.inf}, "max_temperature"),
    ],
  )
  def test_fit_temperature_options(self, kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
      metrics.fit_temperature(_HAND_LOGITS, _HAND_LABELS, **kwargs)

  @pytest.mark.parametrize(
    "temperature,error",
    [
      (0.0, ValueError),
      (-2.0, ValueError),
      (np.inf, ValueError),
      ("2", TypeError),
      (jnp.ones(2), ValueError),
    ],
  )
  def test_apply_temperature_rejects_bad_temperature(self, temperature, error):
    with pytest.raises(error, match="`temperature`"):
      metrics.apply_temperature(_HAND_LOGITS, temperature)

  def test_apply_temperature_passes_a_nan_temperature_on(self):
    # fit_temperature on an empty split gives NaN; the scaled metrics are then NaN, not a crash.
    temperature = metrics.fit_temperature(_HAND_LOGITS, _HAND_LABELS, where=np.zeros(4, bool))
    scaled = metrics.apply_temperature(_HAND_LOGITS, temperature)
    assert np.isnan(metrics.expected_calibration_error(scaled, _HAND_LABELS))

  def test_apply_temperature_rejects_integer_logits(self):
    with pytest.raises(TypeError, match="`logits` must be a floating"):
      metrics.apply_temperature(np.ones((2, 3), np.int32), 2.0)

  @pytest.mark.parametrize(
    "fn",
    [
      metrics.maximum_calibration_error,
      metrics.adaptive_calibration_error,
      metrics.classwise_calibration_error,
    ],
  )
  @pytest.mark.parametrize("num_bins", [0, 2.0, None])
  def test_bad_num_bins(self, fn, num_bins):
    with pytest.raises(ValueError, match="`num_bins`"):
      fn(_HAND_LOGITS, _HAND_LABELS, num_bins=num_bins)

  @pytest.mark.parametrize(
    "fn",
    [
      metrics.maximum_calibration_error,
      metrics.adaptive_calibration_error,
      metrics.classwise_calibration_error,
      metrics.fit_temperature,
    ],
  )
  def test_shape_and_dtype_errors_name_the_argument(self, fn):
    with pytest.raises(AssertionError, match=r"`labels` must have shape \(4,\), got \(3,\)"):
      fn(_HAND_LOGITS, _HAND_LABELS[:3])
    with pytest.raises(TypeError, match="`labels` must be integer"):
      fn(_HAND_LOGITS, _HAND_LABELS.astype(np.float32))
    with pytest.raises(TypeError, match="`where` must be a boolean"):
      fn(_HAND_LOGITS, _HAND_LABELS, where=np.ones(4))


def test_public_names_are_exactly_all():
  public = {name for name in vars(metrics) if not name.startswith("_")}
  assert public == set(metrics.__all__)
  for leaked in ("np", "jnp", "jax", "functools", "NamedTuple"):
    assert not hasattr(metrics, leaked), leaked
  for name in metrics.__all__:
    assert getattr(metrics, name).__doc__, name


def test_docstring_examples_run():
  # The package re-exports; the docstrings live in the modules that define the public names.
  modules = {sys.modules[getattr(metrics, name).__module__] for name in metrics.__all__}
  results = [
    doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    for module in sorted(modules | {metrics}, key=lambda module: module.__name__)
  ]
  attempted = sum(result.attempted for result in results)
  failed = sum(result.failed for result in results)
  assert attempted > 20 and failed == 0, results
