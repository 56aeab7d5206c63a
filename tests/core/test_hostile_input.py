"""Hostile input to the library (issue 10, items 7 and 8): never a silently wrong number.

Narrow and wide integer labels are read exactly (uint8 labels never match ignore_index=-100, int8
labels are in range for 200 classes, int64 labels are never wrapped to int32); string options and
negative class weights are refused by name; logits without classes give a ValueError; the drop-ins
follow optax on an empty batch and give NaN for out-of-range labels under a per-logit mask; the
metrics take Python lists. Expected values come from the float64 references in ``_reference.py``
(NumPy compares integers of any width exactly) or from optax itself.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import checkify

import xent_jax
from tests import _reference as ref
from xent_jax import metrics

NUM_CLASSES = 200


def _logits(num_rows, num_classes=NUM_CLASSES, seed=0):
  rng = np.random.default_rng(seed)
  return (2.0 * rng.standard_normal((num_rows, num_classes))).astype(np.float32)


def _eager_and_jit(fn):
  return [fn, jax.jit(fn)]


# ----------------------------------------------------------------------------------------------
# Label dtypes: comparisons with ignore_index and [0, C) are exact in every integer dtype.

# (dtype, label values, which rows the float64 reference sees as ignored / out of range)
NARROW_CASES = {
  # uint8: 156 is a real class (it used to equal -100 after a cast); 255 is out of range.
  "uint8": (np.uint8, [156, 3, 255, 0]),
  # int8: -100 is ignored; 127 is a class of 200; -1 is out of range.
  "int8": (np.int8, [-100, 127, -1, 5]),
  # int16 and uint16 with the same kind of values.
  "int16": (np.int16, [-100, 199, 200, 150]),
  "uint16": (np.uint16, [65436, 199, 200, 150]),  # 65436 == -100 mod 2**16: a bad label
}


@pytest.mark.parametrize("case", list(NARROW_CASES))
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_cross_entropy_reads_narrow_labels_exactly(case, reduction):
  dtype, values = NARROW_CASES[case]
  x = _logits(len(values))
  labels = np.array(values, dtype)
  want = ref.cross_entropy(x, labels.astype(np.int64), reduction=reduction)
  for fn in _eager_and_jit(lambda x, y: xent_jax.cross_entropy(x, y, reduction=reduction)):
    np.testing.assert_allclose(fn(x, jnp.asarray(labels)), want, rtol=1e-5, atol=1e-6)


def test_uint8_class_156_is_not_ignored_and_int8_minus_100_is():
  x = _logits(2)
  loss = xent_jax.cross_entropy(x, jnp.array([156, 0], jnp.uint8), reduction="none")
  want = ref.cross_entropy(x[:1], np.array([156]), reduction="none")[0]
  np.testing.assert_allclose(loss[0], want, rtol=1e-5)
  loss = xent_jax.cross_entropy(x, jnp.array([-100, 0], jnp.int8), reduction="none")
  assert float(loss[0]) == 0.0


@pytest.mark.parametrize("case", ["uint8", "int8"])
def test_variants_read_narrow_labels_exactly(case):
  dtype, values = NARROW_CASES[case]
  x = _logits(len(values))
  labels = np.array(values, dtype)
  for fn in (xent_jax.softmax_focal_loss, xent_jax.poly1_cross_entropy):
    got = fn(x, jnp.asarray(labels), reduction="none")
    same = fn(x, jnp.asarray(labels.astype(np.int32)), reduction="none")
    np.testing.assert_array_equal(np.isnan(got), np.isnan(same))
    np.testing.assert_allclose(got, same, rtol=1e-6)


@pytest.mark.parametrize("case", ["uint8", "int8"])
def test_linear_cross_entropy_reads_narrow_labels_exactly(case):
  dtype, values = NARROW_CASES[case]
  rng = np.random.default_rng(3)
  hidden = rng.standard_normal((len(values), 3)).astype(np.float32)
  weight = rng.standard_normal((NUM_CLASSES, 3)).astype(np.float32)
  labels = np.array(values, dtype)
  want = ref.cross_entropy(
    hidden.astype(np.float64) @ weight.T.astype(np.float64),
    labels.astype(np.int64),
    reduction="none",
  )
  got = xent_jax.linear_cross_entropy(hidden, weight, jnp.asarray(labels), reduction="none")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_uint32_labels_beyond_int32_are_out_of_range():
  x = _logits(2)
  labels = jnp.array([2**31 + 5, 7], jnp.uint32)  # would wrap to a negative int32
  for fn in _eager_and_jit(lambda x, y: xent_jax.cross_entropy(x, y, reduction="none")):
    loss = fn(x, labels)
    assert np.isnan(loss[0])
    want = ref.cross_entropy(x[1:], np.array([7]), reduction="none")[0]
    np.testing.assert_allclose(loss[1], want, rtol=1e-5)


INT64_FUNCTIONS = {
  "cross_entropy": lambda x, y: xent_jax.cross_entropy(x, y),
  "focal_loss": lambda x, y: xent_jax.softmax_focal_loss(x, y),
  "softmax_cross_entropy_with_integer_labels": lambda x, y: (
    xent_jax.softmax_cross_entropy_with_integer_labels(x, y)
  ),
  "softmax_cross_entropy": lambda x, y: xent_jax.softmax_cross_entropy(x, y),
  "linear_cross_entropy": lambda x, y: xent_jax.linear_cross_entropy(x, jnp.ones((5, 5)), y),
  "accuracy": lambda x, y: metrics.accuracy(x, y),
  "expected_calibration_error": lambda x, y: metrics.expected_calibration_error(x, y),
  "fit_temperature": lambda x, y: metrics.fit_temperature(x, y),
}


@pytest.mark.parametrize("name", list(INT64_FUNCTIONS))
@pytest.mark.parametrize("as_list", [False, True])
def test_int64_labels_that_would_wrap_raise(name, as_list):
  # 2**32 + 1 wraps to class 1 as int32: a finite, wrong loss. With x64 off it must be refused.
  labels = np.array([2**32 + 1, 3], np.int64)
  with pytest.raises(ValueError, match=r"`labels` must fit in int32.*4294967297"):
    INT64_FUNCTIONS[name](_logits(2, 5), labels.tolist() if as_list else labels)


def test_int64_labels_in_int32_range_are_fine():
  x = _logits(3, 5)
  labels = np.array([0, 4, 2], np.int64)
  np.testing.assert_allclose(
    xent_jax.cross_entropy(x, labels), ref.cross_entropy(x, labels), rtol=1e-5
  )


def test_int64_labels_under_x64_are_out_of_range_not_wrapped():
  x = _logits(2, 5).astype(np.float64)
  with jax.enable_x64(True):
    labels = jnp.array([2**32 + 1, 3], jnp.int64)
    for fn in _eager_and_jit(lambda x, y: xent_jax.cross_entropy(x, y, reduction="none")):
      loss = fn(x, labels)
      assert np.isnan(loss[0])
      np.testing.assert_allclose(
        loss[1], ref.cross_entropy(x[1:], np.array([3]), reduction="none")[0], rtol=1e-12
      )


@pytest.mark.parametrize("bad", [1.0, "-100", True, jnp.array([-100])])
def test_ignore_index_must_be_an_int(bad):
  with pytest.raises(TypeError, match="`ignore_index`"):
    xent_jax.cross_entropy(_logits(2, 5), jnp.array([0, 1]), ignore_index=bad)


def test_ignore_index_as_numpy_int_works():
  x = _logits(2, 5)
  got = xent_jax.cross_entropy(x, jnp.array([0, 3]), ignore_index=np.int64(3), reduction="none")
  np.testing.assert_allclose(
    got, ref.cross_entropy(x, np.array([0, 3]), ignore_index=3, reduction="none"), rtol=1e-5
  )


def test_check_labels_reads_narrow_labels_exactly():
  x = jnp.zeros((3, NUM_CLASSES))
  xent_jax.check_labels(x, jnp.array([156, 199, 0], jnp.uint8))  # all classes: no error
  with pytest.raises(ValueError, match=r"labels\[\(1,\)\] = 200"):
    xent_jax.check_labels(x, jnp.array([156, 200, 0], jnp.uint8))
  with pytest.raises(ValueError, match=r"labels\[\(0,\)\] = 156"):
    xent_jax.check_labels(jnp.zeros((3, 100)), jnp.array([156, 1, 0], jnp.uint8))
  xent_jax.check_labels(x, jnp.array([-100, 127, 0], jnp.int8))


def test_check_labels_traced_reads_narrow_labels_exactly():
  checked = checkify.checkify(jax.jit(lambda x, y: xent_jax.check_labels(x, y)))
  err, _ = checked(jnp.zeros((3, NUM_CLASSES)), jnp.array([156, 199, 0], jnp.uint8))
  assert err.get() is None
  err, _ = checked(jnp.zeros((3, NUM_CLASSES)), jnp.array([-100, 127, 0], jnp.int8))
  assert err.get() is None
  err, _ = checked(jnp.zeros((3, 100)), jnp.array([0, 156, 0], jnp.uint8))
  assert "flat position 1 holds 156" in err.get()


# ----------------------------------------------------------------------------------------------
# Optax drop-ins: out-of-range labels under a per-logit where, empty batches, no classes.


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_drop_in_per_logit_where_gives_nan_for_out_of_range_labels(eps):
  x = _logits(4, 5)
  mask = np.random.default_rng(1).random((4, 5)) < 0.7
  mask[:, 0] = True
  labels = np.array([-1, 5, 2, 0])
  for fn in _eager_and_jit(
    lambda x, y, m: xent_jax.softmax_cross_entropy_with_integer_labels(
      x, y, where=m, label_smoothing=eps
    )
  ):
    loss = fn(x, labels, mask)
    assert np.isnan(loss[0]) and np.isnan(loss[1]), loss  # optax reads -1 as class 4
    want = ref.optax_integer_cross_entropy(x[2:], labels[2:], where=mask[2:], label_smoothing=eps)
    np.testing.assert_allclose(loss[2:], want, rtol=1e-5)


def test_drop_in_per_logit_where_row_without_classes_stays_zero():
  x = _logits(2, 5)
  mask = np.ones((2, 5), bool)
  mask[0] = False
  loss = xent_jax.softmax_cross_entropy_with_integer_labels(x, np.array([-1, 2]), where=mask)
  assert float(loss[0]) == 0.0
  np.testing.assert_allclose(
    loss[1],
    optax.losses.softmax_cross_entropy_with_integer_labels(x, np.array([-1, 2]), where=mask)[1],
    rtol=1e-6,
  )


def test_drop_in_narrow_labels_equal_int32_labels():
  x = _logits(3, NUM_CLASSES)
  for labels in (np.array([156, 199, 3], np.uint8), np.array([127, -1, 3], np.int8)):
    got = xent_jax.softmax_cross_entropy_with_integer_labels(x, jnp.asarray(labels))
    want = ref.cross_entropy(x, labels.astype(np.int64), reduction="none", ignore_index=None)
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("shape,axis", [((0, 5), -1), ((2, 0, 5), -1), ((0, 5, 3), 1)])
def test_drop_in_empty_batch_matches_optax(shape, axis):
  x = jnp.zeros(shape)
  axes = (axis,) if isinstance(axis, int) else axis
  batch = tuple(n for i, n in enumerate(shape) if i not in {a % len(shape) for a in axes})
  labels = jnp.zeros(batch, jnp.int32)
  want = optax.losses.softmax_cross_entropy_with_integer_labels(x, labels, axis=axis)
  got = xent_jax.softmax_cross_entropy_with_integer_labels(x, labels, axis=axis)
  assert got.shape == want.shape == batch
  got = xent_jax.softmax_cross_entropy(x, jnp.zeros(shape), axis=axis)
  assert got.shape == optax.losses.softmax_cross_entropy(x, jnp.zeros(shape), axis=axis).shape
  assert xent_jax.smooth_labels(jnp.zeros((3, 0)), 0.1).shape == (3, 0)


def test_drop_in_empty_batch_with_a_tuple_axis():
  # optax itself fails here (a reshape to (0, -1)); the drop-in returns the empty batch shape.
  got = xent_jax.softmax_cross_entropy_with_integer_labels(
    jnp.zeros((0, 3, 4)), jnp.zeros((0,), jnp.int32), axis=(1, 2)
  )
  assert got.shape == (0,)


NO_CLASS_CALLS = {
  "cross_entropy": lambda x, y: xent_jax.cross_entropy(x, y),
  "cross_entropy smoothed": lambda x, y: xent_jax.cross_entropy(x, y, label_smoothing=0.1),
  "focal_loss": lambda x, y: xent_jax.softmax_focal_loss(x, y),
  "softmax_cross_entropy_with_integer_labels": lambda x, y: (
    xent_jax.softmax_cross_entropy_with_integer_labels(x, y)
  ),
  "softmax_cross_entropy": lambda x, y: xent_jax.softmax_cross_entropy(x, jnp.zeros(x.shape)),
  "poly_loss_cross_entropy": lambda x, y: xent_jax.poly_loss_cross_entropy(x, jnp.zeros(x.shape)),
  "accuracy": lambda x, y: metrics.accuracy(x, y),
  "negative_log_likelihood": lambda x, y: metrics.negative_log_likelihood(x, y),
  "expected_calibration_error": lambda x, y: metrics.expected_calibration_error(x, y),
  "classwise_calibration_error": lambda x, y: metrics.classwise_calibration_error(x, y),
  "fit_temperature": lambda x, y: metrics.fit_temperature(x, y),
}


@pytest.mark.parametrize("name", list(NO_CLASS_CALLS))
def test_logits_without_classes_raise_value_error(name):
  with pytest.raises(
    ValueError,
    match=r"`logits` must have at least one class along axis 1, "
    r"got shape \(3, 0\)",
  ):
    NO_CLASS_CALLS[name](jnp.zeros((3, 0)), jnp.zeros((3,), jnp.int32))


@pytest.mark.parametrize(
  "fused",
  [
    lambda h, w, y: xent_jax.linear_cross_entropy(h, w, y),
    lambda h, w, y: xent_jax.get_loss("focal").linear(h, w, y),
  ],
  ids=["linear_cross_entropy", "focal.linear"],
)
def test_fused_head_without_classes_raises_value_error(fused):
  """V = 0 names `weight` (it ended in a ZeroDivisionError while planning chunks)."""
  with pytest.raises(
    ValueError,
    match=r"`weight` must have at least one class along axis 0, "
    r"got shape \(0, 4\)",
  ):
    fused(jnp.ones((3, 4)), jnp.ones((0, 4)), jnp.zeros((3,), jnp.int32))


# ----------------------------------------------------------------------------------------------
# Options: strings and negative class weights are refused by name.

STRING_OPTION_CALLS = {
  "cross_entropy": (
    "label_smoothing",
    lambda v: xent_jax.cross_entropy(_logits(2, 5), jnp.array([0, 1]), label_smoothing=v),
  ),
  "linear_cross_entropy": (
    "label_smoothing",
    lambda v: xent_jax.linear_cross_entropy(
      jnp.ones((2, 3)), jnp.ones((4, 3)), jnp.array([0, 1]), label_smoothing=v
    ),
  ),
  "focal_loss": (
    "gamma",
    lambda v: xent_jax.softmax_focal_loss(_logits(2, 5), jnp.array([0, 1]), gamma=v),
  ),
  "softmax_cross_entropy_with_integer_labels": (
    "label_smoothing",
    lambda v: xent_jax.softmax_cross_entropy_with_integer_labels(
      _logits(2, 5), jnp.array([0, 1]), label_smoothing=v
    ),
  ),
  "softmax_cross_entropy": (
    "label_smoothing",
    lambda v: xent_jax.softmax_cross_entropy(
      _logits(2, 5), jnp.full((2, 5), 0.2), label_smoothing=v
    ),
  ),
  "smooth_labels": ("alpha", lambda v: xent_jax.smooth_labels(jnp.full((2, 5), 0.2), v)),
  "poly_loss_cross_entropy": (
    "epsilon",
    lambda v: xent_jax.poly_loss_cross_entropy(_logits(2, 5), jnp.full((2, 5), 0.2), epsilon=v),
  ),
}


@pytest.mark.parametrize("name", list(STRING_OPTION_CALLS))
@pytest.mark.parametrize("value", ["0.1", b"0.1", None, [0.1], True])
def test_non_numeric_options_raise_type_error_naming_them(name, value):
  option, call = STRING_OPTION_CALLS[name]
  with pytest.raises(TypeError, match=rf"`{option}` must be a real number"):
    call(value)


@pytest.mark.parametrize("value", [0.1, np.float32(0.1), jnp.float32(0.1), 0])
def test_numeric_label_smoothing_types_are_accepted(value):
  x, y = _logits(2, 5), np.array([0, 1])
  np.testing.assert_allclose(
    xent_jax.cross_entropy(x, y, label_smoothing=value),
    ref.cross_entropy(x, y, label_smoothing=float(value)),
    rtol=1e-5,
  )


NEGATIVE_WEIGHT_CALLS = {
  "cross_entropy": (
    "class_weight",
    lambda w: xent_jax.cross_entropy(_logits(2, 4), jnp.array([0, 1]), class_weight=w),
  ),
  "softmax_focal_loss": (
    "class_weight",
    lambda w: xent_jax.softmax_focal_loss(_logits(2, 4), jnp.array([0, 1]), class_weight=w),
  ),
  "linear_cross_entropy": (
    "class_weight",
    lambda w: xent_jax.linear_cross_entropy(
      jnp.ones((2, 3)), jnp.ones((4, 3)), jnp.array([0, 1]), class_weight=w
    ),
  ),
}


@pytest.mark.parametrize("name", list(NEGATIVE_WEIGHT_CALLS))
@pytest.mark.parametrize("bad", [-1.0, np.nan])
def test_negative_or_nan_class_weights_raise(name, bad):
  argument, call = NEGATIVE_WEIGHT_CALLS[name]
  w = jnp.array([1.0, 0.5, bad, 2.0])
  with pytest.raises(
    ValueError,
    match=rf"`{argument}` must hold non-negative class weights, "
    rf"got {argument}\[2\] = {bad}",
  ):
    call(w)


def test_zero_class_weights_are_fine():
  x, y = _logits(2, 4), np.array([0, 1])
  w = np.array([0.0, 1.0, 2.0, 0.0])
  np.testing.assert_allclose(
    xent_jax.cross_entropy(x, y, class_weight=w, reduction="sum"),
    ref.cross_entropy(x, y, weight=w, reduction="sum"),
    rtol=1e-5,
  )


# ----------------------------------------------------------------------------------------------
# Metrics take Python lists, like jnp functions.


def test_metrics_accept_python_lists():
  x = [[0.1, 2.0, -1.0], [1.5, 0.2, 0.3], [0.0, 0.0, 3.0]]
  y = [1, 2, 2]
  where = [True, True, False]
  x_arr, y_arr, where_arr = np.array(x, np.float32), np.array(y), np.array(where)
  for fn in (
    metrics.accuracy,
    metrics.negative_log_likelihood,
    metrics.brier_score,
    metrics.expected_calibration_error,
    metrics.maximum_calibration_error,
    metrics.adaptive_calibration_error,
    metrics.classwise_calibration_error,
    metrics.fit_temperature,
  ):
    np.testing.assert_allclose(
      fn(x, y, where=where), fn(x_arr, y_arr, where=where_arr), rtol=1e-6, err_msg=fn.__name__
    )
  assert float(metrics.accuracy(x, y)) == pytest.approx(2 / 3)
  sums = metrics.eval_sums(x, y)
  assert float(sums.count) == 3.0
  np.testing.assert_allclose(metrics.apply_temperature(x, 2.0), x_arr / 2.0, rtol=1e-7)
